"""LazinessMonitor through the Trainer: values against independent computations, no trace, batches, resume, faults."""

import copy
import math
import sys
import warnings

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import BackboneFinetuning, ModelCheckpoint

from lightning_nt.common.compiled import renamed_state_dict, uncompiled_name
from lightning_nt.laziness import LazinessMonitor, empirical_ntk, relative_distance
from tests.helpers import (
    BoringModel,
    TinyClassifier,
    assert_same_training,
    read_tensorboard_scalars,
    read_tensorboard_tags,
    seeded_fit,
    tiny_trainer,
)
from tests.laziness.models import PlainClassifier, ReLUClassifier, inputs_of, labels_of
from tests.laziness.test_core import _numpy_alignment, _reference_ntk


def _fit(callbacks, module=ReLUClassifier, **kwargs):
    return seeded_fit(callbacks, module, **kwargs)


class Reference(pl.Callback):
    """Independent: the first examples of the unshuffled data, brute-force signs, autograd Jacobians, NumPy."""

    def __init__(self, num_samples, every_n_steps):
        self.num_samples, self.every_n_steps, self.values = num_samples, every_n_steps, {}

    def on_train_start(self, trainer, pl_module):
        data = pl_module.train_dataloader().dataset.data.tensors
        self.inputs, self.labels = data[0][: self.num_samples], data[1][: self.num_samples]
        self.initial = [p.detach().clone().double() for p in pl_module.parameters()]
        self.signs0, self.kernel0 = self._signs(pl_module), self._kernel(pl_module)
        self._record(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step % self.every_n_steps == 0:
            self._record(trainer, pl_module)

    def _signs(self, net):
        with torch.no_grad():
            first = net.net[0](self.inputs) > 0
            second = net.net[4](torch.relu(net.net[0](self.inputs))) > 0
        return first, second

    def _kernel(self, net):
        return _reference_ntk(copy.deepcopy(net.net).double().eval(), self.inputs.double()).numpy()

    def _record(self, trainer, net):
        current = [p.detach().double() for p in net.parameters()]
        moved = math.sqrt(sum(float((a - b).square().sum()) for a, b in zip(current, self.initial)))
        size = math.sqrt(sum(float(b.square().sum()) for b in self.initial))
        signs = self._signs(net)
        flips = sum(int((a != b).sum()) for a, b in zip(signs, self.signs0)) / sum(a.numel() for a in signs)
        kernel = self._kernel(net)
        eigenvalues = np.linalg.eigvalsh(kernel)
        self.values[trainer.global_step] = {
            "laziness/weight_distance": moved / size,
            "laziness/activation_flips": flips,
            "laziness/activation_flips/net.2": float((signs[0] != self.signs0[0]).double().mean()),
            "laziness/ntk_change": np.linalg.norm(kernel - self.kernel0) / np.linalg.norm(self.kernel0),
            "laziness/ntk_lambda_min": eigenvalues[0],
            "laziness/ntk_lambda_max": eigenvalues[-1],
            "laziness/kernel_alignment": _numpy_alignment(kernel, np.eye(3)[self.labels.numpy()]),
        }


def test_logged_values_match_independent_computations(tmp_path):
    monitor = LazinessMonitor(every_n_steps=2, num_examples=24, chunk_size=5, hold_jacobians=False)
    reference = Reference(24, 2)
    pl.seed_everything(0)
    net = ReLUClassifier(num_samples=48, lr=0.3, shuffle=False)  # the probe set is the first 24 examples
    trainer = tiny_trainer(tmp_path, callbacks=[monitor, reference], max_epochs=2)
    trainer.fit(net)
    assert [entry["step"] for entry in monitor.history] == [0, 2, 4, 6]
    assert monitor.history[-1]["laziness/activation_flips"] > 0
    for entry in monitor.history:
        expected = reference.values[entry["step"]]
        for tag, value in expected.items():
            scale = expected["laziness/ntk_lambda_max"] if "lambda" in tag else 1.0  # fp32 kernel against fp64
            assert entry[tag] == pytest.approx(value, rel=1e-5, abs=1e-6 * scale), (entry["step"], tag)
    scalars = read_tensorboard_scalars(tmp_path)
    for tag in [*expected, "laziness/seconds", "laziness/weight_distance/net.0", "laziness/activation_flips/net.5"]:
        assert [step for step, _ in scalars[tag]] == [0, 2, 4, 6], tag
        assert tag in trainer.callback_metrics
    assert "laziness/over_steps" in read_tensorboard_tags(tmp_path)["images"]


def test_a_run_with_the_monitor_is_bitwise_the_run_without():
    def module():
        return ReLUClassifier(norm=True, dropout=0.2)

    plain, plain_trainer = _fit([], module=module, max_epochs=2)
    monitor = LazinessMonitor(every_n_steps=2, num_examples=20, chunk_size=7)
    watched, trainer = _fit([monitor], module=module, max_epochs=2)
    assert [entry["step"] for entry in monitor.history] == [0, 2, 4, 6, 8]
    assert_same_training(watched, trainer, plain, plain_trainer)


@pytest.mark.parametrize("style", ["tuple", "dict", "dataclass"])
def test_every_batch_structure_gives_the_same_measurements(style):
    def forward(module, batch):
        return module(inputs_of(batch))

    monitor = LazinessMonitor(every_n_steps=3, num_examples=16, forward_fn=forward, target_fn=labels_of)
    _fit([monitor], module=lambda: ReLUClassifier(style=style))
    default = LazinessMonitor(every_n_steps=3, num_examples=16)
    _fit([default], module=lambda: ReLUClassifier(style="tuple"))
    assert len(monitor.history) == len(default.history) == 3
    for mine, theirs in zip(monitor.history, default.history):
        assert mine.keys() - {"laziness/seconds"} == theirs.keys() - {"laziness/seconds"}
        for tag in mine.keys() - {"laziness/seconds"}:
            assert mine[tag] == theirs[tag], tag


def test_without_the_kernel_only_weights_and_patterns_are_measured():
    monitor = LazinessMonitor(every_n_steps=2, num_examples=16, ntk=False, layers=["net.0"])
    _fit([monitor])
    tags = set(monitor.history[-1])
    assert {"laziness/weight_distance", "laziness/activation_flips", "laziness/activation_flips/net.0"} <= tags
    assert "laziness/seconds" in tags and not any("ntk" in tag or "alignment" in tag for tag in tags)


def test_a_model_without_activations_or_labels_warns_once_and_measures_the_rest():
    monitor = LazinessMonitor(every_n_steps=2, num_examples=16)
    with pytest.warns(UserWarning) as caught:
        _fit([monitor], module=lambda: BoringModel(), max_steps=4)
    messages = [str(w.message) for w in caught if "LazinessMonitor" in str(w.message)]
    assert len([m for m in messages if "activation" in m]) == 1 and len([m for m in messages if "labels" in m]) == 1
    entry = monitor.history[-1]
    assert entry["laziness/weight_distance"] > 0
    assert entry["laziness/ntk_change"] == pytest.approx(0.0, abs=1e-6)  # a linear model's tangent kernel is constant
    assert "laziness/activation_flips" not in entry and "laziness/kernel_alignment" not in entry


def test_a_resumed_run_logs_what_the_uninterrupted_run_logs(tmp_path):
    whole = LazinessMonitor(every_n_steps=3, num_examples=16)
    module = lambda: ReLUClassifier(shuffle=False)  # noqa: E731
    _fit([whole], module=module, max_epochs=4)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_epochs=1)
    first = LazinessMonitor(every_n_steps=3, num_examples=16)
    _fit([first, checkpoint], module=module, max_epochs=2, enable_checkpointing=True)
    resumed = LazinessMonitor(every_n_steps=3, num_examples=16)
    pl.seed_everything(1)  # another initialisation: the checkpoint's weights and initial state must win
    tiny_trainer(None, callbacks=[resumed], max_epochs=4).fit(module(), ckpt_path=str(tmp_path / "last.ckpt"))
    assert [e["step"] for e in resumed.history] == [e["step"] for e in whole.history] == [0, 3, 6, 9, 12, 15, 16]
    for mine, theirs in zip(resumed.history, whole.history):
        for tag in mine.keys() - {"laziness/seconds"}:
            assert mine[tag] == pytest.approx(theirs[tag], rel=1e-6), (mine["step"], tag)


