"""Cost of one GradientSignalTest measurement against one training step, and against per-example gradients.

One measurement on n examples is one forward + backward on the n/2 examples of the second half (their mean
gradient) and one forward-mode JVP over the n/2 examples of the first half (their directional derivatives).
The alternative it avoids: per-example gradients of the first half (``vmap(grad)``, n/2 x |theta| floats)
dotted with the mean gradient. A training step is Lightning's forward + backward + optimizer step on one
batch of 64. Median seconds over repeated calls, same model, same examples.

    python benchmarks/bench_stats.py                  # digits CNN and MLP, 512 training examples, CPU
    python benchmarks/bench_stats.py --num-examples 256
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from timing import lightning_step_time
from torch.func import functional_call, grad, vmap

from lightning_nt.demos import DigitsCNN, DigitsDataModule, DigitsMLP
from lightning_nt.stats import GradientSignalTest


def per_example(module: pl.LightningModule, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
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
    pl.seed_everything(0)
    monitor = Timed(every_n_steps=1, data="train", **kwargs)
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=8, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[monitor], num_sanity_val_steps=0, limit_val_batches=0,
    )  # fmt: skip
    trainer.fit(make(), datamodule)
    return statistics.median(monitor.seconds[2:])


def per_example_gradient_seconds(module: pl.LightningModule, inputs: torch.Tensor, labels: torch.Tensor) -> float:
    """f_i from explicit per-example gradients of the first half (the path the JVP replaces)."""
    module.eval()
    params = {name: p.detach() for name, p in module.named_parameters()}
    half = len(labels) // 2

    def loss(weights: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(functional_call(module, weights, (x[None],)), y[None])

    times = []
    for _ in range(5):
        started = time.perf_counter()
        mean = torch.autograd.grad(
            per_example(module, (inputs[half:], labels[half:])).mean(), list(module.parameters())
        )
        gradients = vmap(grad(loss), in_dims=(None, 0, 0))(params, inputs[:half], labels[:half])
        sum((gradients[name] * g).flatten(1).sum(1) for name, g in zip(params, mean))
        times.append(time.perf_counter() - started)
    return statistics.median(times[1:])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-examples", type=int, default=512)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    datamodule = DigitsDataModule(batch_size=64)
    datamodule.setup("fit")
    inputs, labels = datamodule.train_set.tensors
    inputs, labels = inputs[: args.num_examples], labels[: args.num_examples]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, n = {args.num_examples} examples")
    for name, make in (("DigitsCNN", lambda: DigitsCNN()), ("DigitsMLP", lambda: DigitsMLP())):
        size = sum(p.numel() for p in make().parameters())
        loader = datamodule.train_dataloader()
        step = lightning_step_time(make(), loader, steps=20, warmup=5)
        default = measurement_seconds(make, datamodule, num_examples=args.num_examples)
        vector = measurement_seconds(make, datamodule, num_examples=args.num_examples, loss_fn=per_example)
        explicit = per_example_gradient_seconds(make(), inputs, labels)
        print(
            f"{name} ({size:,} parameters): training step {step * 1e3:.1f} ms; one measurement "
            f"{vector * 1e3:.1f} ms with a per-example loss_fn ({vector / step:.1f} steps), "
            f"{default * 1e3:.1f} ms through training_step under vmap ({default / step:.1f} steps); "
            f"explicit per-example gradients {explicit * 1e3:.1f} ms ({explicit / vector:.1f}x the JVP path)"
        )


if __name__ == "__main__":
    main()
