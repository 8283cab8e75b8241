"""Every constructor argument of the averaging API is checked at construction, naming the argument."""

import inspect
import math

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from lightning_nt import IterateAveraging
from lightning_nt.averaging import IterateAverage, decay_per_update
from lightning_nt.common.validation import ArgumentError
from tests.helpers import TinyClassifier, read_tensorboard_scalars, tiny_trainer

NAN, INF = math.nan, math.inf
NOT_INTEGERS = ["3", 2.5, NAN, INF, True, None]
NOT_FINITE = ["0.5", NAN, INF, -INF, True, [0.5]]
NOT_BOOLEANS = ["no", "False", 1, 0, None]

# argument -> bad values; `None` is a bad value only where the argument may not be None
CALLBACK = {
    "mode": ["swa", "EMA", 1, None],
    "start_step": [v for v in NOT_INTEGERS if v is not None] + [-1],
    "start_epoch": [v for v in NOT_INTEGERS if v is not None] + [-2],
    "every_n_steps": [*NOT_INTEGERS, 0, -3],
    "update_on": ["batch", None, 1],
    "every_n_epochs": [*NOT_INTEGERS, 0],
    "decay": [*NOT_FINITE, 0.0, 1.0, 1.5, -0.1],
    "half_life": [*NOT_FINITE, 0.0, -5.0],
    "warmup": [*NOT_FINITE, 0.0, -1.0],
    "bn": ["freeze", None, True],
    "bn_batches": [v for v in NOT_INTEGERS if v is not None] + [0],
    "compare_raw": NOT_BOOLEANS,
    "apply_on_end": NOT_BOOLEANS,
    "evaluate": NOT_BOOLEANS,
    "device": ["banana", "gpu0", 3, True, "cuda:x"],
    "loss_fn": ["loss", 3, True],
    "name": ["", 3, True],
}
EMA_ONLY = {"decay", "half_life", "warmup"}

CORE = {
    "module": ["net", None, 3],
    "mode": ["median", None],
    "decay": [*NOT_FINITE, 0.0, 1.0],
    "warmup": [*NOT_FINITE, 0.0],
    "buffers": NOT_BOOLEANS,
    "device": ["banana", 3],
}


def test_the_sweep_covers_every_argument():
    assert set(CALLBACK) == set(inspect.signature(IterateAveraging).parameters)
    assert set(CORE) == set(inspect.signature(IterateAverage).parameters)


@pytest.mark.parametrize(("argument", "value"), [(a, v) for a, values in CALLBACK.items() for v in values], ids=repr)
def test_callback_refuses_bad_values_naming_the_argument(argument, value):
    base = {"mode": "ema", "apply_on_end": False} if argument in EMA_ONLY else {}
    with pytest.raises(ArgumentError, match=f"`{argument}`"):
        IterateAveraging(**{**base, argument: value})


@pytest.mark.parametrize(("argument", "value"), [(a, v) for a, values in CORE.items() for v in values], ids=repr)
def test_core_refuses_bad_values_naming_the_argument(argument, value):
    kwargs = {"module": nn.Linear(2, 2), "mode": "ema", "decay": 0.9, argument: value}
    with pytest.raises(ArgumentError, match=f"`{argument}`"):
        IterateAverage(**kwargs)


@pytest.mark.parametrize(("argument", "value"), [("decay", NAN), ("half_life", INF), ("every_n_steps", 0)])
def test_decay_per_update_refuses_bad_values(argument, value):
    kwargs = {"half_life": 10.0} if argument == "every_n_steps" else {}
    with pytest.raises(ArgumentError, match=f"`{argument}`"):
        decay_per_update(**{**kwargs, argument: value})


def test_good_values_are_accepted():
    IterateAveraging(mode="ema", half_life=100, warmup=1, every_n_steps=5, device="cpu", name="ema")
    spelled = IterateAveraging(device=torch.device("cpu"))
    assert spelled.state_key == IterateAveraging(device="cpu").state_key  # resumable whichever way it is spelled
    IterateAveraging(bn_batches=3, start_epoch=0, loss_fn=lambda module, batch: F.mse_loss(*batch), compare_raw=True)
    IterateAverage(nn.Linear(2, 2), mode="ema", decay=0.5, device="cpu")


def _loss(module, batch):
    return F.cross_entropy(module(batch[0]), batch[1])


def _other_loss(module, batch):
    return F.cross_entropy(module(batch[0]), batch[1], label_smoothing=0.1)


@pytest.mark.parametrize(
    "difference",
    [
        {"warmup": 0.5},
        {"bn": "average"},
        {"bn_batches": 2},
        {"device": "cpu"},
        {"loss_fn": _loss},
        {"name": "second"},
    ],
    ids=lambda difference: next(iter(difference)),  # the argument's name: a function's repr changes per process
)
def test_instances_differing_in_one_argument_coexist(difference):
    """Every configuration argument is in the state key, so Lightning accepts both and restores each its own."""
    base = {"mode": "ema", "decay": 0.9, "evaluate": False, "apply_on_end": False, "loss_fn": _other_loss}
    first, second = IterateAveraging(**base), IterateAveraging(**{**base, **difference})
    assert first.state_key != second.state_key
    pl.Trainer(callbacks=[first, second], logger=False, enable_checkpointing=False)
    assert "0x" not in second.state_key  # no memory address: the key is the same in the resuming process


def test_each_instance_logs_under_its_own_name(tmp_path):
    callbacks = [
        IterateAveraging(),
        IterateAveraging(mode="ema", half_life=5, evaluate=False, apply_on_end=False),
        IterateAveraging(mode="ema", decay=0.5, evaluate=False, apply_on_end=False, name="fast_ema"),
    ]
    pl.seed_everything(0)
    tiny_trainer(tmp_path, max_epochs=1, callbacks=callbacks).fit(TinyClassifier(num_samples=32))
    logged = read_tensorboard_scalars(tmp_path)
    for tag in ("averaging", "averaging_1", "fast_ema"):
        assert logged[f"{tag}/n_averaged"][-1][1] == 2.0, tag
        assert logged[f"{tag}/skipped"][-1][1] == 0.0, tag
    clash = [IterateAveraging(name="ema"), IterateAveraging(mode="ema", evaluate=False, apply_on_end=False, name="ema")]
    with pytest.raises(RuntimeError, match="name="):
        tiny_trainer(None, callbacks=clash).fit(TinyClassifier(num_samples=32))


def test_evaluating_and_applying_are_one_instance():
    callbacks = [IterateAveraging(apply_on_end=False), IterateAveraging(mode="ema", evaluate=False)]
    with pytest.raises(RuntimeError, match="same one"):
        tiny_trainer(None, callbacks=callbacks).fit(TinyClassifier(num_samples=32))
