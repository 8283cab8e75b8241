"""Regenerate ``gradtest_digits.png``: GradientSignalTest over the digits run of ``examples/configs/stats.yaml``.

The run the method card describes and ``tests/stats/test_science.py`` checks: the digits MLP (SGD lr 0.01, momentum
0.9, 10 epochs, seed 0) built from the YAML by ``examples/cli.py``, tested on all 359 held-out digits every 20
steps, with validation off (validation draws from torch's global generator and would change later epochs). The
picture is the callback's own ``figure()`` (what it logs as ``gradtest/signal_test``), with a title.

    python -m docs.figures.gradtest_digits --out docs/figures/gradtest_digits.png
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import warnings
from pathlib import Path

import matplotlib

from lightning_nt.stats import GradientSignalTest

matplotlib.use("Agg")

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
OVERRIDES = ["--trainer.limit_val_batches=0", "--trainer.num_sanity_val_steps=0", "--trainer.logger=false"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="where to write the PNG")
    args = parser.parse_args()
    for name in ("pytorch_lightning", "lightning_fabric", "lightning.pytorch"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    sys.path.insert(0, str(EXAMPLES))  # examples/cli.py imports its sibling summary.py
    from cli import main as cli

    with tempfile.TemporaryDirectory() as scratch:  # the CLI saves its config.yaml there
        quiet = [f"--trainer.default_root_dir={scratch}", "--trainer.enable_progress_bar=false"]
        run = cli(["fit", "--config", str(EXAMPLES / "configs" / "stats.yaml"), *OVERRIDES, *quiet])
    (monitor,) = [callback for callback in run.trainer.callbacks if isinstance(callback, GradientSignalTest)]
    figure = monitor.figure()
    figure.suptitle("Digits MLP, SGD lr 0.01: gradient signal on 359 held-out digits", fontsize=10)
    figure.tight_layout()
    figure.savefig(args.out, dpi=110)
    for entry in monitor.history:
        print(
            f"step {entry['step']:4d}: T {entry['gradtest/statistic']:6.2f}  p {entry['gradtest/p_value']:.2e}  "
            f"signal {entry['gradtest/signal']:.3f}"
        )
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
