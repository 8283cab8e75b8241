"""One verdict for every process (a DP-SGD guard under DDP): a refusal found on one rank is every rank's error.

Each process checks its own share of the batch before the first step (the example-independence check, the parameter
uses, the module's state, the per-example rows), so a refusal may be found on one rank only, e.g. a model that mixes
the examples on rank 1's batches alone. That rank used to raise alone; the others waited in the step's all-reduce
until its process ended and failed with the process group's error ("Connection closed by peer" under gloo, or the
timeout), not the refusal: a user reading rank 0's log did not learn why. On a step whose checks run, every rank
runs them catching its failure, then all meet in :func:`agree_across_ranks`: one all-gather of two flags per rank,
and, only when some rank failed, a broadcast of that rank's message, which every rank then raises. A failure raised
outside lightning_nt's code (the module's own error) is not agreed on (:func:`raised_by_lightning_nt`): it ends its
rank at once, as without DP, and the others fail when that process ends.

On the later steps nothing is agreed (an agreement is a collective and a device-to-host sync per step), yet a refusal
can still be met there on one rank alone (a weighted ``EmbeddingBag`` call, a layer's extra input, a dropout switched
on, a random draw first met on some batch). :class:`LaterRefusals` is the one mechanism for all of them: the refusing
rank holds its refusal instead of raising it and goes on through the step's one collective, the DP optimizer's
all-reduce of the noisy sum (:class:`AgreedReduction`), with NaN gradients and a flag element appended to the
smallest parameter's buffer (no extra collective); so every rank's update of that step is all-NaN (nothing of it is
released) and every rank holds the flags' sum, copied to the host without waiting. Each rank reads it at the start of
the next step (before that step's update), before any checkpoint is written and at the end of training, and, when it
is not zero, all meet in :func:`agree_across_ranks` and raise the refusal.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "AgreedReduction",
    "LaterRefusals",
    "RefusalRoute",
    "Refuse",
    "agree_across_ranks",
    "raise_refusal",
    "raised_by_lightning_nt",
]

Refuse = Callable[[Exception], None]
"""What a check in a forward hook does with its refusal: raise it (:func:`raise_refusal`), or, where the strategy holds
refusals (:meth:`~lightning_nt.privacy.engines.ClippingEngine.refuse`), hold it and return: the forward pass goes on."""

_BEFORE_THE_UPDATE = "every rank stops with this error before the step's update."
_AFTER_THE_UPDATE = (
    "every rank stops with this error at its next step. The refused step's update was all-NaN on every rank, so "
    "nothing of it was released, and the trainable weights and the optimizer's state are NaN now: resume from a "
    "checkpoint saved before it."
)


def agree_across_ranks(strategy: Any, failure: Exception | None, pending: bool, *, later: bool = False) -> bool:
    """Whether any rank still has checks ``pending`` (so the next step agrees too), if no rank failed; else raise,
    on every rank, the failure of the lowest rank that had one, naming it (chained to ``failure`` where it is that).

    ``strategy`` is the Lightning strategy (its ``all_gather`` and ``broadcast``); every rank must call this at the
    same point of the same step. ``later``: the failure was met in a step after the first ones and held through it
    (:class:`LaterRefusals`): the message says so.

    Example::

        try:
            run_the_checks()
        except Exception as failure:
            agree_across_ranks(trainer.strategy, failure, pending=False)  # raises on every rank
        pending = agree_across_ranks(trainer.strategy, None, pending=checks_left())
    """
    flags = torch.tensor([failure is not None, pending], dtype=torch.int64, device=strategy.root_device)
    verdicts = strategy.all_gather(flags).reshape(-1, 2)
    failed = verdicts[:, 0].nonzero().flatten().tolist()
    if not failed:
        return bool(verdicts[:, 1].any())
    rank = failed[0]
    message = strategy.broadcast(_described(failure) if failure is not None else None, src=rank)
    where = f"rank {rank} of {len(verdicts)}" + (" in a step after the first ones" if later else "")
    raise RuntimeError(
        f"{message}\n(Found on {where}; {_AFTER_THE_UPDATE if later else _BEFORE_THE_UPDATE})"
    ) from failure


def raise_refusal(refusal: Exception) -> None:
    """A check's :data:`Refuse` where no refusal is held: raise it."""
    raise refusal


class RefusalRoute:
    """A :data:`Refuse` that the layers' hooks hold: it hands a refusal to :attr:`to` (the clipping engine's
    ``refuse``; :func:`raise_refusal` until set). A copy of it (``copy.deepcopy`` or pickling of the module, as some
    measurements make) is a fresh route that raises: it must not copy the engine and its DP optimizer.

    Example::

        route = RefusalRoute()
        guard = WeightedBagGuard(module, trainable, route)
        route.to = engine.refuse
    """

    def __init__(self) -> None:
        self.to: Refuse = raise_refusal

    def __call__(self, refusal: Exception) -> None:
        self.to(refusal)

    def __deepcopy__(self, memo: dict[int, Any]) -> RefusalRoute:
        return RefusalRoute()

    def __reduce__(self) -> tuple[type[RefusalRoute], tuple[()]]:
        return RefusalRoute, ()


def raised_by_lightning_nt(failure: BaseException) -> bool:
    """Whether ``failure`` was raised in lightning_nt's own code (a refusal of its checks), not in the module's or a
    library's: only those are agreed on, since a rank failing in the module's ``training_step`` may leave the others
    in a collective of the module's own (``self.log(..., sync_dist=True)``), which an agreement would not match."""
    traceback = failure.__traceback__
    while traceback is not None and traceback.tb_next is not None:
        traceback = traceback.tb_next
    return traceback is not None and Path(traceback.tb_frame.f_code.co_filename).resolve().is_relative_to(_PACKAGE)


