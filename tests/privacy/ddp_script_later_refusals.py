"""DP-SGD fits under DDP where rank 1 alone meets a refusal on a later step (issue 10): one process of the two.

The test starts both processes itself (``LOCAL_RANK`` set, so Lightning launches nothing); each runs every case of
:data:`CASES` in turn, one fit each over one process group: from step :data:`TRIGGER` on, rank 1's batch or module
does what a refusal of that case names (rank 0's never does), after the first step's agreed checks are over.

``python tests/privacy/ddp_script_later_refusals.py <folder> <process-group timeout, s> [case ...]``: after each case,
this rank saves what it met (``rank<r>.pt`` in ``<folder>``, every case so far): the error, its optimizer steps,
whether every trainable weight is NaN, and the checkpoints written (under ``<folder>``, the working directory). A case
that did not end in the refusal agreed by every rank ends this process at once (the other's collectives then fail
instead of matching the next case's).
"""

from __future__ import annotations

import os
import sys
import warnings
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_nt import DPDDPStrategy

DIM, CLASSES, TOKENS = 4, 3, 10
TRIGGER = 2
"""The first optimizer step at which rank 1 meets the refusal (steps 0 and 1 go through)."""
DRAWING = {"on": False}  # global: Opacus re-runs a copy of the layer made when the engine was built


