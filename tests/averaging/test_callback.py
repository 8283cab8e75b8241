import warnings

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import ModelCheckpoint

from lightning_nt import CompressionBoundReporter, IterateAveraging
from lightning_nt.averaging import load_averaged_weights
from tests.helpers import (
    BoringModel,
    TinyClassifier,
    assert_same_training,
    read_tensorboard_scalars,
    seeded_fit,
    tiny_trainer,
)


class StepRecorder(pl.Callback):
    """Records fp64 parameters after every optimizer step, keyed by global step."""

    def __init__(self):
        self.params: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.params[trainer.global_step] = {n: p.detach().double().clone() for n, p in pl_module.named_parameters()}


def _expected_mean(recorder, steps):
    return {n: torch.stack([recorder.params[s][n] for s in steps]).mean(0) for n in recorder.params[steps[0]]}


@pytest.mark.parametrize(
    ("kwargs", "trainer_kwargs", "expected_steps"),
    [
        ({"every_n_steps": 3, "start_step": 4}, {"max_epochs": 2}, [6, 9, 12]),
        ({"every_n_steps": 2}, {"max_epochs": 3, "accumulate_grad_batches": 2}, [2, 4, 6, 8]),
        ({"start_epoch": 1}, {"max_epochs": 2}, [7, 8, 9, 10, 11, 12]),
        ({"update_on": "epoch"}, {"max_epochs": 3}, [6, 12, 18]),
        ({"update_on": "epoch", "every_n_epochs": 2, "start_epoch": 1}, {"max_epochs": 4}, [12, 24]),
    ],
)
def test_uniform_average_follows_the_schedule(kwargs, trainer_kwargs, expected_steps):
    recorder = StepRecorder()
    averaging = IterateAveraging(apply_on_end=False, **kwargs)
    seeded_fit([recorder, averaging], **trainer_kwargs)
    assert averaging.n_averaged == len(expected_steps)
    expected = _expected_mean(recorder, expected_steps)
    for name, value in averaging.averaged_state_dict().items():
        torch.testing.assert_close(value.double(), expected[name], rtol=0, atol=1e-6)


def test_ema_every_k_steps_uses_the_rescaled_decay():
    recorder = StepRecorder()
    averaging = IterateAveraging(mode="ema", decay=0.9, every_n_steps=2, apply_on_end=False)
    seeded_fit([recorder, averaging], max_epochs=2)
    expected = None
    for step in range(2, 13, 2):
        iterate = recorder.params[step]
        expected = iterate if expected is None else {n: 0.81 * expected[n] + 0.19 * iterate[n] for n in iterate}
    for name, value in averaging.averaged_state_dict().items():
        torch.testing.assert_close(value.double(), expected[name], rtol=0, atol=1e-6)


def test_training_is_bitwise_the_run_without_it(tmp_path):
    """Validation with the average, BN recompute and raw comparison leave weights, optimizer and RNG alone."""
    plain, plain_trainer = seeded_fit([], max_epochs=3, module=lambda: TinyClassifier(num_samples=96, norm="batch"))
    averaged, trainer = seeded_fit(
        [IterateAveraging(compare_raw=True, apply_on_end=False)],
        root=tmp_path,
        max_epochs=3,
        module=lambda: TinyClassifier(num_samples=96, norm="batch"),
    )
    assert_same_training(averaged, trainer, plain, plain_trainer)


def test_raw_metrics_equal_the_run_without_averaging(tmp_path):
    seeded_fit([], root=tmp_path / "plain", max_epochs=3)
    seeded_fit([IterateAveraging(compare_raw=True)], root=tmp_path / "avg", max_epochs=3)
    plain = read_tensorboard_scalars(tmp_path / "plain")
    averaged = read_tensorboard_scalars(tmp_path / "avg")
    assert [round(v, 5) for _, v in averaged["raw/val_loss"]] == [round(v, 5) for _, v in plain["val_loss"]]
    assert [v for _, v in averaged["averaging/n_averaged"]] == [0.0, 6.0, 12.0, 18.0, 18.0]
    assert averaged["val_loss"] != plain["val_loss"]


def test_validation_uses_the_average(tmp_path):
    averaging = IterateAveraging(apply_on_end=False)
    module, trainer = seeded_fit([averaging], max_epochs=2)
    inputs, labels = next(iter(module.val_dataloader()))
    average = averaging.averaged_state_dict()
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(average[name])
        expected = F.cross_entropy(module(inputs), labels)
    assert trainer.callback_metrics["val_loss"] == pytest.approx(expected.item(), abs=1e-6)


def test_no_swap_before_the_first_update(tmp_path):
    seeded_fit([], root=tmp_path / "plain", max_epochs=2)
    seeded_fit([IterateAveraging(start_epoch=5)], root=tmp_path / "late", max_epochs=2)
    plain = read_tensorboard_scalars(tmp_path / "plain")["val_loss"]
    assert read_tensorboard_scalars(tmp_path / "late")["val_loss"] == plain


