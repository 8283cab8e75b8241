"""The ranks' verdicts on the first-step checks agreed: a refusal found on one rank is every rank's error (issue 10);
on the later steps, a refusal held through its step and carried by the step's own all-reduce (``LaterRefusals``,
``AgreedReduction``).

The collectives are stood in for by a strategy that answers as the other ranks would, and the all-reduce by a stand-in
for the other process; the 2-process runs are in ``test_ddp.py`` (Lightning's script launcher: rank 0 raises rank 1's
refusal) and ``test_ddp_later_refusals.py``.
"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

from lightning_nt.common.validation import check_choice
from lightning_nt.privacy.agreement import (
    AgreedReduction,
    LaterRefusals,
    RefusalRoute,
    agree_across_ranks,
    raise_refusal,
    raised_by_lightning_nt,
)
from lightning_nt.privacy.engines.uses import WeightedBagGuard


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


def _a_refusal() -> ValueError:
    """A refusal raised in lightning_nt's own code (the kind a rank holds through a later step)."""
    try:
        check_choice("mode", "nonsense", ("a", "b"))
    except ValueError as refusal:
        return refusal
    raise AssertionError("not refused")


def _carried(refusals: LaterRefusals, total: float) -> LaterRefusals:
    refusals.carried(torch.tensor([total]))
    return refusals


def test_a_later_step_without_a_refusal_is_read_without_any_collective():
    ranks = Ranks(0, [(False, False), (False, False)], [None, None])
    counting = CountingRanks(ranks)
    LaterRefusals().check(counting)  # nothing carried yet
    _carried(LaterRefusals(), 0.0).check(counting)
    assert counting.collectives == 0


def test_a_refusal_held_by_another_rank_is_raised_here_at_the_next_check_naming_that_rank_once():
    refusals = _carried(LaterRefusals(), 1.0)
    ranks = Ranks(0, [(False, False), (True, False)], [None, "bag.weight is pooled by an EmbeddingBag"])
    with pytest.raises(
        RuntimeError,
        match=r"^bag.weight is pooled by an EmbeddingBag\n\(Found on rank 1 of 2 in a "
        r"step after the first ones; every rank stops with this error at its next step\. The refused "
        r"step's update was all-NaN on every rank, so nothing of it was released",
    ):
        refusals.check(ranks)
    refusals.check(ranks)  # read once: nothing more to raise
    assert ranks.broadcasts == [1]


def test_only_lightning_nt_refusals_are_held():
    refusals = LaterRefusals()
    assert not refusals.hold(MemoryError("the module's own")) and refusals.failure is None
    first, second = _a_refusal(), _a_refusal()
    assert refusals.hold(first) and refusals.hold(second) and refusals.failure is first  # the first one met
    assert refusals.flag(torch.zeros(3, dtype=torch.bfloat16)).tolist() == [1.0]
    assert LaterRefusals().flag(torch.zeros(3)).tolist() == [0.0]


class CountingRanks:
    """``ranks`` counting the collectives made through it."""

    def __init__(self, ranks: Ranks) -> None:
        self.ranks, self.collectives = ranks, 0
        self.root_device = ranks.root_device

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        self.collectives += 1
        return self.ranks.all_gather(tensor)

    def broadcast(self, value: object, src: int = 0) -> object:
        self.collectives += 1
        return self.ranks.broadcast(value, src)


class OpacusLike:
    """What :class:`AgreedReduction` needs of Opacus's distributed DP optimizer: its parameters, ``pre_step`` (which
    raises ``failure`` if set) and the mean over 2 processes."""

    loss_reduction, world_size = "mean", 2

    def __init__(self, params: list[torch.Tensor], failure: Exception | None = None) -> None:
        self.params, self.failure = params, failure

    def pre_step(self, closure: object = None) -> bool:
        if self.failure is not None:
            raise self.failure
        return True

    def reduce_gradients(self) -> None:
        raise AssertionError("replaced while the refusals are carried")


class Reducing(AgreedReduction, OpacusLike):
    pass


def _reducing(failure: Exception | None = None) -> tuple[Reducing, LaterRefusals]:
    params = [torch.zeros(3, 2), torch.zeros(2), torch.zeros(4)]
    for index, p in enumerate(params):
        p.grad = torch.full_like(p, float(index + 1))
    optimizer, refusals = Reducing(params, failure), LaterRefusals()
    optimizer.agree_on_refusals(refusals)
    return optimizer, refusals


