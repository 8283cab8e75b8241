"""A DP-SGD fit under DDP with Lightning's default launcher (this script run again as rank 1's process): the model
mixes the examples on rank 1 only, so only rank 1's example-independence check refuses it; or (``callback``) rank 1
fails outside the checks, in a callback before its first training step, while rank 0 waits for its verdict; or
(``training_step``) rank 1's own ``training_step`` raises while rank 0 is in a collective of the module's own (a
``sync_dist`` log).

``python tests/privacy/ddp_script_refusal.py <folder> <process-group timeout, s> [model|callback|training_step]``:
each rank saves, as it fails, its error, its optimizer steps and whether its weights moved (``rank<r>.pt`` in
``<folder>``).
"""

from __future__ import annotations

import sys
from datetime import timedelta
from typing import Any

import pytorch_lightning as pl
import torch

from lightning_nt import DPDDPStrategy
from tests.helpers import save_rank_state
from tests.privacy.test_audit import Audited


class MixesOnRankOne(Audited):
    """Centres its inputs over the batch (``x - x.mean(0)``) on rank 1; keeps its examples apart on rank 0."""

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return super().forward(inputs - inputs.mean(0) if self.trainer.global_rank == 1 else inputs)


class FailsOnRankOne(pl.Callback):
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        if trainer.global_rank == 1:
            raise ValueError("rank 1 fails before its training step")


class RaisesOnRankOne(Audited):
    """Its ``training_step`` raises on rank 1 (an out-of-memory error, a bad record), and logs with ``sync_dist`` (an
    all-reduce at log time) on rank 0."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if self.trainer.global_rank == 1:
            raise MemoryError("rank 1 runs out of memory in its training step")
        loss = super().training_step(batch, batch_idx)
        self.log("synced_loss", loss.detach(), on_step=True, sync_dist=True)
        return loss


class SaveFailure(pl.Callback):
    def __init__(self, directory: str) -> None:
        self.directory = directory

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.before = [p.detach().clone() for p in pl_module.parameters()]

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        moved = any(not torch.equal(b, p) for b, p in zip(self.before, pl_module.parameters()))
        state: dict[str, Any] = {"error": f"{type(exception).__name__}: {exception}", "moved": moved}
        save_rank_state(trainer, self.directory, {**state, "steps": trainer.global_step})


if __name__ == "__main__":
    folder, timeout = sys.argv[1], timedelta(seconds=float(sys.argv[2]))
    mode = (sys.argv[3:] or ["model"])[0]
    pl.seed_everything(0)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=DPDDPStrategy(noise_multiplier=1.0, max_grad_norm=1.0, timeout=timeout),
        max_steps=3,
        limit_val_batches=0,
        callbacks=[SaveFailure(folder), *([FailsOnRankOne()] if mode == "callback" else [])],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit({"model": MixesOnRankOne, "callback": Audited, "training_step": RaisesOnRankOne}[mode]())
