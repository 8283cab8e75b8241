"""Hessian-vector products (HVPs) and seconds to get lambda_max to 1e-3 relative error, and the monitor's cost.

Same model and probe set for everyone: Cohen et al.'s small edge-of-stability setting (tanh MLP
32-100-100-10, MSE, 500 examples, full-batch GD at lr 0.4). The reference lambda_max is Lanczos run
to a residual of 1e-10 (the tests check that solver against exact Hessians).

Compared, at initialisation (cold) and every 20 steps along a training run (warm):
  * ours: warm-started Lanczos, stopped on the Ritz residual (tol 1e-3), as SharpnessMonitor runs it;
  * power iteration with PyHessian's stop rule (relative change < 1e-3); PyHessian itself when installed;
  * hessian-eigenthings' ``lanczos`` at its defaults, when installed.
Then the training time with SharpnessMonitor at its defaults (every 100 steps), and with ``max_overhead=0.05``.

    pip install pyhessian hessian-eigenthings   # optional anchors
    python benchmarks/bench_sharpness.py
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable

import pytorch_lightning as pl
import torch
from torch import Tensor, nn

from lightning_nt import SharpnessMonitor
from lightning_nt.demos import FullBatchMLP, half_mean_squared_error
from lightning_nt.sharpness import HessianOperator, lanczos, warm_start


def problem(seed: int = 0) -> tuple[nn.Module, Tensor, Tensor]:
    """The network and data of the edge-of-stability demo (the same as ``training_seconds`` trains)."""
    torch.manual_seed(seed)
    module = FullBatchMLP(seed=seed)
    return module.net, module.inputs, module.targets


class Counted:
    """An HVP closure that counts its calls."""

    def __init__(self, net: nn.Module, inputs: Tensor, targets: Tensor) -> None:
        self.operator = HessianOperator(
            list(net.parameters()), lambda: [(half_mean_squared_error(net(inputs), targets), 1.0)]
        )
        self.calls = 0

    def __call__(self, vector: Tensor) -> Tensor:
        self.calls += 1
        return self.operator.matvec(vector)


def reference(net: nn.Module, inputs: Tensor, targets: Tensor) -> float:
    matvec = Counted(net, inputs, targets)
    result = lanczos(matvec, torch.randn(matvec.operator.numel), tol=1e-10, max_iter=300, smallest=False)
    return float(result.eigenvalues[0])


def power_iteration(
    matvec: Callable[[Tensor], Tensor], dim: int, truth: float, max_iter: int = 2000
) -> tuple[int, int, float]:
    """Returns (HVPs to 1e-3 error, HVPs at PyHessian's stop rule, error at the stop); -1: not within max_iter."""
    vector = torch.randn(dim)
    vector /= vector.norm()
    previous, first_accurate, stop = None, -1, None
    for i in range(1, max_iter + 1):
        product = matvec(vector)
        value = float(product @ vector)
        if first_accurate < 0 and abs(value - truth) <= 1e-3 * abs(truth):
            first_accurate = i
        if stop is None and previous is not None and abs(previous - value) / (abs(previous) + 1e-6) < 1e-3:
            stop = (i, abs(value - truth) / abs(truth))
        if stop is not None and first_accurate > 0:
            break
        previous = value
        vector = product / product.norm()
    stop = stop or (max_iter, abs(value - truth) / abs(truth))
    return first_accurate, stop[0], stop[1]


def lanczos_to_accuracy(matvec: Counted, start: Tensor, truth: float) -> tuple[int, int, float]:
    """Returns (HVPs to 1e-3 error, HVPs at our residual stop on lambda_max only, and with lambda_min, max error)."""
    first_accurate = -1
    for steps in range(1, 60):
        value = float(lanczos(matvec, start, tol=1e-12, max_iter=steps, smallest=False).eigenvalues[0])
        if abs(value - truth) <= 1e-3 * abs(truth):
            first_accurate = steps
            break
    top = lanczos(matvec, start, tol=1e-3, max_iter=100, smallest=False)
    both = lanczos(matvec, start, tol=1e-3, max_iter=100)
    error = max(abs(float(r.eigenvalues[0]) - truth) / abs(truth) for r in (top, both))
    return first_accurate, top.num_matvecs, both.num_matvecs, error


def pyhessian_power(net: nn.Module, inputs: Tensor, targets: Tensor, truth: float) -> tuple[int, float] | None:
    try:
        import pyhessian  # noqa: F401  (the package exports a class named like its module)
    except ImportError:
        return None
    pyhessian_module = sys.modules["pyhessian.hessian"]
    counter = {"n": 0}
    original = pyhessian_module.hessian_vector_product

    def counted(*args: object) -> object:
        counter["n"] += 1
        return original(*args)

    pyhessian_module.hessian_vector_product = counted
    try:
        value = pyhessian_module.hessian(net, half_mean_squared_error, data=(inputs, targets), cuda=False).eigenvalues(
            maxIter=2000, tol=1e-3
        )[0][0]
    finally:
        pyhessian_module.hessian_vector_product = original
        net.zero_grad(set_to_none=True)
    return counter["n"], abs(value - truth) / abs(truth)


def eigenthings_defaults(matvec: Counted, truth: float) -> tuple[int, float] | None:
    try:
        import hessian_eigenthings as he
    except ImportError:
        return None
    before = matvec.calls
    result = he.lanczos(he.LambdaOperator(matvec, matvec.operator.numel), k=1, seed=0)
    return matvec.calls - before, abs(float(result.eigenvalues[0]) - truth) / abs(truth)


def training_seconds(steps: int, monitor: SharpnessMonitor | None) -> float:
    pl.seed_everything(0)
    trainer = pl.Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[monitor] if monitor else [],
    )
    started = time.perf_counter()
    trainer.fit(FullBatchMLP("sgd", lr=0.4, steps=steps))
    return time.perf_counter() - started


