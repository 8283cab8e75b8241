"""What each lightning_nt capability did in a run, in one line each: printed by the digits demo and the CLI.

``summarize(trainer)`` finds the capabilities among the Trainer's callbacks and its strategy; a capability
without an entry here is listed by name only.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytorch_lightning as pl

from lightning_nt import (
    CompressionBoundReporter,
    DPDDPStrategy,
    DPStrategy,
    GradInit,
    IterateAveraging,
    SharpnessMonitor,
)
from lightning_nt.laziness import LazinessMonitor
from lightning_nt.similarity import RepresentationSimilarity
from lightning_nt.stats import GradientSignalTest

__all__ = ["SUBSPACE_RECIPE", "summarize"]

SUBSPACE_RECIPE = "--bound --model mlp --subspace 120 --optimizer adam"
"""The digits demo's flags for a non-vacuous bound, advised when a bound is vacuous."""


def _averaging(callback: IterateAveraging, trainer: pl.Trainer) -> str:
    metrics = trainer.callback_metrics
    text = f"{callback.n_averaged} iterates averaged"
    averaged, raw = metrics.get("val/loss"), metrics.get("raw/val/loss")
    if averaged is not None and raw is not None and callback.n_averaged:
        verdict = "the average is better" if averaged < raw else "the average is NOT better here"
        text += f"; validation loss with the average {averaged:.4f}, with the raw weights {raw:.4f} ({verdict})"
    return text


def _sharpness(callback: SharpnessMonitor, trainer: pl.Trainer) -> str:
    if not callback.history:
        return "no measurement"
    last = callback.history[-1]
    key = "sharpness/preconditioned" if "sharpness/preconditioned" in last else "sharpness/lambda_max"
    text = f"{len(callback.history)} measurements; last {key.split('/')[1]} {last[key]:.2f}"
    if "sharpness/ratio" in last:
        text += f" vs threshold {last['sharpness/threshold']:.2f} (ratio {last['sharpness/ratio']:.2f}): "
        text += _edge_of_stability(callback.history)
    if "sharpness/batch_sharpness" in last:
        text += f"; batch sharpness {last['sharpness/batch_sharpness']:.2f}"
    return text


def _edge_of_stability(history: list[dict[str, float]]) -> str:
    """Whether the sharpness rose through its threshold, and where the ratio stayed after it did."""
    measured = [(entry["step"], entry["sharpness/ratio"]) for entry in history if "sharpness/ratio" in entry]
    crossings = [i for i in range(1, len(measured)) if measured[i - 1][1] < 1 <= measured[i][1]]
    if not crossings:
        peak = max(ratio for step, ratio in measured if step > 0) if len(measured) > 1 else measured[0][1]
        return (
            f"never rose through the threshold (peak ratio {peak:.2f} after training began); a larger learning "
            "rate or a longer run reaches the edge of stability"
        )
    step, _ = measured[crossings[0]]
    after = [ratio for _, ratio in measured[crossings[0] + 1 :]]
    if not after:
        return f"crossed the threshold at step {step}, the last measurement"
    low, high = min(after), max(after)
    verdict = "hovered at the edge of stability" if low >= 0.8 and high <= 1.3 else "did not settle at the edge"
    return f"crossed the threshold at step {step}, then the ratio stayed in {low:.2f}-{high:.2f} ({verdict})"


def _gradinit(callback: GradInit, trainer: pl.Trainer) -> str:
    result = callback.result
    text = callback.summary().removeprefix("GradInit: ")
    if result is not None and not result.diverged:
        lowered = result.lookahead_loss_end < result.lookahead_loss_start
        text += (
            " The search lowered the look-ahead loss." if lowered else " The search did NOT lower the look-ahead loss."
        )
    return text


