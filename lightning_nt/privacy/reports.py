"""What the DP strategy reports besides the noisy update (a DP-SGD stage), and the warnings that go with it.

The ``dp/*`` figures (epsilon, delta, noise, rate) are computed from the ledger and covered by the guarantee.
Everything else here is a noiseless statistic of the private data, so it is off by default or released once,
with a warning saying that it is not covered: ``dp/clip_fraction`` (``log_clip_fraction=True``), the end-of-run
count of examples whose gradient was not finite, and what ``training_step`` itself logs from the private batch.
:class:`_PrivacyReports` holds the DP strategy's hooks that report at the start and the end of training.
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
from lightning_utilities.core.apply_func import apply_to_collection
from opacus.accountants import IAccountant
from pytorch_lightning.utilities import rank_zero_warn
from torch.utils.data import DataLoader
from typing_extensions import override

from lightning_nt.common import log_scalars
from lightning_nt.privacy.engines import ClippingEngine
from lightning_nt.privacy.ledger import mark_trained_privately

__all__ = [
    "log_clip_fraction",
    "log_privacy",
    "warn_about_evaluation_on_training_data",
    "warn_about_logging_from_the_batch",
    "warn_about_nonfinite_examples",
    "warn_about_options",
]


def warn_about_options(accountant: str, log_clip_fraction: bool, seed: int | None) -> None:
    """At construction: options that weaken or approximate the guarantee."""
    if accountant == "gdp":
        rank_zero_warn("accountant='gdp' is a central-limit approximation and can under-report epsilon.")
    if log_clip_fraction:
        rank_zero_warn(
            "DPStrategy(log_clip_fraction=True) logs dp/clip_fraction, a noiseless statistic of every private "
            "batch (its size and which examples were clipped): it is NOT covered by the privacy guarantee. "
            "Use it for debugging only, never on a run whose logs are released."
        )
    if seed is not None:
        rank_zero_warn(
            "DPStrategy(seed=...) makes the Poisson batches and the noise reproducible by anyone who knows the seed; "
            "the privacy accounting assumes they are secret. Leave seed=None for a real guarantee."
        )


def log_privacy(
    trainer: pl.Trainer, epsilon: float, delta: float, noise_multiplier: float, sample_rate: float | None
) -> None:
    """``dp/epsilon``, ``dp/delta``, ``dp/noise_multiplier`` and ``dp/sample_rate`` to every logger."""
    figures = {"dp/epsilon": epsilon, "dp/delta": delta, "dp/noise_multiplier": noise_multiplier}
    log_scalars(trainer, {**figures, "dp/sample_rate": sample_rate or 0.0})


def log_clip_fraction(trainer: pl.Trainer, norms: torch.Tensor | None, max_grad_norm: float) -> None:
    """``dp/clip_fraction``: the fraction of the step's examples whose gradient norm exceeded ``max_grad_norm``."""
    if norms is not None and len(norms):
        log_scalars(trainer, {"dp/clip_fraction": float((norms > max_grad_norm).float().mean())})


def warn_about_nonfinite_examples(count: int) -> None:
    """Once, at the end of a run: how many examples contributed zero because their gradient was not finite."""
    if count:
        rank_zero_warn(
            f"{count} per-example gradient(s) in this run were not finite (NaN or inf) and were left out of the "
            "clipped sums (each such example contributed zero; the sensitivity stays max_grad_norm). The count "
            "is over the whole run and is not covered by the guarantee. Check the data and the loss."
        )


def warn_about_evaluation_on_training_data(train_dataset: object, loaders: object) -> bool:
    """Warn if one of ``loaders`` (evaluation loaders, in any collection) reads ``train_dataset``; whether one does."""
    datasets: list[object] = []
    apply_to_collection(loaders, DataLoader, lambda loader: datasets.append(loader.dataset))
    if not any(dataset is train_dataset for dataset in datasets):
        return False
    rank_zero_warn(
        "An evaluation loader reads the train dataset: what validation (or testing) computes and logs on it is "
        "computed on the private data without noise and is NOT covered by the privacy guarantee. Evaluate on "
        "held-out data you may release."
    )
    return True


# The LightningModule's hooks in a training step: what they log is computed from the private batch or from its
# gradients before the noise (on_after_backward, on_before_optimizer_step: e.g. Lightning's `grad_norm` recipe).
_TRAINING_HOOKS = (
    "training_step",
    "on_train_batch_start",
    "on_before_backward",
    "on_after_backward",
    "on_before_optimizer_step",
    "on_before_zero_grad",
    "on_train_batch_end",
    "on_train_epoch_end",
)


def warn_about_logging_from_the_batch(trainer: pl.Trainer) -> bool:
    """Warn if the module's training hooks logged anything (computed on the private batch or its un-noised gradients,
    without noise); whether they did. ``training_step`` is always looked at, the other hooks where the module
    overrides them (a callback's logs in the same hook can't be told apart from the module's)."""
    results = getattr(trainer, "_results", None) or {}
    module = trainer.lightning_module
    hooks = [h for h in _TRAINING_HOOKS if h == "training_step" or _overrides(module, h)]
    logged = {hook: sorted({key.split(".", 1)[1] for key in results if key.split(".", 1)[0] == hook}) for hook in hooks}
    what = ", ".join(f"{hook} logs {names}" for hook, names in logged.items() if names)
    if what:
        rank_zero_warn(
            f"{what}, computed on the private batch (or its gradients before the noise) without noise: these figures "
            "are NOT covered by the privacy guarantee (only the dp/* figures and what goes through the noisy update "
            "are). Keep them private, or log figures computed on public data (e.g. in validation_step)."
        )
    return bool(what)


def _overrides(module: pl.LightningModule, hook: str) -> bool:
    return getattr(type(module), hook, None) is not getattr(pl.LightningModule, hook, None)


class _PrivacyReports:
    """The reporting hooks of the DP strategies (mixed into them before Lightning's strategy class): the ``dp/*``
    figures at the start and the end of training, the end-of-run warning about non-finite examples, and the note
    on the module of what the fit spent."""

    # set by the strategy's constructor (see DPStrategy), and from its set-up
    epsilon: float
    delta: float
    noise_multiplier: float
    sample_rate: float | None
    accountant: IAccountant
    _engine: ClippingEngine | None

    @override
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_start(batch, batch_idx)  # type: ignore[misc]
        if batch_idx == 0:
            self._log_privacy()

    @override
    def on_train_end(self) -> None:
        super().on_train_end()  # type: ignore[misc]
        self._log_privacy()
        self._warn_about_nonfinite_examples()
        mark_trained_privately(self.lightning_module, self.epsilon, self.delta, self.accountant)

    def _warn_about_nonfinite_examples(self) -> None:
        """Every process calls this at the end: the count of non-finite examples is summed across them."""
        local = self._engine.take_nonfinite_count() if self._engine is not None else 0
        total = self.reduce(torch.tensor(local, device=self.root_device), reduce_op="sum")  # type: ignore[attr-defined]
        warn_about_nonfinite_examples(int(total))

    def _log_privacy(self) -> None:
        trainer = self.lightning_module.trainer
        log_privacy(trainer, self.epsilon, self.delta, self.noise_multiplier, self.sample_rate)
