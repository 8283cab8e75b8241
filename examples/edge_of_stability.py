"""Reproduce Cohen et al.'s edge of stability with SharpnessMonitor and save the picture.

    python examples/edge_of_stability.py                 # GD at lr 0.4: sharpness rises to 2/lr and stays
    python examples/edge_of_stability.py --optimizer adam --lr 1e-3 --steps 1500   # preconditioned, 38/lr

Writes TensorBoard logs (``sharpness/*`` and the image ``sharpness/edge_of_stability``) and a PNG.
"""

from __future__ import annotations

import argparse
import warnings
from collections.abc import Sequence

import pytorch_lightning as pl

from lightning_nt import SharpnessMonitor
from lightning_nt.demos import FullBatchMLP


def main(argv: Sequence[str] | None = None) -> SharpnessMonitor:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--optimizer", choices=["sgd", "adam"], default="sgd")
    parser.add_argument("--lr", type=float, default=0.4)
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--png", default=None, help="where to save the picture (default: in the run's log directory)")
    parser.add_argument("--log-dir", default="lightning_logs")
    args = parser.parse_args(argv)

    pl.seed_everything(args.seed)
    # lambda_max only: the bottom of the spectrum (lambda_min) is a cluster near 0 that Lanczos converges slowly
    monitor = SharpnessMonitor(every_n_steps=20, num_examples=500, lambda_min=False, max_overhead=None)
    trainer = pl.Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=pl.loggers.TensorBoardLogger(args.log_dir, name="edge_of_stability"),
        callbacks=[monitor],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with warnings.catch_warnings():  # measuring every 20 steps of a tiny model is the point here, not an accident
        warnings.filterwarnings("ignore", message="SharpnessMonitor: measuring has taken")
        trainer.fit(FullBatchMLP(args.optimizer, args.lr, args.steps, args.seed))
    figure = monitor.figure()
    figure.axes[0].set_title(f"full-batch {args.optimizer}, lr {args.lr}: tanh MLP, 500 examples")
    figure.tight_layout()
    png = args.png or f"{trainer.logger.log_dir}/edge_of_stability.png"
    figure.savefig(png, dpi=100)
    key = "sharpness/preconditioned" if args.optimizer == "adam" else "sharpness/lambda_max"
    ratios = [f"{entry[key] / entry['sharpness/threshold']:.2f}" for entry in monitor.history if key in entry]
    print(f"sharpness / threshold every 20 steps: {' '.join(ratios)}\npicture: {png}")
    return monitor


if __name__ == "__main__":
    main()
