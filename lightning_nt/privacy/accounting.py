"""Noise and accounting (a DP-SGD stage): which accountant, how much noise for a target epsilon, epsilon so far.

The strategy calibrates its noise here (:func:`calibrated_noise`, called by :class:`_CalibratedNoise`, mixed into
the strategy) once the sample rate and the planned steps are known, asks :func:`exceeds_budget` before every step
whether it may still be taken, and draws a step's noise from :func:`secret_noise` (seeded from the OS), or from
:func:`seeded_noise` when the run was given a seed.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import secrets
import warnings
from collections.abc import Iterator
from typing import Any, Literal

import pytorch_lightning as pl
import torch
from opacus.accountants import GaussianAccountant, IAccountant, PRVAccountant, RDPAccountant
from opacus.accountants.utils import get_noise_multiplier
from pytorch_lightning.utilities import rank_zero_warn

from lightning_nt.common.validation import check_choice
from lightning_nt.privacy.guards import planned_steps

__all__ = [
    "AccountantName",
    "calibrate_noise",
    "calibrated_noise",
    "epsilon_of",
    "exceeds_budget",
    "make_accountant",
    "plan_key",
    "secret_noise",
    "seeded_noise",
    "steps_taken",
]

AccountantName = Literal["prv", "rdp", "gdp"]
_ACCOUNTANTS: dict[str, type[IAccountant]] = {"prv": PRVAccountant, "rdp": RDPAccountant, "gdp": GaussianAccountant}


def make_accountant(name: AccountantName) -> IAccountant:
    """A fresh Opacus accountant: ``"prv"`` (tight upper bound), ``"rdp"`` (looser upper bound) or ``"gdp"``.

    ``"gdp"`` is the central-limit approximation of Dong et al.: it can under-report epsilon for few steps.
    """
    check_choice("accountant", name, _ACCOUNTANTS)
    return _ACCOUNTANTS[name]()


def epsilon_of(accountant: IAccountant, delta: float) -> float:
    """Epsilon spent so far at ``delta`` (0 before any step, ``inf`` if any step had no noise).

    The figure is the accountant's own, computed once per ledger: the PRV accountant takes 0.1 to 0.6 s a query
    on a 2-core CPU, asked at every epoch start and several times at the end of a fit.
    """
    if not accountant.history:
        return 0.0
    if any(noise == 0 for noise, _, _ in accountant.history):
        return math.inf
    key = _ledger_key(accountant, delta)
    epsilon = _EPSILONS.get(key) if key is not None else None
    if epsilon is None:
        with _quiet_rdp_order_warning(isinstance(accountant, PRVAccountant)):
            epsilon = float(accountant.get_epsilon(delta=delta))
        if key is not None:
            if len(_EPSILONS) >= 256:
                _EPSILONS.pop(next(iter(_EPSILONS)))
            _EPSILONS[key] = epsilon
    return epsilon


_EPSILONS: dict[tuple[Any, ...], float] = {}


def _ledger_key(accountant: IAccountant, delta: float) -> tuple[Any, ...] | None:
    """What an Opacus accountant's epsilon depends on: its kind, its orders (RDP, a class attribute a user may
    change), its ledger and delta, as immutable numbers; ``None`` (not memoised) for anything else: a subclass,
    settings on the instance, a tensor or array in the ledger (changed in place, it would keep its hash)."""
    if type(accountant) not in _ACCOUNTANTS.values() or vars(accountant).keys() != {"history"}:
        return None
    history = tuple(tuple(entry) for entry in accountant.history)
    numbers = (delta, *(value for entry in history for value in entry))
    if not all(isinstance(value, int | float) for value in numbers):
        return None
    orders = tuple(getattr(accountant, "DEFAULT_ALPHAS", ()))
    return (type(accountant), orders, history, delta)


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


def steps_taken(accountant: IAccountant) -> int:
    """The noisy steps in the accountant's ledger."""
    return sum(steps for _, _, steps in accountant.history)


