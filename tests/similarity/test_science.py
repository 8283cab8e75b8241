"""Two seeds of a ReLU MLP on the digits, compared layer by layer through the Trainer.

Kornblith et al. (2019): representations of two seeds are most similar at the first layer and less so with
depth. Godfrey et al. (2022): the activation basis of a ReLU layer is privileged, so the ReLU intertwiner
similarity of two seeds is well above the same measure after a random rotation of one network's features,
while CKA and orthogonal Procrustes, blind to rotations, can't tell the two apart.
"""

import pytest
import pytorch_lightning as pl
import torch
from torch import nn

from lightning_nt.demos import DigitsDataModule
from lightning_nt.demos.digits import DigitsClassifier
from lightning_nt.similarity import RepresentationSimilarity, similarities
from tests.helpers import tiny_trainer

METRICS = ("cka", "intertwiner", "orthogonal_procrustes")


class DeepDigitsMLP(DigitsClassifier):
    """Four ReLU layers of width 32 on the flattened 8x8 digits."""

    def __init__(self, width: int = 32, depth: int = 4) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.hparams.update(optimizer="sgd", lr=0.05, momentum=0.9, weight_decay=0.0)
        layers: list[nn.Module] = [nn.Flatten()]
        for index in range(depth):
            layers += [nn.Linear(64 if index == 0 else width, width), nn.ReLU()]
        self.net = nn.Sequential(*layers, nn.Linear(width, 10))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)


def _trained(seed, callbacks=(), epochs=20):
    pl.seed_everything(seed)
    module = DeepDigitsMLP()
    tiny_trainer(max_epochs=epochs, callbacks=list(callbacks), limit_val_batches=0).fit(module, DigitsDataModule())
    return module


def _relu_outputs(module, images):
    outputs = {}
    hooks = [
        layer.register_forward_hook(lambda _, __, output, name=name: outputs.__setitem__(name, output))
        for name, layer in module.named_modules()
        if isinstance(layer, nn.ReLU)
    ]
    with torch.no_grad():
        module.eval()(images)
    for hook in hooks:
        hook.remove()
    return outputs


@pytest.mark.slow
def test_two_seeds_are_alike_up_to_permutations_and_less_so_with_depth():
    first = _trained(seed=0)
    monitor = RepresentationSimilarity(reference=first, every_n_epochs=20, metrics=METRICS)
    second = _trained(seed=1, callbacks=[monitor])
    final = monitor.history[-1]
    layers = [f"net.{2 * index + 2}" for index in range(4)]
    cka = [final[f"similarity/cka/{layer}"] for layer in layers]
    print({layer: {m: round(final[f"similarity/{m}/{layer}"], 3) for m in METRICS} for layer in layers})

    assert cka[0] > 0.8
    assert cka[0] > max(cka[1:]) + 0.03
    assert (cka[0] + cka[1]) / 2 > (cka[2] + cka[3]) / 2 + 0.05

    images = next(monitor._probe.chunks())[0][0]
    generator = torch.Generator().manual_seed(0)
    first_outputs, second_outputs = _relu_outputs(first, images), _relu_outputs(second, images)
    gaps, control_gaps = [], []
    for layer, x in first_outputs.items():
        y = second_outputs[layer].double()
        aligned = similarities(x, y, METRICS)
        assert aligned["intertwiner"] == pytest.approx(final[f"similarity/intertwiner/{layer}"], abs=1e-6)
        gaps.append(aligned["intertwiner"] - _mean_under_rotations(x, y, aligned, generator))
        turned = y @ _rotation(generator)  # control: a network whose basis is not privileged (one rotation away)
        control_gaps.append(
            similarities(x, turned, ("intertwiner",))["intertwiner"]
            - _mean_under_rotations(x, turned, aligned, generator)
        )
    print("intertwiner minus its mean under 16 random rotations, per layer:", [round(gap, 3) for gap in gaps])
    print("the same for a rotated network (control):", [round(gap, 3) for gap in control_gaps])
    assert min(gaps) > 0.01
    assert sum(gaps) / len(gaps) > 0.035
    assert abs(sum(control_gaps) / len(control_gaps)) < 0.02


def _rotation(generator, size=32):
    return torch.linalg.qr(torch.randn(size, size, generator=generator, dtype=torch.float64))[0]


def _mean_under_rotations(x, y, aligned, generator, count=16):
    """The intertwiner similarity of ``x`` and ``y`` rotated, averaged; CKA and Procrustes don't move."""
    values = []
    for _ in range(count):
        turned = similarities(x, y @ _rotation(generator), METRICS)
        assert turned["cka"] == pytest.approx(aligned["cka"], abs=1e-9)
        assert turned["orthogonal_procrustes"] == pytest.approx(aligned["orthogonal_procrustes"], abs=1e-9)
        values.append(turned["intertwiner"])
    return sum(values) / count