def main() -> None:
    torch.manual_seed(0)
    net, inputs, targets = problem()
    dim = sum(p.numel() for p in net.parameters())
    print(
        f"tanh MLP, {dim} parameters, 500 examples; CPU, {torch.get_num_threads()} threads, torch {torch.__version__}"
    )

    truth = reference(net, inputs, targets)
    matvec = Counted(net, inputs, targets)
    ours = lanczos_to_accuracy(matvec, torch.randn(dim), truth)
    power = power_iteration(matvec, dim, truth)
    print(f"cold, lambda_max = {truth:.5f}")
    print(
        f"  ours (Lanczos):       {ours[0]:4d} HVPs to 1e-3 error; residual stop (tol 1e-3) at {ours[1]} HVPs for "
        f"lambda_max alone, {ours[2]} with lambda_min; error at the stop {ours[3]:.1e}"
    )
    print(
        f"  power iteration:      {power[0]:4d} HVPs to 1e-3 error; PyHessian's stop rule at {power[1]} HVPs, "
        f"error {power[2]:.1e}"
    )
    print(f"  HVPs to 1e-3 error, power / ours: {power[0] / ours[0]:.1f}x  (target >= 3)")
    anchor = pyhessian_power(net, inputs, targets, truth)
    if anchor:
        print(f"  PyHessian 0.1 itself: {anchor[0]:4d} HVPs, error {anchor[1]:.1e}")
    defaults = eigenthings_defaults(matvec, truth)
    if defaults:
        print(f"  hessian-eigenthings lanczos(k=1) defaults: {defaults[0]} HVPs, error {defaults[1]:.1e}")

    optimizer = torch.optim.SGD(net.parameters(), lr=0.4)
    variants = {"ours warm, lambda_max + lambda_min": True, "ours warm, lambda_max only": False}
    counts: dict[str, list[int]] = {name: [] for name in [*variants, "power to 1e-3", "power, PyHessian stop"]}
    errors: dict[str, list[float]] = {name: [] for name in counts}
    seconds = dict.fromkeys(counts, 0.0)
    previous: dict[str, list[Tensor]] = {}
    for step in range(1, 401):
        optimizer.zero_grad()
        half_mean_squared_error(net(inputs), targets).backward()
        optimizer.step()
        if step % 20:
            continue
        net.zero_grad(set_to_none=True)
        truth = reference(net, inputs, targets)
        for name, smallest in variants.items():
            matvec = Counted(net, inputs, targets)
            start = warm_start(previous[name]) if name in previous else torch.randn(dim)
            started = time.perf_counter()
            result = lanczos(matvec, start, tol=1e-3, max_iter=100, smallest=smallest)
            seconds[name] += time.perf_counter() - started
            previous[name] = [*result.eigenvectors, *([result.vector_min] if smallest else [])]
            counts[name].append(result.num_matvecs)
            errors[name].append(abs(float(result.eigenvalues[0]) - truth) / truth)
        started = time.perf_counter()
        accurate, stop, error = power_iteration(Counted(net, inputs, targets), dim, truth)
        seconds["power to 1e-3"] += time.perf_counter() - started
        counts["power to 1e-3"].append(accurate if accurate > 0 else 2000)
        counts["power, PyHessian stop"].append(stop)
        errors["power, PyHessian stop"].append(error)
    n = len(counts["power to 1e-3"])
    print(f"along 400 GD steps at lr 0.4, every 20 steps ({n} measurements; mean HVPs, max relative error):")
    for name, values in counts.items():
        error = f", max error {max(errors[name]):.1e}" if errors[name] else ""
        print(f"  {name:36s} {sum(values) / n:6.1f} HVPs{error}")
    ratio = sum(counts["power to 1e-3"]) / sum(counts["ours warm, lambda_max only"])
    print(f"  HVPs to 1e-3 error, power / ours (lambda_max only): {ratio:.1f}x  (target >= 3)")

    steps, best = 10000, {"plain": math.inf, "budget": math.inf, "defaults": math.inf}
    shares = []
    for _ in range(3):  # interleaved repeats, best wall time of each: this machine's timings drift by +-20%
        best["plain"] = min(best["plain"], training_seconds(steps, None))
        monitor = SharpnessMonitor(max_overhead=0.05)
        best["budget"] = min(best["budget"], training_seconds(steps, monitor))
        shares.append(monitor.history[-1]["sharpness/overhead"])
        best["defaults"] = min(best["defaults"], training_seconds(steps, SharpnessMonitor()))
    plain = best["plain"]
    print(f"training {steps} full-batch steps (best of 3): plain {plain:.2f} s")
    budget = best["budget"]
    print(
        f"  with a budget (max_overhead=0.05): {budget:.2f} s (+{(budget / plain - 1) * 100:.1f}%, "
        f"target <= 5%); share it measured at its last measurement {min(shares) * 100:.1f}-{max(shares) * 100:.1f}%"
    )
    print(
        f"  at defaults (every 100 steps, max_overhead=None): {best['defaults']:.2f} s "
        f"(+{(best['defaults'] / plain - 1) * 100:.1f}%)"
    )


if __name__ == "__main__":
    main()