def test_apply_on_end_and_test_with_the_average(tmp_path):
    applied = IterateAveraging()
    module, trainer = seeded_fit([applied], max_epochs=2)
    for name, p in module.named_parameters():
        assert torch.equal(p.detach(), applied.averaged_state_dict()[name])
    kept = IterateAveraging(apply_on_end=False)
    module, trainer = seeded_fit(
        [kept], max_epochs=2, num_sanity_val_steps=0, module=lambda: TinyClassifier(num_samples=96, norm="batch")
    )
    raw = [p.detach().clone() for p in module.parameters()]
    validated = trainer.validate(module, verbose=False)[0]["val_loss"]
    assert validated == pytest.approx(trainer.callback_metrics["val_loss"].item())
    tested = trainer.test(module, verbose=False)[0]["test_loss"]  # under inference_mode
    assert tested == pytest.approx(validated)
    assert all(torch.equal(a, b) for a, b in zip(raw, module.parameters()))
    kept.save_averaged_weights(tmp_path / "avg.pt")
    fresh = TinyClassifier(norm="batch")
    load_averaged_weights(fresh, tmp_path / "avg.pt")
    assert torch.equal(fresh.net[0].weight, kept.averaged_state_dict()["net.0.weight"])


@pytest.mark.parametrize("bn", ["average", "copy", "recompute"])
def test_batchnorm_policies(bn):
    averaging = IterateAveraging(bn=bn, apply_on_end=False, bn_batches=2)
    _, trainer = seeded_fit([averaging], max_epochs=2, module=lambda: TinyClassifier(num_samples=96, norm="batch"))
    has_buffers = "net.1.running_mean" in averaging.averaged_state_dict()
    assert has_buffers == (bn == "average")
    if bn == "average":
        assert averaging.averaged_state_dict()["net.1.num_batches_tracked"].item() == 12
    assert torch.isfinite(trainer.callback_metrics["val_loss"])


def test_resume_equals_uninterrupted(tmp_path):
    def callbacks():
        return [
            IterateAveraging(mode="ema", decay=0.8, apply_on_end=False, evaluate=False),
            IterateAveraging(start_step=3),
        ]

    def module():  # Lightning does not restore the global RNG, so the data order must not depend on it
        return TinyClassifier(num_samples=96, shuffle=False)

    straight = callbacks()
    seeded_fit(straight, module=module, max_epochs=4)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1)
    seeded_fit([*callbacks(), checkpoint], module=module, max_epochs=2, enable_checkpointing=True)
    resumed = callbacks()
    pl.seed_everything(1)
    tiny_trainer(None, callbacks=resumed, max_epochs=4).fit(module(), ckpt_path=str(tmp_path / "epoch=1-step=12.ckpt"))
    for left, right in zip(straight, resumed):
        assert left.n_averaged == right.n_averaged
        for name, value in left.averaged_state_dict().items():
            assert torch.equal(value, right.averaged_state_dict()[name]), name
    assert straight[0].averaged_state_dict()["net.0.weight"].ne(straight[1].averaged_state_dict()["net.0.weight"]).any()


def test_two_averages_coexist_but_only_one_is_evaluated(tmp_path):
    plain, _ = seeded_fit([], max_epochs=2)
    tail, ema = (
        IterateAveraging(apply_on_end=False),
        IterateAveraging(mode="ema", decay=0.9, evaluate=False, apply_on_end=False),
    )
    both, _ = seeded_fit([tail, ema], max_epochs=2)
    for a, b in zip(plain.parameters(), both.parameters()):
        assert torch.equal(a, b)  # training went on from the raw weights
    assert tail.n_averaged == ema.n_averaged == 12
    with pytest.raises(RuntimeError, match="evaluate=False to all but one"):
        seeded_fit([IterateAveraging(apply_on_end=False), IterateAveraging(mode="ema", decay=0.9, apply_on_end=False)])
    with pytest.raises(RuntimeError, match="apply_on_end=False to all but one"):
        seeded_fit([IterateAveraging(), IterateAveraging(mode="ema", decay=0.9, evaluate=False)])


def test_attaches_to_boring_model():
    averaging = IterateAveraging(mode="ema", half_life=5)
    seeded_fit([averaging], module=BoringModel, max_epochs=1, limit_train_batches=8, limit_val_batches=2)
    assert averaging.n_averaged == 8


def test_gadam_in_two_lines():
    class Gadam(TinyClassifier):
        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-2, weight_decay=5e-4)

    averaging = IterateAveraging(mode="uniform", update_on="epoch", start_epoch=2)
    seeded_fit([averaging], module=lambda: Gadam(num_samples=96), max_epochs=4)
    assert averaging.n_averaged == 2


def test_warns_when_the_optimizer_is_schedule_free():
    class AdamWScheduleFree(torch.optim.AdamW):
        pass

    class Module(TinyClassifier):
        def configure_optimizers(self):
            return AdamWScheduleFree(self.parameters())

    with pytest.warns(UserWarning, match="averages twice"):
        seeded_fit([IterateAveraging()], module=Module, max_epochs=1)


