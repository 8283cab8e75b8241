import inspect
import math

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint

from lightning_nt import GradInit, SharpnessMonitor
from lightning_nt.common.validation import ArgumentError
from tests.helpers import TinyClassifier, TinyTransformer, read_tensorboard_scalars, read_tensorboard_tags, tiny_trainer


class Snapshot(pl.Callback):
    """Records parameters, their identities and the optimizer's references when training starts (after GradInit)."""

    def on_train_start(self, trainer, pl_module):
        self.params = {n: p.detach().clone() for n, p in pl_module.named_parameters()}
        self.ids = [id(p) for p in pl_module.parameters()]
        self.optimizer_ids = [id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]]
        self.buffers = {n: b.clone() for n, b in pl_module.named_buffers()}
        self.training = [m.training for m in pl_module.modules()]


def _fit(callbacks, module=None, root=None, **kwargs):
    pl.seed_everything(0)
    module = (module or (lambda: TinyClassifier(num_samples=96, norm="batch")))()
    initial = {n: p.detach().clone() for n, p in module.named_parameters()}
    trainer = tiny_trainer(root, callbacks=callbacks, **kwargs)
    trainer.fit(module)
    return module, trainer, initial


def test_rescales_in_place_and_touches_nothing_else(tmp_path):
    gradinit, snapshot = GradInit(iterations=20, lr=0.05), Snapshot()
    _, _, initial = _fit([gradinit, snapshot], root=tmp_path, max_steps=1)
    assert snapshot.ids == snapshot.optimizer_ids  # the optimizer still holds the module's own parameters
    assert any(abs(s - 1) > 1e-3 for s in gradinit.scales.values())
    for name, value in snapshot.params.items():
        torch.testing.assert_close(value, initial[name] * gradinit.scales[name])
    assert all(torch.equal(b, torch.zeros_like(b)) for n, b in snapshot.buffers.items() if "running_mean" in n)
    assert snapshot.training == [True] * len(snapshot.training)
    scalars = read_tensorboard_scalars(tmp_path)
    assert {"gradinit/lookahead_loss_start", "gradinit/lookahead_loss_end", "gradinit/grad_norm"} <= scalars.keys()
    tags = read_tensorboard_tags(tmp_path)
    assert "gradinit/scales" in tags["images"] and any("gradinit/scales" in t for t in tags["tensors"])


class MetricState(pl.Callback):
    def on_train_start(self, trainer, pl_module):  # right after GradInit's search
        self.updates, self.true_positives = pl_module.accuracy._update_count, pl_module.accuracy.tp.clone()


def test_torchmetrics_and_logs_of_the_module_are_untouched(tmp_path):
    state = MetricState()
    _fit([GradInit(iterations=5), state], root=tmp_path, max_epochs=1)
    assert state.updates == 0 and not state.true_positives.any()  # the module's training_step ran 5x2 times
    logged = read_tensorboard_scalars(tmp_path)
    assert len(logged["train_loss"]) == 6  # one per training step, none from the search


def test_eta_and_algorithm_come_from_the_configured_optimizer():
    gradinit = GradInit(iterations=3)
    _fit([gradinit], module=TinyTransformer, max_steps=1)  # Adam at lr 1e-3, attention on the CPU
    assert gradinit._simulated_optimizer(torch.optim.Adam([torch.zeros(1, requires_grad=True)], lr=1e-3)) == (
        "adam",
        1e-3,
    )
    assert gradinit._simulated_optimizer(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.2)) == ("sgd", 0.2)
    assert (
        GradInit(eta=0.5)._simulated_optimizer(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.2))[1] == 0.5
    )


def test_constraint_branch_through_attention_on_the_cpu():
    gradinit = GradInit(iterations=4, gamma=1e-6, algorithm="sgd", eta=0.1)
    _fit([gradinit], module=TinyTransformer, max_steps=1)
    assert gradinit.result.constraint_iterations == 4
    assert any(abs(s - 1) > 1e-4 for s in gradinit.scales.values())


def test_not_rerun_when_resuming(tmp_path):
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1)
    _fit([GradInit(iterations=5), checkpoint], max_epochs=1, enable_checkpointing=True)
    resumed = GradInit(iterations=5)
    pl.seed_everything(0)
    trainer = tiny_trainer(None, callbacks=[resumed], max_epochs=2)
    trainer.fit(TinyClassifier(num_samples=96, norm="batch"), ckpt_path=str(tmp_path / "epoch=0-step=6.ckpt"))
    assert resumed.result is None and resumed.scales  # skipped; the scales come from the checkpoint


