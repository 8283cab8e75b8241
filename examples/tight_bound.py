"""A certified error bound below 0.35 on the digits (m = 1438): what it takes beyond `--bound --subspace`.

    python examples/tight_bound.py               # seeds 0-23 (best 0.3488, median 0.372), ~8 minutes on 1 core
    python examples/tight_bound.py --seeds 0     # the best seed of that sweep only: 0.3488 on any machine

Recipe (from a sweep of about 30 variants on the training set; README, CompressionBoundReporter):
1. an MLP 64-128-10 trained only in a 150-dimensional random subspace (``to_subspace``), Adam with cosine decay;
2. quantisation-aware fine-tuning of ``w`` on a fixed 9-level uniform grid over mean +- 3 std, with a
   straight-through gradient, ending exactly on the grid;
3. a greedy search moving single coordinates one level up or down while that lowers the training errors;
4. ``certify``: the library encodes ``w`` and the seed, decodes, measures the decoded model, bounds it.

Trying several seeds is free: the 32-bit seed is part of every code, so the code covers all of them. The
architecture, dimension and grid were chosen by looking at training-set bounds, which a strict account
charges a few bits for (5 bits for 32 variants: 0.3488 -> 0.3507).

The recipe computes in float64, so that its figures are the same on every machine. Its 1,400 Adam steps are
chaotic: in float32, the rounding differences between machines (a matrix product sums in another order with
1 or 2 threads, or with AVX2 or AVX-512 kernels) grew until coordinates of ``w`` crossed quantisation levels,
and seed 19 certified 0.348 with 2 threads but 0.379 with 1. In float64 those differences start about 10^9
times smaller and never reach a decision: every figure above is the same with 1 or 2 threads and with AVX2 or
AVX-512 kernels. ``theta0`` and ``P`` are still drawn by the library in float32 and cast exactly.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from lightning_nt.compression import Certificate, certify, configuration_grid, to_subspace
from lightning_nt.demos import DigitsDataModule

GRID = configuration_grid(levels=(2, 3, 4, 5, 7, 9, 13, 17, 33), prune=(0.0,))


class SubspaceMLP:
    """The network (in float64), its subspace coordinates ``w`` and a forward pass for any value of ``w``."""

    def __init__(self, dimension: int, seed: int) -> None:
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
        self.subspace = to_subspace(self.net, dimension, seed)
        self.net.double()
        self.name = next(name for name, p in self.net.named_parameters() if p is self.subspace.weight)

    def __call__(self, w: Tensor, inputs: Tensor) -> Tensor:
        return functional_call(self.net, {self.name: w}, (inputs,))

    def errors(self, w: Tensor, inputs: Tensor, labels: Tensor) -> int:
        with torch.no_grad():
            return int((self(w, inputs).argmax(dim=1) != labels).sum())


def snap(w: Tensor, grid: Tensor) -> Tensor:
    return grid[torch.bucketize(w, (grid[1:] + grid[:-1]) / 2)]


def uniform_grid(w: Tensor, levels: int, clip: float) -> Tensor:
    """``levels`` values between float16 end points, computed as the library's uniform quantiser does."""
    low = max(float(w.min()), float(w.mean() - clip * w.std()))
    high = min(float(w.max()), float(w.mean() + clip * w.std()))
    low, high = (torch.tensor(float(torch.tensor(v).half())) for v in (low, high))
    return (low + (high - low) * (torch.arange(levels, dtype=torch.float32) / (levels - 1))).double()


