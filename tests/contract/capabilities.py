"""The capabilities the contract suite runs, one :class:`Capability` entry each.

A capability added later enters every promise of the suite by adding one entry to :data:`CAPABILITIES`: how to
build it with tiny settings for a zoo entry, which tags it logs, what state of its own must survive a resume,
whether it promises to leave the trained weights alone, which zoo entries it refuses by design (and with what
message), and how its constructor is swept with bad values.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import pytorch_lightning as pl

from lightning_nt import (
    CompressionBoundReporter,
    DPStrategy,
    GradientSignalTest,
    GradInit,
    IterateAveraging,
    LazinessMonitor,
    RepresentationSimilarity,
    SharpnessMonitor,
    SubspaceTraining,
)
from lightning_nt.common import named_modules
from lightning_nt.similarity.activations import recognised_activation
from lightning_nt.similarity.callback import ACTIVATION_MODULES
from tests.helpers.zoo import ZooEntry

__all__ = ["CAPABILITIES", "Capability", "Constructor", "Refusal"]


@dataclasses.dataclass(frozen=True)
class Refusal:
    """A zoo entry a capability refuses by design: an error raised before the first optimizer step, or (for a
    reporter that must not end the user's fit) a warning, whose message matches the regular expression ``match``.

    ``optional``: the issue allows either refusing or supporting the entry (e.g. "fail closed naming the
    parameter, or treat it as a zero gradient"); a completed fit without the message then passes too.
    """

    match: str
    optional: bool = False


@dataclasses.dataclass(frozen=True)
class Constructor:
    """How the bad-input sweep calls a public constructor: ``cls(**valid, name=bad)`` for every argument.

    The bad values of each argument follow from its annotation (``tests/contract/bad_values.py``);
    ``out_of_range`` adds values of the right type that the argument's documented range excludes.
    """

    cls: type
    valid: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    out_of_range: Mapping[str, tuple[Any, ...]] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Capability:
    """One capability (or one configuration of it) as the contract suite sees it."""

    name: str
    build: Callable[[ZooEntry], Any]
    """A fresh callback, list of callbacks, or strategy with tiny settings, for the given zoo entry."""
    tags: Callable[[ZooEntry], tuple[str, ...]] = lambda entry: ()
    """Scalar tags a one-epoch fit logs (to ``trainer.callback_metrics`` and to every logger)."""
    state: Callable[[Any], Any] = lambda capability: None
    """Its own history or state, which a resumed run must end with too."""
    state_tolerance: float = 0.0
    """Relative tolerance on ``state`` after a resume (0: bit for bit)."""
    side_effect_free: bool = False
    """Promises that the trained weights are bit for bit those of the same run without it."""
    refuses: Callable[[ZooEntry], Refusal | None] = lambda entry: None
    trainer_refusals: Mapping[str, Refusal] = dataclasses.field(default_factory=dict)
    """Trainer configurations it refuses by design, by their name in ``test_trainer_configurations.py``."""
    constructor: Constructor | None = None
    """Swept with bad values (one capability per public class)."""

    def __str__(self) -> str:
        return self.name

    def attach(self, entry: ZooEntry) -> tuple[Any, dict[str, Any]]:
        """A fresh instance for ``entry``, and the ``callbacks=`` or ``strategy=`` that give it to a Trainer."""
        built = self.build(entry)
        if isinstance(built, pl.strategies.Strategy):
            return built, {"strategy": built}
        return built, {"callbacks": list(built) if isinstance(built, list | tuple) else [built]}


def _logits(entry: ZooEntry) -> Callable[[pl.LightningModule, Any], Any]:
    """``(module, batch) -> logits`` as a user writes it: ``.logits`` of a HuggingFace-style output object."""
    if entry.output_object:
        return lambda module, batch: module(module.unpack(batch)[0]).logits
    return lambda module, batch: module(module.unpack(batch)[0])


def _predictions(entry: ZooEntry) -> dict[str, Any]:
    """``predict_fn``/``target_fn`` as a user passes them for batches that aren't ``(inputs, labels)`` tuples."""
    if entry.batch_kind in ("tuple", "namedtuple"):
        return {}
    return {
        "predict_fn": _logits(entry),
        "target_fn": lambda batch: batch["labels"] if isinstance(batch, dict) else batch.labels,
    }


def _compression(entry: ZooEntry) -> CompressionBoundReporter:
    return CompressionBoundReporter(
        levels=(3, 9), prune=(0.0,), methods=("uniform",), finalists=1, stability_samples=4, **_predictions(entry)
    )


def _refuses_non_classifiers(entry: ZooEntry) -> Refusal | None:
    # issue 10 item 5: a regressor is refused naming predict_fn/target_fn; a single logit may be refused, or
    # measured by a documented binary rule
    if entry.loss_kind == "mse":
        return Refusal(r"predict_fn|target_fn")
    if entry.loss_kind == "bce":
        return Refusal(r"predict_fn|target_fn", optional=True)
    return None


def _compression_refusals(entry: ZooEntry) -> Refusal | None:
    # an integer buffer (a step counter) is not encoded: a warning naming it, no report (the fit goes on)
    return _refuses_non_classifiers(entry) or (Refusal(r"integer buffers") if entry.integer_buffers else None)


def _subspace_refusals(entry: ZooEntry) -> Refusal | None:
    if entry.reparametrized:  # theta0 + P w needs plain parameters to displace
        return Refusal(r"already carry parametrizations")
    if entry.bare_parameters:  # theta0 is drawn from the seed by the layers' reset_parameters: named, with the fixes
        return Refusal(r"don't belong to a module with `reset_parameters`")
    # one coordinate vector w can't honour param groups with different learning rates: say so, naming the subspace
    return Refusal(r"(?i)subspace") if entry.several_lrs else None


def _subspace_compression_refusals(entry: ZooEntry) -> Refusal | None:
    return _subspace_refusals(entry) or _compression_refusals(entry)


def _compression_tags(entry: ZooEntry) -> tuple[str, ...]:
    # a model that ends with non-finite weights has nothing to certify: a warning, no report (issue 10 item 23)
    return (
        () if entry.goes_non_finite else ("compression/error_bound", "compression/train_error", "compression/code_bits")
    )


def _sharpness_tags(entry: ZooEntry) -> tuple[str, ...]:
    tags = ("sharpness/lambda_max", "sharpness/threshold", "sharpness/ratio")
    return (*tags, "sharpness/preconditioned") if entry.optimizer == "adam" else tags


def _sharpness_history(monitor: SharpnessMonitor) -> list[dict[str, float]]:
    kept = ("step", "sharpness/lambda_max", "sharpness/threshold", "sharpness/ratio", "sharpness/lambda_min")
    return [{key: value for key, value in entry.items() if key in kept} for entry in monitor.history]


def _averaging_state(callback: IterateAveraging) -> dict[str, Any]:
    return {"n_averaged": callback.n_averaged, "average": callback.averaged_state_dict()}


def _compression_report(reporter: CompressionBoundReporter) -> dict[str, float]:
    return {key: value for key, value in reporter.report.items() if not key.endswith("seconds")}


def _needs_the_loss(entry: ZooEntry) -> Refusal | None:
    # the loss of a manually optimised module can't be read from its training_step: ask for loss_fn
    return Refusal(r"loss_fn") if entry.manual_optimization else None


def _second_order_refusals(entry: ZooEntry) -> Refusal | None:
    # an operation without a second derivative (nn.EmbeddingBag): named, with the layer that replaces it
    return _needs_the_loss(entry) or (None if entry.second_order else Refusal(r"nn\.Embedding followed by"))


def _gradient_test_refusals(entry: ZooEntry) -> Refusal | None:
    # activation checkpointing under the vmapped per-example loss: a loss_fn giving [B] losses avoids the vmap
    return _second_order_refusals(entry) or (Refusal(r"`loss_fn") if entry.activation_checkpointing else None)


def _laziness(entry: ZooEntry) -> LazinessMonitor:
    forward = {"forward_fn": _logits(entry)} if entry.output_object else {}
    return LazinessMonitor(every_n_steps=2, num_examples=8, **forward)


def _laziness_refusals(entry: ZooEntry) -> Refusal | None:
    # torch.func's Jacobians can't go through activation checkpointing's saved-tensor hooks
    return Refusal(r"activation checkpointing .*`forward_fn") if entry.activation_checkpointing else None


def _gradinit_refusals(entry: ZooEntry) -> Refusal | None:
    if entry.manual_optimization:
        return _needs_the_loss(entry)
    # issue 10 item 10: GradInit uses the scheduler's base lr, or asks for `eta=` naming the schedule
    return Refusal(r"`eta=`", optional=True) if entry.lr_starts_at_zero else None


def _dp_refusals(entry: ZooEntry) -> Refusal | None:
    if entry.compiled:  # Opacus's hooks are missed by a graph compiled before them (hooks engine: no per-example grad)
        return Refusal(r"torch\.compile.*Train uncompiled")
    if entry.manual_optimization:  # the strategy steps the DP optimizer itself
        return Refusal(r"automatic optimization")
    if "accumulate_grad_batches" in entry.trainer_arguments:  # breaks Poisson sampling's accounting
        return Refusal(r"accumulate_grad_batches")
    if entry.batch_norm and not entry.batch_norm_in_eval:  # batch statistics couple the examples
        return Refusal(r"BatchNorm")
    if entry.parameter_containers:  # an nn.ParameterList is never called: no layer's per-example rule sees its use
        return Refusal(r"ParameterList")
    if entry.recomputed_layers:  # Opacus's torch.func recomputation of a layer carries no buffers, replays no draws
        return Refusal(r"Opacus recomputes their whole forward pass with torch\.func.*requires_grad_\(False\)")
    if entry.shared_input_rows:  # the examples' gradients are summed in the broadcast before any hook sees them
        return Refusal(r"ran on one row shared by the whole batch.*requires_grad_\(False\)")
    if entry.forward_updates_buffers:  # buffers written from the private batch would be released without noise
        return Refusal(r"training_step changed the module's")
    if entry.recurrent or entry.attention:  # Opacus's DPLSTM/DPGRU/DPMultiheadAttention, by fix_modules=True
        return Refusal(r"fix_modules")
    if entry.unused_parameters:  # issue 10 item 11: fail closed naming the parameter, or a zero gradient
        return Refusal(r"unused", optional=True)
    if entry.trainer_arguments.get("precision") == "64-true":  # the engines clip and noise in fp32
        return Refusal(r"precision='64-true'")
    if entry.reparametrized:  # the per-example rules see neither the hidden parameters nor the reparametrization
        return Refusal(r"parametrized")
    if entry.activation_checkpointing:  # a layer re-run in the backward pass escapes per-example clipping
        return Refusal(r"activation checkpointing")
    return None


def _dp_hooks_refusals(entry: ZooEntry) -> Refusal | None:
    # Opacus's full backward hooks forbid in-place changes of a hooked layer's output; bk's tensor hooks allow them
    in_place = Refusal(r"in-place operation.*grad_sample_mode='bk'") if entry.in_place_on_outputs else None
    return _dp_refusals(entry) or in_place


def _dp_book_keeping_refusals(entry: ZooEntry) -> Refusal | None:
    refusal = _dp_refusals(entry)
    # the row check runs at the step, after the engine; the recomputation check is the Opacus engines'
    engine_built = refusal is None or entry.shared_input_rows or entry.recomputed_layers
    if engine_built and entry.tied_weights:  # one tensor in two layers: per-layer norms would be wrong
        return Refusal(r"grad_sample_mode='hooks'")
    if engine_built and entry.bare_parameters:  # no book-keeping rule (PReLU has one)
        return Refusal(r"neither a book-keeping nor an Opacus per-sample rule.*grad_sample_mode='hooks'")
    return refusal


_DP_TRAINER_REFUSALS = {
    "iterable_dataset": Refusal(r"can't Poisson-sample an IterableDataset"),
    "accumulation_schedule": Refusal(r"GradientAccumulationScheduler.*breaks Poisson sampling"),
    "bf16_true": Refusal(r"can't run with precision='bf16-true'.*Use precision='32-true' or 'bf16-mixed'"),
    "fp16_mixed_grad_scaler": Refusal(r"can't run with precision='16-mixed'.*GradScaler"),
}


def _dp_capability(mode: str, refuses: Callable[[ZooEntry], Refusal | None], **more: Any) -> Capability:
    """DPStrategy with ``grad_sample_mode=mode`` (named plain ``DPStrategy`` for the default, hooks)."""
    return Capability(
        "DPStrategy" if mode == "hooks" else f"DPStrategy-{mode}",
        lambda entry: DPStrategy(noise_multiplier=1.0, max_grad_norm=1.0, seed=0, grad_sample_mode=mode),
        tags=lambda entry: ("dp/epsilon", "dp/delta", "dp/noise_multiplier", "dp/sample_rate"),
        state=lambda strategy: strategy.epsilon,
        refuses=refuses,
        trainer_refusals=_DP_TRAINER_REFUSALS,
        **more,
    )


_MAP_STYLE_ONLY = {"iterable_dataset": Refusal(r"needs one train DataLoader over a map-style dataset")}


def _activation_layers(entry: ZooEntry) -> list[str]:
    module = entry.build()  # tags are named without the `_orig_mod.` of compiled modules
    return [
        name
        for name, layer in named_modules(module).items()
        if (type(layer) in ACTIVATION_MODULES or recognised_activation(layer) is not None)
        and name not in entry.shared_layers  # no per-example representation: left out with a warning
    ]


def _similarity_tags(entry: ZooEntry) -> tuple[str, ...]:
    return tuple(f"similarity/cka/{name}" for name in _activation_layers(entry))


def _similarity_refusals(entry: ZooEntry) -> Refusal | None:
    if entry.manual_optimization:  # features are read by running the module as training_step does
        return _needs_the_loss(entry)
    return None if _activation_layers(entry) else Refusal(r"`layers`")


_COUNTS = (0, -1)
_PROBABILITIES = (0.0, 1.0, -0.5, 1.5)
_POSITIVE = (0.0, -1.0)

CAPABILITIES: list[Capability] = [
    Capability(
        "GradInit",
        lambda entry: GradInit(iterations=3),
        tags=lambda entry: ("gradinit/lookahead_loss_start", "gradinit/lookahead_loss_end", "gradinit/grad_norm"),
        state=lambda callback: callback.scales,
        refuses=_gradinit_refusals,
        constructor=Constructor(
            GradInit,
            out_of_range={
                "iterations": _COUNTS,
                "lr": _POSITIVE,
                "eta": _POSITIVE,
                "gamma": _POSITIVE,
                "min_scale": _POSITIVE,
                "max_scale": _POSITIVE,
                "grad_clip": (-1.0,),  # 0 turns clipping off
            },
        ),
    ),
    Capability(
        "IterateAveraging-uniform",
        lambda entry: IterateAveraging(mode="uniform"),
        tags=lambda entry: ("averaging/n_averaged",),
        state=_averaging_state,
        constructor=Constructor(
            IterateAveraging,
            valid={"mode": "ema"},
            out_of_range={
                "start_step": (-1,),
                "start_epoch": (-1,),
                "every_n_steps": _COUNTS,
                "every_n_epochs": _COUNTS,
                "decay": _PROBABILITIES,
                "half_life": _POSITIVE,
                "warmup": _POSITIVE,
                "bn_batches": _COUNTS,
            },
        ),
    ),
    Capability(
        "IterateAveraging-ema",
        lambda entry: IterateAveraging(mode="ema", decay=0.5),
        tags=lambda entry: ("averaging/n_averaged",),
        state=_averaging_state,
    ),
    Capability(
        "IterateAveraging-observer",
        lambda entry: IterateAveraging(mode="ema", decay=0.5, evaluate=False, apply_on_end=False),
        tags=lambda entry: ("averaging/n_averaged",),
        state=_averaging_state,
        side_effect_free=True,
    ),
    Capability(
        "SharpnessMonitor",
        lambda entry: SharpnessMonitor(every_n_steps=2, num_examples=16, max_iter=8, max_overhead=None),
        tags=_sharpness_tags,
        state=_sharpness_history,
        state_tolerance=1e-3,  # Lanczos to tol=1e-3: the warm start may differ after a resume (item 21)
        side_effect_free=True,
        refuses=_second_order_refusals,
        constructor=Constructor(
            SharpnessMonitor,
            out_of_range={
                "every_n_steps": _COUNTS,
                "num_eigenvalues": _COUNTS,
                "num_examples": _COUNTS,
                "num_samples": _COUNTS,
                "chunk_size": _COUNTS,
                "tol": _PROBABILITIES,
                "max_iter": _COUNTS,
                "trace_samples": (2, 0, -1),
                "batch_sharpness_batches": _COUNTS,
                "smoothness_steps": ((), (0.0,), (-1.0,)),
                "max_overhead": _PROBABILITIES,
            },
        ),
    ),
    Capability(
        "CompressionBoundReporter",
        _compression,
        tags=_compression_tags,
        state=_compression_report,
        side_effect_free=True,
        refuses=_compression_refusals,
        trainer_refusals=_MAP_STYLE_ONLY,  # distinct training examples are counted: a warning, no bound
        constructor=Constructor(
            CompressionBoundReporter,
            out_of_range={
                "delta": _PROBABILITIES,
                "every_n_epochs": _COUNTS,
                "levels": ((), (1,), (0,)),
                "prune": ((), (-0.1,), (1.0,)),
                "methods": ((),),
                "num_examples": _COUNTS,
                "num_samples": _COUNTS,
                "screening_samples": _COUNTS,
                "finalists": _COUNTS,
                "stability_samples": _COUNTS,
            },
        ),
    ),
    Capability(
        "SubspaceTraining",
        lambda entry: SubspaceTraining(dimension=12),
        refuses=_subspace_refusals,
        constructor=Constructor(
            SubspaceTraining, valid={"dimension": 12}, out_of_range={"dimension": _COUNTS, "seed": (-1, 2**32)}
        ),
    ),
    Capability(
        "SubspaceTraining+CompressionBoundReporter",
        lambda entry: [SubspaceTraining(dimension=12), _compression(entry)],
        tags=_compression_tags,
        state=lambda callbacks: _compression_report(callbacks[1]),
        refuses=_subspace_compression_refusals,
        trainer_refusals=_MAP_STYLE_ONLY,  # distinct training examples are counted: a warning, no bound
    ),
    Capability(
        "GradientSignalTest",
        lambda entry: GradientSignalTest(every_n_steps=2, num_examples=16, data="train"),
        tags=lambda entry: ("gradtest/statistic", "gradtest/p_value", "gradtest/reject", "gradtest/signal"),
        state=lambda callback: callback.history,
        side_effect_free=True,
        refuses=_gradient_test_refusals,
        constructor=Constructor(
            GradientSignalTest,
            out_of_range={
                "every_n_steps": _COUNTS,
                "num_examples": (3, 0, -1),
                "num_samples": (3, 0, -1),
                "alpha": (0.0, 1.0, -0.5),
            },
        ),
    ),
    Capability(
        "RepresentationSimilarity",
        lambda entry: RepresentationSimilarity(every_n_epochs=1, num_examples=16, chunk_size=8),
        tags=_similarity_tags,
        state=lambda callback: callback.history,
        side_effect_free=True,
        refuses=_similarity_refusals,
        constructor=Constructor(
            RepresentationSimilarity,
            out_of_range={"every_n_epochs": _COUNTS, "num_samples": (3, 0, -1), "chunk_size": _COUNTS},
        ),
    ),
    Capability(
        "RepresentationSimilarity-val",  # outputs read during validation itself (a forward pass where it can't)
        lambda entry: RepresentationSimilarity(every_n_epochs=1, num_examples=12, data="val"),
        tags=_similarity_tags,
        state=lambda callback: callback.history,
        side_effect_free=True,
        refuses=lambda entry: None if _activation_layers(entry) else Refusal(r"`layers`"),  # validation_step runs
    ),
    Capability(
        "LazinessMonitor",
        _laziness,
        tags=lambda entry: ("laziness/weight_distance",) + (("laziness/ntk_change",) if entry.classifier else ()),
        state=lambda callback: [{k: v for k, v in e.items() if k != "laziness/seconds"} for e in callback.history],
        side_effect_free=True,
        refuses=_laziness_refusals,
        constructor=Constructor(
            LazinessMonitor,
            out_of_range={
                "every_n_steps": _COUNTS,
                "num_examples": (1, 0, -1),
                "num_samples": (1, 0, -1),
                "chunk_size": _COUNTS,
            },
        ),
    ),
    _dp_capability("bk", _dp_book_keeping_refusals),
    _dp_capability("auto", _dp_refusals),  # bk where it can clip every layer (tied weights: hooks): refuses as hooks
    _dp_capability(
        "hooks",
        _dp_hooks_refusals,
        constructor=Constructor(
            DPStrategy,
            out_of_range={
                "noise_multiplier": (-1.0,),
                "target_epsilon": _POSITIVE,
                "delta": _PROBABILITIES,
                "max_grad_norm": _POSITIVE,
                "sample_rate": (0.0, -0.5, 1.5),
                "max_physical_batch_size": _COUNTS,
                "augmentation_multiplicity": _COUNTS,
            },
        ),
    ),
]
