"""Train a small CNN on scikit-learn's 8x8 digits on the CPU, with any lightning_nt capability switched on.

    python examples/digits.py                      # plain run, about 10 seconds on 2 CPU cores
    python examples/digits.py --help               # every option and capability flag
    python examples/digits.py --bound --model mlp --subspace 120 --optimizer adam   # a certified error bound
    python examples/digits.py --sharpness          # full-batch GD reaches the edge of stability and stays there
    tensorboard --logdir lightning_logs            # look at what was logged

Each capability adds one entry to ``CAPABILITIES`` below: a flag, the callback (or strategy) it builds, and the
settings its demo needs unless the command line gives others; ``summary.py`` says in one line per capability
what it did.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.strategies import Strategy
from summary import summarize

from lightning_nt import (
    CompressionBoundReporter,
    DPStrategy,
    GradientSignalTest,
    GradInit,
    IterateAveraging,
    LazinessMonitor,
    RepresentationSimilarity,
    SharpnessMonitor,
    SubspaceTraining,
)
from lightning_nt.demos import DeepDigitsMLP, DigitsCNN, DigitsDataModule, DigitsMLP


@dataclass(frozen=True)
class Capability:
    """A lightning_nt capability that ``--<flag>`` switches on: a callback, or the training strategy.

    ``defaults`` are the option values (by ``argparse`` destination) its demo uses where the command line does
    not set them, e.g. a learning rate at which the paper's effect shows.
    """

    flag: str
    help: str
    build: Callable[[argparse.Namespace], pl.Callback | Strategy]
    defaults: Mapping[str, Any] = field(default_factory=dict)


ALL_IMAGES = 1797
"""The digits data set's size: a batch of this many is the whole training set."""

