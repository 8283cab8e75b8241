import math
import warnings

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch.func import functional_call

from lightning_nt import SharpnessMonitor
from lightning_nt.sharpness import callback as sharpness_callback
from lightning_nt.sharpness.hvp import HessianOperator, flatten, unflatten
from tests.helpers import (
    BoringModel,
    TinyClassifier,
    assert_same_training,
    read_tensorboard_scalars,
    read_tensorboard_tags,
    seeded_fit,
    tiny_trainer,
)


class ExactSharpness(pl.Callback):
    """Independent reference: eigvalsh of torch.autograd.functional.hessian on the same examples."""

    def __init__(self, num_samples):
        self.num_samples, self.exact = num_samples, {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        data = pl_module.train_dataloader().dataset.tensors
        inputs, labels = data[0][: self.num_samples].double(), data[1][: self.num_samples]
        names = [n for n, _ in pl_module.named_parameters()]
        params = [p.detach() for _, p in pl_module.named_parameters()]

        def loss_of(flat):
            weights = dict(zip(names, unflatten(flat, params)))
            return F.cross_entropy(functional_call(pl_module, weights, (inputs,)), labels)

        hessian = torch.autograd.functional.hessian(loss_of, flatten(params).double())
        self.exact[trainer.global_step] = torch.linalg.eigvalsh(hessian)


def test_eigenvalues_match_the_exact_hessian_of_the_probe_set(tmp_path):
    monitor = SharpnessMonitor(max_overhead=None, every_n_steps=3, num_eigenvalues=2, num_examples=40, tol=1e-5)
    reference = ExactSharpness(40)
    seeded_fit([monitor, reference], module=lambda: TinyClassifier(num_samples=96, shuffle=False), root=tmp_path)
    assert [entry["step"] for entry in monitor.history] == [0, 3, 6]
    for entry in monitor.history[1:]:
        exact = reference.exact[entry["step"]]
        assert entry["sharpness/lambda_max"] == pytest.approx(exact[-1].item(), rel=1e-4)
        assert entry["sharpness/lambda_2"] == pytest.approx(exact[-2].item(), rel=1e-3)
        assert entry["sharpness/lambda_min"] == pytest.approx(exact[0].item(), abs=1e-4 * exact[-1].item())
        assert entry["sharpness/threshold"] == pytest.approx(2 / 0.1)
        assert entry["sharpness/ratio"] == pytest.approx(entry["sharpness/lambda_max"] / 20)
    scalars = read_tensorboard_scalars(tmp_path)
    assert [step for step, _ in scalars["sharpness/lambda_max"]] == [0, 3, 6]
    assert {"sharpness/threshold", "sharpness/ratio", "sharpness/lambda_2", "sharpness/hvps"} <= scalars.keys()
    assert "sharpness/edge_of_stability" in read_tensorboard_tags(tmp_path)["images"]


def test_a_run_with_the_monitor_is_bitwise_the_run_without():
    def module():
        return TinyClassifier(num_samples=96, norm="batch")

    options = {"every_n_steps": 2, "num_examples": 32, "chunk_size": 10, "trace": True, "trace_samples": 6}
    plain, plain_trainer = seeded_fit([], module=module, max_epochs=2)
    monitor = SharpnessMonitor(
        **options, max_overhead=None, batch_sharpness=True, batch_sharpness_batches=2, smoothness=True
    )
    watched, trainer = seeded_fit([monitor], module=module, max_epochs=2)
    assert len(monitor.history) == 7
    assert_same_training(watched, trainer, plain, plain_trainer)
    entry = monitor.history[-1]
    for tag in ("trace", "trace_stderr", "batch_sharpness"):
        assert math.isfinite(entry[f"sharpness/{tag}"])
    for tag in ("loss_range", "grad_predictiveness", "beta"):
        assert entry[f"smoothness/{tag}"] >= 0


def test_smoothness_takes_its_loss_and_gradient_from_the_measurements_own_operator(monkeypatch):
    """One Hessian operator per measurement, smoothness metrics included: under DDP each build all-reduces the
    ranks' example counts (found: a second operator, and a second all-reduce, for the smoothness metrics)."""
    built = []

    class Counted(HessianOperator):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            built.append(self)

    monkeypatch.setattr(sharpness_callback, "HessianOperator", Counted)
    monitor = SharpnessMonitor(every_n_steps=2, num_examples=32, chunk_size=10, max_overhead=None, smoothness=True)
    seeded_fit([monitor], module=lambda: TinyClassifier(num_samples=96), max_epochs=1)
    assert len(monitor.history) == len(built) == 4
    assert all(entry["smoothness/beta"] >= 0 for entry in monitor.history)


def _fitted_twice(monitor, epochs=(1, 2)):
    """One fit, then another on the same Trainer up to ``epochs[1]`` (``epochs=(2,)``: one fit, uninterrupted)."""
    pl.seed_everything(0)
    module = TinyClassifier(num_samples=64, shuffle=False)
    trainer = tiny_trainer(None, callbacks=[monitor], max_epochs=epochs[0])
    for max_epochs in epochs:
        trainer.fit_loop.max_epochs = max_epochs
        trainer.fit(module)
    return trainer


def test_a_second_fit_on_the_same_trainer_goes_on_with_the_run_as_a_resume_does():
    """Another ``fit`` on the same Trainer: the history of the uninterrupted run, without measuring the step the first
    fit ended on twice (found: ``[0, 2, 4, 4, 6, 8]``). (A new Trainer: ``test_a_second_fresh_fit_...``.)"""
    options = {"every_n_steps": 2, "num_examples": 32, "max_overhead": None}
    uninterrupted, twice = SharpnessMonitor(**options), SharpnessMonitor(**options)
    _fitted_twice(uninterrupted, epochs=(2,))
    _fitted_twice(twice)
    assert [entry["step"] for entry in twice.history] == [0, 2, 4, 6, 8]
    assert _untimed(twice.history) == _untimed(uninterrupted.history)


def _untimed(history):
    return [{tag: value for tag, value in entry.items() if tag not in ("sharpness/seconds", "sharpness/overhead")}
            for entry in history]  # fmt: skip


def test_threshold_follows_the_live_learning_rate():
    class Scheduled(TinyClassifier):
        def configure_optimizers(self):
            optimizer = torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)
            return [optimizer], [torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)]

    monitor = SharpnessMonitor(max_overhead=None, every_n_steps=6, num_examples=32)
    seeded_fit([monitor], module=lambda: Scheduled(num_samples=96), max_epochs=3)
    thresholds = [entry["sharpness/threshold"] for entry in monitor.history]
    assert thresholds == pytest.approx([38.0, 76.0, 152.0, 304.0])