class _Renaming(ReLUClassifier):
    """Loads a checkpoint saved with its network compiled or not (the ``_orig_mod.`` renaming users write)."""

    def __init__(self, compiled):
        super().__init__(shuffle=False)
        if compiled:
            self.net = torch.compile(self.net, backend="aot_eager")

    def on_load_checkpoint(self, checkpoint):
        checkpoint["state_dict"] = renamed_state_dict(self, checkpoint["state_dict"])


@pytest.mark.parametrize("compiled_first", [True, False])
def test_a_run_resumed_with_its_network_compiled_the_other_way_keeps_its_initialisation(compiled_first, tmp_path):
    """The initial weights are named without ``_orig_mod.``: they are not taken for other parameters (which
    restarted the reference at the resume step, with a warning naming every parameter as frozen and trainable)."""
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_epochs=1)
    first = LazinessMonitor(every_n_steps=3, num_examples=16)
    _fit([first, checkpoint], module=lambda: _Renaming(compiled_first), max_epochs=1, enable_checkpointing=True)
    saved = torch.load(tmp_path / "last.ckpt", weights_only=False)["callbacks"][first.state_key]["initial"]["weights"]
    resumed = LazinessMonitor(every_n_steps=3, num_examples=16)
    module = _Renaming(not compiled_first)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*trainable parameters changed")
        tiny_trainer(None, callbacks=[resumed], max_epochs=2).fit(module, ckpt_path=str(tmp_path / "last.ckpt"))
    assert [e["step"] for e in resumed.history] == [0, 3, 6, 8]
    final = {uncompiled_name(name): p for name, p in module.named_parameters()}
    expected = relative_distance(final, {uncompiled_name(name): w for name, w in saved.items()}).overall
    assert resumed.history[-1]["laziness/weight_distance"] == pytest.approx(expected, rel=1e-9)
    assert expected > 0.01


