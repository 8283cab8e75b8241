"""Issue 10: SharpnessMonitor on warm-up schedules, frozen backbones, accumulation, resumes, fp64, bad input."""

import math
import warnings

import pytest
import pytorch_lightning as pl
import torch
from torch import Tensor

from lightning_nt import SharpnessMonitor
from lightning_nt.common.validation import ArgumentError
from lightning_nt.sharpness import HessianOperator, lanczos, stability_threshold
from tests.helpers import TinyClassifier, read_tensorboard_scalars, tiny_trainer
from tests.sharpness.models import BagOfSigns, CrashAt, FrozenBackbone, RecordAdam, exact_hessian, probe_examples

TIMING = ("sharpness/seconds", "sharpness/overhead")


def _fit(callbacks, make_module, root=None, **trainer_kwargs):
    """Seed, then build the module and fit it: the weights don't depend on which tests ran before."""
    pl.seed_everything(0)
    module = make_module()
    tiny_trainer(root, callbacks=callbacks, **trainer_kwargs).fit(module)
    return module


def _messages(caught, text):
    return [str(w.message) for w in caught if text in str(w.message)]


# item 1 (on the CPU): fp64 everywhere, so a hard-coded fp32 (or a probe not converted for the Trainer) shows up


def test_a_double_precision_run_measures_in_double_precision_against_the_exact_hessian():
    class Momentum(TinyClassifier):
        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

    monitor = SharpnessMonitor(
        every_n_steps=3, num_examples=40, tol=1e-9, max_iter=200, num_eigenvalues=2, trace=True, trace_samples=600,
        batch_sharpness=True, batch_sharpness_batches=2, smoothness=True, spherical=True,
    )  # fmt: skip
    module = _fit([monitor], lambda: Momentum(num_samples=96, shuffle=False), precision="64-true", max_epochs=1)
    assert [entry["step"] for entry in monitor.history] == [0, 3, 6]
    assert next(module.parameters()).dtype == torch.float64
    exact = torch.linalg.eigvalsh(
        exact_hessian(module, [n for n, _ in module.named_parameters()], *probe_examples(module, 40))
    )
    last = monitor.history[-1]
    assert last["sharpness/lambda_max"] == pytest.approx(exact[-1].item(), rel=1e-9)
    assert last["sharpness/lambda_2"] == pytest.approx(exact[-2].item(), rel=1e-9)
    assert last["sharpness/lambda_min"] == pytest.approx(exact[0].item(), abs=1e-9 * exact[-1].item())
    assert len(exact) == 195  # Hutch++'s sketch of 600 // 3 products spans the space: its trace is exact
    assert last["sharpness/trace"] == pytest.approx(exact.sum().item(), rel=1e-8)
    assert all(math.isfinite(value) for value in last.values())


# item 9: Adam over a frozen backbone and an unused parameter


def test_adam_over_a_frozen_backbone_keeps_logging_the_preconditioned_sharpness():
    monitor = SharpnessMonitor(every_n_steps=3, num_examples=40, tol=1e-6, max_iter=60, max_overhead=None)
    reference = RecordAdam(40)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _fit([monitor, reference], lambda: FrozenBackbone(num_samples=96), max_epochs=1)
    later = [entry for entry in monitor.history if entry["step"] > 0]
    assert [entry["step"] for entry in later] == [3, 6]
    for entry in later:
        scale = reference.diagonals[entry["step"]].rsqrt()
        exact = torch.linalg.eigvalsh(scale[:, None] * reference.hessians[entry["step"]] * scale[None, :])[-1].item()
        assert entry["sharpness/preconditioned"] == pytest.approx(exact, rel=1e-4)
        assert entry["sharpness/threshold"] == pytest.approx(3800.0)
        assert entry["sharpness/ratio"] == pytest.approx(entry["sharpness/preconditioned"] / 3800.0)
    notes = _messages(caught, "no Adam state")
    assert len(notes) == 1 and "unused" in notes[0]


