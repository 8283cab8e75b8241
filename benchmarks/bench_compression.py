"""The certified bound on the digits demo, its code length, and what the report costs next to training.

Two modes, each trained once with the demo's settings and then reported on (the report is timed apart
from training, twice: the certificate alone, then with Arora et al.'s and the capacity measures):

- post hoc: the demo's DigitsCNN (SGD, 30 epochs), all of its parameters encoded;
- subspace: DigitsMLP trained with Adam only in a 120-dimensional random subspace (30 epochs), where
  the code is the subspace coordinates and the seed.

Goal (issue #6): a certified bound below 0.35 with m about 1500, and the report within 10% of training.

    python benchmarks/bench_compression.py
    python benchmarks/bench_compression.py --dimension 150 --epochs 40
"""

from __future__ import annotations

import argparse
import time
import warnings
from collections.abc import Callable

import pytorch_lightning as pl
import torch

from lightning_nt import CompressionBoundReporter, SubspaceTraining
from lightning_nt.demos import DigitsCNN, DigitsDataModule, DigitsMLP


def run(name: str, make_model: Callable[[], pl.LightningModule], callbacks: list[pl.Callback], epochs: int) -> None:
    pl.seed_everything(0, verbose=False)
    model = make_model()
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        logger=False,
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    started = time.perf_counter()
    trainer.fit(model, DigitsDataModule())
    training = time.perf_counter() - started
    timings = {}
    for label, full in (("certificate", False), ("full report", True)):
        reporter = CompressionBoundReporter(arora=full, capacity=full)
        started = time.perf_counter()
        report = reporter.compute(trainer, model)
        timings[label] = time.perf_counter() - started
    certificate = reporter.certificate
    images, labels = trainer.train_dataloader.dataset.tensors
    with torch.no_grad():
        raw_error = float((model.eval()(images).argmax(dim=1) != labels).float().mean())
    print(
        f"{name:9s} | trained {sum(p.numel() for p in model.parameters() if p.requires_grad):6d} | "
        f"bound {report['compression/error_bound']:.3f} | train err raw {raw_error:.3f}, decoded "
        f"{report['compression/train_error']:.3f}"
        f" | val err (decoded) {report['compression/test_error']:.3f} | {certificate.code_bits:6d} bits "
        f"({certificate.config}) | training {training:5.1f} s | certificate {timings['certificate']:5.2f} s "
        f"({timings['certificate'] / training:.1%}) | full report {timings['full report']:5.2f} s "
        f"({timings['full report'] / training:.1%})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dimension", type=int, default=120)
    parser.add_argument("--epochs", type=int, default=30)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    print(f"digits, m = 1438 training examples, delta = 0.05, {args.epochs} epochs")
    run("post hoc", DigitsCNN, [], args.epochs)
    run("subspace", lambda: DigitsMLP(optimizer="adam", lr=0.05), [SubspaceTraining(args.dimension)], args.epochs)


if __name__ == "__main__":
    main()
