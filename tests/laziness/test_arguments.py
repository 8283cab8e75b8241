"""Every constructor argument of LazinessMonitor is checked at construction, naming the argument."""

import inspect
import math

import pytest
import pytorch_lightning as pl

from lightning_nt.common.validation import ArgumentError
from lightning_nt.laziness import LazinessMonitor

NOT_INTEGERS = ["3", 2.5, math.nan, math.inf, True]

BAD = {
    "every_n_steps": [*NOT_INTEGERS, None, 0, -1],
    "num_examples": [*NOT_INTEGERS, None, 1, 0],
    "num_samples": [*NOT_INTEGERS, 1, 0],  # the deprecated name of num_examples: None is its "not given"
    "ntk": ["no", 1, 0, None],
    "layers": ["net.0", [], [1], ("net.0", None), 3],
    "chunk_size": [*NOT_INTEGERS, 0, -4],
    "hold_jacobians": ["no", 1, None],
    "forward_fn": ["forward", 3, True],
    "target_fn": ["labels", 3, False],
    "max_jacobian_bytes": [*NOT_INTEGERS, 0, -1],
    "output_chunk_size": [*NOT_INTEGERS, 0, -1],
}


def test_the_sweep_covers_every_argument():
    assert set(BAD) == set(inspect.signature(LazinessMonitor).parameters)


@pytest.mark.parametrize(("argument", "value"), [(a, v) for a, values in BAD.items() for v in values], ids=repr)
def test_bad_values_are_refused_naming_the_argument(argument, value):
    with pytest.raises(ArgumentError, match=f"`{argument}`"):
        LazinessMonitor(**{argument: value})


def _forward(module, batch):
    return module(batch[0])


@pytest.mark.parametrize(
    "difference",
    [
        {"every_n_steps": 7},
        {"num_examples": 64},
        {"ntk": False},
        {"layers": ["net.2"]},
        {"chunk_size": None},
        {"hold_jacobians": False},
        {"forward_fn": _forward},
        {"target_fn": _forward},
    ],
    ids=lambda difference: next(iter(difference)),  # the argument's name: a function's repr changes per process
)
def test_instances_differing_in_one_argument_coexist(difference):
    first, second = LazinessMonitor(), LazinessMonitor(**difference)
    assert first.state_key != second.state_key and "0x" not in second.state_key
    pl.Trainer(callbacks=[first, second], logger=False, enable_checkpointing=False)


def test_good_values_are_accepted():
    LazinessMonitor(every_n_steps=1, num_examples=2, ntk=False, layers=("a", "b"), chunk_size=None)