def _peer_sends(monkeypatch: pytest.MonkeyPatch, flag: float) -> list[int]:
    """Stand in for the all-reduce of 2 processes whose other one sends gradients of 10 and ``flag``; the sizes of
    the all-reduces made."""
    sizes: list[int] = []

    def all_reduce(tensor: torch.Tensor, op: object = None) -> None:
        sizes.append(tensor.numel())
        peer = torch.full_like(tensor, 10.0)
        if len(sizes) == 2:  # the smallest parameter's, one element longer
            peer[-1] = flag
        tensor.add_(peer)

    monkeypatch.setattr(torch.distributed, "all_reduce", all_reduce)
    return sizes


def test_the_steps_all_reduces_carry_the_ranks_flags_without_an_extra_collective(monkeypatch):
    """Opacus's all-reduces, one per parameter in its order; the smallest parameter's carries the flags' sum one
    element beyond its gradient, which is the mean over the processes as before."""
    sizes = _peer_sends(monkeypatch, flag=0.0)
    optimizer, refusals = _reducing()
    assert optimizer.pre_step() is True
    optimizer.reduce_gradients()
    assert sizes == [6, 3, 4]
    assert [p.grad.unique().tolist() for p in optimizer.params] == [[5.5], [6.0], [6.5]]
    refusals.check(Ranks(0, [(False, False), (False, False)], [None, None]))  # nothing flagged: no collective
    sizes = _peer_sends(monkeypatch, flag=1.0)
    optimizer.reduce_gradients()
    with pytest.raises(RuntimeError, match=r"^a refusal\n\(Found on rank 1 of 2 in a step after the first ones"):
        refusals.check(Ranks(0, [(False, False), (True, False)], [None, "a refusal"]))


def test_a_refusal_in_the_optimizers_own_step_is_held_and_this_ranks_gradients_are_nan(monkeypatch):
    """``pre_step`` refused (a parameter without per-example gradients): the rank goes on to the all-reduce with NaN
    gradients and its flag, so every rank's update is NaN and every rank raises its refusal at the next check."""
    sizes = _peer_sends(monkeypatch, flag=0.0)
    refusal = _a_refusal()
    optimizer, refusals = _reducing(refusal)
    assert optimizer.pre_step() is True and refusals.failure is refusal
    optimizer.reduce_gradients()
    assert sizes == [6, 3, 4] and all(p.grad.isnan().all() for p in optimizer.params)
    with pytest.raises(
        RuntimeError, match=r"^ArgumentError: `mode` must be one of .*\n\(Found on rank 1 of 2 in a step after"
    ) as caught:
        refusals.check(Ranks(1, [(False, False), (False, False)], [None, None]))
    assert caught.value.__cause__ is refusal


def test_the_modules_own_error_in_the_optimizers_step_is_raised_at_once():
    optimizer, refusals = _reducing(MemoryError("the module's own"))
    with pytest.raises(MemoryError):
        optimizer.pre_step()
    assert refusals.failure is None


def test_without_refusals_attached_the_optimizer_is_opacus_own():
    optimizer = Reducing([torch.zeros(2)])
    with pytest.raises(AssertionError, match="replaced while"):
        optimizer.reduce_gradients()


def test_a_check_in_a_forward_hook_that_holds_its_refusal_lets_the_forward_pass_go_on():
    """Where refusals are held (DDP, later steps), a check met in a forward hook hands its refusal on and returns:
    the call runs (the module's own collectives later in ``training_step`` still meet the other ranks'); by default
    it raises, as on one process."""
    bag = torch.nn.EmbeddingBag(5, 2, mode="sum")
    tokens, weights = torch.tensor([[0, 1], [2, 3]]), torch.ones(2, 2)
    held: list[Exception] = []
    guard = WeightedBagGuard(bag, {id(bag.weight)}, held.append)
    guard.watching = True
    assert bag(tokens, per_sample_weights=weights).shape == (2, 2)
    assert len(held) == 1 and "per_sample_weights" in str(held[0])
    guard.remove()
    guard = WeightedBagGuard(bag, {id(bag.weight)})
    guard.watching = True
    with pytest.raises(RuntimeError, match="per_sample_weights") as caught:
        bag(tokens, per_sample_weights=weights)
    assert raised_by_lightning_nt(caught.value)
    guard.remove()


def test_a_copy_of_a_refusal_route_raises_and_holds_nothing_of_the_engine():
    """The layers' hooks hold the route, so a copy of the module (``copy.deepcopy``, pickling) copies it: a fresh route
    that raises, not the engine and its DP optimizer that the route hands refusals to."""
    held: list[Exception] = []
    route = RefusalRoute()
    route.to = held.append
    route(RuntimeError("held"))
    assert [str(e) for e in held] == ["held"]
    for copy_ in (copy.deepcopy(route), pickle.loads(pickle.dumps(route))):
        assert copy_.to is raise_refusal
        with pytest.raises(RuntimeError, match="raised"):
            copy_(RuntimeError("raised"))
