"""DP-SGD with Opacus for any LightningModule: strategies, Poisson sampling, accounting.

One module per stage of a private step, in the order a batch meets them:

* ``guards``: settings that would break the guarantee, refused before the first step; ``independence``: layers
  that mix the examples of a batch, refused on a fit's first batch;
* ``sampling``: Poisson batches at rate ``q``, sharded over processes, empty batches kept;
* ``virtual_steps``: a logical batch run as physical parts (``max_physical_batch_size``), augmented views;
* ``engines``: per-example clipping behind one interface (``hooks``, ``ghost``, ``bk``; chosen by
  ``engines.clipping_engine``), with ``book_keeping`` the single-backward core and ``grad_samplers`` Opacus's
  extra per-example rules;
* ``accounting``: the accountant, the noise calibrated to ``target_epsilon``, the budget stop;
* ``ledger``: the privacy ledger in checkpoints and on the trained module;
* ``reports``: the ``dp/*`` figures and the warnings about what is not covered;
* ``step`` and ``strategy``: the Lightning adapter (``DPStrategy``, ``DPDDPStrategy``) that runs them; the hooks
  of one stage are mixed in from that stage's module (calibration: ``accounting``, checkpoints: ``ledger``,
  reporting: ``reports``).
"""

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