CAPABILITIES: list[Capability] = [
    Capability(
        flag="gradinit",
        help="learn the initial scale of every parameter tensor before training (GradInit, 300 iterations at lr "
        "0.02); see it repair a network the default initialisation can't train: --model deep --epochs 5 "
        "--batch-size 32 --lr 0.02, with and without --gradinit",
        build=lambda args: GradInit(iterations=300, lr=0.02),
    ),
    Capability(
        flag="average",
        help="uniform tail average of the weights over the second half of training (Gadam/SWA), "
        "validated against the raw weights",
        build=lambda args: IterateAveraging(mode="uniform", start_epoch=args.epochs // 2, compare_raw=True),
    ),
    Capability(
        flag="sharpness",
        help="top Hessian eigenvalue every 10 steps against the optimizer's edge-of-stability threshold "
        "(2(1+momentum)/lr for SGD), on 512 training images, and batch sharpness when training on mini-batches. "
        "Unless given, trains as Cohen et al. do, where the sharpness rises to 2/lr and stays there: "
        "--model mlp --loss mse --optimizer sgd --momentum 0 --lr 0.5 --batch-size 0 (full batch) --epochs 200",
        build=lambda args: SharpnessMonitor(
            every_n_steps=10, num_examples=512, batch_sharpness=not _full_batch(args), max_overhead=None
        ),
        defaults={
            "model": "mlp",
            "loss": "mse",
            "optimizer": "sgd",
            "momentum": 0.0,
            "lr": 0.5,
            "batch_size": 0,
            "epochs": 200,
        },
    ),
    Capability(
        flag="laziness",
        help="how lazy training is: weight distance from init, ReLU sign flips and the change of the empirical "
        "NTK on 128 training images every 50 steps (try --model mlp --hidden 4096 against --hidden 64)",
        build=lambda args: LazinessMonitor(every_n_steps=50, num_examples=128),
    ),
    Capability(
        flag="similarity",
        help="every epoch, each ReLU layer's representation of the validation images (read during validation "
        "itself) compared with its state at initialisation: linear CKA, orthogonal Procrustes and the ReLU "
        "intertwiner similarity (Godfrey et al.)",
        build=lambda args: RepresentationSimilarity(reference="init", every_n_epochs=1, num_examples=512, data="val"),
    ),
    Capability(
        flag="gradtest",
        help="every 50 steps, Kim & Ramdas' cross test of 'the expected gradient is zero' on 512 held-out digits: "
        "is there still signal in the gradient?",
        build=lambda args: GradientSignalTest(every_n_steps=50, num_examples=512),
    ),
    Capability(
        flag="dp",
        help="DP-SGD (Opacus): Poisson sampling, per-example clipping at 1.0, noise calibrated so that the whole "
        "run spends epsilon 8 at delta 1e-5; --norm batch is refused (use none or group)",
        build=lambda args: DPStrategy(target_epsilon=8.0, delta=1e-5, max_grad_norm=1.0),
    ),
    Capability(
        flag="bound",
        help="after training, a certified compression bound on the error (quantise, arithmetic-code, decode, "
        "kl-Occam bound at delta 0.05) with Arora et al.'s noise stability and capacity measures; tight with "
        "--subspace",
        build=lambda args: CompressionBoundReporter(),
    ),
]


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, and every option's default."""


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The options, with the ``defaults`` of each capability switched on where the command line is silent."""
    parser = _parser()
    chosen = [c for c in CAPABILITIES if getattr(parser.parse_args(argv), c.flag.replace("-", "_"))]
    for capability in chosen:
        parser.set_defaults(**capability.defaults)
    return parser.parse_args(argv)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=_HelpFormatter)
    parser.add_argument("--epochs", type=int, default=30, help="training epochs")
    parser.add_argument(
        "--batch-size", type=int, default=64, help="examples per training batch (0: all, full-batch training)"
    )
    parser.add_argument("--train-size", type=int, default=None, help="use only this many training images")
    parser.add_argument(
        "--model",
        choices=["cnn", "mlp", "deep"],
        default="cnn",
        help="DigitsCNN, DigitsMLP, or DeepDigitsMLP (12 ReLU layers without normalisation, initialised too large: "
        "it does not train from its default initialisation, and does after --gradinit)",
    )
    parser.add_argument("--width", type=int, default=16, help="channels of the first convolution")
    parser.add_argument("--hidden", type=int, default=512, help="hidden units of the MLP")
    parser.add_argument(
        "--subspace", type=int, default=None, help="train only in a random subspace of this dimension (Lotfi et al.)"
    )
    parser.add_argument("--depth", type=int, default=3, help="convolutions (>= 3)")
    parser.add_argument("--norm", choices=["none", "batch", "group"], default="none", help="normalisation layers")
    parser.add_argument("--optimizer", choices=["sgd", "adam", "adamw"], default="sgd", help="optimizer")
    parser.add_argument("--lr", type=float, default=0.05, help="learning rate")
    parser.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    parser.add_argument(
        "--loss", choices=["cross_entropy", "mse"], default="cross_entropy", help="cross-entropy or squared error"
    )
    parser.add_argument("--weight-decay", type=float, default=0.0, help="weight decay")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split, the initialisation and the batches")
    parser.add_argument("--log-dir", default="lightning_logs", help="TensorBoard log directory")
    for capability in CAPABILITIES:
        parser.add_argument(f"--{capability.flag}", action="store_true", help=capability.help)
    return parser


def _full_batch(args: argparse.Namespace) -> bool:
    return args.batch_size == 0


def _batch_size(args: argparse.Namespace) -> int:
    """The loader's batch size: ``--batch-size``, or every training image at 0 (full-batch gradient descent)."""
    return args.batch_size if not _full_batch(args) else args.train_size or ALL_IMAGES


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    """Train, validate, print a summary and return the final validation metrics."""
    args = parse_args(argv)
    pl.seed_everything(args.seed, workers=True)
    chosen = [c for c in CAPABILITIES if getattr(args, c.flag.replace("-", "_"))]
    plugins = [capability.build(args) for capability in chosen]
    callbacks = [plugin for plugin in plugins if isinstance(plugin, pl.Callback)]
    if args.subspace is not None:
        callbacks.insert(0, SubspaceTraining(dimension=args.subspace, seed=args.seed))
    strategies = [plugin for plugin in plugins if isinstance(plugin, Strategy)]
    optimization = {
        "optimizer": args.optimizer,
        "lr": args.lr,
        "momentum": args.momentum,
        "weight_decay": args.weight_decay,
        "loss": args.loss,
    }
    if args.model == "mlp":
        model = DigitsMLP(hidden=args.hidden, **optimization)
    elif args.model == "deep":
        model = DeepDigitsMLP(**optimization)
    else:
        model = DigitsCNN(width=args.width, norm=args.norm, depth=args.depth, **optimization)
    datamodule = DigitsDataModule(batch_size=_batch_size(args), train_size=args.train_size, seed=args.seed)
    logger = pl.loggers.TensorBoardLogger(args.log_dir, name="digits")
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        accelerator="cpu",
        logger=logger,
        callbacks=callbacks,
        strategy=strategies[0] if strategies else "auto",
        log_every_n_steps=1 if _full_batch(args) else 5,  # one step per epoch in full-batch training
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    started = time.perf_counter()
    trainer.fit(model, datamodule)
    seconds = time.perf_counter() - started
    summary = summarize(trainer)  # before `validate`, which replaces the metrics logged in `fit` (raw/val/*)
    results = {k: float(v) for k, v in trainer.validate(model, datamodule, verbose=False)[0].items()}

    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"\nDigits {args.model.upper()} ({trained} trained parameters), {args.epochs} epochs in {seconds:.0f} s")
    print(f"  validation accuracy {results['val/acc']:.4f}, loss {results['val/loss']:.4f}")
    for line in summary:
        print(f"  {line}")
    print(f"  TensorBoard: tensorboard --logdir {logger.log_dir}")
    return results


if __name__ == "__main__":
    main()
