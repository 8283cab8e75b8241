"""Cost of one GradientSignalTest measurement: against a training step, and its math against per-example gradients.

One measurement on n examples is one forward + backward on the n/2 examples of the second half (their mean
gradient) and one forward-mode JVP over the n/2 examples of the first half (their directional derivatives
``f_i``). The alternative it avoids: per-example gradients of the first half (``vmap(grad)``, n/2 x |theta|
floats) dotted with the mean gradient.

Three figures per model:

- a training step: Lightning's forward + backward + optimizer step on one batch of 64;
- one measurement of the callback as a run pays for it (``_measure``: moving the cached examples, saving and
  restoring the module's state, the math, logging), with a per-example ``loss_fn`` and through ``training_step``
  under vmap;
- the math alone, timed the same way for both paths (same eval-mode module, same examples, same per-example
  loss, the same mean-gradient backward, nothing else): the JVP path against explicit ``vmap(grad)``
  per-example gradients, and, each in a fresh process (Linux), the peak resident memory either adds (sampled
  from ``/proc/self/statm`` during the call, less the size before it).

Medians over repeated calls after a warm-up; ``--threads`` sets torch's thread count (default 2).

    python benchmarks/bench_stats.py                  # digits CNN and MLP, 512 training examples, CPU
    python benchmarks/bench_stats.py --num-examples 256 --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from timing import lightning_step_time
from torch import Tensor
from torch.func import functional_call, grad, vmap

from lightning_nt.demos import DigitsCNN, DigitsDataModule, DigitsMLP
from lightning_nt.stats import GradientSignalTest, directional_derivatives

MODELS: dict[str, Callable[[], pl.LightningModule]] = {"DigitsCNN": DigitsCNN, "DigitsMLP": DigitsMLP}


def per_example(module: pl.LightningModule, batch: tuple[Tensor, Tensor]) -> Tensor:
    return F.cross_entropy(module(batch[0]), batch[1], reduction="none")


class Timed(GradientSignalTest):
    """The callback with the wall time of every measurement recorded."""

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.seconds: list[float] = []

    def _measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        started = time.perf_counter()
        super()._measure(trainer, pl_module)
        self.seconds.append(time.perf_counter() - started)


def measurement_seconds(
    make: Callable[[], pl.LightningModule], datamodule: DigitsDataModule, **kwargs: object
) -> float:
    """Median wall time of the callback's measurement in a run (all of ``_measure``), after two warm-up calls."""
    pl.seed_everything(0)
    monitor = Timed(every_n_steps=1, data="train", **kwargs)
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=8, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[monitor], num_sanity_val_steps=0, limit_val_batches=0,
    )  # fmt: skip
    trainer.fit(make(), datamodule)
    return statistics.median(monitor.seconds[2:])


def _mean_gradient(module: pl.LightningModule, inputs: Tensor, labels: Tensor) -> list[Tensor]:
    half = len(labels) // 2
    return list(torch.autograd.grad(per_example(module, (inputs[half:], labels[half:])).mean(), module.parameters()))


def jvp_scores(module: pl.LightningModule, inputs: Tensor, labels: Tensor) -> Tensor:
    """The ``f_i`` of the first half by the callback's path: one backward, one batched forward-mode JVP."""
    half = len(labels) // 2
    direction = _mean_gradient(module, inputs, labels)
    parameters = list(module.named_parameters())
    return directional_derivatives(module, per_example, (inputs[:half], labels[:half]), parameters, direction)[1]


