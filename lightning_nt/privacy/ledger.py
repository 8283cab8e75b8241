"""The checkpointed ledger (a DP-SGD stage): the privacy spent travels with the checkpoints and the module.

A checkpoint carries the accountant's history, the noise, the calibration plan and the steps a budget stop
skipped (:func:`ledger_entry`); resuming from it continues that ledger, and a checkpoint without one, with one
that doesn't match its step count, or one that would roll the ledger back in the middle of a run is refused
(:func:`resumed_ledger`). A module trained privately keeps a note of what it spent, so that training it again with
a fresh ledger is warned about (:func:`mark_trained_privately`, :func:`warn_if_trained_privately_before`).
:class:`_CheckpointedLedger` holds the DP strategy's checkpoint hooks that write and read the ledger.
"""

from __future__ import annotations

from typing import Any

from lightning_fabric.utilities.types import _PATH
from opacus.accountants import IAccountant
from pytorch_lightning.trainer.states import TrainerFn
from pytorch_lightning.utilities import rank_zero_warn
from torch import nn
from typing_extensions import override

from lightning_nt.privacy.accounting import AccountantName, make_accountant, steps_taken
from lightning_nt.privacy.guards import check_ledger

__all__ = ["ledger_entry", "mark_trained_privately", "resumed_ledger", "warn_if_trained_privately_before"]

CHECKPOINT_KEY = "dp_accountant"
MODULE_LEDGER = "_lightning_nt_dp_ledger"  # left on a module trained privately, to warn when it is trained again


def ledger_entry(
    accountant: IAccountant, noise_multiplier: float, plan: tuple[Any, ...] | None, skipped_steps: int
) -> dict[str, Any]:
    """What a checkpoint stores under ``"dp_accountant"``: enough to continue the ledger and to check it."""
    return {
        "ledger": accountant.state_dict(),
        "noise_multiplier": noise_multiplier,
        "plan": plan,
        "skipped_steps": skipped_steps,
    }


def resumed_ledger(
    checkpoint: dict[str, Any], path: _PATH, accountant: IAccountant, name: AccountantName, fitting: bool
) -> dict[str, Any] | None:
    """The checkpoint's ledger entry to continue from, or ``None`` to keep ``accountant`` (an earlier checkpoint
    evaluated after fit: a run's ledger never shrinks). Refuses what would under-report epsilon."""
    saved = checkpoint.get(CHECKPOINT_KEY)
    if saved is None:
        raise RuntimeError(
            f"{path} has no privacy ledger (it was not saved by a DP strategy), so the privacy spent "
            "before it is unknown: resuming privately from it would under-report epsilon."
        )
    ledger = make_accountant(name)
    ledger.load_state_dict(saved["ledger"])
    steps, spent = steps_taken(ledger), steps_taken(accountant)
    if steps < spent and not fitting:
        return None
    if steps < spent:
        raise RuntimeError(
            f"Restoring {path} would roll the privacy ledger back from {spent} to {steps} noisy steps, "
            "but the steps after the checkpoint were released. Restoring an earlier checkpoint in the middle of "
            "a private run (as tuners do) is refused; start a new run from it instead."
        )
    check_ledger(saved, checkpoint, steps)
    return saved


def mark_trained_privately(module: nn.Module, epsilon: float, delta: float, accountant: IAccountant) -> None:
    """Leave on ``module`` what this fit spent (read by :func:`warn_if_trained_privately_before`)."""
    setattr(module, MODULE_LEDGER, {"epsilon": epsilon, "delta": delta, "history": list(accountant.history)})


def warn_if_trained_privately_before(module: nn.Module, accountant: IAccountant) -> None:
    """Warn when a module trained privately before starts a fresh ledger (a resumed run continues its own)."""
    earlier = getattr(module, MODULE_LEDGER, None)
    if earlier is None or accountant.history:
        return
    rank_zero_warn(
        f"This module was already trained privately (epsilon {earlier['epsilon']:.4g} at delta "
        f"{earlier['delta']:g}), and this fit starts a fresh privacy ledger: dp/epsilon counts only this fit. "
        "The privacy spent on the data in total is at least the sum of both (compose them), or resume the "
        "earlier run with fit(ckpt_path=...) to continue its ledger."
    )


class _CheckpointedLedger:
    """The checkpoint hooks of the DP strategies (mixed into them before Lightning's strategy class): every
    checkpoint carries the ledger, and restoring one continues it."""

    # set by the strategy's constructor (see DPStrategy), and from its set-up
    noise_multiplier: float
    target_epsilon: float | None
    accountant: IAccountant
    accountant_name: AccountantName
    _plan: tuple[Any, ...] | None
    _skipped_steps: int

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: _PATH, storage_options: Any = None) -> None:
        entry = ledger_entry(self.accountant, self.noise_multiplier, self._plan, self._skipped_steps)
        checkpoint[CHECKPOINT_KEY] = entry
        super().save_checkpoint(checkpoint, filepath, storage_options)  # type: ignore[misc]

    @override
    def load_checkpoint(self, checkpoint_path: _PATH, weights_only: bool | None = None) -> dict[str, Any]:
        checkpoint = super().load_checkpoint(checkpoint_path, weights_only=False)  # type: ignore[misc]
        fitting = self.lightning_module.trainer.state.fn == TrainerFn.FITTING
        saved = resumed_ledger(checkpoint, checkpoint_path, self.accountant, self.accountant_name, fitting)
        if saved is not None:
            _warn_if_the_noise_changes(self.noise_multiplier, float(saved["noise_multiplier"]), self.target_epsilon)
            self.noise_multiplier = float(saved["noise_multiplier"])
            self._plan = tuple(saved["plan"]) if saved.get("plan") is not None else None
            self._skipped_steps = int(saved.get("skipped_steps", 0))
            self.accountant.load_state_dict(saved["ledger"])
        return checkpoint


def _warn_if_the_noise_changes(given: float, saved: float, target_epsilon: float | None) -> None:
    """A resumed run keeps its ledger's noise: say so when the strategy was built with another one."""
    if target_epsilon is None and given != saved:
        rank_zero_warn(
            f"Resuming a private run whose ledger was spent with noise_multiplier={saved:g}: it continues with that "
            f"noise, not noise_multiplier={given:g} given to the strategy, so that the run stays one ledger. To train "
            "on with other noise, start a new private run (a new ledger) from the weights."
        )
