"""Cost of one LazinessMonitor measurement against a training step of the digits CNN.

Target (issue 15): one measurement with ``ntk=True`` on 128 examples costs at most 50 training steps of
``DigitsCNN`` (width 16, batch 64, SGD). Also timed: ``ntk=False`` (weights and activation patterns only), and the
kernel alone by ``empirical_ntk`` at several chunk sizes, holding all Jacobians or two chunks' at a time. A
measurement's cost in training steps is the median over ``--repeats`` measurements of its time over that of the
``--between`` training steps run just before it (interleaved in one run, so a change of load moves both); the
device is synchronised.

    python benchmarks/bench_laziness.py                   # CPU (or the GPU when there is one)
    python benchmarks/bench_laziness.py --samples 256 --width 32
"""

from __future__ import annotations

import argparse
import statistics
import time

import pytorch_lightning as pl
import torch
from timing import lightning_step_time
from torch.utils.data import DataLoader

from lightning_nt.demos import DigitsCNN, DigitsDataModule
from lightning_nt.laziness import LazinessMonitor, empirical_ntk


class StepTimes(pl.Callback):
    """The wall time of every training step (forward, backward, optimizer), the device synchronised; listed before
    the monitor, so a step's time ends before the monitor's measurement at that step begins."""

    def __init__(self) -> None:
        self.seconds: dict[int, float] = {}
        self._started = 0.0

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx) -> None:
        _synchronize()
        self._started = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx) -> None:
        _synchronize()
        self.seconds[trainer.global_step] = time.perf_counter() - self._started


def measurement_cost(width: int, samples: int, ntk: bool, repeats: int, between: int) -> tuple[float, list[float]]:
    """Median ``laziness/seconds``, and each measurement's cost in training steps: its seconds over the median of
    the ``between`` steps timed just before it, in the same run. Interleaved, so a change of load between the two
    timings (which a step timed once, before all measurements, suffers) moves both."""
    torch.manual_seed(0)
    monitor, steps = LazinessMonitor(every_n_steps=between, num_examples=samples, ntk=ntk), StepTimes()
    trainer = pl.Trainer(
        accelerator="gpu" if torch.cuda.is_available() else "cpu",
        devices=1,
        max_steps=repeats * between,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[steps, monitor],
    )
    trainer.fit(DigitsCNN(width=width), _loader())
    measured = [entry for entry in monitor.history if entry["step"] > 0]  # step 0: no steps timed before it
    ratios = [
        entry["laziness/seconds"]
        / statistics.median(steps.seconds[s] for s in range(entry["step"] - between + 1, entry["step"] + 1))
        for entry in measured
    ]
    return statistics.median(entry["laziness/seconds"] for entry in measured), ratios


def _synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def kernel_seconds(width: int, samples: int, chunk_size: int | None, hold: bool, repeats: int) -> float:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    net = DigitsCNN(width=width).to(device).eval()
    inputs = next(iter(DataLoader(_loader().dataset, batch_size=samples)))[0].to(device)
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        empirical_ntk(net, inputs, chunk_size=chunk_size, hold_jacobians=hold)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def _loader() -> DataLoader:
    data = DigitsDataModule(batch_size=64)
    data.setup("fit")
    return data.train_dataloader()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--between", type=int, default=10, help="training steps timed before each measurement")
    args = parser.parse_args()
    step = lightning_step_time(DigitsCNN(width=args.width), _loader(), steps=30, warmup=5)
    parameters = sum(p.numel() for p in DigitsCNN(width=args.width).parameters())
    print(f"DigitsCNN width {args.width}: {parameters} parameters; training step (batch 64): {1e3 * step:.1f} ms")
    for ntk in (True, False):
        seconds, ratios = measurement_cost(args.width, args.samples, ntk, args.repeats, args.between)
        print(
            f"measurement ntk={ntk}, {args.samples} examples: {seconds:.3f} s = {statistics.median(ratios):.1f} "
            f"training steps (median of {len(ratios)} interleaved ratios, {min(ratios):.1f} to {max(ratios):.1f})"
        )
    for chunk_size, hold in ((8, True), (32, True), (None, True), (32, False)):
        seconds = kernel_seconds(args.width, args.samples, chunk_size, hold, args.repeats)
        setting = f"chunk_size={chunk_size}, hold_jacobians={hold}"
        print(f"empirical_ntk alone, {setting}: {seconds:.3f} s = {seconds / step:.1f} steps")


if __name__ == "__main__":
    main()