def _privacy(strategy: DPStrategy | DPDDPStrategy, trainer: pl.Trainer) -> str:
    return (
        f"(epsilon={strategy.epsilon:.2f}, delta={strategy.delta:g})-DP: noise multiplier "
        f"{strategy.noise_multiplier:.3f}, sample rate {strategy.sample_rate:.4f}, clip {strategy.max_grad_norm}"
    )


def _bound(callback: CompressionBoundReporter, trainer: pl.Trainer) -> str:
    report, certificate = callback.report, callback.certificate
    if certificate is None:
        return "no bound computed"
    bound = report["compression/error_bound"]
    text = (
        f"certified error <= {bound:.3f} (probability {1 - certificate.delta:g}): decoded model's train error "
        f"{report['compression/train_error']:.3f} on m={certificate.num_examples}, {certificate.code_bits} bits "
        f"({certificate.config})"
    )
    if "compression/test_error" in report and not math.isnan(report["compression/test_error"]):
        text += f"; validation error {report['compression/test_error']:.3f}"
    if bound >= 0.9:
        text += (
            " -- VACUOUS: the model needs too many bits for this many examples; train in a random subspace "
            f"(in the digits demo: {SUBSPACE_RECIPE}; in your own run: SubspaceTraining)"
        )
    return text


def _gradient_signal(callback: GradientSignalTest, trainer: pl.Trainer) -> str:
    if not callback.history:
        return "no measurement"
    first, last = callback.history[0], callback.history[-1]
    rejected = sum(entry["gradtest/reject"] for entry in callback.history)
    return (
        f"{len(callback.history)} measurements, 'no gradient signal' rejected in {rejected:.0f}; statistic "
        f"{first['gradtest/statistic']:.1f} -> {last['gradtest/statistic']:.1f} "
        f"(last p {last['gradtest/p_value']:.2g}), "
        f"estimated ||E grad||² {first['gradtest/signal']:.3g} -> {last['gradtest/signal']:.3g}"
    )


def _similarity(callback: RepresentationSimilarity, trainer: pl.Trainer) -> str:
    if not callback.history:
        return "no measurement"
    last = callback.history[-1]
    layers = [tag.split("/", 2)[2] for tag in last if tag.startswith("similarity/cka/")]
    pairs = ", ".join(
        f"{layer} {last[f'similarity/cka/{layer}']:.2f}/{last.get(f'similarity/intertwiner/{layer}', math.nan):.2f}"
        for layer in layers
    )
    return f"CKA/intertwiner similarity per layer to the reference: {pairs}"


def _laziness(callback: LazinessMonitor, trainer: pl.Trainer) -> str:
    if not callback.history:
        return "no measurement"
    last = callback.history[-1]
    parts = [f"weights moved {last['laziness/weight_distance']:.3f} of their initial norm"]
    if "laziness/activation_flips" in last:
        parts.append(f"{100 * last['laziness/activation_flips']:.1f}% of ReLU signs flipped")
    if "laziness/ntk_change" in last:
        parts.append(f"NTK changed {last['laziness/ntk_change']:.3f}")
    return f"{len(callback.history)} measurements; " + ", ".join(parts)


SUMMARIES: dict[type, Callable[[Any, pl.Trainer], str]] = {
    GradInit: _gradinit,
    IterateAveraging: _averaging,
    SharpnessMonitor: _sharpness,
    GradientSignalTest: _gradient_signal,
    RepresentationSimilarity: _similarity,
    LazinessMonitor: _laziness,
    DPStrategy: _privacy,
    DPDDPStrategy: _privacy,
    CompressionBoundReporter: _bound,
}


def summarize(trainer: pl.Trainer) -> list[str]:
    """One line per lightning_nt capability of the run (its callbacks and its strategy), in Trainer order."""
    lines = []
    for plugin in [*trainer.callbacks, trainer.strategy]:
        for kind, summary in SUMMARIES.items():
            if isinstance(plugin, kind):
                lines.append(f"{type(plugin).__name__}: {summary(plugin, trainer)}")
    return lines
