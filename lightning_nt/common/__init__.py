"""Plumbing every capability shares: the loss of any module, logging, probe sets, exact restore, reductions."""

from lightning_nt.common.autodiff import differentiable_kernels
from lightning_nt.common.batches import (
    batch_size,
    concatenate_batches,
    copied,
    map_examples,
    select_examples,
    tensors_of,
)
from lightning_nt.common.callback import Callback
from lightning_nt.common.compiled import (
    compiled_parts,
    eager_execution,
    named_modules,
    uncompiled_name,
    with_own_methods,
)
from lightning_nt.common.distributed import (
    broadcast_from_rank_zero,
    check_unsharded,
    gather_across_ranks,
    mean_across_ranks,
    min_across_ranks,
    sum_across_ranks,
)
from lightning_nt.common.layers import StandardizedConv2d
from lightning_nt.common.loss import (
    LossFn,
    captured_logging,
    example_losses,
    frozen_attributes,
    frozen_metrics,
    loss_from_output,
    muted_logging,
    training_loss,
    training_step_output,
    validation_step_output,
)
from lightning_nt.common.probe import (
    ProbeLoader,
    ProbeSet,
    first_validation_loader,
    prepare_batch,
    preserved_loader_rng,
    running_stage,
)
from lightning_nt.common.reporting import log_figure, log_scalars, log_text
from lightning_nt.common.state import RNGState, preserved_modes, preserved_rng, preserved_state, stable_name
from lightning_nt.common.substitution import substituted
from lightning_nt.common.validation import check_choice

__all__ = [
    "Callback",
    "LossFn",
    "ProbeLoader",
    "ProbeSet",
    "RNGState",
    "StandardizedConv2d",
    "batch_size",
    "broadcast_from_rank_zero",
    "captured_logging",
    "check_choice",
    "check_unsharded",
    "compiled_parts",
    "concatenate_batches",
    "copied",
    "differentiable_kernels",
    "eager_execution",
    "example_losses",
    "first_validation_loader",
    "frozen_attributes",
    "frozen_metrics",
    "gather_across_ranks",
    "log_figure",
    "log_scalars",
    "log_text",
    "loss_from_output",
    "map_examples",
    "mean_across_ranks",
    "min_across_ranks",
    "muted_logging",
    "named_modules",
    "prepare_batch",
    "preserved_loader_rng",
    "preserved_modes",
    "preserved_rng",
    "preserved_state",
    "running_stage",
    "select_examples",
    "stable_name",
    "substituted",
    "sum_across_ranks",
    "tensors_of",
    "training_loss",
    "training_step_output",
    "uncompiled_name",
    "validation_step_output",
    "with_own_methods",
]
