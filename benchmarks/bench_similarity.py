"""Cost of RepresentationSimilarity on the digits demo, as a share of the training time without it.

The digits demo's CNN (three ReLU layers, width 16, SGD, batches of 64) trains on the 1438 training digits with
and without the callback as ``examples/digits.py --similarity`` builds it (``reference="init"``,
``every_n_epochs=1`` unless ``--every`` says otherwise, 512 probe examples, CKA, ReLU intertwiner and orthogonal
Procrustes per layer, the layer x layer CKA matrix at the end). The two fits alternate, plain then watched,
``--repeats`` times in one process on ``--threads`` threads, so that a change in the machine's load hits both
alike; the medians are compared. Inside the watched fits the callback's hooks are timed too, split into the
forward passes that read the features and the rest (the measures themselves, logging), which is the figure
least moved by load: ``hooks / plain fit``.

    python benchmarks/bench_similarity.py                   # 30 epochs (the demo's), 5 pairs, 2 threads
    python benchmarks/bench_similarity.py --epochs 10 --repeats 9 --every 5
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections import defaultdict
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger

from lightning_nt.demos import DigitsCNN, DigitsDataModule
from lightning_nt.similarity import RepresentationSimilarity


def fit_seconds(epochs: int, callbacks: list[pl.Callback], logger: bool) -> float:
    """Wall time of one fit of the digits demo's CNN with the demo's trainer (its TensorBoard logger, in a
    temporary folder, if ``logger``: then the callback also draws its picture at the end)."""
    pl.seed_everything(0, verbose=False)
    with tempfile.TemporaryDirectory() as folder:
        trainer = pl.Trainer(
            accelerator="cpu",
            max_epochs=epochs,
            logger=TensorBoardLogger(folder) if logger else False,
            log_every_n_steps=5,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=callbacks,
        )
        module, data = DigitsCNN(), DigitsDataModule()
        started = time.perf_counter()
        trainer.fit(module, data)
        return time.perf_counter() - started


class TimedSimilarity(RepresentationSimilarity):
    """The callback with stopwatches around its hooks and around its forward passes."""

    def __init__(self, every_n_epochs: int) -> None:
        super().__init__(reference="init", every_n_epochs=every_n_epochs, num_samples=512)
        self.seconds: dict[str, float] = defaultdict(float)

    def _timed(self, part: str, method: Any, *args: Any) -> Any:
        started = time.perf_counter()
        result = method(*args)
        self.seconds[part] += time.perf_counter() - started
        return result

    def on_train_start(self, *args: Any) -> None:  # type: ignore[override]
        self._timed("hooks", super().on_train_start, *args)

    def on_train_batch_end(self, *args: Any) -> None:  # type: ignore[override]
        self._timed("hooks", super().on_train_batch_end, *args)

    def on_train_end(self, *args: Any) -> None:  # type: ignore[override]
        self._timed("hooks", super().on_train_end, *args)

    def _features(self, *args: Any) -> Any:  # type: ignore[override]
        return self._timed("forward", super()._features, *args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=30, help="epochs per fit (the digits demo trains 30)")
    parser.add_argument("--repeats", type=int, default=5, help="pairs of fits (plain, watched)")
    parser.add_argument("--every", type=int, default=1, help="every_n_epochs")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--no-logger", dest="logger", action="store_false", help="no logger, so no picture")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    fit_seconds(1, [TimedSimilarity(1)], args.logger)  # warm-up: imports, data, allocator, scipy, matplotlib
    plain, watched, hooks, forward = [], [], [], []
    for _ in range(args.repeats):
        plain.append(fit_seconds(args.epochs, [], args.logger))
        monitor = TimedSimilarity(args.every)
        watched.append(fit_seconds(args.epochs, [monitor], args.logger))
        hooks.append(monitor.seconds["hooks"])
        forward.append(monitor.seconds["forward"])
    base = statistics.median(plain)
    measurements = args.epochs // args.every
    print(f"digits CNN, {args.epochs} epochs, every_n_epochs={args.every} ({measurements} measurements)")
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.repeats} interleaved pairs, medians, "
        f"{'TensorBoard logger (the picture drawn at the end)' if args.logger else 'no logger'}"
    )
    print(f"  plain fit            {base:.2f} s  (all: {', '.join(f'{t:.2f}' for t in plain)})")
    print(f"  with the callback    {statistics.median(watched):.2f} s  (all: {', '.join(f'{t:.2f}' for t in watched)})")
    print(f"  whole-fit overhead   {statistics.median(watched) / base - 1:+.1%} (target <= 10%)")
    spent, read = statistics.median(hooks), statistics.median(forward)
    print(f"  inside the hooks     {spent:.2f} s = {spent / base:.1%} of the plain fit (target <= 10%)")
    print(f"    forward passes     {read:.2f} s = {read / base:.1%} ({measurements + 2} passes over 512 digits)")
    print(f"    measures, logging  {spent - read:.2f} s = {(spent - read) / base:.1%}")


if __name__ == "__main__":
    main()
