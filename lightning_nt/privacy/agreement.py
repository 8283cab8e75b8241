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
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

__all__ = ["agree_across_ranks", "raised_by_lightning_nt"]


def agree_across_ranks(strategy: Any, failure: Exception | None, pending: bool) -> bool:
    """Whether any rank still has checks ``pending`` (so the next step agrees too), if no rank failed; else raise,
    on every rank, the failure of the lowest rank that had one, naming it (chained to ``failure`` where it is that).

    ``strategy`` is the Lightning strategy (its ``all_gather`` and ``broadcast``); every rank must call this at the
    same point of the same step.

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
    raise RuntimeError(
        f"{message}\n(Found on rank {rank} of {len(verdicts)}; every rank stops with this error before the step's "
        "update.)"
    ) from failure


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