class BlowsUp(ReLUClassifier):
    """Its weights become NaN after a few steps (as a diverging run's would), and training carries on."""

    def on_train_batch_end(self, outputs, batch, batch_idx):
        if self.global_step == 3:
            with torch.no_grad():
                self.net[6].weight.fill_(math.nan)


def test_only_the_non_finite_values_of_a_measurement_are_left_out_and_named_in_one_warning():
    """Was: one non-finite value dropped the whole measurement (steps 4 to 6 were missing from the history)."""
    monitor = LazinessMonitor(every_n_steps=1, num_examples=16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _fit([monitor], module=lambda: BlowsUp(), max_steps=6, max_epochs=2)
    assert [entry["step"] for entry in monitor.history] == [0, 1, 2, 3, 4, 5, 6]  # hooks: callbacks before the module
    blown = {"weight_distance", "ntk_change", "ntk_lambda_min", "ntk_lambda_max", "kernel_alignment"}
    blown = {f"laziness/{name}" for name in blown} | {f"laziness/weight_distance/net.{i}" for i in (0, 4, 6)}
    assert all(blown <= entry.keys() for entry in monitor.history[:4])
    for entry in monitor.history[4:]:
        assert not blown & entry.keys()
        assert all(math.isfinite(value) for value in entry.values())
        assert {"laziness/activation_flips", "laziness/activation_flips/net.2", "laziness/seconds"} <= entry.keys()
    warned = [str(w.message) for w in caught if "not finite" in str(w.message)]
    assert len(warned) == 1 and all(name in warned[0] for name in blown)


class ZeroInitialised(PlainClassifier):
    """A linear probe initialised at zero: the relative weight distance is 0/0, the kernel ``X X^T + 1`` is fine."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Linear(8, 3)
        torch.nn.init.zeros_(self.net.weight)
        torch.nn.init.zeros_(self.net.bias)

    def train_dataloader(self):
        return ReLUClassifier().train_dataloader()


def test_a_zero_initialised_model_logs_its_kernel_without_the_undefined_weight_distance():
    monitor = LazinessMonitor(every_n_steps=2, num_examples=16)
    with pytest.warns(UserWarning, match=r"'laziness/weight_distance'.* not finite"):
        _fit([monitor], module=ZeroInitialised, max_steps=4)
    assert [entry["step"] for entry in monitor.history] == [0, 2, 4]
    assert all("laziness/weight_distance" not in entry for entry in monitor.history)
    assert monitor.history[0]["laziness/ntk_change"] == 0.0 and monitor.history[-1]["laziness/ntk_lambda_max"] > 0
    assert -1 <= monitor.history[-1]["laziness/kernel_alignment"] <= 1


class BlindToItsInput(ReLUClassifier):
    """Outputs that don't depend on the input (as a narrow network's at initialisation can, to fp32): every example has
    the same output gradients, so the centred NTK is zero and the kernel-target alignment 0/0."""

    def forward(self, inputs):
        return super().forward(inputs * 0)


def test_an_undefined_kernel_alignment_is_left_out_and_the_other_figures_logged():
    monitor = LazinessMonitor(every_n_steps=2, num_examples=16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _fit([monitor], module=lambda: BlindToItsInput(), max_steps=4)
    assert [entry["step"] for entry in monitor.history] == [0, 2, 4]
    assert all("laziness/kernel_alignment" not in entry for entry in monitor.history)
    assert all(math.isfinite(entry["laziness/weight_distance"]) for entry in monitor.history)
    assert monitor.history[-1]["laziness/weight_distance"] > 0
    assert len([w for w in caught if "alignment is undefined" in str(w.message)]) == 1


@pytest.mark.parametrize(
    ("module", "target_fn", "zero"),
    [
        (ReLUClassifier, lambda batch: torch.zeros_like(batch[1]), "the centred label kernel is zero"),
        (BlindToItsInput, None, "the centred NTK is zero"),
    ],
)
def test_the_warning_for_an_undefined_alignment_names_the_centred_kernel_that_is_zero(module, target_fn, zero):
    """Was: every undefined alignment blamed the NTK, also when the probe labels were of one class."""
    monitor = LazinessMonitor(every_n_steps=2, num_examples=16, target_fn=target_fn)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _fit([monitor], module=module, max_steps=2)
    warned = [str(w.message) for w in caught if "alignment is undefined" in str(w.message)]
    assert len(warned) == 1 and zero in warned[0]
    assert ("label" in zero) == ("same label" in warned[0]) and ("NTK" in zero) == ("output gradients" in warned[0])


def test_fitting_twice_starts_from_the_new_initialisation():
    monitor = LazinessMonitor(every_n_steps=2, num_examples=16)
    module, _ = _fit([monitor], max_steps=4)
    tiny_trainer(None, callbacks=[monitor], max_steps=2).fit(module)
    assert [entry["step"] for entry in monitor.history] == [0, 2]
    assert monitor.history[0]["laziness/weight_distance"] == 0.0
    assert monitor.history[0]["laziness/ntk_change"] == 0.0


class _PlainSGD(ReLUClassifier):
    """Without momentum: a second ``fit`` makes a new optimizer, so only then does it train as one fit does."""

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def test_a_second_fit_on_the_same_trainer_goes_on_comparing_with_the_runs_initialisation():
    """Another ``fit`` on the same Trainer goes on as a resume does: the uninterrupted run's history (found: a new
    history, measured from the weights the second fit started from, the first fit's entries lost)."""

    def fitted(monitor, epochs):
        pl.seed_everything(0)
        module, trainer = _PlainSGD(shuffle=False), tiny_trainer(None, callbacks=[monitor])
        for max_epochs in epochs:
            trainer.fit_loop.max_epochs = max_epochs
            trainer.fit(module)

    uninterrupted, twice = (LazinessMonitor(every_n_steps=2, num_examples=16) for _ in range(2))
    fitted(uninterrupted, [2])
    fitted(twice, [1, 2])
    assert [e["step"] for e in twice.history] == [e["step"] for e in uninterrupted.history] == [0, 2, 4, 6, 8]
    for mine, theirs in zip(twice.history, uninterrupted.history):
        for tag in mine.keys() - {"laziness/seconds"}:
            assert mine[tag] == pytest.approx(theirs[tag], rel=1e-6), (mine["step"], tag)


