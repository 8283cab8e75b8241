"""One real ``Trainer.fit`` of WRN-16-4 on CIFAR-shaped data with each capability switched on in turn.

For every precision (fp32, bf16-mixed) the same fit runs with nothing attached, then with ``GradInit``,
``IterateAveraging``, ``SharpnessMonitor``, ``CompressionBoundReporter``, ``RepresentationSimilarity``,
``LazinessMonitor``, ``GradientSignalTest`` and ``DPStrategy`` (Opacus hooks and the single-backward engine), one at
a time.
Each line gives the median and the mean time per training step (the mean carries the measurements that a
monitor makes every ``n`` steps), the whole fit's wall time (which carries one-off work: GradInit's search
before the first step, the compression report after the last), and the ratios to the run without it.
DP-SGD needs per-example gradients, so it trains the GroupNorm + weight-standardised variant (De et al.)
and is compared with that variant's own plain run.

    python benchmarks/gpu_fit.py                    # on a CUDA device: ~2-3 minutes on an H100
    python benchmarks/gpu_fit.py --smoke            # anywhere: tiny network, 2 steps per fit (a test runs it)

The table is printed and written to ``gpu_fit.md`` and ``gpu_fit.json`` under ``--out`` (default ``$OUT``,
else a new temporary folder).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from timing import StepTimer
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from lightning_nt import (
    CompressionBoundReporter,
    DPStrategy,
    GradientSignalTest,
    GradInit,
    IterateAveraging,
    LazinessMonitor,
    RepresentationSimilarity,
    SharpnessMonitor,
)
from lightning_nt.demos import wide_resnet


@dataclasses.dataclass(frozen=True)
class Sizes:
    depth: int
    widen: int
    image: int
    batch_size: int
    steps: int
    warmup: int


FULL = Sizes(depth=16, widen=4, image=32, batch_size=128, steps=40, warmup=10)
SMOKE = Sizes(depth=10, widen=1, image=8, batch_size=4, steps=2, warmup=0)


class CifarShaped(pl.LightningModule):
    """A Wide ResNet trained with SGD + momentum on generated CIFAR-shaped data (3 x image x image, 10 classes)."""

    def __init__(self, sizes: Sizes, norm: Literal["batch", "group"]) -> None:
        super().__init__()
        self.sizes = sizes
        self.net = wide_resnet(sizes.depth, sizes.widen, norm=norm)

    def forward(self, images: Tensor) -> Tensor:
        return self.net(images)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        images, labels = batch
        loss = F.cross_entropy(self(images), labels)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)

    def train_dataloader(self) -> DataLoader:
        batches = self.sizes.steps + self.sizes.warmup + 1
        generator = torch.Generator().manual_seed(0)
        count = batches * self.sizes.batch_size
        images = torch.randn(count, 3, self.sizes.image, self.sizes.image, generator=generator)
        labels = torch.randint(10, (count,), generator=generator)
        return DataLoader(TensorDataset(images, labels), batch_size=self.sizes.batch_size, shuffle=True)


@dataclasses.dataclass(frozen=True)
class Setting:
    """A capability switched on: ``callbacks`` or a ``strategy`` for the Trainer, and the network it needs."""

    name: str
    make: Callable[[Sizes], dict[str, Any]]
    norm: Literal["batch", "group"] = "batch"


def _every(sizes: Sizes) -> int:
    return max(1, sizes.steps // 4)


SETTINGS = [
    Setting("none", lambda sizes: {}),
    Setting("GradInit", lambda sizes: {"callbacks": [GradInit(iterations=max(2, sizes.steps // 2))]}),
    Setting("IterateAveraging", lambda sizes: {"callbacks": [IterateAveraging(mode="ema", decay=0.999)]}),
    Setting(
        "SharpnessMonitor",
        lambda sizes: {
            "callbacks": [
                SharpnessMonitor(
                    every_n_steps=_every(sizes), num_examples=4 * sizes.batch_size, max_iter=20, max_overhead=None
                )
            ]
        },
    ),
    Setting(
        "CompressionBoundReporter",
        lambda sizes: {
            "callbacks": [
                CompressionBoundReporter(
                    levels=(5, 9, 17), prune=(0.0,), methods=("uniform",), finalists=1, stability_samples=16
                )
            ]
        },
    ),
    Setting(
        "RepresentationSimilarity",
        lambda sizes: {"callbacks": [RepresentationSimilarity(every_n_epochs=1, num_examples=2 * sizes.batch_size)]},
    ),
    Setting(
        "LazinessMonitor",
        lambda sizes: {"callbacks": [LazinessMonitor(every_n_steps=_every(sizes), num_examples=16, chunk_size=4)]},
    ),
    Setting(
        "GradientSignalTest",
        lambda sizes: {
            "callbacks": [
                GradientSignalTest(every_n_steps=_every(sizes), num_examples=2 * sizes.batch_size, data="train")
            ]
        },
    ),
    Setting("none (GroupNorm)", lambda sizes: {}, norm="group"),
    Setting("DPStrategy", lambda sizes: {"strategy": DPStrategy(noise_multiplier=1.0, max_grad_norm=1.0)}, "group"),
    Setting(
        "DPStrategy (bk)",
        lambda sizes: {"strategy": DPStrategy(noise_multiplier=1.0, max_grad_norm=1.0, grad_sample_mode="bk")},
        "group",
    ),
]


def chosen(names: set[str]) -> list[Setting]:
    """The settings named, and the plain run each of them is compared with."""
    baselines = {"none (GroupNorm)" if s.norm == "group" else "none" for s in SETTINGS if s.name in names}
    return [s for s in SETTINGS if s.name in names | baselines]


def timed_fit(setting: Setting, sizes: Sizes, precision: str, accelerator: str) -> dict[str, Any]:
    """Fit once with ``setting``; times per step (median, mean after the warm-up) and for the whole fit.

    A capability that fails is reported in its row (``error``), and the other runs go on.
    """
    row = {"capability": setting.name, "precision": precision}
    row["baseline"] = "none (GroupNorm)" if setting.norm == "group" else "none"
    try:
        return row | _timed_fit(setting, sizes, precision, accelerator)
    except Exception as error:  # a GPU run reports every capability, including one that crashes
        return row | {"error": f"{type(error).__name__}: {error}"[:300]}


def _timed_fit(setting: Setting, sizes: Sizes, precision: str, accelerator: str) -> dict[str, float]:
    torch.manual_seed(0)
    module = CifarShaped(sizes, setting.norm)
    timer = StepTimer()
    arguments = setting.make(sizes)
    trainer = pl.Trainer(
        accelerator=accelerator,
        devices=1,
        precision=precision,
        max_steps=sizes.steps + sizes.warmup + 1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer, *arguments.pop("callbacks", [])],
        benchmark="strategy" not in arguments,  # cuDNN's autotuner would tune again for every Poisson batch size
        **arguments,
    )
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module)
    if accelerator == "gpu":
        torch.cuda.synchronize()
    fit_seconds = time.perf_counter() - start
    steps = [b - a for a, b in zip(timer.times[sizes.warmup :], timer.times[sizes.warmup + 1 :])]
    return {
        "median_step_ms": 1e3 * statistics.median(steps),
        "mean_step_ms": 1e3 * statistics.fmean(steps),
        "fit_s": fit_seconds,
    }


def with_ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each row with its ratios to the plain run (same precision, same network)."""
    plain = {(row["capability"], row["precision"]): row for row in rows}
    for row in rows:
        base = plain[(row["baseline"], row["precision"])]
        for key in ("median_step_ms", "mean_step_ms", "fit_s"):
            row[f"{key}_ratio"] = row[key] / base[key] if key in row and key in base else math.nan
    return rows