def train(
    model: SubspaceMLP,
    w: Tensor,
    data: tuple[Tensor, Tensor],
    epochs: int,
    lr: float,
    batch_size: int,
    grid: Tensor | None = None,
) -> Tensor:
    """Adam with cosine decay; with a ``grid``, the forward sees ``w`` snapped to it (straight-through)."""
    inputs, labels = data
    w = w.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([w], lr=lr)
    steps = epochs * math.ceil(len(labels) / batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    generator = torch.Generator().manual_seed(1)
    for _ in range(epochs):
        order = torch.randperm(len(labels), generator=generator)
        for start in range(0, len(labels), batch_size):
            index = order[start : start + batch_size]
            used = w if grid is None else w + (snap(w.detach(), grid) - w).detach()
            loss = F.cross_entropy(model(used, inputs[index]), labels[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            if grid is not None:
                with torch.no_grad():
                    w.clamp_(grid[0], grid[-1])
    return w.detach() if grid is None else snap(w.detach(), grid)


def coordinate_search(model: SubspaceMLP, w: Tensor, grid: Tensor, data: tuple[Tensor, Tensor], sweeps: int) -> Tensor:
    """Move single coordinates one level while the training errors (ties: cross-entropy) go down.

    Both end levels stay occupied, so the library's min/max quantiser rebuilds the same grid.
    """
    inputs, labels = data
    symbols = torch.bucketize(w, (grid[1:] + grid[:-1]) / 2)

    def score(candidate: Tensor) -> float:
        with torch.no_grad():
            logits = model(grid[candidate], inputs)
        return float((logits.argmax(dim=1) != labels).sum()) + 1e-3 * float(
            F.cross_entropy(logits, labels, reduction="sum")
        )

    best = score(symbols)
    for sweep in range(sweeps):
        moved = False
        for k in torch.randperm(len(symbols), generator=torch.Generator().manual_seed(sweep)).tolist():
            for step in (1, -1):
                level = int(symbols[k]) + step
                last_at_an_end = symbols[k] in (0, len(grid) - 1) and int((symbols == symbols[k]).sum()) == 1
                if not 0 <= level < len(grid) or last_at_an_end:
                    continue
                candidate = symbols.clone()
                candidate[k] = level
                value = score(candidate)
                if value < best:
                    best, symbols, moved = value, candidate, True
                    break
        if not moved:
            break
    return grid[symbols]


def certified(model: SubspaceMLP, w: Tensor, train_set: tuple[Tensor, Tensor]) -> Certificate:
    """The library's certificate of the parametrised network holding ``w`` (what the code describes)."""
    inputs, labels = train_set

    def error_of(tensors: Sequence[Tensor]) -> float:
        return model.errors(tensors[0], inputs, labels) / len(labels)

    return certify([w], error_of, len(labels), GRID, delta=0.05, seed=model.subspace.seed)


def run(seed: int, train_set: tuple[Tensor, Tensor], val_set: tuple[Tensor, Tensor]) -> tuple[Certificate, float]:
    torch.manual_seed(0)
    model = SubspaceMLP(dimension=150, seed=seed)
    w = train(model, torch.zeros(150, dtype=torch.float64), train_set, epochs=200, lr=0.1, batch_size=256)
    grid = uniform_grid(w, levels=9, clip=3.0)
    w = train(model, w.clamp(grid[0], grid[-1]), train_set, 60, 0.2 * float(w.std()) / 7, 64, grid=grid)
    w = coordinate_search(model, w, grid, train_set, sweeps=12)
    certificate = certified(model, w, train_set)
    return certificate, model.errors(certificate.decoded[0], *val_set) / len(val_set[1])


def main(argv: Sequence[str] | None = None) -> Certificate:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(24)), help="subspace seeds to try")
    args = parser.parse_args(argv)
    data = DigitsDataModule()
    data.setup()
    train_set, val_set = (
        (inputs.double(), labels) for inputs, labels in (data.train_set.tensors, data.val_set.tensors)
    )
    best: Certificate | None = None
    for seed in args.seeds:
        certificate, val_error = run(seed, train_set, val_set)
        print(
            f"seed {seed}: certified error <= {certificate.error_bound:.4f} (decoded train error "
            f"{certificate.train_error:.4f}, {certificate.code_bits} bits, {certificate.config}); "
            f"decoded validation error {val_error:.4f}"
        )
        if best is None or certificate.error_bound < best.error_bound:
            best = certificate
    assert best is not None
    print(f"best: {best.error_bound:.4f} with probability {1 - best.delta:g} over the {best.num_examples} examples")
    return best


if __name__ == "__main__":
    main()
