import copy
import dataclasses
import math
import warnings

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.utils.data import DataLoader

from lightning_nt.common.validation import ArgumentError
from lightning_nt.stats import GradientSignalTest, cross_mean_test, directional_derivatives, per_example_losses
from lightning_nt.stats.gradient import double_backward_jvp
from tests.helpers import (
    ManualOptimizationModule,
    TinyClassifier,
    TinyTransformer,
    assert_same_training,
    classification_data,
    read_tensorboard_scalars,
    read_tensorboard_tags,
    seeded_fit,
    tiny_trainer,
)
from tests.sharpness.models import BagOfSigns

TAGS = ("gradtest/statistic", "gradtest/p_value", "gradtest/reject", "gradtest/signal")


def _cross_entropy_per_example(module, batch):
    return F.cross_entropy(module(batch[0]), batch[1], reduction="none")


def test_jvp_directional_derivatives_equal_explicit_vmap_grad_per_example_gradients():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 4)).double()
    inputs, labels = torch.randn(20, 6, dtype=torch.float64), torch.randint(4, (20,))
    parameters = list(net.named_parameters())
    direction = [torch.randn_like(p) for _, p in parameters]

    def example_loss(weights, x, y):
        return F.cross_entropy(functional_call(net, weights, (x[None],)), y[None])

    gradients = vmap(grad(example_loss), in_dims=(None, 0, 0))(dict(parameters), inputs, labels)
    explicit = sum((gradients[name] * v).flatten(1).sum(1) for (name, _), v in zip(parameters, direction))
    losses, derivatives = directional_derivatives(
        net, _cross_entropy_per_example, (inputs, labels), parameters, direction
    )
    torch.testing.assert_close(derivatives, explicit, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(losses, F.cross_entropy(net(inputs), labels, reduction="none"))

    def scalar_loss(module, batch):  # a mean loss: per-example values come from one-example batches under vmap
        return per_example_losses(lambda b: F.cross_entropy(module(b[0]), b[1]), batch)

    _, from_means = directional_derivatives(net, scalar_loss, (inputs, labels), parameters, direction)
    torch.testing.assert_close(from_means, explicit, rtol=1e-6, atol=1e-6)


class ExplicitGradients(pl.Callback):
    """Independent reference: per-example gradients one backward at a time on the same (eval-mode) examples."""

    def __init__(self, examples):
        self.examples, self.results = examples, {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        inputs, labels = self.examples
        pl_module.eval()
        rows = []
        for x, y in zip(inputs, labels):
            loss = F.cross_entropy(pl_module(x[None]), y[None])
            rows.append(torch.cat([g.flatten() for g in torch.autograd.grad(loss, list(pl_module.parameters()))]))
        pl_module.train()
        self.results[trainer.global_step] = cross_mean_test(torch.stack(rows).double(), seed=0)


def test_the_callback_is_the_cross_mean_test_of_the_per_example_gradients(tmp_path):
    reference = ExplicitGradients(classification_data(32, 8, 3, seed=1).tensors)  # the module's validation set
    monitor = GradientSignalTest(every_n_steps=3, num_examples=32)
    _, trainer = seeded_fit([monitor, reference], root=tmp_path)
    assert [entry["step"] for entry in monitor.history] == [0, 3, 6]
    for entry in monitor.history[1:]:
        exact = reference.results[entry["step"]]
        assert entry["gradtest/statistic"] == pytest.approx(exact.statistic, rel=1e-5)
        assert entry["gradtest/signal"] == pytest.approx(exact.estimate, rel=1e-5)
        assert entry["gradtest/p_value"] == pytest.approx(exact.p_value, rel=1e-4, abs=1e-12)
        assert entry["gradtest/reject"] == float(exact.p_value <= 0.05)
    scalars = read_tensorboard_scalars(tmp_path)
    for tag in TAGS:
        assert [step for step, _ in scalars[tag]] == [0, 3, 6]
        assert trainer.callback_metrics[tag] == pytest.approx(monitor.history[-1][tag], rel=1e-6)
    assert "gradtest/signal_test" in read_tensorboard_tags(tmp_path)["images"]


def test_per_example_loss_fn_mean_loss_fn_and_training_step_give_the_same_test():
    def mean_loss(module, batch):
        return F.cross_entropy(module(batch[0]), batch[1])

    histories = []
    for loss_fn in (None, _cross_entropy_per_example, mean_loss):
        monitor = GradientSignalTest(every_n_steps=2, num_examples=24, data="train", loss_fn=loss_fn)
        seeded_fit([monitor], max_epochs=1)
        histories.append(monitor.history)
    for other in histories[1:]:
        for a, b in zip(histories[0], other):
            for tag in TAGS:
                assert a[tag] == pytest.approx(b[tag], rel=1e-5), tag


def test_a_loss_fn_returning_a_mean_runs_on_a_whole_batch_only_once():
    """Its first call shows it gives no per-example vector; later measurements go straight to one-example batches."""
    whole_batches = []

    def mean_loss(module, batch):
        if batch[0].ndim == 2 and len(batch[0]) > 1:
            whole_batches.append(len(batch[0]))
        return F.cross_entropy(module(batch[0]), batch[1])

    monitor = GradientSignalTest(every_n_steps=2, num_examples=24, data="train", loss_fn=mean_loss)
    seeded_fit([monitor], max_epochs=1)
    assert len(monitor.history) > 1 and len(whole_batches) == 1


def test_a_run_with_the_test_is_bitwise_the_run_without():
    def module():
        return TinyClassifier(num_samples=96, norm="batch")

    plain, plain_trainer = seeded_fit([], module=module, max_epochs=2)
    monitor = GradientSignalTest(every_n_steps=2, num_examples=32)
    watched, trainer = seeded_fit([monitor], module=module, max_epochs=2)
    assert len(monitor.history) == 7
    assert_same_training(watched, trainer, plain, plain_trainer)
    assert float(plain_trainer.callback_metrics["train_acc"]) == float(trainer.callback_metrics["train_acc"])


@dataclasses.dataclass
class Example:
    inputs: Tensor
    labels: Tensor


class StructuredBatches(TinyClassifier):
    """Batches as a dict ({"x", "y"}) or a dataclass; training_step reads them by name."""

    def __init__(self, kind, **kwargs):
        super().__init__(**kwargs)
        self.kind = kind

    def _wrap(self, dataset):
        inputs, labels = dataset.tensors
        rows = list(zip(inputs, labels))
        if self.kind == "dict":
            return [{"x": x, "y": y} for x, y in rows]
        return [Example(x, y) for x, y in rows]

    def _unwrap(self, batch):
        return (batch["x"], batch["y"]) if self.kind == "dict" else (batch.inputs, batch.labels)

    def training_step(self, batch, batch_idx):
        return super().training_step(self._unwrap(batch), batch_idx)

    def validation_step(self, batch, batch_idx):
        return super().validation_step(self._unwrap(batch), batch_idx)

    def train_dataloader(self):
        data = self._wrap(classification_data(self.num_samples, self.dim, self.classes))
        return DataLoader(data, batch_size=16, shuffle=True, collate_fn=self._collate)

    def val_dataloader(self):
        data = self._wrap(classification_data(32, self.dim, self.classes, seed=1))
        return DataLoader(data, batch_size=32, collate_fn=self._collate)

    def _collate(self, rows):
        if self.kind == "dict":
            return {"x": torch.stack([r["x"] for r in rows]), "y": torch.stack([r["y"] for r in rows])}
        return Example(torch.stack([r.inputs for r in rows]), torch.stack([r.labels for r in rows]))


@pytest.mark.parametrize("kind", ["dict", "dataclass"])
def test_dict_and_dataclass_batches_give_the_tuple_batch_numbers(kind):
    reference = GradientSignalTest(every_n_steps=3, num_examples=32)
    seeded_fit([reference])
    monitor = GradientSignalTest(every_n_steps=3, num_examples=32)
    seeded_fit([monitor], module=lambda: StructuredBatches(kind, num_samples=96))
    assert len(monitor.history) == len(reference.history) == 3
    for a, b in zip(monitor.history, reference.history):
        for tag in TAGS:
            assert a[tag] == pytest.approx(b[tag], rel=1e-5)


def test_no_gradient_at_all_is_logged_as_no_evidence_not_skipped():
    """Found by audit: every f_i zero (a loss that does not depend on the weights, dead ReLUs) was skipped as "not
    finite", so the clearest "no signal" case left no tag; it is logged with the core's limit, T = 0 and p = 1."""

    def loss_fn(module, batch):
        return _cross_entropy_per_example(module, batch) * 0.0

    monitor = GradientSignalTest(every_n_steps=2, num_examples=32, loss_fn=loss_fn)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        seeded_fit([monitor])
    assert [entry["step"] for entry in monitor.history] == [0, 2, 4, 6]  # at the end of the fit too
    assert all(
        (entry["gradtest/statistic"], entry["gradtest/p_value"], entry["gradtest/reject"], entry["gradtest/signal"])
        == (0.0, 1.0, 0.0, 0.0)
        for entry in monitor.history
    )
    assert sum("no spread" in str(w.message) for w in caught) == 1


def test_a_small_probe_is_warned_about_once_a_large_one_not():
    """Found by audit: N(0, 1) p-values are anti-conservative at small n1 (Student's t_15 puts 0.060 above 1.645)."""
    for num_examples, warned in ((32, 1), (128, 0)):
        monitor = GradientSignalTest(every_n_steps=2, num_examples=num_examples, data="train")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            seeded_fit([monitor], module=lambda: TinyClassifier(num_samples=128))
        assert sum("anti-conservative" in str(w.message) for w in caught) == warned, num_examples


def test_non_finite_measurements_are_skipped_with_one_warning():
    def loss_fn(module, batch):
        return _cross_entropy_per_example(module, batch) * float("nan")

    monitor = GradientSignalTest(every_n_steps=2, num_examples=32, loss_fn=loss_fn)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, trainer = seeded_fit([monitor])
    assert monitor.history == []
    assert sum("not finite" in str(w.message) for w in caught) == 1
    assert trainer.global_step == 6


def test_validation_data_is_required_for_data_val():
    class NoValidation(TinyClassifier):
        val_dataloader = None
        validation_step = None

    with pytest.raises(ValueError, match=r"`data='val'`.*val_dataloader.*data='train'"):  # as RepresentationSimilarity
        seeded_fit([GradientSignalTest(num_examples=16)], module=lambda: NoValidation(num_samples=48))
    monitor = GradientSignalTest(num_examples=16, data="train", every_n_steps=1)
    seeded_fit([monitor], module=lambda: NoValidation(num_samples=48))
    assert [entry["step"] for entry in monitor.history] == [0, 1, 2, 3]


def test_a_resumed_run_equals_an_uninterrupted_one(tmp_path):
    def module():
        return TinyClassifier(num_samples=96, shuffle=False)

    uninterrupted = GradientSignalTest(every_n_steps=4, num_examples=32)
    seeded_fit([uninterrupted], module=module, max_epochs=2)
    first = GradientSignalTest(every_n_steps=4, num_examples=32)
    _, trainer = seeded_fit([first], module=module, max_epochs=1)
    trainer.save_checkpoint(tmp_path / "epoch1.ckpt")
    resumed = GradientSignalTest(every_n_steps=4, num_examples=32)
    pl.seed_everything(0)
    tiny_trainer(None, callbacks=[resumed], max_epochs=2).fit(module(), ckpt_path=tmp_path / "epoch1.ckpt")
    assert [entry["step"] for entry in resumed.history] == [0, 4, 8, 12]
    assert resumed.history == uninterrupted.history


def test_checkpoint_keeps_the_history_and_the_key_names_every_setting():
    monitor = GradientSignalTest(every_n_steps=3, num_examples=32)
    seeded_fit([monitor])
    restored = GradientSignalTest(every_n_steps=3, num_examples=32)
    restored.load_state_dict(monitor.state_dict())
    assert restored.history == monitor.history and len(restored.history) == 3
    keys = {
        GradientSignalTest(**kwargs).state_key
        for kwargs in ({}, {"every_n_steps": 5}, {"num_examples": 64}, {"data": "train"}, {"alpha": 0.01}, {"seed": 1})
    }
    assert len(keys) == 6


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"every_n_steps": 0}, "every_n_steps"),
        ({"every_n_steps": 2.0}, "every_n_steps"),
        ({"num_examples": 3}, "num_examples"),
        ({"num_examples": True}, "num_examples"),
        ({"num_samples": 3}, "num_samples"),  # the deprecated name
        ({"num_samples": True}, "num_samples"),
        ({"data": "test"}, "data"),
        ({"alpha": 0.0}, "alpha"),
        ({"alpha": 1.0}, "alpha"),
        ({"alpha": math.nan}, "alpha"),
        ({"loss_fn": "cross_entropy"}, "loss_fn"),
        ({"seed": 1.5}, "seed"),
    ],
)
def test_bad_arguments_are_named(kwargs, argument):
    with pytest.raises(ArgumentError, match=f"`{argument}`"):
        GradientSignalTest(**kwargs)


