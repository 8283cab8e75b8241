"""DPStrategy(grad_sample_mode="bk"): the single-backward engine inside a real fit, against the vmap(grad) reference."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from lightning_nt import DPStrategy
from lightning_nt.privacy import AugmentedViews
from lightning_nt.privacy.engines.ghost import _GhostDPOptimizer
from tests.helpers import classification_data
from tests.helpers.third_party import Conv1D, LayerNorm2d
from tests.privacy.test_strategy import PerExample, Plain, RecordUpdate, _clipped_sum, _fit


@pytest.mark.parametrize(
    ("accelerator", "precision"),
    [
        ("cpu", "32-true"),
        pytest.param("gpu", "32-true", marks=pytest.mark.cuda),
        pytest.param("gpu", "bf16-mixed", marks=pytest.mark.cuda),  # norms and clip factors in fp32
    ],
)
def test_noiseless_update_equals_the_clipped_sum(accelerator, precision):
    record = RecordUpdate()
    strategy = DPStrategy(noise_multiplier=0.0, max_grad_norm=0.5, grad_sample_mode="bk")
    with pytest.warns(UserWarning, match="noise_multiplier=0"):
        module, _ = _fit(strategy, callbacks=[record], max_steps=1, accelerator=accelerator, precision=precision)
    before = {name: weight.cpu() for name, weight in record.before.items()}
    expected = _clipped_sum(module.cpu(), before, [t.cpu() for t in record.batch], 0.5)
    tolerance = {"rtol": 1e-5, "atol": 1e-6} if precision == "32-true" else {"rtol": 0.1, "atol": 2e-3}
    for name, update in record.update.items():
        torch.testing.assert_close(update.cpu(), -expected[name] / 16.0, **tolerance)
    assert all(p.requires_grad for p in module.parameters())  # handed back after the backward


@pytest.mark.parametrize("mode", ["bk", "ghost"])
def test_the_clipped_sum_reaches_the_noise_without_a_copy(mode, monkeypatch):
    """Opacus's optimizer deep-copied every parameter's clipped sum each step (a slow Python copy a parameter: on a
    WRN-16-1, the largest host cost of a bk step). The update stays the clipped sum (the test above)."""
    copies = []
    deepcopy = copy.deepcopy
    monkeypatch.setattr(copy, "deepcopy", lambda value, *rest: copies.append(type(value)) or deepcopy(value, *rest))
    strategy = DPStrategy(noise_multiplier=1.0, max_grad_norm=0.5, grad_sample_mode=mode)
    _, trainer = _fit(strategy, module=PerExample if mode == "ghost" else Plain, max_steps=3)
    assert trainer.global_step == 3 and torch.Tensor not in copies and nn.Parameter not in copies


def test_a_second_noisy_step_without_clearing_is_refused_as_opacus_refuses_it():
    """Found by review: the copy-free `accumulate` built a new tensor for a sum already there, which dropped the mark
    Opacus's noise step leaves on it, so a step not cleared would release the previous step's clipped sum again."""
    layer = nn.Linear(2, 1, bias=False)
    optimizer = _GhostDPOptimizer(
        torch.optim.SGD(layer.parameters(), lr=1.0),
        noise_multiplier=0.0,
        max_grad_norm=1.0,
        expected_batch_size=1,
        loss_reduction="sum",
    )
    layer.weight.grad = torch.tensor([[1.0, 0.0]])
    optimizer.pre_step()
    torch.testing.assert_close(layer.weight.grad, torch.tensor([[1.0, 0.0]]))
    layer.weight.grad = torch.tensor([[0.0, 1.0]])  # the next clipped sum, with no zero_grad in between
    with pytest.raises(ValueError, match="zero_grad"):
        optimizer.pre_step()


def test_virtual_steps_give_the_update_of_the_whole_logical_batch():
    record = RecordUpdate(at=2)
    strategy = DPStrategy(noise_multiplier=0.0, max_grad_norm=0.5, max_physical_batch_size=5, grad_sample_mode="bk")
    module, _ = _fit(strategy, module=lambda: Plain(num_samples=64, batch_size=16), callbacks=[record], max_steps=3)
    assert len(record.batch[0]) > 5
    expected = _clipped_sum(module, record.before, record.batch, 0.5)
    for name, update in record.update.items():
        torch.testing.assert_close(update, -expected[name] / 16.0, rtol=1e-5, atol=1e-6)


def test_runs_through_empty_batches_and_bf16_mixed():
    strategy = DPStrategy(grad_sample_mode="bk")
    _, trainer = _fit(strategy, module=lambda: Plain(num_samples=64, batch_size=1), max_epochs=1)
    assert trainer.global_step == 64
    _, trainer = _fit(DPStrategy(grad_sample_mode="bk"), max_steps=2, precision="bf16-mixed")
    assert trainer.global_step == 2


def test_under_bf16_mixed_the_update_is_the_fp32_clipped_sum():
    """bf16-mixed on the CPU: the backward runs in bf16, the norms, clip factors and sums in fp32, so the update is the
    float32 reference's clipped sum up to the bf16 rounding of the forward and backward passes (measured: at most
    4.7e-3 of each tensor's largest entry; asserted: 2e-2)."""
    record = RecordUpdate()
    strategy = DPStrategy(noise_multiplier=0.0, max_grad_norm=0.5, grad_sample_mode="bk")
    with pytest.warns(UserWarning, match="noise_multiplier=0"):
        module, _ = _fit(strategy, callbacks=[record], max_steps=1, precision="bf16-mixed")
    expected = _clipped_sum(module, record.before, record.batch, 0.5)
    for name, update in record.update.items():
        scale = float(expected[name].abs().max()) / 16.0
        torch.testing.assert_close(update, -expected[name] / 16.0, rtol=0.0, atol=2e-2 * scale, msg=name)