def test_divergence_keeps_the_original_weights():
    def exploding(module, batch):
        return torch.nn.functional.cross_entropy(module(batch[0]), batch[1]) * float("inf")

    gradinit = GradInit(iterations=5, loss_fn=exploding)
    with pytest.warns(UserWarning, match="diverged"):
        _, _, initial = _fit([gradinit, snapshot := Snapshot()], max_steps=1)
    assert gradinit.scales == {} and "diverged" in gradinit.summary()
    for name, value in snapshot.params.items():
        assert torch.equal(value, initial[name])


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"iterations": 0}, "iterations"),
        ({"lr": 0}, "lr"),
        ({"eta": -1.0}, "eta"),
        ({"gamma": 0}, "gamma"),
        ({"min_scale": 0}, "min_scale"),
        ({"max_scale": 0.001}, "max_scale"),
        ({"algorithm": "lamb"}, "algorithm"),
    ],
)
def test_bad_input_names_the_argument(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        GradInit(**kwargs)


def test_lookahead_tags_are_logged_when_every_iteration_takes_the_constraint_branch(tmp_path):
    gradinit = GradInit(iterations=4, gamma=1e-6, algorithm="sgd", eta=0.1)
    _fit([gradinit], module=TinyTransformer, root=tmp_path, max_steps=1)
    assert gradinit.result.constraint_iterations == 4 and not gradinit.result.lookahead_losses
    scalars = read_tensorboard_scalars(tmp_path)
    start, end = scalars["gradinit/lookahead_loss_start"][0][1], scalars["gradinit/lookahead_loss_end"][0][1]
    assert math.isfinite(start) and math.isfinite(end) and start != end


_GOOD = {"iterations": 3, "lr": 0.01, "eta": 0.1, "gamma": 1.0, "algorithm": "sgd", "normalize_grad": True}
_GOOD |= {"min_scale": 0.01, "max_scale": 10.0, "batch_overlap": True, "second_order": False, "grad_clip": 1.0}
_GOOD |= {"loss_fn": None}
_NOT_A_NUMBER = ["1", None, [1.0], math.nan, math.inf, -math.inf, True]
_BAD = {
    "iterations": ["3", 2.5, 0, -1, True, None, math.nan],
    "lr": [*_NOT_A_NUMBER, 0.0, -0.1],
    "eta": [n for n in _NOT_A_NUMBER if n is not None] + [0.0, -0.1],
    "gamma": [*_NOT_A_NUMBER, 0.0, -1.0],
    "algorithm": ["lamb", "SGD", None, 1, True],
    "normalize_grad": ["no", "False", 0, 1, None],
    "min_scale": [*_NOT_A_NUMBER, 0.0, -0.5],
    "max_scale": [n for n in _NOT_A_NUMBER if n is not None] + [0.0, -1.0, 0.005],
    "batch_overlap": ["yes", 1, None],
    "second_order": ["no", 0, None],
    "grad_clip": [*_NOT_A_NUMBER, -1.0],
    "loss_fn": ["loss", 3, [len]],
}


def test_the_sweep_covers_every_constructor_argument():
    assert set(_BAD) == set(_GOOD) == set(inspect.signature(GradInit).parameters)
    GradInit(**_GOOD)


@pytest.mark.parametrize(("argument", "value"), [(a, v) for a, values in _BAD.items() for v in values])
def test_every_bad_value_of_every_argument_is_refused_naming_it(argument, value):
    with pytest.raises(ArgumentError, match=f"`{argument}`"):
        GradInit(**(_GOOD | {argument: value}))


def test_the_scales_picture_names_its_values_and_marks_held_scales():
    gradinit = GradInit(iterations=20, lr=0.5, min_scale=0.9, max_scale=1.1)  # a large lr drives scales to the bounds
    _fit([gradinit], max_steps=1)
    figure = gradinit.figure()
    axes = figure.axes[0]
    assert "look-ahead loss" in axes.get_title() and "multiplied" in axes.get_xlabel()
    assert [label.get_text() for label in axes.get_yticklabels()] == list(gradinit.scales)
    assert len(axes.texts) == len(gradinit.scales)  # every bar carries its value
    held = [
        n
        for n, s in gradinit.scales.items()
        if not n.endswith("bias") and any(math.isclose(s, bound, rel_tol=1e-6) for bound in (0.9, 1.1))
    ]
    colours = [tuple(round(c, 3) for c in bar.get_facecolor()[:3]) for bar in axes.patches[: len(gradinit.scales)]]
    red = (0.839, 0.153, 0.157)  # matplotlib's tab:red
    assert held and colours.count(red) == len(held)


def test_scales_held_at_a_bound_are_warned_naming_them():
    """The README's DigitsCNN had a layer pushed to min_scale and trained at chance for 10 epochs, with only "weight
    scales in [0.01, 2.09]" said; a held scale is now a warning naming the tensors and the knobs."""
    gradinit = GradInit(iterations=20, lr=0.5, min_scale=0.9, max_scale=1.1)
    with pytest.warns(UserWarning, match=r"GradInit: the scales of \[.*\] ended at a bound") as warned:
        _fit([gradinit], max_steps=1)
    message = next(str(w.message) for w in warned if "ended at a bound" in str(w.message))
    held = [n for n, s in gradinit.scales.items() if not n.endswith("bias") and min(abs(s - 0.9), abs(s - 1.1)) < 1e-6]
    assert held and all(repr(name) in message for name in held)
    assert "`lr`" in message and "`min_scale`" in message


def test_scales_inside_the_bounds_are_not_warned(recwarn):
    gradinit = GradInit(iterations=5, lr=0.01)
    _fit([gradinit], max_steps=1)
    assert not [w for w in recwarn if "ended at a bound" in str(w.message)]
    assert all(s > 0.01 for n, s in gradinit.scales.items() if not n.endswith("bias"))


def _sharpness_history(callbacks):
    pl.seed_everything(0)
    trainer = tiny_trainer(None, callbacks=callbacks, max_steps=2)
    trainer.fit(TinyClassifier(num_samples=32, shuffle=False))
    return next(c for c in trainer.callbacks if isinstance(c, SharpnessMonitor)).history


def test_a_monitor_listed_before_it_measures_the_weights_training_starts_from():
    # a SharpnessMonitor listed before GradInit measured step 0 on the weights GradInit then rescaled
    def monitor():
        return SharpnessMonitor(every_n_steps=1, num_examples=16, max_iter=8, max_overhead=None)

    before = _sharpness_history([monitor(), GradInit(iterations=3)])
    after = _sharpness_history([GradInit(iterations=3), monitor()])
    assert [entry["step"] for entry in before] == [0, 1, 2]
    assert [entry["sharpness/lambda_max"] for entry in before] == [entry["sharpness/lambda_max"] for entry in after]
