"""The ranks' verdicts on the first-step checks agreed: a refusal found on one rank is every rank's error (issue 10).

The collectives are stood in for by a strategy that answers as the other ranks would; the 2-process runs are in
``test_ddp.py`` (Lightning's script launcher: rank 0 raises rank 1's refusal).
"""

from __future__ import annotations

import pytest
import torch

from lightning_nt.common.validation import check_choice
from lightning_nt.privacy.agreement import agree_across_ranks, raised_by_lightning_nt


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


def test_only_lightning_nt_refusals_are_agreed_on():
    """A refusal raised by the package's checks is agreed across ranks; the module's own error (raised in its code,
    or in a library it calls) is not, since the other ranks may be in a collective of the module's own."""
    with pytest.raises(ValueError) as refusal:
        check_choice("mode", "nonsense", ("a", "b"))
    assert raised_by_lightning_nt(refusal.value)
    with pytest.raises(RuntimeError) as own:
        torch.ones(2) @ torch.ones(3)
    assert not raised_by_lightning_nt(own.value)
    with pytest.raises(MemoryError) as here:
        raise MemoryError("the module's own")
    assert not raised_by_lightning_nt(here.value)
