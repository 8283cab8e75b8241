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

__all__ = ["summarize"]


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
    ratios = [entry["sharpness/ratio"] for entry in callback.history if "sharpness/ratio" in entry]
    key = "sharpness/preconditioned" if "sharpness/preconditioned" in last else "sharpness/lambda_max"
    text = f"{len(callback.history)} measurements; last {key.split('/')[1]} {last[key]:.1f}"
    if ratios:
        peak = max(ratios)
        state = "reached the edge of stability" if peak >= 0.9 else "stayed below the edge of stability"
        text += f" vs threshold {last['sharpness/threshold']:.1f} (ratio {ratios[-1]:.2f}, peak {peak:.2f}: {state})"
    if "sharpness/batch_sharpness" in last:
        text += f"; batch sharpness {last['sharpness/batch_sharpness']:.1f}"
    return text


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
            "(--subspace 120 in the digits demo, SubspaceTraining in your own run)"
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
