"""Privacy accounting: which accountant, how much noise for a target epsilon, and epsilon so far."""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator
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
    with _quiet_rdp_order_warning(isinstance(accountant, PRVAccountant)):
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
    with _quiet_rdp_order_warning():
        return _noise_multiplier(target_epsilon, delta, sample_rate, steps, accountant)


def _noise_multiplier(
    target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: AccountantName
) -> float:
    return float(
        get_noise_multiplier(
            target_epsilon=target_epsilon,
            target_delta=delta,
            sample_rate=sample_rate,
            steps=steps,
            accountant=accountant,
        )
    )


@contextlib.contextmanager
def _quiet_rdp_order_warning(quiet: bool = True) -> Iterator[None]:
    """Silence Opacus's "Optimal order is the largest alpha" where it does not touch the reported epsilon.

    The RDP conversion warns when its best order is at the end of its grid: the bound is then less tight, never
    invalid. It fires on the trial noise levels of the calibration's bisection (not the chosen one, which is checked
    by the accountant afterwards) and inside the PRV accountant, which uses RDP only to size its domain. With
    ``accountant="rdp"`` the reported epsilon is that RDP bound, so there it is left to warn.
    """
    with warnings.catch_warnings():
        if quiet:
            warnings.filterwarnings("ignore", message="Optimal order is the (largest|smallest) alpha")
        yield
