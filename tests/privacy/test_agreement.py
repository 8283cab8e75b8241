"""The ranks' verdicts on the first-step checks agreed: a refusal found on one rank is every rank's error (issue 10).

The collectives are stood in for by a strategy that answers as the other ranks would; the 2-process runs are in
``test_ddp.py`` (Lightning's script launcher: rank 0 raises rank 1's refusal).
"""

from __future__ import annotations

import pytest
import torch

from lightning_nt.privacy.agreement import agree_across_ranks


class Ranks:
    """This process is rank ``rank``; the others report ``flags`` (failed, pending) and ``messages``."""

    root_device = torch.device("cpu")

    def __init__(self, rank: int, flags: list[tuple[bool, bool]], messages: list[str | None]) -> None:
        self.rank, self.flags, self.messages = rank, flags, messages
        self.broadcasts: list[int] = []

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        rows = [tensor if rank == self.rank else torch.tensor(flags) for rank, flags in enumerate(self.flags)]
        return torch.stack(rows).to(torch.int64)

    def broadcast(self, value: object, src: int = 0) -> object:
        self.broadcasts.append(src)
        return value if src == self.rank else self.messages[src]


def test_without_a_failure_the_ranks_learn_whether_any_still_has_checks_to_run():
    ranks = Ranks(0, [(False, False), (False, True)], [None, None])
    assert agree_across_ranks(ranks, None, pending=False) is True
    ranks = Ranks(0, [(False, False), (False, False)], [None, None])
    assert agree_across_ranks(ranks, None, pending=False) is False
    assert ranks.broadcasts == []  # no message travels unless a rank failed


def test_a_refusal_on_another_rank_is_raised_here_naming_that_rank():
    ranks = Ranks(0, [(False, False), (True, False), (True, False)], [None, "A layer mixes", "Another"])
    with pytest.raises(RuntimeError, match=r"^A layer mixes\n\(Found on rank 1 of 3; every rank stops") as caught:
        agree_across_ranks(ranks, None, pending=True)
    assert caught.value.__cause__ is None and ranks.broadcasts == [1]  # the lowest failing rank's message


def test_this_ranks_own_failure_is_raised_as_the_others_raise_it_chained_to_the_original():
    failure = ValueError("bad batch")
    ranks = Ranks(1, [(False, False), (False, False)], [None, None])
    with pytest.raises(RuntimeError, match=r"^ValueError: bad batch\n\(Found on rank 1 of 2;") as caught:
        agree_across_ranks(ranks, failure, pending=False)
    assert caught.value.__cause__ is failure