# item 10: warm-up from lr 0


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_lr_zero_gives_an_infinite_threshold_and_ratio_zero(optimizer, tmp_path):
    class WarmUp(TinyClassifier):
        def configure_optimizers(self):
            make = torch.optim.Adam if optimizer == "adam" else torch.optim.SGD
            opt = make(self.parameters(), lr=1e-2)
            return [opt], [
                {"scheduler": torch.optim.lr_scheduler.LambdaLR(opt, lambda s: float(s >= 3)), "interval": "step"}
            ]

    monitor = SharpnessMonitor(every_n_steps=1, num_examples=32)
    _fit([monitor], lambda: WarmUp(num_samples=96), root=tmp_path, max_epochs=1)
    assert [entry["step"] for entry in monitor.history] == list(range(7))
    at_zero = [entry for entry in monitor.history if entry["step"] in (1, 2)]
    for entry in at_zero:  # lr 0 after steps 1 and 2 (with Adam state there, not at step 0)
        assert entry["sharpness/threshold"] == math.inf and entry["sharpness/ratio"] == 0.0
    assert all(math.isfinite(entry["sharpness/threshold"]) for entry in monitor.history[3:])
    assert stability_threshold(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.0)).value == math.inf


# item 2: every_n_steps honoured by default; a budget is opt-in, announced and counted; overhead at step 0


def test_every_n_steps_is_honoured_by_default():
    monitor = SharpnessMonitor(every_n_steps=5, num_examples=32)
    _fit([monitor], lambda: TinyClassifier(num_samples=64), max_epochs=5)  # 20 steps
    assert [entry["step"] for entry in monitor.history] == [0, 5, 10, 15, 20]


