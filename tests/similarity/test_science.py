"""Two seeds of a ReLU MLP on the digits, compared layer by layer through the Trainer.

Kornblith et al. (2019): representations of two seeds are most similar at the first layer and less so with
depth. Godfrey et al. (2022): the activation basis of a ReLU layer is privileged, so the ReLU intertwiner
similarity of two seeds is above the same measure after a random rotation of one network's features (the null:
its mean and spread over 64 rotations; z = the gap over that spread), while CKA and orthogonal Procrustes, blind
to rotations, can't tell the two apart. A network rotated once (a basis that is not privileged) is the control.
"""

import statistics

import pytest
import pytorch_lightning as pl
import torch
from torch import nn

from lightning_nt.demos import DigitsDataModule
from lightning_nt.demos.digits import DigitsClassifier
from lightning_nt.similarity import PreparedFeatures, RepresentationSimilarity, similarities
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
    scores, control_scores = [], []
    for layer, x in first_outputs.items():
        y = second_outputs[layer].double()
        aligned = similarities(x, y, METRICS)
        assert aligned["intertwiner"] == pytest.approx(final[f"similarity/intertwiner/{layer}"], abs=1e-6)
        scores.append(_against_rotations(x, y, aligned, generator))
        turned = y @ _rotation(generator)  # control: a network whose basis is not privileged (one rotation away)
        control = similarities(x, turned, METRICS)
        control_scores.append(_against_rotations(x, turned, control, generator))
    print("per layer: intertwiner minus its mean under 64 random rotations, z (that over their standard deviation):")
    print("  seeds:  ", [(round(gap, 3), round(z, 1)) for gap, z in scores])
    print("  control:", [(round(gap, 3), round(z, 1)) for gap, z in control_scores])
    z_scores, control_z = [z for _, z in scores], [z for _, z in control_scores]
    assert z_scores[0] > 4  # the first layer: far outside what rotations give
    # not every layer: with AVX-512 kernels the same seeds train to slightly different networks, and the second
    # layer's z is 0.6 there (2.0 with AVX2); the claim is the first layer's and the mean over layers
    assert sum(z_scores) / len(z_scores) > 2.5
    assert abs(sum(control_z) / len(control_z)) < 1  # a rotated network: inside its null
    assert sum(z_scores) / len(z_scores) > sum(control_z) / len(control_z) + 2


def _rotation(generator, size=32):
    return torch.linalg.qr(torch.randn(size, size, generator=generator, dtype=torch.float64))[0]


def _against_rotations(x, y, aligned, generator, count=64):
    """The intertwiner similarity of ``x`` and ``y`` against its null, the same for ``y`` under ``count`` random
    rotations: ``(gap, z)``, the value minus the null's mean and that over the null's standard deviation. CKA and
    Procrustes don't move under the rotations."""
    reference, values = PreparedFeatures(x), []
    for _ in range(count):
        turned = similarities(reference, y @ _rotation(generator), METRICS)
        assert turned["cka"] == pytest.approx(aligned["cka"], abs=1e-9)
        assert turned["orthogonal_procrustes"] == pytest.approx(aligned["orthogonal_procrustes"], abs=1e-9)
        values.append(turned["intertwiner"])
    gap = aligned["intertwiner"] - statistics.mean(values)
    return gap, gap / statistics.stdev(values)
