"""The per-rank state helpers: a disagreement anywhere in the states fails, naming the rank and the value."""

import pytest
import torch

from tests.helpers.ranks import assert_ranks_agree, rank_states, save_rank_state


class _Rank:
    def __init__(self, rank: int) -> None:
        self.global_rank = rank


def _history(loss: float = 0.5, weight: float = 1.0, seconds: float = 0.1) -> list[dict]:
    return [{"step": 0, "loss": loss, "seconds": seconds, "weights": {"w": torch.full((2,), weight)}}]


def test_saved_states_come_back_in_rank_order(tmp_path):
    for rank in (0, 1):
        save_rank_state(_Rank(rank), tmp_path, {"rank": rank})
    assert rank_states(tmp_path) == [{"rank": 0}, {"rank": 1}]


def test_equal_states_agree_ignoring_and_approximating_what_is_named():
    assert_ranks_agree([_history(), _history(seconds=0.2)], ignore={"seconds"})
    assert_ranks_agree([_history(), _history(loss=0.5 + 1e-12)], ignore={"seconds"}, approx={"loss"})


@pytest.mark.parametrize(
    ("other", "named"),
    [
        (_history(loss=0.5 + 1e-12), r"\[0\]\['loss'\]"),
        (_history(weight=1.0 + 1e-7), r"\[0\]\['weights'\]\['w'\]"),
        (_history(seconds=0.2), r"\[0\]\['seconds'\]"),
        (_history() * 2, "length"),
        ([{**_history()[0], "extra": 1}], "keys"),
        ([{**_history()[0], "weights": {"w": torch.ones(2, dtype=torch.float64)}}], "dtype"),
    ],
    ids=["float", "tensor", "unignored", "length", "keys", "dtype"],
)
def test_any_disagreement_fails_naming_the_rank_and_the_value(other, named):
    with pytest.raises(AssertionError, match=rf"rank 1: state.*{named}"):
        assert_ranks_agree([_history(), other])
