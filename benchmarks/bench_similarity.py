"""Cost of RepresentationSimilarity on the digits demo, as a share of the training time without it.

The digits demo's CNN (three ReLU layers, width 16, SGD, batches of 64) trains on the 1438 training digits with
the demo's trainer (TensorBoard logger, here in a temporary folder, ``log_every_n_steps=5``), without and with
the callback as ``examples/digits.py --similarity`` builds it: ``reference="init"``, ``every_n_epochs=1``,
``num_examples=512``, ``data="val"`` (the 359 validation digits, whose layer outputs are read during
validation itself; ``--data train``: 512 training digits and a forward pass of the callback's own per
measurement), CKA, ReLU intertwiner and orthogonal Procrustes per layer, and at the end the layer x layer CKA matrix
and the picture (``--no-logger``: no picture). The two fits alternate, plain then watched,
``--repeats`` times in one process on ``--threads`` threads, so that a change in the machine's load hits both
alike, and the medians are compared. Inside the watched fits the callback's hooks are timed too, split into
the measurements (after each epoch), the start (the reference's features) and the end (CKA matrix, picture),
and the forward passes inside them.

Every figure is given twice: in wall time and in the process's CPU time. On a machine shared with other jobs
the wall times of a fit vary by a factor of two from one fit to the next; with one thread the CPU time counts
only the work the fit itself does, so its ratios are the ones to read there (with several threads it also
counts the threads' spinning at barriers).

    python benchmarks/bench_similarity.py                   # 30 epochs (the demo's), 5 pairs, 2 threads
    python benchmarks/bench_similarity.py --epochs 10 --repeats 9 --every 5 --threads 1
    python benchmarks/bench_similarity.py --data train  # a forward pass over 512 training digits each epoch
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections import defaultdict
from typing import Any, NamedTuple

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger

from lightning_nt.demos import DigitsCNN, DigitsDataModule
from lightning_nt.similarity import RepresentationSimilarity

PARTS = ("measurements", "start", "end", "forward")


class Seconds(NamedTuple):
    """A duration on both clocks."""

    wall: float
    cpu: float

    @classmethod
    def since(cls, started: Seconds) -> Seconds:
        return cls(time.perf_counter() - started.wall, time.process_time() - started.cpu)

    @classmethod
    def now(cls) -> Seconds:
        return cls(time.perf_counter(), time.process_time())


def fit_seconds(epochs: int, callbacks: list[pl.Callback], logger: bool) -> Seconds:
    """Duration of one fit of the digits demo's CNN with the demo's trainer (its TensorBoard logger, in a
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
        started = Seconds.now()
        trainer.fit(module, data)
        return Seconds.since(started)


class TimedSimilarity(RepresentationSimilarity):
    """The callback as the digits demo builds it, with stopwatches around its hooks and its forward passes."""

    _MEASURING = (
        "on_train_batch_end",
        "on_validation_batch_start",
        "on_validation_batch_end",
        "on_validation_epoch_end",
        "on_train_epoch_end",
    )

    def __init__(self, every_n_epochs: int = 1, num_examples: int = 512, data: str = "val") -> None:
        super().__init__(reference="init", every_n_epochs=every_n_epochs, num_examples=num_examples, data=data)
        self.seconds: dict[str, Seconds] = defaultdict(lambda: Seconds(0.0, 0.0))
        self.forward_passes = 0
        for hook in self._MEASURING:
            setattr(self, hook, self._stopwatch("measurements", getattr(self, hook)))
        self.on_train_start = self._stopwatch("start", self.on_train_start)  # type: ignore[method-assign]
        self.on_train_end = self._stopwatch("end", self.on_train_end)  # type: ignore[method-assign]

    def _stopwatch(self, part: str, method: Any) -> Any:
        def timed(*args: Any, **kwargs: Any) -> Any:
            started = Seconds.now()
            result = method(*args, **kwargs)
            spent, total = Seconds.since(started), self.seconds[part]
            self.seconds[part] = Seconds(total.wall + spent.wall, total.cpu + spent.cpu)
            return result

        return timed

    def _forward_features(self, *args: Any) -> Any:  # type: ignore[override]
        self.forward_passes += 1
        return self._stopwatch("forward", super()._forward_features)(*args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=30, help="epochs per fit (the digits demo trains 30)")
    parser.add_argument("--repeats", type=int, default=5, help="pairs of fits (plain, watched)")
    parser.add_argument("--every", type=int, default=1, help="every_n_epochs")
    parser.add_argument("--num-examples", type=int, default=512, help="probe examples (the demo's: 512)")
    parser.add_argument("--data", choices=("val", "train"), default="val", help="data (the demo's: val)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--no-logger", dest="logger", action="store_false", help="no logger, so no picture")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    fit_seconds(1, [TimedSimilarity()], args.logger)  # warm-up: imports, data, allocator, scipy, matplotlib
    plain, watched, parts, passes = [], [], defaultdict(list), 0
    for _ in range(args.repeats):
        plain.append(fit_seconds(args.epochs, [], args.logger))
        monitor = TimedSimilarity(args.every, args.num_examples, args.data)
        watched.append(fit_seconds(args.epochs, [monitor], args.logger))
        for part in PARTS:
            parts[part].append(monitor.seconds[part])
        passes = monitor.forward_passes
    measurements = args.epochs // args.every
    logger = "TensorBoard logger (the picture drawn at the end)" if args.logger else "no logger"
    print(
        f"digits CNN, {args.epochs} epochs, every_n_epochs={args.every} ({measurements} measurements), "
        f"num_examples={args.num_examples}, data={args.data!r}, {logger}"
    )
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.repeats} interleaved pairs, medians")
    for clock in Seconds._fields:
        _report(clock, measurements, plain, watched, parts, passes)


def _report(
    clock: str,
    measurements: int,
    plain: list[Seconds],
    watched: list[Seconds],
    parts: dict[str, list[Seconds]],
    passes: int,
) -> None:
    def median(values: list[Seconds]) -> float:
        return statistics.median(getattr(value, clock) for value in values)

    base, spent = median(plain), {part: median(values) for part, values in parts.items()}
    runs = {
        name: ", ".join(f"{getattr(t, clock):.2f}" for t in fits)
        for name, fits in (("plain", plain), ("watched", watched))
    }
    print(f"{clock} time")
    print(f"  plain fit          {base:6.2f} s   (all: {runs['plain']})")
    print(f"  with the callback  {median(watched):6.2f} s   (all: {runs['watched']})")
    print(f"  whole-fit overhead {median(watched) / base - 1:+7.1%}   (target <= 10%)")
    measured, start, end, forward = (spent[part] for part in PARTS)
    hooks = measured + start + end
    print(f"  inside the hooks   {hooks:6.2f} s = {hooks / base:.1%} of the plain fit   (target <= 10%)")
    each = measured / max(measurements, 1) * 1e3
    print(f"    measurements     {measured:6.2f} s = {measured / base:.1%} ({each:.1f} ms each)")
    print(f"    start, end       {start:6.2f} s + {end:.2f} s = {(start + end) / base:.1%}")
    print(f"    of which forward {forward:6.2f} s = {forward / base:.1%} ({passes} passes of the callback's own)")


if __name__ == "__main__":
    main()