def test_a_tanh_network_is_measured_with_named_layers():
    monitor = LazinessMonitor(every_n_steps=2, num_examples=16, layers=["net.0"])
    _fit([monitor], module=lambda: TinyClassifier(), max_steps=4)
    assert monitor.history[-1]["laziness/activation_flips/net.0"] >= 0


def test_bf16_mixed_measures_in_fp32_outside_autocast():
    plain, mixed = LazinessMonitor(every_n_steps=2, num_examples=16), LazinessMonitor(every_n_steps=2, num_examples=16)
    _fit([plain], max_steps=2)
    _fit([mixed], max_steps=2, precision="bf16-mixed")
    assert plain.history[0].keys() == mixed.history[0].keys()
    for tag in plain.history[0].keys() - {"laziness/seconds"}:
        assert mixed.history[0][tag] == plain.history[0][tag], tag  # the same weights, measured the same way
    assert all(math.isfinite(value) for value in mixed.history[-1].values())


class _WithBackbone(ReLUClassifier):
    """Its first layer is ``backbone``: Lightning's ``BackboneFinetuning`` freezes it, then unfreezes it."""

    def __init__(self):
        super().__init__()
        self.backbone = self.net[0]

    def configure_optimizers(self):
        return torch.optim.SGD(filter(lambda p: p.requires_grad, self.parameters()), lr=0.1)