@pytest.mark.parametrize("physical", [4, 5])
def test_augmentation_multiplicity_with_virtual_steps(physical):
    """K = 3 views of each example, 4 or 5 physical rows at a time (a group never split: 12 or 15 views): each
    example's gradient is the mean of its views' before clipping, as in hooks mode."""

    class Augmented(Plain):
        def train_dataloader(self):
            views = AugmentedViews(classification_data(64), lambda x: x + 0.5 * torch.randn_like(x), multiplicity=3)
            return DataLoader(views, batch_size=16)

    record = RecordUpdate()
    strategy = DPStrategy(
        noise_multiplier=0.0,
        max_grad_norm=0.5,
        augmentation_multiplicity=3,
        max_physical_batch_size=physical,
        grad_sample_mode="bk",
    )
    module, _ = _fit(strategy, module=lambda: Augmented(num_samples=64, batch_size=16), callbacks=[record], max_steps=1)
    inputs, labels = record.batch
    assert inputs.shape[1:] == (3, 8) and not torch.equal(inputs[:, 0], inputs[:, 1])
    expected = _clipped_sum(module, record.before, (inputs.flatten(0, 1), labels.flatten(0, 1)), 0.5, views=3)
    for name, update in record.update.items():
        torch.testing.assert_close(update, -expected[name] / 16.0, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["bk", "hooks", "ghost"])
def test_an_input_gradient_penalty_is_refused_by_name(mode):
    """Double backprop in ``training_step`` (``torch.autograd.grad(..., create_graph=True)``) runs a backward pass
    through the layers before the loss's own: every engine failed with an ``IndexError``. (Opacus's ghost clipping
    takes the per-example losses.)"""

    class Penalised(Plain):
        def training_step(self, batch, batch_idx):
            inputs, labels = batch
            inputs = inputs.clone().requires_grad_(True)
            losses = F.cross_entropy(self(inputs), labels, reduction="none")
            (input_gradient,) = torch.autograd.grad(losses.sum(), inputs, create_graph=True)
            penalised = losses + input_gradient.square().sum(1)
            return penalised if mode == "ghost" else penalised.mean()

    with pytest.raises(RuntimeError, match=r"received an output gradient a second time in one step"):
        _fit(DPStrategy(grad_sample_mode=mode), module=lambda: Penalised(num_samples=64, batch_size=16), max_steps=1)


def test_an_unsupported_layer_is_refused_before_the_first_step():
    class Scaled(Plain):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.scale = torch.nn.Parameter(torch.ones(()))

        def forward(self, inputs):
            return super().forward(inputs) * self.scale

    with pytest.raises(RuntimeError, match=r"grad_sample_mode='bk' can't clip this module.*hooks"):
        _fit(DPStrategy(grad_sample_mode="bk"), module=lambda: Scaled(num_samples=64, batch_size=16), max_steps=1)