def test_adam_gets_the_preconditioned_sharpness():
    class WithAdam(TinyClassifier):
        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-2)

    monitor = SharpnessMonitor(max_overhead=None, every_n_steps=3, num_examples=32)
    seeded_fit([monitor], module=lambda: WithAdam(num_samples=96))
    first, later = monitor.history[0], monitor.history[-1]
    assert "sharpness/preconditioned" not in first and "sharpness/ratio" not in first  # no Adam state at step 0
    assert later["sharpness/threshold"] == pytest.approx(3800.0)
    assert later["sharpness/ratio"] == pytest.approx(later["sharpness/preconditioned"] / 3800.0)


def test_param_groups_with_different_settings_are_flagged():
    class TwoGroups(TinyClassifier):
        def configure_optimizers(self):
            groups = [{"params": self.net[0].parameters(), "lr": 0.1}, {"params": self.net[3].parameters(), "lr": 0.01}]
            return torch.optim.SGD(groups)

    monitor = SharpnessMonitor(max_overhead=None, every_n_steps=3, num_examples=32)
    with pytest.warns(UserWarning, match="group 0"):
        seeded_fit([monitor], module=lambda: TwoGroups(num_samples=96))
    assert monitor.history[-1]["sharpness/threshold"] == pytest.approx(20.0)


def test_other_optimizers_log_eigenvalues_only_and_say_so():
    class WithRMSprop(TinyClassifier):
        def configure_optimizers(self):
            return torch.optim.RMSprop(self.parameters(), lr=1e-3)

    monitor = SharpnessMonitor(max_overhead=None, every_n_steps=3, num_examples=32)
    with pytest.warns(UserWarning, match="no stability threshold is known for RMSprop"):
        seeded_fit([monitor], module=lambda: WithRMSprop(num_samples=96))
    assert "sharpness/threshold" not in monitor.history[-1] and "sharpness/lambda_max" in monitor.history[-1]