def test_a_fine_tuning_schedule_restarts_the_reference_with_a_warning():
    # the parameters trainable at the start were compared with a larger set after the unfreeze: a ValueError ended
    # the fit at the first measurement of the second stage
    monitor = LazinessMonitor(every_n_steps=1, num_examples=8)
    unfreeze = BackboneFinetuning(unfreeze_backbone_at_epoch=1, backbone_initial_ratio_lr=1.0)
    with pytest.warns(UserWarning, match=r"changed at step \d+ \(\['net.0.bias', 'net.0.weight'\] became trainable"):
        _, trainer = _fit([unfreeze, monitor], _WithBackbone, max_epochs=2)
    first_of_stage_two = next(e for e in monitor.history if e["step"] > trainer.num_training_batches)
    assert monitor.history[-1]["step"] == trainer.global_step
    assert first_of_stage_two["laziness/weight_distance"] < monitor.history[-1]["laziness/weight_distance"]


class TupleOutput(ReLUClassifier):
    """``forward`` returns ``(logits, aux)``, as many models do; ``training_step`` unpacks it."""

    def forward(self, inputs):
        logits = super().forward(inputs)
        return logits, logits.square().mean()

    def training_step(self, batch, batch_idx):
        return torch.nn.functional.cross_entropy(self(inputs_of(batch))[0], labels_of(batch))


