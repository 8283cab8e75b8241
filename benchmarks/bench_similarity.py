"""Cost of RepresentationSimilarity on the digits demo, as a share of the training time without it.

The digits CNN (three ReLU layers, width 16) trains on the 1438 training digits with and without the
callback at ``every_n_epochs=1`` (``--every``; defaults otherwise: 512 probe examples, CKA, ReLU intertwiner and
orthogonal Procrustes per layer, the layer x layer CKA matrix at the end). The two configurations are
interleaved ``--repeats`` times in one process and the fastest fit of each is kept; the time spent inside
the callback's hooks is reported too.

    python benchmarks/bench_similarity.py                   # 10 epochs, 3 repeats
    python benchmarks/bench_similarity.py --epochs 30 --repeats 5 --every 5
"""

from __future__ import annotations

import argparse
import time

import pytorch_lightning as pl
import torch

from lightning_nt.demos import DigitsCNN, DigitsDataModule
from lightning_nt.similarity import RepresentationSimilarity


def fit_seconds(epochs: int, callbacks: list[pl.Callback]) -> float:
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(
        accelerator="gpu" if torch.cuda.is_available() else "cpu",
        devices=1,
        max_epochs=epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )
    module, data = DigitsCNN(), DigitsDataModule()
    started = time.perf_counter()
    trainer.fit(module, data)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--every", type=int, default=1, help="every_n_epochs")
    args = parser.parse_args()
    fit_seconds(1, [])  # warm-up: imports, data, allocator
    plain, watched, spent = [], [], []
    for _ in range(args.repeats):
        plain.append(fit_seconds(args.epochs, []))
        monitor = TimedSimilarity(args.every)
        watched.append(fit_seconds(args.epochs, [monitor]))
        spent.append(monitor.seconds)
    best_plain, best_watched = min(plain), min(watched)
    print(f"digits CNN, {args.epochs} epochs, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(
        f"  plain fit {best_plain:.2f} s; "
        f"with RepresentationSimilarity(every_n_epochs={args.every}) {best_watched:.2f} s"
    )
    print(f"  overhead {best_watched / best_plain - 1:+.1%} of training time (target <= 10%)")
    print(f"  time inside the callback's hooks: {min(spent):.2f} s = {min(spent) / best_plain:.1%} of the plain fit")


class TimedSimilarity(RepresentationSimilarity):
    """The callback with a stopwatch around its hooks."""

    def __init__(self, every_n_epochs: int) -> None:
        super().__init__(every_n_epochs=every_n_epochs)
        self.seconds = 0.0

    def _timed(self, hook: str, *args: object) -> None:
        started = time.perf_counter()
        getattr(super(), hook)(*args)
        self.seconds += time.perf_counter() - started

    def on_train_start(self, *args: object) -> None:  # type: ignore[override]
        self._timed("on_train_start", *args)

    def on_train_batch_end(self, *args: object) -> None:  # type: ignore[override]
        self._timed("on_train_batch_end", *args)

    def on_train_end(self, *args: object) -> None:  # type: ignore[override]
        self._timed("on_train_end", *args)


if __name__ == "__main__":
    main()
