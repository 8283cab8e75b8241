"""Cost of DP-SGD per ``grad_sample_mode``: each mode's step against the non-private step and against Opacus hooks.

One process, same model, data and batch for every measurement: a non-private Lightning step, ``DPStrategy`` in
each mode of ``--modes`` (``hooks``, ``ghost``, ``bk``, ...), and, for the modes Opacus has itself, a raw PyTorch
loop and a raw Opacus loop (``PrivacyEngine.make_private``, same mode), so that what the strategy adds on top of
Opacus shows (target: at most 5%). Batches are fixed-size (``poisson_sampling=False``) so that every step does the
same work. The measurements are interleaved, ``--repeats`` rounds of every one in turn (ABCABC...), and each figure
is the median over rounds of a fit's median step time: load on a shared machine hits every mode alike.

Peak memory is what one step allocates above what is held when it starts (activations, per-example gradients,
norms, sums): on a GPU ``torch.cuda.max_memory_allocated``; on a CPU, from the allocations and frees that
``torch.profiler`` records (``profile_memory=True``) during one extra, untimed step: an estimate (blocks allocated
before the step count as held throughout it; within an operator, its allocations and frees count at its start).

Targets (issue 12): ``bk`` at most 0.75x the time of ``hooks`` on a 2-core CPU (WRN-16-1, batch 64); on a GPU
(WRN-16-4, batch 256) at most 2.0x the non-private step, and peak memory at most that of ``hooks``.

    python benchmarks/bench_dp.py                                    # CPU: WRN-16-1 GroupNorm+WS, batch 64
    python benchmarks/bench_dp.py --modes hooks,ghost,bk --repeats 5
    python benchmarks/bench_dp.py --model wrn16-4 --batch-size 256   # GPU default
    python benchmarks/bench_dp.py --smoke                            # anywhere, seconds: tiny sizes (a test runs it)
    python benchmarks/bench_dp.py --modes bk --profile               # and what bounds each step (see below)

``--profile`` then profiles ``--steps`` more steps of each Lightning fit and prints, per step, how many device
operations ran (CUDA kernels and copies; operators on a CPU), how long the device was busy against the wall time
(a GPU busy for a small part of the step waits for the host to launch work: launch-bound), and the operations that
took the most time.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from opacus import PrivacyEngine
from timing import lightning_step_time, median_step
from torch import nn
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile
from torch.utils.data import DataLoader, TensorDataset

from lightning_nt import DPStrategy
from lightning_nt.demos import wide_resnet

OPACUS_MODES = ("hooks", "ew", "functorch", "ghost")  # bk is this project's own: no raw Opacus loop to compare


class Classifier(pl.LightningModule):
    def __init__(self, net: nn.Module, per_example: bool = False) -> None:
        super().__init__()
        self.net, self.per_example = net, per_example

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        # ghost clipping wants the per-example losses
        return F.cross_entropy(self.net(batch[0]), batch[1], reduction="none" if self.per_example else "mean")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


@contextmanager
def step_peak(device: torch.device, into: list[int]) -> Iterator[None]:
    """Append to ``into`` the peak bytes allocated inside the block above what was allocated at its start."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        held = torch.cuda.memory_allocated()
        yield
        torch.cuda.synchronize()
        into.append(torch.cuda.max_memory_allocated() - held)
        return
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        yield
    changes = sorted(  # an operator's own allocations and frees (at its start), and those outside operators
        (event.time_range.start, event.cpu_memory_usage if event.name == "[memory]" else event.self_cpu_memory_usage)
        for event in profiler.events()
    )
    into.append(max(itertools.accumulate((change for _, change in changes), initial=0)))


