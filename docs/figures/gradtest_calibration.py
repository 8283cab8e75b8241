"""Regenerate ``gradtest_calibration.png``: the cross mean test's ``T`` under the null against N(0, 1).

Two of the null cases of ``tests/stats/test_calibration.py``, drawn by the same code (seed 0): ``n = 200`` rows of
dimension ``d = 1000``, Gaussian and with i.i.d. t3 coordinates, 2000 repetitions each; the histogram of ``T``
against the standard normal density, and the share of repetitions rejected at 0.05.

    python -m docs.figures.gradtest_calibration --out docs/figures/gradtest_calibration.png
"""

from __future__ import annotations

import argparse

import matplotlib
import numpy as np

from lightning_nt.stats import normal_p_value
from tests.stats.test_calibration import N, _null_statistics

matplotlib.use("Agg")
import matplotlib.pyplot as plt

CASES = (("gaussian", "gaussian"), ("t3", "t3 (i.i.d. coordinates)"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="where to write the PNG")
    parser.add_argument("--dimension", type=int, default=1000)
    parser.add_argument("--repetitions", type=int, default=2000)
    args = parser.parse_args()
    figure, axes = plt.subplots(1, len(CASES), figsize=(9, 3.6), sharey=True)
    grid = np.linspace(-4, 4, 400)
    for axis, (family, label) in zip(axes, CASES):
        statistics = _null_statistics("mean", family, args.dimension, args.repetitions)
        rejected = float((normal_p_value(statistics) <= 0.05).double().mean())
        axis.hist(statistics.numpy(), bins=40, density=True, alpha=0.6, label=f"T over {args.repetitions} null samples")
        axis.plot(grid, np.exp(-(grid**2) / 2) / np.sqrt(2 * np.pi), color="black", label="N(0, 1)")
        axis.set_title(f"{label}, n = {N}, d = {args.dimension}: {rejected:.3f} rejected", fontsize=9)
        axis.set_xlabel("T")
        print(f"{label}: {rejected:.4f} of {args.repetitions} rejected at 0.05")
    axes[0].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(args.out, dpi=110)
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