def test_outputs_that_are_not_one_tensor_are_refused_before_the_first_step_naming_forward_fn():
    # was an AttributeError ("'tuple' object has no attribute 'reshape'") from inside torch.func
    trainer = tiny_trainer(max_steps=2, callbacks=[LazinessMonitor(every_n_steps=2, num_examples=8)])
    with pytest.raises(TypeError, match=r"returned a tuple\. Pass `forward_fn"):
        trainer.fit(TupleOutput())
    assert trainer.global_step == 0
    monitor = LazinessMonitor(every_n_steps=2, num_examples=8, forward_fn=lambda module, batch: module(batch[0])[0])
    _, trainer = _fit([monitor], module=TupleOutput, max_steps=2)
    assert trainer.global_step == 2 and "laziness/ntk_change" in monitor.history[-1]


class TwoInputs(ReLUClassifier):
    """Reads ``{"x": ..., "y": ...}`` batches whose inputs are a dict of two halves (a two-tower model)."""

    def __init__(self):
        super().__init__(style="dict")

    def forward(self, inputs):
        return super().forward(torch.cat([inputs["left"], inputs["right"]], dim=1))

    def training_step(self, batch, batch_idx):
        return torch.nn.functional.cross_entropy(self(halves(batch)), labels_of(batch))


def halves(batch):
    return {"left": inputs_of(batch)[:, :4], "right": inputs_of(batch)[:, 4:]}


def test_a_module_the_default_forward_cannot_call_is_refused_before_the_first_step_naming_forward_fn():
    # the default forward calls the module on the batch's first tensor: was "new(): invalid data type 'str'"
    trainer = tiny_trainer(max_steps=2, callbacks=[LazinessMonitor(every_n_steps=2, num_examples=8)])
    with pytest.raises(TypeError, match=r"on the batch's first tensor by default, which failed .* `forward_fn"):
        trainer.fit(TwoInputs())
    assert trainer.global_step == 0
    monitor = LazinessMonitor(every_n_steps=2, num_examples=8, forward_fn=lambda module, batch: module(halves(batch)))
    _, trainer = _fit([monitor], module=TwoInputs, max_steps=2)
    assert trainer.global_step == 2 and "laziness/ntk_change" in monitor.history[-1]


class Checkpointed(ReLUClassifier):
    """The first layers under activation checkpointing (the same function)."""

    def __init__(self, reentrant: bool = False) -> None:
        super().__init__()
        self.reentrant = reentrant

    def forward(self, inputs):
        return self.net[4:](torch.utils.checkpoint.checkpoint(self.net[:4], inputs, use_reentrant=self.reentrant))