def explicit_scores(module: pl.LightningModule, inputs: Tensor, labels: Tensor) -> Tensor:
    """The same ``f_i`` from explicit per-example gradients (``vmap(grad)``) of the first half."""
    half = len(labels) // 2
    direction = _mean_gradient(module, inputs, labels)
    weights = {name: p.detach() for name, p in module.named_parameters()}

    def loss(values: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(functional_call(module, values, (x[None],)), y[None])

    gradients = vmap(grad(loss), in_dims=(None, 0, 0))(weights, inputs[:half], labels[:half])
    return sum((gradients[name] * g).flatten(1).sum(1) for name, g in zip(weights, direction))  # type: ignore[return-value]


PATHS = {"jvp": jvp_scores, "explicit": explicit_scores}


def _setup(model: str, num_examples: int) -> tuple[pl.LightningModule, Tensor, Tensor]:
    torch.manual_seed(0)
    datamodule = DigitsDataModule(batch_size=64)
    datamodule.setup("fit")
    inputs, labels = datamodule.train_set.tensors
    return MODELS[model]().eval(), inputs[:num_examples], labels[:num_examples]


def math_seconds(model: str, num_examples: int, repeats: int = 7) -> dict[str, float]:
    """Median seconds of each path's math, the two interleaved, after a warm-up call of each; their ``f`` agree."""
    module, inputs, labels = _setup(model, num_examples)
    torch.testing.assert_close(
        jvp_scores(module, inputs, labels), explicit_scores(module, inputs, labels), rtol=1e-4, atol=1e-6
    )
    times: dict[str, list[float]] = {name: [] for name in PATHS}
    for _ in range(repeats):
        for name, path in PATHS.items():
            started = time.perf_counter()
            path(module, inputs, labels)
            times[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in times.items()}


def peak_memory_mb(model: str, path: str, num_examples: int, threads: int) -> float:
    """Resident memory (MB) one call of ``path`` adds at its peak, measured in a fresh interpreter."""
    command = [sys.executable, __file__, "--peak-of", path, model, "--num-examples", str(num_examples)]
    command += ["--threads", str(threads)]
    # allocations above 64 KiB are mapped and unmapped, so the resident size follows the tensors alive
    environment = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    output = subprocess.run(command, check=True, capture_output=True, text=True, env=environment).stdout
    return json.loads(output.splitlines()[-1])["peak_mb"]


def _resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _report_peak(path: str, model: str, num_examples: int) -> None:
    """Print the peak resident size during one call of ``path``, less the size before it (sampled every 0.5 ms)."""
    module, inputs, labels = _setup(model, num_examples)
    _mean_gradient(module, inputs, labels)  # autograd's own first-use allocations are not the path's
    before, peak, running = _resident_bytes(), [0], True

    def sample() -> None:
        while running:
            peak[0] = max(peak[0], _resident_bytes())
            time.sleep(0.0005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    PATHS[path](module, inputs, labels)
    running = False
    sampler.join()
    print(json.dumps({"peak_mb": max(peak[0] - before, 0) / 2**20}))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-examples", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--peak-of", nargs=2, metavar=("PATH", "MODEL"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.peak_of:
        _report_peak(*args.peak_of, args.num_examples)
        return
    datamodule = DigitsDataModule(batch_size=64)
    datamodule.setup("fit")
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, n = {args.num_examples} examples, "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
    )
    for name, make in MODELS.items():
        size = sum(p.numel() for p in make().parameters())
        step = lightning_step_time(make(), datamodule.train_dataloader(), steps=20, warmup=5)
        default = measurement_seconds(make, datamodule, num_examples=args.num_examples)
        vector = measurement_seconds(make, datamodule, num_examples=args.num_examples, loss_fn=per_example)
        bare = math_seconds(name, args.num_examples)
        memory = {path: peak_memory_mb(name, path, args.num_examples, args.threads) for path in PATHS}
        gradients_mb = args.num_examples // 2 * size * 4 / 2**20
        print(
            f"{name} ({size:,} parameters): training step {step * 1e3:.1f} ms; one measurement in a run "
            f"{vector * 1e3:.1f} ms with a per-example loss_fn ({vector / step:.1f} steps), {default * 1e3:.1f} ms "
            f"through training_step under vmap ({default / step:.1f} steps); the math alone: JVP path "
            f"{bare['jvp'] * 1e3:.1f} ms, explicit per-example gradients {bare['explicit'] * 1e3:.1f} ms "
            f"({bare['explicit'] / bare['jvp']:.2f}x the JVP time); peak memory added: JVP {memory['jvp']:.1f} MB, "
            f"explicit {memory['explicit']:.1f} MB (the gradients alone: {gradients_mb:.1f} MB)"
        )


if __name__ == "__main__":
    main()