class ProfiledSteps(pl.Callback):
    """Profiles ``count`` steps of a fit from step ``first`` on: the device's operations and the wall time."""

    def __init__(self, first: int, count: int) -> None:
        self.first, self.count = first, count
        self.profiler: profile | None = None
        self.wall = 0.0
        self._started = 0.0

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: object) -> None:
        """From the start of step ``first`` to the start of step ``first + count``: whole cycles, gaps included."""
        if trainer.global_step == self.first:
            self.profiler = profile(activities=[_device_activity(pl_module.device)])
            _synchronize(pl_module.device)
            self.profiler.__enter__()
            self._started = time.perf_counter()
        elif self.profiler is not None and trainer.global_step == self.first + self.count:
            _synchronize(pl_module.device)
            self.wall = time.perf_counter() - self._started
            self.profiler.__exit__(None, None, None)

    def summary(self, label: str, top: int = 6) -> list[str]:
        """Per step: device operations, device busy time against wall time, and the ``top`` costliest operations."""
        assert self.profiler is not None and self.wall > 0, "the fit ended before the profiled steps did"
        on_gpu = any(event.device_type == DeviceType.CUDA for event in self.profiler.events())
        events = [event for event in self.profiler.key_averages() if _device_operation(event, on_gpu)]
        busy = sum(_self_time(event) for event in events) / 1e6 / self.count
        launched = sum(event.count for event in events) / self.count
        wall = self.wall / self.count
        unit = "kernels and copies" if on_gpu else "operators"
        lines = [
            f"  profile {label}: {launched:.0f} {unit} a step; device busy {busy * 1e3:.1f} ms of a "
            f"{wall * 1e3:.1f} ms step ({busy / wall:.0%})"
        ]
        for event in sorted(events, key=_self_time, reverse=True)[:top]:
            share, calls = _self_time(event) / 1e3 / self.count, event.count / self.count
            lines.append(f"    {share:7.2f} ms  {calls:6.1f}x  {event.key[:90]}")
        return lines


def _device_operation(event: Any, on_gpu: bool) -> bool:
    """A kernel or copy on the GPU; an ``aten`` operator on a CPU. Not a ``record_function`` range (an annotation
    spans operations that are counted already), nor, on a CPU, autograd's own bookkeeping around operators."""
    if getattr(event, "is_user_annotation", False):
        return False
    if on_gpu:
        return event.device_type == DeviceType.CUDA
    return event.device_type == DeviceType.CPU and event.key.startswith("aten::")


def _self_time(event: Any) -> float:
    """Microseconds an averaged event spent on its device, itself (not in its children)."""
    if event.device_type == DeviceType.CPU:
        return event.self_cpu_time_total
    return getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0.0)


def _device_activity(device: torch.device) -> ProfilerActivity:
    return ProfilerActivity.CUDA if device.type == "cuda" else ProfilerActivity.CPU


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class LastStepPeak(pl.Callback):
    """Measures the peak memory of the fit's last step (which the step timer does not time)."""

    def __init__(self) -> None:
        self.peaks: list[int] = []
        self._block: Any = None

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: object) -> None:
        if trainer.global_step == trainer.max_steps - 1:
            self._block = step_peak(pl_module.device, self.peaks)
            self._block.__enter__()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: object) -> None:
        if self._block is not None:
            self._block.__exit__(None, None, None)
            self._block = None


@dataclass
class Setting:
    make_net: Callable[[], nn.Module]
    loader: DataLoader
    steps: int
    warmup: int
    precision: str


def lightning_step(setting: Setting, mode: str | None) -> tuple[float, int]:
    """Median seconds per step and the peak bytes of one step: a Lightning fit, non-private or DPStrategy(mode)."""
    peak = LastStepPeak()
    seconds = lightning_fit(setting, mode, peak)
    return seconds, peak.peaks[0]


def lightning_fit(setting: Setting, mode: str | None, callback: pl.Callback) -> float:
    """Median seconds per step of a Lightning fit, non-private or DPStrategy(mode), with ``callback`` attached."""
    strategy: Any = "auto"
    if mode is not None:
        strategy = DPStrategy(noise_multiplier=1.0, grad_sample_mode=mode, poisson_sampling=False)
    module = Classifier(setting.make_net(), per_example=mode == "ghost")
    return lightning_step_time(
        module,
        setting.loader,
        setting.steps,
        setting.warmup,
        strategy=strategy,
        precision=setting.precision,
        callbacks=[callback],
    )


def profiled_fit(setting: Setting, mode: str | None) -> list[str]:
    """A Lightning fit, non-private or DPStrategy(mode), with ``setting.steps`` steps after the warm-up profiled."""
    profiled = ProfiledSteps(setting.warmup, setting.steps)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lightning_fit(setting, mode, profiled)
    return profiled.summary(mode or "non-private")