@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing_is_refused_before_the_first_step_naming_forward_fn(reentrant):
    # was torch.func's "don't yet support saved tensor hooks. Please open an issue with your use case." (or, with
    # use_reentrant=True, "must override the setup_context staticmethod")
    trainer = tiny_trainer(max_steps=2, callbacks=[LazinessMonitor(every_n_steps=2, num_examples=8)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the reentrant checkpoint's "None of the inputs have requires_grad=True"
        with pytest.raises(RuntimeError, match=r"activation checkpointing .* pass `forward_fn"):
            trainer.fit(Checkpointed(reentrant))
    assert trainer.global_step == 0
    monitor = LazinessMonitor(every_n_steps=2, num_examples=8, forward_fn=lambda module, batch: module.net(batch[0]))
    _, trainer = _fit([monitor], module=Checkpointed, max_steps=2)
    assert trainer.global_step == 2 and "laziness/ntk_change" in monitor.history[-1]


class Indexed(torch.utils.data.Dataset):
    """``(x, y, index)`` examples, as datasets that return the example index give them."""

    def __init__(self, num_samples: int = 64) -> None:
        self.data = ReLUClassifier(num_samples=num_samples).train_dataloader().dataset.data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int):
        return (*self.data[index], index)


class IndexedClassifier(ReLUClassifier):
    def train_dataloader(self):
        return torch.utils.data.DataLoader(Indexed(), batch_size=16, shuffle=False)


def test_the_default_labels_of_an_x_y_index_batch_are_y_not_the_index():
    """Found: the default took the batch's last integer tensor, the index: the alignment with it was logged."""
    default = LazinessMonitor(every_n_steps=2, num_examples=16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _fit([default], module=IndexedClassifier, max_steps=2)
    explicit = LazinessMonitor(every_n_steps=2, num_examples=16, target_fn=lambda batch: batch[1])
    _fit([explicit], module=IndexedClassifier, max_steps=2)
    assert torch.equal(default._initial["targets"], explicit._initial["targets"])
    for mine, theirs in zip(default.history, explicit.history, strict=True):
        assert mine["laziness/kernel_alignment"] == theirs["laziness/kernel_alignment"]
    assert not [w for w in caught if "distinct value" in str(w.message)]
    assert len([w for w in caught if "holds 2 one-dimensional integer tensors" in str(w.message)]) == 1


def test_several_integer_tensors_by_position_are_warned_about_naming_target_fn():
    """(tokens, lengths, labels), an RNN classifier's batch: the second item is the lengths, and was taken silently
    (found by review)."""

    class WithLengths(IndexedClassifier):
        def train_dataloader(self):
            loader = super().train_dataloader()
            return torch.utils.data.DataLoader(loader.dataset, batch_size=16, collate_fn=self._with_lengths)

        @staticmethod
        def _with_lengths(items):
            x = torch.stack([item[0] for item in items])
            return x, torch.full((len(items),), 7), torch.stack([item[1] for item in items])

        def training_step(self, batch, batch_idx):
            return torch.nn.functional.cross_entropy(self(batch[0]), batch[2])

    monitor = LazinessMonitor(every_n_steps=2, num_examples=16)
    with pytest.warns(
        UserWarning,
        match=r"holds 2 one-dimensional integer tensors .* takes its second item .*"
        r"`target_fn",
    ):
        _fit([monitor], module=WithLengths, max_steps=2)


def test_default_labels_that_look_like_an_example_index_are_warned_about():
    class IndexOnly(IndexedClassifier):
        def train_dataloader(self):
            loader = super().train_dataloader()
            return torch.utils.data.DataLoader(loader.dataset, batch_size=16, collate_fn=self._x_and_index)

        @staticmethod
        def _x_and_index(items):
            return torch.stack([item[0] for item in items]), torch.tensor([item[2] for item in items])

        def training_step(self, batch, batch_idx):
            return self(batch[0]).square().mean()

    monitor = LazinessMonitor(every_n_steps=2, num_examples=16)
    with pytest.warns(UserWarning, match=r"second item\) hold a distinct value for every one of the 16 probe examples"):
        _fit([monitor], module=IndexOnly, max_steps=2)


def test_distinct_labels_that_can_be_class_indices_are_not_taken_for_an_example_index():
    """Found by review: 16 probe examples of a 64-class problem may well hold 16 distinct labels; that was warned about
    as an example index. Now only labels beyond the network's outputs are."""

    class ManyClasses(ReLUClassifier):
        def __init__(self) -> None:
            super().__init__()
            self.net[6] = torch.nn.Linear(16, 64)

        def train_dataloader(self):
            generator = torch.Generator().manual_seed(0)
            inputs, labels = torch.randn(16, 8, generator=generator), torch.randperm(64, generator=generator)[:16]
            return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(inputs, labels), batch_size=16)

    monitor = LazinessMonitor(every_n_steps=2, num_examples=16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _fit([monitor], module=ManyClasses, max_steps=2)
    assert len(monitor._initial["targets"].unique()) == 16 and int(monitor._initial["targets"].max()) < 64
    assert not [w for w in caught if "distinct value" in str(w.message)]
    assert "laziness/kernel_alignment" in monitor.history[-1]


def test_a_train_loader_smaller_than_num_examples_gives_a_probe_set_of_all_it_has_with_one_warning():
    """Was: silently fewer examples (40 for the default 128)."""
    monitor = LazinessMonitor(every_n_steps=2, num_examples=100)
    with pytest.warns(UserWarning, match=r"holds 40 examples, fewer than num_examples=100") as caught:
        _fit([monitor], module=lambda: ReLUClassifier(num_samples=40), max_steps=4)
    assert len([w for w in caught if "fewer than num_examples" in str(w.message)]) == 1
    assert monitor._initial["kernel"].shape == (40, 40)


class ManyOutputs(ReLUClassifier):
    """A head of 64 outputs (a small autoencoder's): 32 examples' Jacobians are 32 x 64 x P x 4 bytes."""

    def __init__(self) -> None:
        super().__init__()
        self.net[6] = torch.nn.Linear(16, 64)

    def training_step(self, batch, batch_idx):
        raise AssertionError("the fit is refused before the first step")


def test_a_kernel_whose_jacobians_exceed_max_jacobian_bytes_is_refused_before_the_first_step_naming_the_fixes():
    """Found: nothing bounded the Jacobians (an MNIST autoencoder's default measurement would hold 301 GiB)."""
    module = ManyOutputs()
    parameters = sum(p.numel() for p in module.parameters())
    needed = 32 * 64 * parameters * 4
    monitor = LazinessMonitor(num_examples=32, max_jacobian_bytes=needed - 1)
    with pytest.raises(MemoryError, match=r"hold_jacobians.*`ntk=False`.*`num_examples`.*`hold_jacobians=False`"):
        _fit([monitor], module=lambda: module, max_steps=2)
    fits = LazinessMonitor(num_examples=32, chunk_size=4, hold_jacobians=False, max_jacobian_bytes=needed - 1)
    _fit([fits], module=lambda: ReLUClassifier(), max_steps=2)  # 8 examples' Jacobians of a 3-output head fit
    by_outputs = LazinessMonitor(num_examples=32, output_chunk_size=16, max_jacobian_bytes=needed // 4)
    with pytest.raises(AssertionError, match="refused before the first step"):  # measured, then trained
        _fit([by_outputs], module=lambda: module, max_steps=2)
    kernel = empirical_ntk(copy.deepcopy(module.net).eval(), by_outputs._initial["batch"][0])
    torch.testing.assert_close(by_outputs._initial["kernel"], kernel, rtol=1e-5, atol=1e-5 * float(kernel.max()))


def test_the_default_jacobian_limit_is_half_the_free_memory(monkeypatch):
    import lightning_nt.laziness.callback as callback

    module = ManyOutputs()
    needed = 32 * 64 * sum(p.numel() for p in module.parameters()) * 4
    monkeypatch.setattr(callback, "_free_memory", lambda device: 2 * needed - 2)
    with pytest.raises(MemoryError, match="None: half the memory free on cpu"):
        _fit([LazinessMonitor(num_examples=32)], module=lambda: module, max_steps=2)
    monkeypatch.setattr(callback, "_free_memory", lambda device: 2 * needed)
    with pytest.raises(AssertionError, match="refused before the first step"):  # measured, then trained
        _fit([LazinessMonitor(num_examples=32)], module=lambda: module, max_steps=2)


def test_the_default_limit_reads_a_containers_memory_limit_and_needs_no_posix_call(tmp_path, monkeypatch):
    """A container's limit is below the host's physical memory (which os.sysconf reads); os.sysconf is POSIX only:
    without it the default limit crashed the fit with an AttributeError (found by review)."""
    from lightning_nt.laziness import callback

    limit = tmp_path / "memory.max"
    limit.write_text("1073741824\n")
    monkeypatch.setattr(callback, "_CGROUP_LIMITS", (str(limit), str(tmp_path / "absent")))
    assert callback._free_memory(torch.device("cpu")) == 2**30
    monkeypatch.delattr(callback.os, "sysconf")
    limit.write_text("max\n")  # cgroup v2 without a limit
    assert callback._free_memory(torch.device("cpu")) == sys.maxsize
