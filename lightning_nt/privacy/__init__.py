"""DP-SGD with Opacus for any LightningModule: strategies, Poisson sampling, accounting."""

from lightning_nt.privacy import grad_samplers  # noqa: F401  (registers per-example gradient rules)
from lightning_nt.privacy.accounting import calibrate_noise, epsilon_of, make_accountant
from lightning_nt.privacy.sampling import AugmentedViews, PoissonBatchSampler, empty_batch_collate, poisson_dataloader
from lightning_nt.privacy.strategy import DPDDPStrategy, DPStrategy, register_strategies

__all__ = [
    "AugmentedViews",
    "DPDDPStrategy",
    "DPStrategy",
    "PoissonBatchSampler",
    "calibrate_noise",
    "empty_batch_collate",
    "epsilon_of",
    "make_accountant",
    "poisson_dataloader",
    "register_strategies",
]
