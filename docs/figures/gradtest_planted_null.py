"""Regenerate ``gradtest_planted_null.png``: GradientSignalTest's p-values under a planted null, through the Trainer.

The planted null of ``tests/stats/test_science.py``: a logistic regression whose weights are those that generated its
data (the population gradient is exactly zero), at learning rate 0, one measurement per seed. Under the null the
p-values are uniform: the histogram is flat and the QQ plot follows the diagonal, inside the pointwise 99% band of
uniform order statistics. Weights moved away from the truth give p-values near 0.

    python -m docs.figures.gradtest_planted_null --out docs/figures/gradtest_planted_null.png [--seeds 400]
"""

from __future__ import annotations

import argparse
import logging
import warnings

import matplotlib
import numpy as np
from scipy.stats import beta, binom, kstest

from tests.stats.test_science import _p_value

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="where to write the PNG")
    parser.add_argument("--seeds", type=int, default=400)
    args = parser.parse_args()
    for name in ("pytorch_lightning", "lightning_fabric", "lightning.pytorch"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    null = np.sort([_p_value(seed) for seed in range(args.seeds)])
    moved = [_p_value(seed, offset=0.3) for seed in range(20)]
    rejected = int((null <= 0.05).sum())
    low, high = binom.interval(0.99, args.seeds, 0.05)
    ks = kstest(null, "uniform").pvalue
    figure, (left, right) = plt.subplots(1, 2, figsize=(9, 3.8))
    left.hist(null, bins=20, range=(0, 1), color="tab:blue", edgecolor="white")
    left.axhline(args.seeds / 20, color="black", linewidth=0.8, label="uniform")
    left.set_xlabel("p-value under the planted null")
    left.set_ylabel(f"seeds (of {args.seeds})")
    left.set_title(f"rejected at 0.05: {rejected} (99% interval {low:.0f}-{high:.0f}); KS p = {ks:.2f}", fontsize=9)
    left.legend(fontsize=8)
    ranks = np.arange(1, args.seeds + 1)
    expected = ranks / (args.seeds + 1)
    band_low, band_high = beta.ppf(0.005, ranks, args.seeds + 1 - ranks), beta.ppf(0.995, ranks, args.seeds + 1 - ranks)
    right.fill_between(expected, band_low, band_high, color="tab:gray", alpha=0.3, label="99% band (pointwise)")
    right.plot([0, 1], [0, 1], color="black", linewidth=0.8)
    right.plot(expected, null, ".", markersize=3, color="tab:blue", label="planted null")
    right.plot(np.linspace(0, 1, len(moved)), np.sort(moved), "x", color="tab:red", label="weights moved by 0.3")
    right.set_xlabel("uniform quantile")
    right.set_ylabel("p-value")
    right.set_title(f"QQ plot; moved weights: largest p = {max(moved):.1e}", fontsize=9)
    right.legend(fontsize=8, loc="upper left")
    figure.tight_layout()
    figure.savefig(args.out, dpi=110)
    print(
        f"{rejected} of {args.seeds} rejected at 0.05 (99% interval {low:.0f}-{high:.0f}); KS p = {ks:.3f}; "
        f"moved: largest p {max(moved):.2e}; written to {args.out}"
    )


if __name__ == "__main__":
    main()