_PACKAGE = Path(__file__).resolve().parents[1]


def _described(failure: Exception) -> str:
    """The failure as its traceback's last line reads, without the type of a RuntimeError (the type raised)."""
    return str(failure) if type(failure) is RuntimeError else f"{type(failure).__name__}: {failure}"


class LaterRefusals:
    """Under DDP, after the first steps: this rank's refusal held through its step, and the ranks' flags carried by
    that step's all-reduce (:class:`AgreedReduction`), read one step late (see the module's docstring).

    Example::

        refusals = LaterRefusals()
        try:
            run_the_step()
        except Exception as failure:
            if not refusals.hold(failure):
                raise  # the module's own error: not agreed on
        ...  # the step's all-reduce carries refusals.flag(...) and hands the sum to refusals.carried(...)
        refusals.check(trainer.strategy)  # at the next step's start: raises on every rank if any rank held one
    """

    def __init__(self) -> None:
        self.failure: Exception | None = None  # this rank's, held until every rank raises it
        self._total: torch.Tensor | None = None  # the flags' sum of the last all-reduce (on the host, or arriving)
        self._arrived: torch.cuda.Event | None = None  # when a CUDA sum has reached the host

    def hold(self, failure: Exception, *, refusal: bool = False) -> bool:
        """Hold ``failure`` as this rank's refusal, if lightning_nt raised it (:func:`raised_by_lightning_nt`; the
        module's own errors end their rank at once, as on the first steps) or it is a ``refusal`` of lightning_nt's
        checks not raised (:data:`Refuse`); whether it was held."""
        if not (refusal or raised_by_lightning_nt(failure)):
            return False
        self.failure = self.failure or failure
        return True

    def flag(self, like: torch.Tensor) -> torch.Tensor:
        """This rank's flag, to append to a buffer ``like`` the one the step all-reduces: 1 if it holds a refusal."""
        return torch.full((1,), float(self.failure is not None), dtype=like.dtype, device=like.device)

    def carried(self, total: torch.Tensor) -> None:
        """Keep the all-reduced flags' sum; from a CUDA device it is copied to (pinned) host memory without waiting."""
        if total.device.type == "cuda":
            self._total = torch.empty(total.shape, dtype=total.dtype, pin_memory=True)  # torch's cached host blocks
            self._total.copy_(total, non_blocking=True)
            self._arrived = torch.cuda.Event()
            self._arrived.record()
        else:
            self._total, self._arrived = total, None  # a collective on the CPU has completed

    def check(self, strategy: Any) -> None:
        """Where the last all-reduce carried a refusal of any rank, raise it on every rank (every rank calls this at
        the same point: a step's start, a checkpoint, the end of training; each agrees only when some rank refused).
        Waits for the sum only if it has not reached the host yet: one step after its all-reduce, it has, or is about
        to (the update that follows it is already queued behind it)."""
        if self._total is None:
            return
        if self._arrived is not None:
            self._arrived.synchronize()
        refused, self._total, self._arrived = bool(self._total.item() > 0), None, None
        if refused:
            agree_across_ranks(strategy, self.failure, pending=False, later=True)
            raise RuntimeError("A rank flagged a refusal in the last step's all-reduce and none reported it.")

    def agree_now(self, strategy: Any) -> None:
        """Raise a held refusal on every rank now, where the step makes no all-reduce to carry it (the step the
        privacy budget skips): every rank calls this at the same point."""
        agree_across_ranks(strategy, self.failure, pending=False, later=True)


class AgreedReduction:
    """Mixed in before Opacus's distributed DP optimizers: while :attr:`refusals` is set (:meth:`agree_on_refusals`),
    a refusal met in the optimizer's own step is held too, a rank holding one sends NaN gradients, and the all-reduce
    of the smallest parameter's gradient carries every rank's flag (no extra collective: the step's own all-reduces,
    in Opacus's order, one of them one element longer)."""

    refusals: LaterRefusals | None = None
    reduced: list[torch.Tensor]  # the parameters all-reduced, fixed when the refusals are attached
    loss_reduction: str
    world_size: int

    def agree_on_refusals(self, refusals: LaterRefusals) -> None:
        """Carry ``refusals`` from now on (every rank, when the fit sets up its optimizer)."""
        self.refusals = refusals
        self.reduced = list(self.params)  # type: ignore[attr-defined]  # same on every rank; a change is refused

    def pre_step(self, closure: Any = None) -> Any:
        refusals = self.refusals
        if refusals is None:
            return super().pre_step(closure)  # type: ignore[misc]
        if refusals.failure is None:
            try:
                return super().pre_step(closure)  # type: ignore[misc]
            except Exception as failure:
                if not refusals.hold(failure):
                    raise
        for p in self.reduced:  # nothing of this rank's batch: every rank's update is NaN
            p.grad = torch.full_like(p, float("nan"))
        return True

    def reduce_gradients(self) -> None:
        refusals = self.refusals
        if refusals is None:
            super().reduce_gradients()  # type: ignore[misc]
            return
        carrier = min(range(len(self.reduced)), key=lambda index: self.reduced[index].numel())
        for index, p in enumerate(self.reduced):
            assert p.grad is not None, "the DP optimizer gives every parameter a gradient before the reduction"
            if index == carrier:
                buffer = torch.cat([p.grad.reshape(-1), refusals.flag(p.grad)])
                torch.distributed.all_reduce(buffer, op=torch.distributed.ReduceOp.SUM)
                p.grad.copy_(buffer[:-1].view_as(p.grad))
                refusals.carried(buffer[-1:])
            else:
                torch.distributed.all_reduce(p.grad, op=torch.distributed.ReduceOp.SUM)
            if self.loss_reduction == "mean":
                p.grad /= self.world_size