def test_the_two_reverse_pass_fallback_equals_forward_mode():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    inputs, labels = torch.randn(10, 4, dtype=torch.float64), torch.randint(3, (10,))
    names = [name for name, _ in net.named_parameters()]
    primals = tuple(p.detach() for p in net.parameters())
    tangents = tuple(torch.randn_like(p) for p in primals)

    def losses(*values):
        output = functional_call(net, dict(zip(names, values)), (inputs,))
        return F.cross_entropy(output, labels, reduction="none")

    values, derivatives = double_backward_jvp(losses, primals, tangents)
    expected_values, expected = torch.func.jvp(losses, primals, tangents)
    torch.testing.assert_close(derivatives, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(values, expected_values)


def test_attention_models_use_kernels_that_forward_mode_can_differentiate():
    module = TinyTransformer()
    initial = copy.deepcopy(module).eval()
    monitor = GradientSignalTest(every_n_steps=2, num_examples=16, data="train")
    seeded_fit([monitor], module=lambda: module, max_steps=2)
    tokens, targets = module.train_dataloader().dataset.tensors
    rows = []
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        for x, y in zip(tokens[:16], targets[:16]):
            loss = initial.training_step((x[None], y[None]), 0)
            rows.append(torch.cat([g.flatten() for g in torch.autograd.grad(loss, list(initial.parameters()))]))
    exact = cross_mean_test(torch.stack(rows).double(), seed=0)
    assert torch.backends.mha.get_fastpath_enabled()  # restored
    assert monitor.history[0]["gradtest/statistic"] == pytest.approx(exact.statistic, rel=1e-4)


def test_manual_optimization_needs_a_loss_fn_and_works_with_one():
    with pytest.raises(RuntimeError, match="loss_fn"):
        seeded_fit([GradientSignalTest(num_examples=16)], module=lambda: ManualOptimizationModule(num_samples=48))
    monitor = GradientSignalTest(num_examples=16, every_n_steps=1, loss_fn=_cross_entropy_per_example)
    seeded_fit([monitor], module=lambda: ManualOptimizationModule(num_samples=48))
    assert [entry["step"] for entry in monitor.history] == [0, 1, 2, 3]


def test_too_few_examples_are_refused_before_training():
    class ThreeValidationExamples(TinyClassifier):
        def val_dataloader(self):
            return DataLoader(classification_data(3, self.dim, self.classes, seed=1), batch_size=3)

    with pytest.raises(ValueError, match="at least 4 examples"):
        seeded_fit([GradientSignalTest(num_examples=16)], module=lambda: ThreeValidationExamples(num_samples=48))


def test_a_layer_without_second_derivatives_is_refused_before_the_first_step_naming_the_replacement():
    # no forward-mode AD for nn.EmbeddingBag, and its double-backward fallback has no derivative either
    trainer = tiny_trainer(max_steps=2, callbacks=[GradientSignalTest(every_n_steps=1, num_examples=16, data="train")])
    with pytest.raises(NotImplementedError, match=r"differentiates the model twice.*nn\.Embedding followed by"):
        trainer.fit(BagOfSigns())
    assert trainer.global_step == 0


class Checkpointed(TinyClassifier):
    """The same function as ``TinyClassifier``, its hidden layer under activation checkpointing."""

    def forward(self, inputs):
        return self.net[3](torch.utils.checkpoint.checkpoint(self.net[:3], inputs, use_reentrant=False))


def test_activation_checkpointing_with_per_example_losses_gives_the_test_of_the_same_function():
    # the fix the refusal below names: with loss_fn giving [B] losses no vmap is needed, and the JVP goes through
    histories = []
    for module in (TinyClassifier, Checkpointed):
        monitor = GradientSignalTest(every_n_steps=2, num_examples=32, data="train", loss_fn=_cross_entropy_per_example)
        seeded_fit([monitor], module=lambda module=module: module(num_samples=64), max_steps=4)
        histories.append(monitor.history)
    expected, actual = histories
    assert [entry["step"] for entry in actual] == [entry["step"] for entry in expected] == [0, 2, 4]
    for got, want in zip(actual, expected):
        assert got == pytest.approx(want, rel=1e-4, abs=1e-6)


def test_activation_checkpointing_under_a_vmapped_loss_is_refused_before_the_first_step_naming_loss_fn():
    # the vmapped forward runs, but the checkpoint's recomputation in the backward pass escapes vmap
    trainer = tiny_trainer(max_steps=2, callbacks=[GradientSignalTest(every_n_steps=2, num_examples=16, data="train")])
    with pytest.raises(RuntimeError, match=r"torch.func.vmap .* Pass `loss_fn\(pl_module, batch\)`"):
        trainer.fit(Checkpointed(num_samples=64))
    assert trainer.global_step == 0


class SqueezedBinary(pl.LightningModule):
    """A binary classifier whose training_step squeezes its ``[B, 1]`` logits: fine for every batch but one of one."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(5, 1)
        inputs = torch.randn(64, 5, generator=torch.Generator().manual_seed(0))
        self.data = torch.utils.data.TensorDataset(inputs, (inputs[:, 0] > 0).float())

    def training_step(self, batch, batch_idx):
        inputs, labels = batch
        return F.binary_cross_entropy_with_logits(self.linear(inputs).squeeze(), labels)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return DataLoader(self.data, batch_size=16)


def _binary_per_example(module, batch):
    return F.binary_cross_entropy_with_logits(module.linear(batch[0])[:, 0], batch[1], reduction="none")


def test_a_training_step_that_fails_on_one_example_is_refused_before_the_first_step_naming_loss_fn():
    trainer = tiny_trainer(max_steps=2, callbacks=[GradientSignalTest(every_n_steps=1, num_examples=32, data="train")])
    with pytest.raises(RuntimeError, match=r"one-example batches.*Target size.*Pass `loss_fn\(pl_module, batch\)`"):
        trainer.fit(SqueezedBinary())
    assert trainer.global_step == 0
    monitor = GradientSignalTest(every_n_steps=1, num_examples=32, data="train", loss_fn=_binary_per_example)
    seeded_fit([monitor], module=SqueezedBinary, max_steps=2)
    assert [entry["step"] for entry in monitor.history] == [0, 1, 2]


def test_more_examples_asked_than_the_data_hold_are_warned_once():
    monitor = GradientSignalTest(every_n_steps=3, num_examples=512)
    with pytest.warns(UserWarning, match=r"num_examples=512\): the val data hold only 32 examples") as caught:
        seeded_fit([monitor])
    assert sum("hold only" in str(w.message) for w in caught) == 1 and len(monitor.history) == 3