def test_warns_when_nothing_was_averaged():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        seeded_fit([IterateAveraging(start_step=1000)], max_epochs=1)
    assert any("before the first update" in str(w.message) for w in caught)


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"mode": "swa"}, "mode"),
        ({"mode": "ema", "decay": 1.5}, "decay"),
        ({"mode": "ema", "decay": 0.0}, "decay"),
        ({"start_step": -1}, "start_step"),
        ({"start_epoch": -2}, "start_epoch"),
        ({"every_n_steps": 0}, "every_n_steps"),
        ({"mode": "ema", "decay": 0.9, "half_life": 10}, "half_life"),
        ({"update_on": "batch"}, "update_on"),
        ({"bn": "freeze"}, "bn"),
        ({"decay": 0.9}, "mode='ema'"),
        ({"start_step": 1, "start_epoch": 1}, "start_epoch"),
        ({"compare_raw": True, "evaluate": False}, "evaluate"),
    ],
)
def test_bad_input_names_the_argument(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        IterateAveraging(**kwargs)


def _certified(callbacks):
    pl.seed_everything(0)
    tiny_trainer(None, callbacks=callbacks, max_epochs=1).fit(TinyClassifier(num_samples=32, shuffle=False))
    return next(c for c in callbacks if isinstance(c, CompressionBoundReporter)).report


def test_a_reporter_listed_before_it_describes_the_average_that_fit_returns():
    # a CompressionBoundReporter listed before IterateAveraging certified the raw weights, listed after it the
    # applied average: the order of `callbacks=` decided which model the bound was about
    def reporter():
        return CompressionBoundReporter(levels=(3, 9), prune=(0.0,), methods=("uniform",), finalists=1)

    before = _certified([reporter(), IterateAveraging()])
    after = _certified([IterateAveraging(), reporter()])
    raw = _certified([reporter()])
    for tag in ("compression/train_error", "compression/code_bits", "compression/error_bound"):
        assert before[tag] == after[tag], tag
    assert before["compression/code_bits"] != raw["compression/code_bits"]


def test_a_second_fit_on_the_same_trainer_continues_the_run_as_a_resume_does(tmp_path):
    # the second fit trained on from the average (applied at the end of the first) with the raw run's optimizer
    # state, and started a new average: neither is the run a resume from the checkpoint gives
    def trainer(callback):
        return tiny_trainer(
            None, callbacks=[callback], max_epochs=2, enable_checkpointing=True, default_root_dir=tmp_path
        )

    pl.seed_everything(0)
    twice, averaging = TinyClassifier(num_samples=32, shuffle=False), IterateAveraging()
    first = trainer(averaging)
    first.fit(twice)
    first.save_checkpoint(tmp_path / "two_epochs.ckpt")
    first.fit_loop.max_epochs = 3
    first.fit(twice)

    pl.seed_everything(0)
    resumed, resumed_averaging = TinyClassifier(num_samples=32, shuffle=False), IterateAveraging()
    second = trainer(resumed_averaging)
    second.fit_loop.max_epochs = 3
    second.fit(resumed, ckpt_path=tmp_path / "two_epochs.ckpt")

    assert averaging.n_averaged == resumed_averaging.n_averaged == 3 * first.num_training_batches
    for name, value in resumed.state_dict().items():
        assert torch.equal(twice.state_dict()[name], value), name
    for name, value in resumed_averaging.averaged_state_dict().items():
        assert torch.equal(averaging.averaged_state_dict()[name], value), name


@pytest.mark.parametrize(
    "lightning_averaging",
    [
        lambda: pl.callbacks.StochasticWeightAveraging(swa_lrs=0.05),
        pytest.param(
            lambda: pl.callbacks.EMAWeightAveraging(),
            marks=pytest.mark.skipif(not hasattr(pl.callbacks, "EMAWeightAveraging"), reason="pytorch-lightning<2.6"),
        ),
    ],
    ids=["StochasticWeightAveraging", "EMAWeightAveraging"],
)
def test_lightnings_own_averaging_beside_it_is_refused_unless_it_only_observes(lightning_averaging):
    # both swapped their average in for validation and copied it in at the end: which average was validated and
    # which one fit returned depended on the order of the callbacks
    trainer = tiny_trainer(None, callbacks=[lightning_averaging(), IterateAveraging()], max_epochs=1)
    with pytest.raises(RuntimeError, match=r"would both put their average into the module"):
        trainer.fit(TinyClassifier(num_samples=32))
    assert trainer.global_step == 0
    observer = IterateAveraging(mode="ema", decay=0.5, evaluate=False, apply_on_end=False)
    tiny_trainer(None, callbacks=[lightning_averaging(), observer], max_epochs=1).fit(TinyClassifier(num_samples=32))
    assert observer.n_averaged > 0