def raw_step(setting: Setting, mode: str | None) -> tuple[float, int]:
    """The same as :func:`lightning_step` for a plain PyTorch loop, or a raw Opacus loop in ``mode``."""
    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    net = setting.make_net().to(device)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01)
    criterion: Any = nn.CrossEntropyLoss()
    loader = setting.loader
    if mode is not None:
        private = PrivacyEngine().make_private(
            module=net,
            optimizer=optimizer,
            criterion=criterion,
            data_loader=loader,
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            poisson_sampling=False,
            grad_sample_mode=mode,
        )
        if mode == "ghost":  # ghost clipping returns a criterion that runs the two backward passes
            net, optimizer, criterion, loader = private
        else:
            net, optimizer, loader = private
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=setting.precision == "bf16-mixed")

    def step(inputs: torch.Tensor, labels: torch.Tensor) -> None:
        inputs, labels = inputs.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        optimizer.zero_grad()
        with autocast:
            loss = criterion(net(inputs), labels)
        loss.backward()
        optimizer.step()

    times, peaks = [], []
    batches = iter(loader)
    for inputs, labels in itertools.islice(batches, setting.steps + setting.warmup + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter())
        step(inputs, labels)
    with step_peak(device, peaks):  # one more, untimed step
        step(*next(batches))
    return median_step(times, setting.warmup), peaks[0]


def interleaved(
    runs: dict[str, Callable[[], tuple[float, int]]], repeats: int
) -> tuple[dict[str, tuple[float, float]], dict[str, str]]:
    """Every run once per round, ``repeats`` rounds: the median over rounds of each run's seconds and peak bytes, and
    the error of each run that failed (not run again)."""
    results: dict[str, list[tuple[float, int]]] = {name: [] for name in runs}
    failures: dict[str, str] = {}
    for round_ in range(repeats):
        for name, run in runs.items():
            if name in failures:
                continue
            try:
                with warnings.catch_warnings():  # e.g. poisson_sampling=False: the accounting is approximate
                    warnings.simplefilter("ignore")
                    results[name].append(run())
            except Exception as error:  # one mode failing must not hide the others' figures
                failures[name] = f"{type(error).__name__}: {error}".splitlines()[0]
        done = ", ".join(f"{name} {values[-1][0] * 1e3:.0f} ms" for name, values in results.items() if values)
        print(f"  round {round_ + 1}/{repeats}: {done}")
    medians = {
        name: (statistics.median(s for s, _ in values), statistics.median(m for _, m in values))
        for name, values in results.items()
        if name not in failures
    }
    return medians, failures


def report(
    modes: list[str], medians: dict[str, tuple[float, float]], failures: dict[str, str], on_gpu: bool
) -> list[str]:
    """One line per mode: time and step peak memory against the non-private step and against hooks."""
    if "lightning" not in medians:
        return [f"  non-private step failed: {failures['lightning']}"]
    plain_time, plain_memory = medians["lightning"]
    lines = [f"  non-private: Lightning {plain_time * 1e3:.1f} ms/step, step peak {plain_memory / 2**20:.0f} MiB"]
    if "raw" in medians:
        lines[0] += f"; raw loop {medians['raw'][0] * 1e3:.1f} ms/step"
    hooks = medians.get("lightning hooks")
    for mode in modes:
        if f"lightning {mode}" not in medians:
            lines.append(f"  {mode:9s} DPStrategy failed: {failures[f'lightning {mode}']}")
            continue
        seconds, memory = medians[f"lightning {mode}"]
        line = (
            f"  {mode:9s} DPStrategy {seconds * 1e3:.1f} ms ({seconds / plain_time:.2f}x non-private"
            + (f", {seconds / hooks[0]:.2f}x hooks" if hooks else "")
            + f"), step peak {memory / 2**20:.0f} MiB"
            + (f" ({memory / hooks[1]:.2f}x hooks)" if hooks and hooks[1] > 0 else "")
        )
        if f"raw {mode}" in medians and "raw" in medians:
            raw_seconds = medians[f"raw {mode}"][0]
            ours, theirs = seconds / plain_time, raw_seconds / medians["raw"][0]
            line += (
                f"; raw Opacus {raw_seconds * 1e3:.1f} ms ({theirs:.2f}x raw non-private): strategy adds "
                f"{(ours / theirs - 1) * 100:+.1f}% (target <= 5%)"
            )
        if mode == "bk":
            line += "; target <= 2.0x non-private" if on_gpu else "; target <= 0.75x hooks"
        lines.append(line)
    return lines


