"""Per-step cost of weight averaging: plain Lightning vs Lightning's EMAWeightAveraging vs IterateAveraging.

One process, same model and data for all three; each configuration is trained ``--repeats`` times,
interleaved, and its per-step time is the median over the timed steps (the best repeat is kept).
Also times one RunningWeightAverage update against the memory-bandwidth floor: a single ``lerp_`` over a
flat tensor with as many floats.

    python benchmarks/bench_averaging.py                      # CPU: a 5.3M-parameter MLP
    python benchmarks/bench_averaging.py --model wrn16-4      # WRN-16-4 on CIFAR-shaped data (GPU)
"""

from __future__ import annotations

import argparse
import time

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import EMAWeightAveraging
from timing import lightning_step_time
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_nt import IterateAveraging
from lightning_nt.averaging import RunningWeightAverage
from lightning_nt.demos import wide_resnet


def mlp() -> nn.Module:
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(3 * 32 * 32, 1024),
        nn.ReLU(),
        nn.Linear(1024, 1024),
        nn.ReLU(),
        nn.Linear(1024, 1024),
        nn.ReLU(),
        nn.Linear(1024, 10),
    )


class Classifier(pl.LightningModule):
    def __init__(self, model: str) -> None:
        super().__init__()
        self.net = wide_resnet() if model == "wrn16-4" else mlp()

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return F.cross_entropy(self.net(batch[0]), batch[1])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)


class FlatLerpFloor(pl.Callback):
    """The memory-bandwidth floor in situ: one flat ``lerp_`` over as many floats as the model has, every step."""

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        numel = sum(p.numel() for p in pl_module.parameters())
        self.average = torch.zeros(numel, device=pl_module.device)
        self.iterate = torch.randn(numel, device=pl_module.device)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: object) -> None:
        self.average.lerp_(self.iterate, 0.001)


def step_time(model: str, callback: pl.Callback | None, steps: int, warmup: int, loader: DataLoader) -> float:
    module = Classifier(model)
    return lightning_step_time(module, loader, steps, warmup, callbacks=[callback] if callback else [])


def update_vs_floor(model: str, device: torch.device, repeats: int = 50) -> tuple[float, float, int]:
    net = Classifier(model).net.to(device)
    average = RunningWeightAverage(net, mode="ema", decay=0.999)
    average.update(net)
    numel = sum(p.numel() for p in net.parameters())
    flat_average, flat_iterate = torch.zeros(numel, device=device), torch.randn(numel, device=device)

    def timed(fn) -> float:
        for _ in range(5):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - start) / repeats

    ours = min(timed(lambda: average.update(net)) for _ in range(3))
    floor = min(timed(lambda: flat_average.lerp_(flat_iterate, 0.001)) for _ in range(3))
    if device.type == "cuda":
        print(
            f"  GPU kernel time per update: ours {kernel_time(lambda: average.update(net)) * 1e3:.4f} ms, "
            f"flat lerp_ {kernel_time(lambda: flat_average.lerp_(flat_iterate, 0.001)) * 1e3:.4f} ms"
        )
    return ours, floor, numel


def kernel_time(fn, repeats: int = 50) -> float:
    """Seconds of GPU kernel time per call (the launch cost on the host, hidden in training, is left out)."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
        for _ in range(repeats):
            fn()
        torch.cuda.synchronize()
    events = profile.key_averages()
    total = sum(getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0.0)) for e in events)
    return total / repeats / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    on_gpu = torch.cuda.is_available()
    parser.add_argument("--model", choices=["mlp", "wrn16-4"], default="wrn16-4" if on_gpu else "mlp")
    parser.add_argument("--batch-size", type=int, default=256 if on_gpu else 64)
    parser.add_argument("--steps", type=int, default=100 if on_gpu else 60)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    device = torch.device("cuda" if on_gpu else "cpu")
    name = torch.cuda.get_device_name() if on_gpu else f"CPU, {torch.get_num_threads()} threads"

    size = args.batch_size * (args.steps + args.warmup + 2)
    data = TensorDataset(torch.randn(size, 3, 32, 32), torch.randint(10, (size,)))
    loader = DataLoader(data, batch_size=args.batch_size, pin_memory=on_gpu)
    configurations = {
        "plain": lambda: None,
        "lightning EMAWeightAveraging": lambda: EMAWeightAveraging(decay=0.999),
        "lightning_nt IterateAveraging": lambda: IterateAveraging(mode="ema", decay=0.999, apply_on_end=False),
        "flat lerp_ floor, in situ": FlatLerpFloor,
    }
    best = {label: float("inf") for label in configurations}
    for _ in range(args.repeats):
        for label, make in configurations.items():
            best[label] = min(best[label], step_time(args.model, make(), args.steps, args.warmup, loader))

    plain = best["plain"]
    print(
        f"device: {name}; model {args.model}; batch {args.batch_size}; torch {torch.__version__}; "
        f"pytorch-lightning {pl.__version__}"
    )
    for label, seconds in best.items():
        print(
            f"  {label:32s} {seconds * 1e3:8.2f} ms/step  overhead {(seconds - plain) * 1e3:+7.3f} ms "
            f"({(seconds / plain - 1) * 100:+.1f}%)"
        )
    ours = best["lightning_nt IterateAveraging"] - plain
    theirs = best["lightning EMAWeightAveraging"] - plain
    floor_in_situ = best["flat lerp_ floor, in situ"] - plain
    print(f"  overhead ratio ours / Lightning: {ours / theirs:.3f}  (target <= 0.2)")
    print(f"  overhead ratio ours / in-situ floor: {ours / floor_in_situ:.2f}")
    update, floor, numel = update_vs_floor(args.model, device)
    print(
        f"  update of {numel / 1e6:.2f}M floats: {update * 1e3:.3f} ms; flat lerp_ floor {floor * 1e3:.3f} ms; "
        f"ratio {update / floor:.2f}  (target <= 1.3)"
    )


if __name__ == "__main__":
    main()