class Scaled(nn.Module):
    """A layer with a trainable parameter of its own and no per-sample rule (Opacus re-runs it under ``torch.func``),
    an input besides its first (``scale``), a dropout that starts off, and a draw it makes while :data:`DRAWING`."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(DIM))
        self.drop = nn.Dropout(0.0)

    def forward(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        noise = torch.rand_like(x) * 0.0 if DRAWING["on"] else 0.0
        return self.drop(x * self.weight * scale + noise)


class LaterOnRankOne(pl.LightningModule):
    """A small classifier whose ``case`` changes, on rank 1 from step :data:`TRIGGER` on, in the way it names; its
    ``training_step`` logs with ``sync_dist=True`` after the forward pass (an all-reduce of its own, on every rank)."""

    def __init__(self, case: str) -> None:
        super().__init__()
        self.case, self.grad_sample_mode = REFUSAL_MET_IN.get(case, case), CASES[case]
        self.bag = nn.EmbeddingBag(TOKENS, DIM, mode="sum")
        self.fc, self.scaled, self.side = nn.Linear(DIM, DIM), Scaled(), nn.Linear(DIM, DIM)
        self.out = nn.Linear(DIM, CLASSES)
        if self.grad_sample_mode != "hooks":  # layers only Opacus's hooks clip
            for layer in (self.bag, self.scaled, self.side):
                layer.requires_grad_(False)

    def _later(self) -> bool:
        return self.trainer.global_rank == 1 and self.trainer.global_step >= TRIGGER

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self.scaled.drop.p = 0.5 if self.case == "dropout" and self._later() else 0.0
        DRAWING["on"] = self.case == "draw" and self._later()

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        later = self._later()
        tokens = (inputs.abs() * 3).long().clamp(max=TOKENS - 1)
        weights = torch.ones_like(inputs) if self.case == "bag" and later else None
        hidden = self.bag(tokens, per_sample_weights=weights) + inputs
        if self.case == "rows" and later:  # the rows of the batch twice
            hidden = self.fc(torch.cat([hidden, hidden]))[: len(hidden)]
        elif self.case == "keyword" and later:
            hidden = self.fc(input=hidden) if self.grad_sample_mode == "bk" else self.fc(hidden)
        else:
            hidden = self.fc(hidden)
        if self.case == "twice" and later:  # a layer called twice (ghost clipping can't clip it)
            hidden = self.fc(hidden)
        hidden = self.scaled(hidden, scale=2.0) if self.case == "extra_input" and later else self.scaled(hidden)
        if self.case == "unused" and later:  # a layer's weight used outside its call, after the first step's check
            hidden = hidden + F.linear(hidden, self.side.weight)
        return self.out(torch.tanh(hidden))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        inputs, labels = batch
        per_example = self.grad_sample_mode == "ghost"
        loss = F.cross_entropy(self(inputs), labels, reduction="none" if per_example else "mean")
        self.log("synced_loss", loss.detach().mean(), on_step=True, sync_dist=True)  # a collective of the module's
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(0)
        inputs = torch.randn(32, DIM, generator=generator)
        return DataLoader(TensorDataset(inputs, torch.randint(CLASSES, (32,), generator=generator)), batch_size=8)


CASES = {  # case: the engine it runs under
    "bag": "hooks",  # an EmbeddingBag called with per_sample_weights (its forward pre-hook)
    "extra_input": "hooks",  # a re-run layer called with an input besides its first (its forward pre-hook)
    "dropout": "hooks",  # a dropout inside a re-run layer switched on (the engine's start of the step)
    "rows": "hooks",  # a layer run on more rows than the batch has (the backward pass)
    "draw": "hooks",  # a re-run layer drawing random numbers (Opacus's re-run, in the backward pass)
    "unused": "hooks",  # a weight used outside its layer's call (the DP optimizer's step)
    "keyword": "bk",  # a layer called by keyword (book-keeping's forward hook)
    "twice": "ghost",  # a layer called twice (ghost clipping's forward hook)
    "last_step": "hooks",  # the bag's, in the fit's last step: raised at the end of training
    "checkpoint": "hooks",  # the bag's, with a checkpoint after every step: raised before it is written
    "budget_stop": "hooks",  # the bag's, in the step the privacy budget skips (no all-reduce): raised in that step
    "physical_parts": "hooks",  # the bag's, in the first of the batch's physical parts (max_physical_batch_size)
}
REFUSAL_MET_IN = {"last_step": "bag", "checkpoint": "bag", "budget_stop": "bag", "physical_parts": "bag"}


class SpentAtTrigger(DPDDPStrategy):
    """Its privacy budget is spent at step :data:`TRIGGER`: that step is skipped and the fit stops."""

    def _budget_exhausted(self) -> bool:
        return self.lightning_module.trainer.global_step >= TRIGGER


def _run(case: str, timeout: timedelta) -> dict[str, Any]:
    """Fit ``case`` on this process's rank; what it met."""
    pl.seed_everything(0, verbose=False)
    module = LaterOnRankOne(case)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        strategy = (SpentAtTrigger if case == "budget_stop" else DPDDPStrategy)(
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            grad_sample_mode=CASES[case],
            seed=0,
            timeout=timeout,
            max_physical_batch_size=2 if case == "physical_parts" else None,
        )
    checkpoints = Path(f"checkpoints_{case}")
    every_step = ModelCheckpoint(dirpath=checkpoints, every_n_train_steps=1, save_top_k=-1)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=strategy,
        max_steps=TRIGGER + (1 if case == "last_step" else 3),
        limit_val_batches=0,
        logger=CSVLogger(Path.cwd()),  # the module's synced log is a collective in its training_step
        callbacks=[every_step] if case == "checkpoint" else [],
        enable_checkpointing=case == "checkpoint",
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    error = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.fit(module)
    except Exception as failure:  # what each rank met is the result
        error = f"{type(failure).__name__}: {failure}"
    trainable = [p for p in module.parameters() if p.requires_grad]
    saved = sorted(path.name for path in checkpoints.glob("*.ckpt"))
    return {
        "error": error,
        "steps": trainer.global_step,
        "nan": all(bool(p.isnan().all()) for p in trainable),
        "checkpoints": saved,
    }


if __name__ == "__main__":
    folder, timeout = Path(sys.argv[1]), timedelta(seconds=float(sys.argv[2]))
    rank = int(os.environ["LOCAL_RANK"])
    results: dict[str, dict[str, Any]] = {}
    for case in sys.argv[3:] or CASES:
        results[case] = _run(case, timeout)
        torch.save(results, folder / f"rank{rank}.pt")
        if "Found on rank" not in (results[case]["error"] or ""):
            os._exit(3)  # not every rank stopped with the refusal: the next case's collectives would not match
