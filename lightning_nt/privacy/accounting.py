"""Privacy accounting: which accountant, how much noise for a target epsilon, and epsilon so far."""

from __future__ import annotations

import math
from typing import Literal

from opacus.accountants import GaussianAccountant, IAccountant, PRVAccountant, RDPAccountant
from opacus.accountants.utils import get_noise_multiplier

from lightning_nt.common.validation import check_choice

__all__ = ["AccountantName", "calibrate_noise", "epsilon_of", "make_accountant"]

AccountantName = Literal["prv", "rdp", "gdp"]
_ACCOUNTANTS: dict[str, type[IAccountant]] = {"prv": PRVAccountant, "rdp": RDPAccountant, "gdp": GaussianAccountant}


def make_accountant(name: AccountantName) -> IAccountant:
    """A fresh Opacus accountant: ``"prv"`` (tight upper bound), ``"rdp"`` (looser upper bound) or ``"gdp"``.

    ``"gdp"`` is the central-limit approximation of Dong et al.: it can under-report epsilon for few steps.
    """
    check_choice("accountant", name, _ACCOUNTANTS)
    return _ACCOUNTANTS[name]()


def epsilon_of(accountant: IAccountant, delta: float) -> float:
    """Epsilon spent so far at ``delta`` (0 before any step, ``inf`` if any step had no noise)."""
    if not accountant.history:
        return 0.0
    if any(noise == 0 for noise, _, _ in accountant.history):
        return math.inf
    return float(accountant.get_epsilon(delta=delta))


def calibrate_noise(
    target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: AccountantName
) -> float:
    """The noise multiplier that spends at most ``target_epsilon`` in ``steps`` steps at ``sample_rate``.

    Examples:
        >>> sigma = calibrate_noise(8.0, 1e-5, sample_rate=0.01, steps=1000, accountant="rdp")
        >>> 0.5 < sigma < 1.5
        True
    """
    return float(
        get_noise_multiplier(
            target_epsilon=target_epsilon,
            target_delta=delta,
            sample_rate=sample_rate,
            steps=steps,
            accountant=accountant,
        )
    )