def main(argv: list[str] | None = None) -> None:
    on_gpu = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["wrn16-1", "wrn16-4"], default="wrn16-4" if on_gpu else "wrn16-1")
    parser.add_argument("--batch-size", type=int, default=256 if on_gpu else 64)
    parser.add_argument(
        "--modes", help="comma-separated grad_sample_mode values (default: hooks,ghost,bk; hooks,bk in bf16-mixed)"
    )
    parser.add_argument("--precision", default="32-true", choices=["32-true", "bf16-mixed"])
    parser.add_argument(
        "--steps", type=int, help="timed (and profiled) steps per fit (default 15 on a GPU, 6 on a CPU)"
    )
    parser.add_argument("--warmup", type=int, default=5 if on_gpu else 2, help="untimed steps per fit")
    parser.add_argument(  # a GPU of one's own has no neighbours' load to even out
        "--repeats", type=int, default=2 if on_gpu else 3, help="interleaved rounds of every measurement"
    )
    parser.add_argument("--no-raw", action="store_true", help="skip the raw PyTorch/Opacus loops")
    parser.add_argument("--smoke", action="store_true", help="WRN-10-1 at batch 8 on 16x16 inputs, 2 steps, 1 round")
    parser.add_argument(
        "--profile", action="store_true", help="then profile the non-private step and each mode's: what bounds it"
    )
    args = parser.parse_args(argv)
    args.steps = args.steps or (None if args.smoke else 15 if on_gpu else 6)
    modes = (args.modes or ("hooks,ghost,bk" if args.precision == "32-true" else "hooks,bk")).split(",")
    if args.precision != "32-true" and "ghost" in modes:
        parser.error("ghost clipping is fp32 only (Opacus computes its norms in the autocast dtype)")
    depth, widen = (10, 1) if args.smoke else (16, int(args.model.split("-")[1]))
    batch, side = (8, 16) if args.smoke else (args.batch_size, 32)
    steps, warmup, repeats = (args.steps or 2, 1, 1) if args.smoke else (args.steps, args.warmup, args.repeats)

    def make_net() -> nn.Module:
        return wide_resnet(depth, widen, norm="group")

    size = batch * (steps + warmup + 3)
    data = TensorDataset(torch.randn(size, 3, side, side), torch.randint(10, (size,)))
    loader = DataLoader(data, batch_size=batch, pin_memory=on_gpu)
    setting = Setting(make_net, loader, steps, warmup, args.precision)
    name = torch.cuda.get_device_name() if on_gpu else f"CPU, {torch.get_num_threads()} threads"
    print(
        f"device: {name}; WRN-{depth}-{widen} GroupNorm+WS, batch {batch}, {args.precision}; {repeats} interleaved "
        f"rounds of {steps} timed steps; torch {torch.__version__}, pytorch-lightning {pl.__version__}"
    )
    runs: dict[str, Callable[[], tuple[float, int]]] = {"lightning": lambda: lightning_step(setting, None)}
    runs |= {f"lightning {mode}": lambda mode=mode: lightning_step(setting, mode) for mode in modes}
    if not args.no_raw:
        runs["raw"] = lambda: raw_step(setting, None)
        runs |= {f"raw {mode}": lambda mode=mode: raw_step(setting, mode) for mode in modes if mode in OPACUS_MODES}
    medians, failures = interleaved(runs, repeats)
    for line in report(modes, medians, failures, on_gpu):
        print(line)
    if args.profile:
        for mode in [None, *modes]:
            if (f"lightning {mode}" if mode else "lightning") in failures:
                continue  # its failure is reported above
            print("\n".join(profiled_fit(setting, mode)), flush=True)


if __name__ == "__main__":
    main()
