"""The one table of contract-suite combinations known to fail on ``main``, each marked strict ``xfail``.

Rows are ``(capability, entries, promise, reason)``: ``entries`` is a zoo entry name (or, for the
``bad_input`` promise, a constructor argument), or a tuple of them. Strict xfail turns a row's test red the
moment its fix lands ("XPASS(strict)"), so the row must then be deleted: this table only ever shrinks.
"""

from __future__ import annotations

import pytest

__all__ = ["KNOWN_FAILURES", "known_failure", "unmatched_rows"]

Row = tuple[str, str | tuple[str, ...], str, str]

ITEM_1 = "issue 10 item 1: SharpnessMonitor's Lanczos mixes CPU and CUDA tensors (lanczos.py:89)"
ITEM_3 = "issue 10 item 3: GradInit's search leaves a shared submodule without the optimizer's Parameters"
ITEM_5 = (
    "issue 10 item 5: a regressor / single-logit model is refused only at on_train_end, by an error that ends "
    "the fit after training (neither before the first step nor a warning)"
)
ITEM_9 = "issue 10 item 9: Adam over a frozen backbone: threshold, ratio and preconditioned are not logged"
ITEM_10 = "issue 10 item 10: SharpnessMonitor at lr 0: ZeroDivisionError in thresholds.py"
ITEM_10_GRADINIT = "issue 10 item 10: GradInit under a warm-up from lr 0 reads eta = 0, 'diverges' and logs nothing"
ITEM_11_GRADINIT = "issue 10 item 11: GradInit's autograd.grad without allow_unused on an unused parameter"
ITEM_11_DP = "issue 10 item 11: an unused parameter crashes DPStrategy mid-step inside Opacus"
ITEM_15 = "issue 10 item 15: with accumulate_grad_batches > 1 SharpnessMonitor measures step 0 twice"
ITEM_16 = "issue 10 item 16: gradinit/lookahead_loss_start/_end are not logged when every iteration is constrained"
ITEM_21 = "issue 10 item 21: a resumed SharpnessMonitor measures again at the resume step"
NEW_SDPA = (
    "NEW (not in issue 10): SharpnessMonitor on nn.TransformerEncoder: the Hessian-vector product double-"
    "differentiates the fused attention kernel ('derivative for aten::_scaled_dot_product_flash_attention_for_"
    "cpu_backward is not implemented') and the fit crashes"
)
NEW_SUBSPACE_GROUPS = (
    "NEW (not in issue 10): SubspaceTraining under param groups fails in torch ('some parameters appear in more "
    "than one parameter group') instead of a message naming the subspace"
)
NEW_DP_RESUME = (
    "NEW (not in issue 10): DPStrategy(seed=0) resumed from a checkpoint does not end where the uninterrupted run "
    "ends, even with noise_multiplier=0: the Poisson seed is drawn from (seed, global_step, loaders made), so the "
    "resumed run samples other batches"
)
ITEM_23 = (
    "issue 10 item 23: CompressionBoundReporter on non-finite weights raises 'No configuration could quantise the "
    "model' from on_train_end, ending the fit"
)
ITEM_24 = "issue 10 item 24: the constructor doesn't check its arguments declaratively (checked_arguments)"

_SHARPNESS_RESUMED = (
    "mlp",
    "dict_batch",
    "namedtuple_batch",
    "dataclass_batch",
    "dict_output",
    "tied_weights",
    "shared_submodule",
    "frozen_backbone",
    "unused_parameter",
    "lstm",
    "gru",
    "conv_groupnorm",
    "batchnorm",
    "param_groups",
    "several_val_loaders",
    "regression",
    "binary_single_logit",
    "goes_non_finite",
)
_DP_RESUMED = (
    "mlp",
    "dict_batch",
    "namedtuple_batch",
    "dataclass_batch",
    "dict_output",
    "tied_weights",
    "shared_submodule",
    "frozen_backbone",
    "conv_groupnorm",
    "warmup_from_zero",
    "param_groups",
    "several_val_loaders",
    "regression",
    "binary_single_logit",
)
_SUBSPACE_COMPRESSION = "SubspaceTraining+CompressionBoundReporter"

KNOWN_FAILURES: list[Row] = [
    ("SubspaceTraining", "param_groups", "attaches", NEW_SUBSPACE_GROUPS),
    (_SUBSPACE_COMPRESSION, "param_groups", "attaches", NEW_SUBSPACE_GROUPS),
    (_SUBSPACE_COMPRESSION, "binary_single_logit", "attaches", ITEM_5),
    (_SUBSPACE_COMPRESSION, "binary_single_logit", "tags", ITEM_5),
    (_SUBSPACE_COMPRESSION, "binary_single_logit", "resume", ITEM_5),
    ("DPStrategy", "unused_parameter", "resume", ITEM_11_DP),
    ("DPStrategy", _DP_RESUMED, "resume", NEW_DP_RESUME),
    (_SUBSPACE_COMPRESSION, "goes_non_finite", "fit_twice", ITEM_23),
    (_SUBSPACE_COMPRESSION, "binary_single_logit", "fit_twice", ITEM_5),
]


_LOOKED_UP: set[tuple[str, str, str]] = set()


def known_failure(capability: str, entry: str, promise: str) -> list[pytest.MarkDecorator]:
    """The strict xfail mark of ``(capability, entry, promise)`` if the table lists it, else no mark."""
    _LOOKED_UP.add((capability, entry, promise))
    for row_capability, entries, row_promise, reason in KNOWN_FAILURES:
        names = (entries,) if isinstance(entries, str) else entries
        if row_capability == capability and row_promise == promise and entry in names:
            return [pytest.mark.xfail(strict=True, reason=reason)]
    return []


def unmatched_rows() -> list[tuple[str, str, str]]:
    """Table entries that name no test case (a typo, or a case that no longer exists): they would mark nothing."""
    return [
        (capability, entry, promise)
        for capability, entries, promise, _ in KNOWN_FAILURES
        for entry in ((entries,) if isinstance(entries, str) else entries)
        if (capability, entry, promise) not in _LOOKED_UP
    ]