def test_a_budget_announces_and_counts_its_skips(tmp_path):
    monitor = SharpnessMonitor(every_n_steps=1, num_examples=32, max_overhead=1e-4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _fit([monitor], lambda: TinyClassifier(num_samples=64), root=tmp_path, max_epochs=2)  # 8 steps
    assert [entry["step"] for entry in monitor.history] == [0] and monitor.skipped == 8
    notes = _messages(caught, "skipped the measurement")
    assert len(notes) == 1 and "max_overhead" in notes[0] and "sharpness/skipped" in notes[0]
    assert read_tensorboard_scalars(tmp_path)["sharpness/skipped"] == [(step, float(step)) for step in range(1, 9)]


def test_an_expensive_monitor_without_budget_warns_once_and_overhead_waits_for_training_time(tmp_path):
    monitor = SharpnessMonitor(every_n_steps=1, num_examples=64, tol=1e-6)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _fit([monitor], lambda: TinyClassifier(num_samples=64), root=tmp_path, max_epochs=2)
    assert len(monitor.history) == 9
    notes = _messages(caught, "of the training time")
    assert len(notes) == 1 and "every_n_steps" in notes[0] and "max_overhead" in notes[0]
    assert "sharpness/overhead" not in monitor.history[0]  # no training time yet at step 0
    assert all(entry["sharpness/overhead"] > 0.25 for entry in monitor.history[1:])
    assert [step for step, _ in read_tensorboard_scalars(tmp_path)["sharpness/overhead"]] == list(range(1, 9))


# item 15 and 21: one measurement per due optimizer step, across accumulation and resumes


def test_gradient_accumulation_measures_each_due_step_once():
    monitor = SharpnessMonitor(every_n_steps=2, num_examples=32, max_overhead=None)
    _fit([monitor], lambda: TinyClassifier(num_samples=96), max_epochs=2, accumulate_grad_batches=2)  # 3 steps an epoch
    assert [entry["step"] for entry in monitor.history] == [0, 2, 4, 6]


def test_a_second_fresh_fit_measures_its_first_step_again():
    """A new Trainer starts a new run: its step 0 is measured again, in a new history (``common.state.continues_run``;
    the earlier rule appended it to the first run's, ``[0, 0]``)."""
    monitor = SharpnessMonitor(every_n_steps=3, num_examples=32)
    for _ in range(2):
        _fit([monitor], lambda: TinyClassifier(num_samples=96), max_steps=2)
    assert [entry["step"] for entry in monitor.history] == [0]


def _comparable(history):
    return [{tag: value for tag, value in entry.items() if tag not in TIMING} for entry in history]


@pytest.mark.parametrize("accumulate", [1, 2])
def test_a_resumed_run_measures_what_the_uninterrupted_run_measures(tmp_path, accumulate):
    options = {"every_n_steps": 2, "num_examples": 32, "num_eigenvalues": 2, "tol": 1e-2, "max_overhead": None}

    def run(name, callbacks, **kwargs):
        checkpoint = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / name, save_last=True)
        pl.seed_everything(0)
        module = TinyClassifier(num_samples=96, shuffle=False)
        trainer = tiny_trainer(
            None, callbacks=[*callbacks, checkpoint], enable_checkpointing=True, max_epochs=4,
            accumulate_grad_batches=accumulate, limit_val_batches=0,
        )  # fmt: skip
        trainer.fit(module, **kwargs)

    uninterrupted = SharpnessMonitor(**options)
    run("uninterrupted", [uninterrupted])
    crashed = SharpnessMonitor(**options)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run("crashed", [crashed, CrashAt(epoch=2)])
    resumed = SharpnessMonitor(**options)
    run("resumed", [resumed], ckpt_path=tmp_path / "crashed" / "last.ckpt")
    steps = [entry["step"] for entry in resumed.history]
    assert steps == [entry["step"] for entry in uninterrupted.history] == list(range(0, 24 // accumulate + 1, 2))
    assert _comparable(resumed.history) == _comparable(uninterrupted.history)


# item 20: memory


def _held_bytes(root) -> int:
    """Bytes of every tensor storage reachable from ``root``'s attributes, each storage counted once."""
    seen, total, stack, visited = set(), 0, [root], set()
    while stack:
        item = stack.pop()
        if id(item) in visited:
            continue
        visited.add(id(item))
        if isinstance(item, Tensor):
            storage = item.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list | tuple | set):
            stack.extend(item)
        elif hasattr(item, "__dict__") and not callable(item):
            stack.extend(vars(item).values())
    return total


@pytest.mark.parametrize("lambda_min", [True, False])
def test_after_fit_the_monitor_holds_only_the_warm_start_vectors(lambda_min):
    monitor = SharpnessMonitor(
        every_n_steps=3, num_examples=32, num_eigenvalues=2, lambda_min=lambda_min, max_overhead=None
    )
    module = _fit([monitor], lambda: TinyClassifier(num_samples=96, hidden=128), max_epochs=1)
    model_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
    assert len(monitor.history) == 3
    assert _held_bytes(monitor) <= (2 + lambda_min) * model_bytes


def test_the_lanczos_basis_grows_with_the_steps_taken_not_max_iter():
    dim = 500_000  # a max_iter x dim basis would be 1 TB
    diagonal = torch.rand(dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    diagonal[0] = 10.0
    result = lanczos(
        lambda v: diagonal * v, torch.ones(dim, dtype=torch.float64), tol=1e-6, max_iter=dim, smallest=False
    )
    assert result.converged and result.num_matvecs < 40
    assert result.eigenvalues[0].item() == pytest.approx(10.0, rel=1e-6)


# item 24: every constructor argument, every kind of bad value, a clean error naming it

MONITOR_BAD_VALUES = {
    "every_n_steps": [0, -1, 2.5, "5", math.nan, math.inf, True, None],
    "num_eigenvalues": [0, 1.5, "2", math.nan, False],
    "num_examples": [0, 10.0, "1024", math.inf, True, None],
    "num_samples": [0, 10.0, "1024", math.inf, True],  # the deprecated name of num_examples
    "chunk_size": [0, -4, 8.5, "8", math.nan],
    "mode": ["test", "TRAIN", 1, None, True],
    "data": ["all", 0, None],
    "tol": [0.0, 1.0, -0.1, 2, "1e-3", math.nan, math.inf, True, None],
    "max_iter": [0, 20.0, "100", math.inf, None, False],
    "trace": ["no", 1, 0, None, "True"],
    "trace_samples": [2, 0, 30.5, "30", math.nan, True],
    "trace_method": ["exact", None, 3],
    "batch_sharpness": ["yes", 1, None],
    "batch_sharpness_batches": [0, 2.5, "8", math.inf, True],
    "smoothness": ["no", 0, None],
    "smoothness_steps": [(), (0.0,), (-1.0, 1.0), (math.nan,), (math.inf,), ("1",), "1.0", 1.0, None, (True,)],
    "spherical": ["no", 1, None],
    "lambda_min": ["false", 0, None],
    "max_overhead": [0.0, 1.0, 1.5, -0.1, "0.05", math.nan, math.inf, True],
    "loss_fn": [3, "loss", (lambda module, batch: None, 1)],
    "seed": [-1, 2**40, 1.5, "0", math.nan, True, None],
}


@pytest.mark.parametrize(
    ("argument", "value"), [(argument, value) for argument, values in MONITOR_BAD_VALUES.items() for value in values]
)
def test_every_bad_monitor_argument_is_named(argument, value):
    with pytest.raises(ArgumentError, match=f"`{argument}`"):
        SharpnessMonitor(**{argument: value})


def test_the_sweep_covers_every_monitor_argument_and_relations_are_checked():
    import inspect

    assert set(MONITOR_BAD_VALUES) == set(inspect.signature(SharpnessMonitor.__init__).parameters) - {"self"}
    with pytest.raises(ArgumentError, match=r"`max_iter`.*num_eigenvalues"):
        SharpnessMonitor(num_eigenvalues=5, max_iter=3)


OPERATOR_BAD_VALUES = {
    "params": [[], "w", [1.0], None, [torch.zeros(2)]],
    "loss_chunks": [3, None, "loss"],
    "reuse_graph": ["no", 1, None],
    "reduce_sum": [3, "sum"],
    "weight": [0.0, -0.5, 1.5, math.nan, math.inf, "1", True, None],
}


@pytest.mark.parametrize(
    ("argument", "value"), [(argument, value) for argument, values in OPERATOR_BAD_VALUES.items() for value in values]
)
def test_every_bad_hessian_operator_argument_is_named(argument, value):
    w = torch.ones(2, requires_grad=True)
    arguments = {"params": [w], "loss_chunks": lambda: [((w**3).sum(), 1.0)], argument: value}
    with pytest.raises(ArgumentError, match=f"`{argument}`"):
        HessianOperator(**arguments)


@pytest.mark.parametrize(
    ("argument", "value"), [("k", 0), ("k", 1.5), ("tol", 0.0), ("tol", math.nan), ("max_iter", 0), ("smallest", "no")]
)
def test_bad_lanczos_arguments_are_named(argument, value):
    with pytest.raises(ArgumentError, match=f"`{argument}`"):
        lanczos(lambda v: v, torch.ones(3), **{argument: value})


def test_a_layer_without_second_derivatives_is_refused_before_the_first_step_naming_the_replacement():
    # nn.EmbeddingBag's backward has no derivative: was a bare NotImplementedError from inside autograd
    trainer = tiny_trainer(max_steps=2, callbacks=[SharpnessMonitor(every_n_steps=1, num_examples=16, max_iter=4)])
    with pytest.raises(NotImplementedError, match=r"differentiates the model twice.*nn\.Embedding followed by"):
        trainer.fit(BagOfSigns())
    assert trainer.global_step == 0