def table(rows: list[dict[str, Any]], device: str, sizes: Sizes) -> str:
    lines = [
        f"WRN-{sizes.depth}-{sizes.widen}, batch {sizes.batch_size}, {sizes.image}x{sizes.image} images, "
        f"{sizes.steps} timed steps after {sizes.warmup}, on {device}",
        "",
        "| precision | capability | median step ms | x | mean step ms | x | fit s | x |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['precision']} | {r['capability']} | failed: {r['error']} | | | | | |")
            continue
        lines.append(
            f"| {r['precision']} | {r['capability']} | {r['median_step_ms']:.2f} | {r['median_step_ms_ratio']:.2f} "
            f"| {r['mean_step_ms']:.2f} | {r['mean_step_ms_ratio']:.2f} | {r['fit_s']:.2f} | {r['fit_s_ratio']:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny network, 2 steps per fit, CPU if no GPU")
    parser.add_argument("--precisions", default="32-true,bf16-mixed")
    parser.add_argument("--capabilities", default=",".join(s.name for s in SETTINGS))
    parser.add_argument("--out", default=os.environ.get("OUT") or None)
    args = parser.parse_args(argv)
    sizes = SMOKE if args.smoke else FULL
    accelerator = "gpu" if torch.cuda.is_available() else "cpu"
    if accelerator == "cpu" and not args.smoke:
        parser.error("no CUDA device: run with --smoke for a CPU check of the script")
    device = torch.cuda.get_device_name() if accelerator == "gpu" else "cpu"
    rows = []
    for precision in args.precisions.split(","):
        timed_fit(SETTINGS[0], sizes, precision, accelerator)  # warm-up: CUDA context, cuDNN autotuning, imports
        for setting in chosen(set(args.capabilities.split(","))):
            rows.append(timed_fit(setting, sizes, precision, accelerator))
            shown = rows[-1].get("error") or f"median {rows[-1]['median_step_ms']:8.2f} ms/step"
            print(f"{precision:>10} {setting.name:<26} {shown}", flush=True)
    rows = with_ratios(rows)
    report = table(rows, device, sizes)
    print(report)
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="gpu_fit_"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_fit.md").write_text(report + "\n")
    (out / "gpu_fit.json").write_text(json.dumps({"device": device, "sizes": dataclasses.asdict(sizes), "rows": rows}))
    print(f"written to {out}")


if __name__ == "__main__":
    main()