def test_auto_clips_by_book_keeping_where_it_can():
    record = RecordUpdate()
    strategy = DPStrategy(noise_multiplier=0.0, max_grad_norm=0.5, grad_sample_mode="auto")
    with pytest.warns(UserWarning, match="noise_multiplier=0"):
        module, _ = _fit(strategy, callbacks=[record], max_steps=1)
    assert strategy.clipping_mode == "bk"
    expected = _clipped_sum(module, record.before, record.batch, 0.5)
    for name, update in record.update.items():
        torch.testing.assert_close(update, -expected[name] / 16.0, rtol=1e-5, atol=1e-6)


class Decoder(Plain):
    """Plain's data decoded by the layers users' generators and transformers have: HuggingFace's ``Conv1D``,
    transposed convolutions, ``PReLU`` and torchvision's ``LayerNorm2d`` (the last two by their qualified names)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.net = nn.Sequential(
            Conv1D(12, self.dim),
            nn.Unflatten(1, (3, 4)),
            nn.ConvTranspose1d(3, 4, 3, stride=2, output_padding=1),  # [B, 4, 10]
            nn.PReLU(4),
            nn.Unflatten(2, (2, 5)),
            nn.ConvTranspose2d(4, 4, 2, stride=2, groups=2),  # [B, 4, 4, 10]
            LayerNorm2d(4),
            nn.Tanh(),
            nn.Flatten(),
            nn.Linear(4 * 4 * 10, self.classes),
        )
        nn.init.normal_(self.net[0].weight)  # GPT-2's std 0.02 would leave the examples' gradients almost equal


@pytest.mark.parametrize(
    ("accelerator", "precision", "tolerance"),
    [
        ("cpu", "32-true", 1e-5),
        pytest.param("gpu", "32-true", 1e-2, marks=pytest.mark.cuda),  # cuDNN convolutions may run in TF32
        pytest.param("gpu", "bf16-mixed", 0.1, marks=pytest.mark.cuda),  # norms and clip factors in fp32
    ],
)
def test_auto_clips_transposed_convolutions_prelu_and_third_party_layers_by_book_keeping(
    accelerator, precision, tolerance
):
    """A real fit: ``"auto"`` picks book-keeping for them, and the update is the clipped sum (to ``tolerance`` of each
    tensor's largest entry, against a float64 reference on the CPU)."""
    record = RecordUpdate()
    strategy = DPStrategy(noise_multiplier=0.0, max_grad_norm=8.5, grad_sample_mode="auto")
    with pytest.warns(UserWarning, match="noise_multiplier=0"):
        module, _ = _fit(
            strategy,
            module=lambda: Decoder(num_samples=64, batch_size=16),
            callbacks=[record],
            max_steps=1,
            accelerator=accelerator,
            precision=precision,
        )
    assert strategy.clipping_mode == "bk"
    before = {name: weight.cpu().double() for name, weight in record.before.items()}
    inputs, labels = (t.cpu() for t in record.batch)
    expected = _clipped_sum(module.cpu().double(), before, [inputs.double(), labels], 8.5)  # about half clipped
    for name, update in record.update.items():
        scale = float(expected[name].abs().max()) / 16.0
        torch.testing.assert_close(
            update.cpu().double(), -expected[name] / 16.0, rtol=0.0, atol=tolerance * scale, msg=name
        )


@pytest.mark.parametrize("options", [{}, {"sensitivity_probe": True}])
def test_auto_falls_back_to_hooks_where_book_keeping_cant_clip(options):
    class Scaled(Plain):  # a bare parameter: no book-keeping rule
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.scale = torch.nn.Parameter(torch.ones(()))

        def forward(self, inputs):
            return super().forward(inputs) * self.scale

    module = (lambda: Scaled(num_samples=64, batch_size=16)) if not options else None
    strategy = DPStrategy(grad_sample_mode="auto", **options)
    _, trainer = _fit(strategy, module=module, max_steps=2)
    assert strategy.clipping_mode == "hooks" and trainer.global_step == 2