class WeightNorm(pl.Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.squared = sum(float(p.detach().pow(2).sum()) for p in pl_module.parameters())


def test_current_batch_mode_spherical_and_boring_model():
    monitor = SharpnessMonitor(max_overhead=None, every_n_steps=4, data="batch", mode="eval", spherical=True)
    norm = WeightNorm()
    seeded_fit([monitor, norm], module=BoringModel, max_epochs=1, limit_train_batches=8, limit_val_batches=1)
    assert [entry["step"] for entry in monitor.history] == [4, 8]
    last = monitor.history[-1]
    assert last["sharpness/spherical"] == pytest.approx(norm.squared * last["sharpness/lambda_max"], rel=1e-5)
    # BoringModel's StepLR has divided lr by 10 when the epoch's last step is measured: the next step uses it
    assert [entry["sharpness/threshold"] for entry in monitor.history] == pytest.approx([20.0, 200.0])


def test_max_overhead_skips_measurements_beyond_the_budget():
    monitor = SharpnessMonitor(every_n_steps=1, num_examples=64, max_overhead=0.05)
    seeded_fit([monitor], max_epochs=4)
    steps = [entry["step"] for entry in monitor.history]
    assert steps[0] == 0 and len(steps) < 24  # 24 steps were due
    assert all(entry["sharpness/seconds"] > 0 for entry in monitor.history)
    for entry in monitor.history[1:]:  # each was allowed: its predecessors' share plus one more cost <= 5%
        assert entry["sharpness/overhead"] < 0.05 * 1.5
    unbounded = SharpnessMonitor(every_n_steps=1, num_examples=64, max_overhead=None)
    seeded_fit([unbounded], max_epochs=4)
    assert [entry["step"] for entry in unbounded.history] == list(range(25))


def test_non_finite_measurements_are_skipped_with_one_warning():
    def loss_fn(module, batch):
        return F.cross_entropy(module(batch[0]), batch[1]) * float("nan")

    monitor = SharpnessMonitor(max_overhead=None, every_n_steps=2, num_examples=32, loss_fn=loss_fn, max_iter=5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, trainer = seeded_fit([monitor], max_epochs=1)
    assert monitor.history == []
    assert sum("not finite" in str(w.message) for w in caught) == 1
    assert trainer.global_step == 6


def test_checkpoint_keeps_the_history(tmp_path):
    monitor = SharpnessMonitor(max_overhead=None, every_n_steps=3, num_examples=32)
    seeded_fit([monitor], max_epochs=1)
    restored = SharpnessMonitor(max_overhead=None, every_n_steps=3, num_examples=32)
    restored.load_state_dict(monitor.state_dict())
    assert restored.history == monitor.history
    assert SharpnessMonitor(every_n_steps=3).state_key != SharpnessMonitor(every_n_steps=5).state_key


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"every_n_steps": 0}, "every_n_steps"),
        ({"num_eigenvalues": 0}, "num_eigenvalues"),
        ({"num_samples": 0}, "num_samples"),
        ({"chunk_size": 0}, "chunk_size"),
        ({"mode": "test"}, "mode"),
        ({"data": "all"}, "data"),
        ({"tol": 0}, "tol"),
        ({"max_overhead": 1.5}, "max_overhead"),
        ({"trace_samples": 1}, "trace_samples"),
        ({"trace_method": "exact"}, "trace_method"),
        ({"smoothness_steps": (0.0,)}, "smoothness_steps"),
    ],
)
def test_bad_input_names_the_argument(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        SharpnessMonitor(**kwargs)


def test_attention_models_are_measured_through_the_math_kernel():
    """The fused CPU attention kernel has no double backward: the monitor must not crash the fit on a Transformer."""
    from tests.helpers import TinyTransformer

    monitor = SharpnessMonitor(every_n_steps=2, num_examples=16, max_iter=10)
    tiny_trainer(None, callbacks=[monitor], max_steps=3).fit(TinyTransformer())
    assert [entry["step"] for entry in monitor.history] == [0, 2]
    assert all(math.isfinite(entry["sharpness/lambda_max"]) for entry in monitor.history)
