"""Occam bounds for a model described in ``L`` bits: the certified part of a compression bound.

For a fixed prefix-free code, a model whose description takes ``L`` bits has prior mass ``2^-L``, so with
probability at least ``1 - delta`` over ``m`` i.i.d. examples its true 0-1 error ``e`` satisfies

    kl(e_hat || e) <= (L ln 2 + ln(1 / delta)) / m            (Occam-kl, Langford & Seeger)
    e <= e_hat + sqrt((L ln 2 + ln(1 / delta)) / (2 m))        (Occam-Hoeffding, looser)

where ``e_hat`` is the error on those ``m`` examples. ``L`` must count every bit needed to decode the model,
including ``log2`` of the number of configurations a search chose among.
"""

from __future__ import annotations

import math

__all__ = ["kl_bernoulli", "kl_inverse", "occam_hoeffding_bound", "occam_kl_bound"]


def kl_bernoulli(q: float, p: float) -> float:
    """``kl(q || p)`` between Bernoulli distributions, in nats (float64; ``0 log 0 = 0``)."""
    if not (0.0 <= q <= 1.0 and 0.0 <= p <= 1.0):
        raise ValueError(f"Bernoulli parameters must be in [0, 1], got q={q}, p={p}.")
    total = 0.0
    for a, b in ((q, p), (1.0 - q, 1.0 - p)):
        if a > 0.0:
            if b == 0.0:
                return math.inf
            total += a * math.log(a / b)
    return total


def kl_inverse(empirical: float, budget: float, tolerance: float = 1e-12) -> float:
    """The largest ``p >= empirical`` with ``kl(empirical || p) <= budget``, by bisection in float64.

    Examples:
        >>> round(kl_inverse(0.0, 0.1), 6)   # closed form 1 - exp(-0.1)
        0.095163
    """
    if not 0.0 <= empirical <= 1.0:
        raise ValueError(f"`empirical` must be in [0, 1], got {empirical}.")
    if budget < 0:
        raise ValueError(f"`budget` must be >= 0, got {budget}.")
    if empirical == 0.0:
        return -math.expm1(-budget)
    low, high = empirical, 1.0
    while high - low > tolerance:
        middle = (low + high) / 2
        if kl_bernoulli(empirical, middle) > budget:
            high = middle
        else:
            low = middle
    return high  # the upper end: never below the true inverse


def _budget(code_bits: float, m: int, delta: float) -> float:
    if code_bits < 0:
        raise ValueError(f"`code_bits` must be >= 0, got {code_bits}.")
    if m < 1:
        raise ValueError(f"`m` must be >= 1, got {m}.")
    if not 0.0 < delta < 1.0:
        raise ValueError(f"`delta` must be in (0, 1), got {delta}.")
    return (code_bits * math.log(2) + math.log(1 / delta)) / m


def occam_kl_bound(train_error: float, code_bits: float, m: int, delta: float = 0.05) -> float:
    """Certified error bound of a model described in ``code_bits`` bits with error ``train_error`` on ``m`` examples.

    Examples:
        >>> round(occam_kl_bound(0.01, 20000, 60000, 0.05), 5)
        0.2409
    """
    return kl_inverse(train_error, _budget(code_bits, m, delta))


def occam_hoeffding_bound(train_error: float, code_bits: float, m: int, delta: float = 0.05) -> float:
    """The looser Hoeffding form of the same bound, capped at 1."""
    return min(1.0, train_error + math.sqrt(_budget(code_bits, m, delta) / 2))
