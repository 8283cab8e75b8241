"""Cost of a GradInit iteration relative to one training step of the same model and batch.

A training step is forward + backward + SGD step on a batch of two half-batches (the batch GradInit
differentiates). An objective iteration adds the look-ahead forward/backward; a constraint iteration
differentiates the gradient norm (double backward). Iterations are timed through `gradinit` itself,
with gamma set so that only one branch runs.

    python benchmarks/bench_gradinit.py                 # 12-conv no-norm net on 8x8 images, CPU
    python benchmarks/bench_gradinit.py --width 64 --half-batch 128
"""

from __future__ import annotations

import argparse
import itertools
import time

import torch
import torch.nn.functional as F
from torch import nn

from lightning_nt.gradinit import gradinit


def deep_conv_net(width: int, depth: int = 12) -> nn.Module:
    layers: list[nn.Module] = [nn.Conv2d(1, width, 3, padding=1), nn.ReLU()]
    for _ in range(depth - 1):
        layers += [nn.Conv2d(width, width, 3, padding=1), nn.ReLU()]
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(width * 64, 10))


def loss_of(module: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return F.cross_entropy(module(batch[0]), batch[1])


def seconds_per(fn, repeats: int) -> float:
    fn()  # warm-up
    started = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - started) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--half-batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    torch.manual_seed(0)
    net = deep_conv_net(args.width)
    halves = [(torch.randn(args.half_batch, 1, 8, 8), torch.randint(10, (args.half_batch,))) for _ in range(8)]
    full = (torch.cat([h[0] for h in halves[:2]]), torch.cat([h[1] for h in halves[:2]]))
    optimizer = torch.optim.SGD(net.parameters(), lr=1e-4)

    def training_step() -> None:
        optimizer.zero_grad()
        loss_of(net, full).backward()
        optimizer.step()

    def search(iterations: int, gamma: float) -> float:
        return seconds_per(
            lambda: gradinit(net, loss_of, itertools.cycle(halves), iterations=iterations, gamma=gamma), 1
        )

    def per_iteration(gamma: float) -> float:
        """Seconds per iteration, without the fixed cost of a search (the look-ahead probes at start and end)."""
        return (search(args.repeats + 1, gamma) - search(1, gamma)) / args.repeats

    step = seconds_per(training_step, args.repeats * 3)
    objective = per_iteration(1e9)
    constraint = per_iteration(1e-9)
    fixed = search(1, 1e9) - objective
    parameters = sum(p.numel() for p in net.parameters())
    print(
        f"12-conv net, width {args.width} ({parameters} parameters), half-batch {args.half_batch}; "
        f"CPU, {torch.get_num_threads()} threads, torch {torch.__version__}"
    )
    print(f"  training step {step * 1e3:.1f} ms")
    print(f"  objective iteration {objective * 1e3:.1f} ms = {objective / step:.2f}x a step (target <= 2.5x)")
    print(f"  constraint iteration {constraint * 1e3:.1f} ms = {constraint / step:.2f}x a step")
    print(
        f"  fixed cost of a search (look-ahead loss at start and end) {fixed * 1e3:.1f} ms = {fixed / step:.2f}x a step"
    )
    print(f"  390 iterations (defaults), all objective: {390 * objective:.1f} s = {390 * objective / step:.0f} steps")


if __name__ == "__main__":
    main()
