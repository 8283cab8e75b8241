"""Cost of DP-SGD: DPStrategy against a raw Opacus loop, each relative to its own non-private baseline.

One process, same model, data and batch for all four: a non-private Lightning step, DPStrategy, a raw
PyTorch loop and a raw Opacus loop (``PrivacyEngine.make_private``, same grad-sample mode). Batches are
fixed-size here (``poisson_sampling=False`` in both) so that every step does the same work. The figure of
merit is (DPStrategy / Lightning) against (raw Opacus / raw PyTorch): what the strategy adds on top of
Opacus itself (target: at most 5%).

    python benchmarks/bench_dp.py                                   # CPU: WRN-16-1 GroupNorm, batch 64
    python benchmarks/bench_dp.py --model wrn16-4 --batch-size 256  # GPU default
"""

from __future__ import annotations

import argparse
import time
import warnings
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from opacus import PrivacyEngine
from timing import lightning_step_time, median_step
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_nt import DPStrategy
from lightning_nt.demos import wide_resnet


class Classifier(pl.LightningModule):
    def __init__(self, net: nn.Module, per_example: bool = False) -> None:
        super().__init__()
        self.net, self.per_example = net, per_example

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        # ghost clipping wants the per-example losses
        return F.cross_entropy(self.net(batch[0]), batch[1], reduction="none" if self.per_example else "mean")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def lightning_step(make_net, loader: DataLoader, strategy: object, steps: int, warmup: int, precision: str) -> float:
    ghost = isinstance(strategy, DPStrategy) and strategy.grad_sample_mode == "ghost"
    module = Classifier(make_net(), per_example=ghost)
    return lightning_step_time(module, loader, steps, warmup, strategy=strategy, precision=precision)


def raw_step(make_net, loader: DataLoader, mode: str | None, steps: int, warmup: int, precision: str) -> float:
    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    net = make_net().to(device)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01)
    criterion: Any = nn.CrossEntropyLoss()
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
    times = []
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16-mixed")
    for i, (inputs, labels) in enumerate(loader):
        if i > steps + warmup:
            break
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter())
        inputs, labels = inputs.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        optimizer.zero_grad()
        with autocast:
            loss = criterion(net(inputs), labels)
        loss.backward()
        optimizer.step()
    return median_step(times, warmup)


def main() -> None:
    on_gpu = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["wrn16-1", "wrn16-4"], default="wrn16-4" if on_gpu else "wrn16-1")
    parser.add_argument("--batch-size", type=int, default=256 if on_gpu else 64)
    parser.add_argument(
        "--modes", default="hooks,bk", help="comma-separated grad_sample_mode values; bk is compared with hooks"
    )
    parser.add_argument("--precision", default="32-true", choices=["32-true", "bf16-mixed"])
    parser.add_argument("--steps", type=int, default=30 if on_gpu else 12)
    parser.add_argument("--warmup", type=int, default=5 if on_gpu else 3)
    args = parser.parse_args()
    widen = int(args.model.split("-")[1])

    def make_net() -> nn.Module:
        return wide_resnet(16, widen, norm="group")

    size = args.batch_size * (args.steps + args.warmup + 3)
    data = TensorDataset(torch.randn(size, 3, 32, 32), torch.randint(10, (size,)))
    loader = DataLoader(data, batch_size=args.batch_size, pin_memory=on_gpu)
    name = torch.cuda.get_device_name() if on_gpu else f"CPU, {torch.get_num_threads()} threads"
    print(
        f"device: {name}; {args.model} GroupNorm+WS, batch {args.batch_size}, {args.precision}; "
        f"torch {torch.__version__}, pytorch-lightning {pl.__version__}"
    )
    common = (args.steps, args.warmup, args.precision)
    plain_lightning = lightning_step(make_net, loader, "auto", *common)
    plain_raw = raw_step(make_net, loader, None, *common)
    print(f"  non-private: Lightning {plain_lightning * 1e3:.1f} ms/step, raw loop {plain_raw * 1e3:.1f} ms/step")
    strategy_times: dict[str, float] = {}
    for mode in args.modes.split(","):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # poisson_sampling=False warns that the accounting is approximate
            strategy = DPStrategy(noise_multiplier=1.0, grad_sample_mode=mode, poisson_sampling=False)
            dp_lightning = strategy_times[mode] = lightning_step(make_net, loader, strategy, *common)
            if mode == "bk":  # Opacus has no single-backward engine: the anchor is the hooks mode
                hooks = strategy_times.get("hooks")
                against = (
                    f"{dp_lightning / hooks:.2f}x the hooks DPStrategy (target <= 0.75x on the CPU)" if hooks else ""
                )
                print(
                    f"  {mode:9s} DPStrategy {dp_lightning * 1e3:.1f} ms ({dp_lightning / plain_lightning:.2f}x "
                    f"Lightning non-private, target <= 2.0x on a GPU); {against}"
                )
                continue
            dp_raw = raw_step(make_net, loader, mode, *common)
        ours, theirs = dp_lightning / plain_lightning, dp_raw / plain_raw
        print(
            f"  {mode:9s} DPStrategy {dp_lightning * 1e3:.1f} ms ({ours:.2f}x Lightning non-private); raw Opacus "
            f"{dp_raw * 1e3:.1f} ms ({theirs:.2f}x raw non-private); strategy adds {(ours / theirs - 1) * 100:+.1f}% "
            "(target <= 5%)"
        )


if __name__ == "__main__":
    main()