def plan_key(
    steps: int,
    sample_rate: float | None,
    noise_multiplier: float,
    target_epsilon: float | None,
    delta: float,
    accountant: AccountantName,
) -> tuple[Any, ...]:
    """What a calibration was for: while none of it changes, its first ``steps`` steps stay within the target.

    Examples:
        >>> plan_key(100, 0.01, 1.1, 8.0, 1e-5, "prv")
        (100, 0.01, 1.1, 8.0, 1e-05, 'prv')
    """
    return (steps, sample_rate, noise_multiplier, target_epsilon, delta, accountant)


def calibrated_noise(
    target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: AccountantName
) -> tuple[float, tuple[Any, ...]]:
    """The noise multiplier for ``steps`` steps within ``target_epsilon`` (:func:`calibrate_noise`), and its plan."""
    noise = calibrate_noise(target_epsilon, delta, sample_rate, steps, accountant)
    return noise, plan_key(steps, sample_rate, noise, target_epsilon, delta, accountant)


def exceeds_budget(
    accountant: IAccountant,
    name: AccountantName,
    *,
    noise_multiplier: float,
    sample_rate: float | None,
    target_epsilon: float,
    delta: float,
    plan: tuple[Any, ...] | None,
) -> bool:
    """Whether one more step at this noise and rate would spend more than ``target_epsilon``.

    Within the calibrated ``plan`` (same rate, noise, target, delta and accountant, steps left) the answer is no
    without asking the accountant; otherwise a copy of the ledger takes the step and reports its epsilon.
    """
    planned = plan[0] if plan is not None else 0
    current = plan_key(planned, sample_rate, noise_multiplier, target_epsilon, delta, name)
    if plan == current and steps_taken(accountant) + 1 <= planned:
        return False  # the noise was calibrated for these steps at this rate, target and delta
    trial = make_accountant(name)
    trial.load_state_dict(accountant.state_dict())
    trial.step(noise_multiplier=noise_multiplier, sample_rate=sample_rate)
    return epsilon_of(trial, delta) > target_epsilon


def secret_noise(device: torch.device) -> torch.Generator:
    """The generator of one step's noise, seeded with 62 bits from the OS: independent of torch's global RNG, which
    scripts seed with a public number (``pl.seed_everything(42)``) that would let anyone regenerate the noise and
    subtract it, and of every other step's noise."""
    return torch.Generator(device=device).manual_seed(secrets.randbits(62))


def seeded_noise(seed: int, step: int, device: torch.device) -> torch.Generator:
    """The generator of step ``step``'s noise in a run seeded with ``seed`` (reproducible runs only: the noise of
    a resumed run is then the noise the uninterrupted run added)."""
    generator = torch.Generator(device=device)
    # not hash(): a str in it is hashed differently by every Python process, and a resume runs in another one
    digest = hashlib.blake2b(f"{seed}/noise/{step}".encode(), digest_size=8).digest()
    return generator.manual_seed(int.from_bytes(digest, "little") % 2**62)


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


class _CalibratedNoise:
    """The noise calibration of the DP strategies (mixed into them before Lightning's strategy class), run once the
    train loader's sample rate and length are known."""

    # set by the strategy's constructor (see DPStrategy), and from its set-up
    noise_multiplier: float
    target_epsilon: float | None
    delta: float
    sample_rate: float | None
    accountant: IAccountant
    accountant_name: AccountantName
    _plan: tuple[Any, ...] | None

    def _calibrate(self, trainer: pl.Trainer, steps_per_epoch: int | None) -> None:
        """With ``target_epsilon``: the noise that spends at most it over the planned steps, set on the optimizer."""
        if self.target_epsilon is None:
            if self.noise_multiplier == 0:
                rank_zero_warn("noise_multiplier=0: no privacy at all, epsilon is reported as inf.")
            return
        planned = planned_steps(trainer, steps_per_epoch)
        if not self.accountant.history:  # a resumed run keeps the noise its ledger was spent with
            assert self.sample_rate is not None
            self.noise_multiplier, self._plan = calibrated_noise(
                self.target_epsilon, self.delta, self.sample_rate, planned, self.accountant_name
            )
        self.optimizers[0].noise_multiplier = self.noise_multiplier  # type: ignore[attr-defined]
