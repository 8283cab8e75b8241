"""Lightning adapter: how far training moves from the lazy (kernel) regime, measured on a fixed probe set."""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import is_dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_warn
from torch import Tensor
from typing_extensions import override

from lightning_nt.common import (
    ProbeSet,
    log_figure,
    log_scalars,
    prepare_batch,
    preserved_state,
    tensors_of,
    uncompiled_name,
)
from lightning_nt.common.callback import Callback
from lightning_nt.common.distributed import mean_across_ranks, min_across_ranks, sum_across_ranks
from lightning_nt.common.state import continues_run, stable_name
from lightning_nt.common.validation import at_least, checked_arguments, non_empty, renamed_arguments, renamed_property
from lightning_nt.laziness.distance import relative_distance
from lightning_nt.laziness.ntk import (
    ForwardFn,
    empirical_ntk,
    jacobian_bytes,
    kernel_alignment,
    outputs_per_example,
    zero_centred_kernels,
)
from lightning_nt.laziness.patterns import activation_layers, activation_patterns, pattern_flips

__all__ = ["LABEL_NAMES", "LazinessMonitor", "TargetFn"]

TargetFn = Callable[[Any], Tensor]
"""``target_fn(batch) -> targets``: integer labels ``[m]`` or float targets ``[m, C]`` for the kernel alignment."""

_TAG = "laziness"

_ZERO_KERNEL_REASONS = {
    "label kernel": "every probe example has the same label (one class); use a larger or class-balanced probe set "
    "(`num_examples`, a shuffled train loader) or targets of several classes with `target_fn`",
    "NTK": "every probe example has the same output gradients, e.g. a network whose outputs don't depend on its "
    "input yet",
}


@contextlib.contextmanager
def _evaluated(pl_module: pl.LightningModule) -> Iterator[None]:
    """The module in eval mode (BatchNorm on its running statistics, no dropout), in fp32 outside autocast; its modes
    and buffers restored after, so that a measurement leaves no trace."""
    with preserved_state(pl_module, parameters=False), torch.autocast(pl_module.device.type, enabled=False):
        pl_module.eval()
        yield


def _first_tensor_forward(module: torch.nn.Module, batch: Any) -> Tensor:
    """The default forward: the module applied to the batch's first tensor (the inputs of ``(x, y)`` batches)."""
    return module(tensors_of(batch)[0])


_CGROUP_LIMITS = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")


def _free_memory(device: torch.device) -> int:
    """The bytes free on a CUDA ``device`` (PyTorch's cached but unused blocks included); for any other, the
    machine's physical memory or a container's (cgroup) limit, whichever is smaller; ``sys.maxsize`` (no default
    limit) where neither can be read (``os.sysconf`` is POSIX only)."""
    if device.type == "cuda":
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return torch.cuda.mem_get_info(device)[0] + cached
    limits = []
    with contextlib.suppress(AttributeError, ValueError, OSError):
        limits.append(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    for path in _CGROUP_LIMITS:
        with contextlib.suppress(OSError, ValueError):
            limits.append(int(Path(path).read_text().strip()))  # "max" (no limit) is not a number
    return min(limits, default=sys.maxsize)


def _check_default_forward(module: torch.nn.Module, batch: Any) -> None:
    """Run the default forward once on the probe batch, so that a module it doesn't fit is refused naming the fix."""
    with preserved_state(module, parameters=False), torch.no_grad():
        module.eval()
        try:
            _first_tensor_forward(module, batch)
        except Exception as error:
            raise TypeError(
                f"LazinessMonitor calls {type(module).__name__} on the batch's first tensor by default, which failed "
                f"({type(error).__name__}: {error}). Pass `forward_fn(pl_module, batch)` returning the network's "
                "outputs, e.g. `lambda pl_module, batch: pl_module(batch['inputs'])`."
            ) from error


LABEL_NAMES = ("y", "label", "labels", "target", "targets")
"""The keys (of a dict batch) or fields (of a dataclass or namedtuple batch) the default labels are looked up by."""


def _default_labels(batch: Any) -> tuple[Tensor | None, str]:
    """The labels where a batch conventionally holds them (the second item of a tuple or list, the first of
    :data:`LABEL_NAMES` a dict, dataclass or namedtuple has), if a one-dimensional integer tensor; else the batch's
    last one-dimensional integer tensor; None if there is none. With where they were found, in words."""
    if isinstance(batch, Mapping):
        conventional = next(((batch[name], f"{name!r}") for name in LABEL_NAMES if name in batch), None)
    elif is_dataclass(batch) or hasattr(batch, "_fields"):  # a dataclass or a namedtuple: by field name
        conventional = next(((getattr(batch, n), f"field {n!r}") for n in LABEL_NAMES if hasattr(batch, n)), None)
    else:
        conventional = (batch[1], "second item") if isinstance(batch, tuple | list) and len(batch) > 1 else None
    if conventional is not None and _is_labels(conventional[0]):
        return conventional
    labels = [tensor for tensor in tensors_of(batch) if _is_labels(tensor)]
    return (labels[-1], "last one-dimensional integer tensor") if labels else (None, "")


def _is_labels(value: Any) -> bool:
    return isinstance(value, Tensor) and value.ndim == 1 and not value.is_floating_point() and not value.is_complex()


class LazinessMonitor(Callback):
    """How lazy training is: weight distance from init, activation pattern flips and the change of the empirical NTK.

    When training starts, ``num_examples`` training examples are cached as a fixed probe set together with the
    initial trainable weights ``theta_0``, their activation patterns and the empirical NTK ``K_0`` (trace over
    outputs, :func:`~lightning_nt.laziness.empirical_ntk`). Every ``every_n_steps`` optimizer steps, at the first
    step and at the end of training it logs

    - ``laziness/weight_distance`` = ``||theta_t - theta_0|| / ||theta_0||``, and ``laziness/weight_distance/<layer>``
      (layers named without the ``_orig_mod.`` of a submodule compiled with ``torch.compile``);
    - ``laziness/activation_flips``: the fraction of (example, unit) patterns that differ from init, the pattern
      being the sign of the pre-activation or, for a clamp such as ReLU6 or Hardtanh, the linear piece it is on
      (below, between or above the bounds); and ``laziness/activation_flips/<layer>`` (activation modules found by
      type or by the function they compute, :func:`~lightning_nt.laziness.patterns.is_activation`; or ``layers``);
    - with ``ntk``: ``laziness/ntk_change`` = ``||K_t - K_0||_F / ||K_0||_F``, ``laziness/ntk_lambda_min`` and
      ``laziness/ntk_lambda_max`` (of ``K_t``), and ``laziness/kernel_alignment`` (centred kernel-target
      alignment with the one-hot labels, Cortes et al. 2012) when the probe set has labels;
    - ``laziness/seconds``: the cost of that measurement.

    When the trainable parameters change during the fit (a fine-tuning schedule such as ``BackboneFinetuning``
    unfreezes a layer), the reference is taken again at that step, with a warning: the quantities are then measured
    from the weights and kernel of the current stage. A run resumed with ``ckpt_path``, or another ``fit`` on the
    same Trainer, goes on with the run's ``.history``, compared with the run's initialisation; a new Trainer without
    a checkpoint starts a new run: a new ``.history`` from the new initialisation
    (:func:`~lightning_nt.common.state.continues_run`).

    In the lazy regime (Jacot et al. 2018; Chizat et al. 2019; Allen-Zhu, Li & Song 2019) all three changes are
    small and fall with width roughly as ``width^-1/2``. At the end of training a picture of the quantities over
    steps is logged as ``laziness/over_steps``. Measurements use the network in eval mode (dropout off,
    BatchNorm on its running statistics) in fp32 outside autocast, so every example's outputs are its own.

    The run is left exactly as without the monitor (no parameter, gradient, buffer, RNG or mode changes).
    Kept in memory (and in checkpoints): one copy of the trainable weights, the probe set, one byte per (example,
    unit) for the patterns and the ``m x m`` kernel. One NTK measurement holds the Jacobians of all ``m`` examples,
    ``4 m C P`` bytes for ``C`` outputs and ``P`` parameters (``hold_jacobians=False``: two chunks' at a time, for
    more work); ``ntk=False`` skips the kernel when even that is too dear. Under DDP each rank measures its own probe
    set and every rank logs, for each quantity, the mean over the ranks that measured it finite.

    Args:
        every_n_steps: optimizer steps between measurements.
        num_examples: training examples in the probe set (the first batches of the train loader).
        ntk: also measure the empirical NTK (change, extreme eigenvalues, alignment).
        layers: names of the submodules whose patterns count: an activation module's input (its linear piece), or
            any other module's output (its sign); default every activation module (``ACTIVATIONS`` by type, and a
            parameter-free module of another class that computes ReLU, LeakyReLU, a clamp, GELU or SiLU, such as
            ``class MyReLU`` or a model's ``x.clamp(0, 6)``).
        chunk_size: examples per vmapped Jacobian (``None``: the whole probe set at once).
        hold_jacobians: keep all ``m`` examples' Jacobians for one product (``4 m C P`` bytes); ``False`` keeps two
            chunks' (``8 chunk_size C P`` bytes) and recomputes them per kernel block (``(k + 1) / 2`` times the work).
        forward_fn: ``forward_fn(pl_module, batch) -> outputs``; default ``pl_module(first tensor of the batch)``.
        target_fn: ``target_fn(batch) -> labels or targets`` for the alignment. Default: the labels where a batch
            conventionally holds them, if a one-dimensional integer tensor: the second item of a tuple or list
            (``(x, y, index)`` gives ``y``), or the first of :data:`LABEL_NAMES` (``y``, ``label``, ``labels``,
            ``target``, ``targets``) a dict, dataclass or namedtuple has; else the batch's last one-dimensional integer
            tensor (no alignment when there is none). A warning is given when the default labels hold a distinct
            value for every probe example (an example index, likely); pass ``target_fn`` then, e.g.
            ``lambda batch: batch["class_id"]``.
        max_jacobian_bytes: the most bytes of Jacobians one kernel measurement may hold
            (:func:`~lightning_nt.laziness.jacobian_bytes`: ``4 m C P``, or ``8 chunk_size C P`` without
            ``hold_jacobians``); checked when the reference is taken, before any kernel is measured, and the fit
            refused with a ``MemoryError`` naming ``ntk``, ``num_examples`` and ``hold_jacobians`` when it is more.
            Default (None): half the memory free on the CUDA device, or half the machine's physical memory on the
            CPU (the smallest over the ranks under DDP).
        output_chunk_size: outputs per Jacobian (``None``: all ``C``); the kernel is summed over chunks of the
            outputs, exactly, so the Jacobians held scale with it instead of ``C`` (for many outputs, an
            autoencoder's), for one more forward pass per chunk.

    Examples:
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> from lightning_nt.demos import DigitsMLP
        >>> images = TensorDataset(torch.rand(64, 1, 8, 8), torch.randint(10, (64,)))
        >>> monitor = LazinessMonitor(every_n_steps=5, num_examples=32)
        >>> trainer = pl.Trainer(max_steps=10, callbacks=[monitor], logger=False, enable_checkpointing=False,
        ...                      enable_progress_bar=False, enable_model_summary=False)
        >>> trainer.fit(DigitsMLP(hidden=64), DataLoader(images, batch_size=16))
        >>> [entry["step"] for entry in monitor.history]
        [0, 5, 10]
        >>> 0 < monitor.history[-1]["laziness/weight_distance"] < 1
        True
    """

    num_samples = renamed_property("num_samples", "num_examples")

    reads_training_data_outside_step = True  # its probe set: declared for DPStrategy (common.capabilities)

    @checked_arguments(
        every_n_steps=at_least(1),
        num_examples=at_least(2),
        layers=non_empty(),
        chunk_size=at_least(1),
        max_jacobian_bytes=at_least(1),
        output_chunk_size=at_least(1),
    )
    @renamed_arguments(num_samples="num_examples")
    def __init__(
        self,
        every_n_steps: int = 100,
        num_examples: int = 128,
        ntk: bool = True,
        layers: Sequence[str] | None = None,
        chunk_size: int | None = 32,
        hold_jacobians: bool = True,
        forward_fn: ForwardFn | None = None,
        target_fn: TargetFn | None = None,
        max_jacobian_bytes: int | None = None,
        output_chunk_size: int | None = None,
    ) -> None:
        self.every_n_steps, self.num_examples, self.ntk, self.chunk_size = every_n_steps, num_examples, ntk, chunk_size
        self.layers, self.hold_jacobians = None if layers is None else tuple(layers), hold_jacobians
        self.forward_fn, self.target_fn, self.max_jacobian_bytes = forward_fn, target_fn, max_jacobian_bytes
        self.output_chunk_size = output_chunk_size
        self.history: list[dict[str, float]] = []
        self._initial: dict[str, Any] | None = None  # probe batch, weights, patterns, kernel, targets (CPU)
        self._restored = False
        self._last_step = -1
        self._warned: set[str] = set()

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(
            every_n_steps=self.every_n_steps,
            num_samples=self.num_examples,  # old name kept in the key: older checkpoints load
            ntk=self.ntk,
            layers=self.layers,
            chunk_size=self.chunk_size,
            hold_jacobians=self.hold_jacobians,
            forward_fn=stable_name(self.forward_fn),
            target_fn=stable_name(self.target_fn),
        )

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # a resume, or another fit on the same Trainer, goes on comparing with the initialisation of its run
        fresh = self._initial is None or not continues_run(trainer, self._restored)
        self._restored = False
        if not fresh:  # the probe batch as `ProbeSet.state_dict` saved it (older checkpoints: its tensors, or itself)
            saved = self._initial.pop("probe", None) or self._initial.pop("batch_tensors", None)
            if saved is not None:
                self._initial["batch"] = next(ProbeSet.from_state_dict(saved, trainer).chunks())[0]
        if fresh:
            self.history, self._last_step = [], -1
            self._initial = self._capture(trainer, pl_module)
            self._measure(trainer, pl_module)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if step != self._last_step and step % self.every_n_steps == 0:
            self._measure(trainer, pl_module)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._initial is not None and self._last_step != trainer.global_step:
            self._measure(trainer, pl_module)
        if self.history and trainer.is_global_zero and trainer.loggers:
            log_figure(trainer, f"{_TAG}/over_steps", self.figure())

    @override
    def state_dict(self) -> dict[str, Any]:
        initial = self._initial
        if initial is not None:  # as torch.load(weights_only=True) reads it: it refuses dataclasses
            initial = {**initial, "batch": None, "probe": ProbeSet(initial["batch"]).state_dict()}
        return {"history": self.history, "initial": initial, "last_step": self._last_step}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict["history"])
        initial, self._last_step = state_dict["initial"], state_dict["last_step"]
        if initial is not None:  # older checkpoints name a compiled submodule's weights with `_orig_mod.`
            initial = {**initial, "weights": {uncompiled_name(name): w for name, w in initial["weights"].items()}}
        self._initial = initial
        self._restored = True

    def figure(self) -> Any:
        """Weight distance, activation flips and NTK change over training steps (log scale), and the alignment."""
        import matplotlib.pyplot as plt

        figure, (changes, kernel) = plt.subplots(1, 2, figsize=(10, 4))
        steps = [entry["step"] for entry in self.history]
        for name in ("weight_distance", "activation_flips", "ntk_change"):
            values = [entry.get(f"{_TAG}/{name}", math.nan) for entry in self.history]
            if any(math.isfinite(v) and v > 0 for v in values):
                changes.plot(steps, values, marker=".", label=name)
        changes.set_yscale("log")
        changes.set_xlabel("optimizer step")
        changes.set_ylabel("relative change from initialisation")
        changes.legend()
        alignment = [entry.get(f"{_TAG}/kernel_alignment", math.nan) for entry in self.history]
        kernel.plot(steps, alignment, marker=".", color="tab:green")
        kernel.set_xlabel("optimizer step")
        kernel.set_ylabel("centred kernel-target alignment")
        figure.tight_layout()
        return figure

    def _capture(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any = None) -> dict[str, Any]:
        """The reference: the probe batch (cached now unless given), the trainable weights, patterns and kernel."""
        if batch is None:
            batch = self._probe_batch(trainer)
        prepared = prepare_batch(trainer, batch, probe="train")
        if self.forward_fn is None:
            _check_default_forward(pl_module, prepared)
        if self.ntk:
            self._check_kernel_memory(trainer, pl_module, prepared)
        patterns, kernel = self._observe(pl_module, prepared)
        if not patterns:
            self._warn(
                "layers",
                f"LazinessMonitor: {type(pl_module).__name__} has no ReLU-family activation module, so no "
                "activation flips are logged; name the layers before a functional activation with `layers=`.",
            )
        targets = self._targets(batch, lambda: self._outputs_per_example(pl_module, prepared))
        return {
            "batch": batch,
            "weights": {name: p.detach().cpu().clone() for name, p in self._params(pl_module).items()},
            "patterns": {name: pattern.cpu() for name, pattern in patterns.items()},
            "kernel": None if kernel is None else kernel.cpu(),
            "targets": None if targets is None else targets.detach().cpu(),
        }

    def _outputs_per_example(self, pl_module: pl.LightningModule, batch: Any) -> int:
        """``C``, the network's outputs for one example, from one forward pass as the kernel's, leaving no trace."""
        with _evaluated(pl_module), torch.no_grad():
            return outputs_per_example(pl_module, batch, self.forward_fn or _first_tensor_forward)

    def _check_kernel_memory(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any) -> None:
        """Refuse, before measuring it, a kernel whose Jacobians (:func:`~lightning_nt.laziness.jacobian_bytes`) need
        more than ``max_jacobian_bytes`` (default: half the memory free on the device), naming what to change."""
        with _evaluated(pl_module):
            forward = self.forward_fn or _first_tensor_forward
            needed = jacobian_bytes(
                pl_module, batch, forward, self.chunk_size, self.hold_jacobians, self.output_chunk_size
            )
        limit = min_across_ranks(trainer, self.max_jacobian_bytes or _free_memory(pl_module.device) // 2)
        if needed > limit:
            held = "all the probe examples' at once" if self.hold_jacobians else "two chunks' at a time"
            raise MemoryError(
                f"LazinessMonitor: one NTK measurement would hold {needed:,} bytes ({needed / 2**30:.3g} GiB) of "
                f"Jacobians (examples x outputs x parameters x bytes per element; {held}, hold_jacobians="
                f"{self.hold_jacobians}), more than the limit of {limit:,} bytes (max_jacobian_bytes="
                f"{self.max_jacobian_bytes}; None: half the memory free on {pl_module.device}). "
                "Pass `ntk=False` (weights and activation patterns only), a smaller `num_examples`, "
                "`hold_jacobians=False` with a small `chunk_size`, a small `output_chunk_size`, or a larger "
                "`max_jacobian_bytes`."
            )

    def _probe_batch(self, trainer: pl.Trainer) -> Any:
        """The first ``num_examples`` examples of the train loader; all it has, with a warning, when it has fewer."""
        probe = ProbeSet.from_trainer(trainer, self.num_examples)
        if len(probe) < self.num_examples:
            self._warn(
                "examples",
                f"LazinessMonitor: the train loader holds {len(probe)} examples, fewer than num_examples="
                f"{self.num_examples}: the probe set (and the kernel) is over those {len(probe)}.",
            )
        return next(probe.chunks())[0]

    def _targets(self, batch: Any, outputs: Callable[[], int]) -> Tensor | None:
        """The probe set's targets for the alignment: ``target_fn``'s, or the default labels (:func:`_default_labels`)
        with a warning when there are none, when the batch holds several candidates by position (labels beside
        sequence lengths or example indices), or when they look like an example index: a distinct value each, and
        values that cannot be class indices of the network's ``outputs()`` per example."""
        if self.target_fn is not None:
            return self.target_fn(batch)
        targets, place = _default_labels(batch)
        candidates = sum(1 for tensor in tensors_of(batch) if _is_labels(tensor))
        if targets is None and self.ntk:
            self._warn("targets", "LazinessMonitor: the probe set has no integer labels; pass `target_fn=`.")
        if self.ntk and candidates > 1 and place in ("second item", "last one-dimensional integer tensor"):
            self._warn(
                "ambiguous",
                f"LazinessMonitor: the batch holds {candidates} one-dimensional integer tensors (labels, and sequence "
                f"lengths or example indices?); the kernel alignment takes its {place} as the labels. If those are "
                "not the labels, pass `target_fn(batch)` returning them, e.g. `target_fn=lambda batch: batch[2]`.",
            )
        if targets is not None and self.ntk and len(targets) > 2 and len(targets.unique()) == len(targets):
            classes = max(outputs(), 2)  # one logit: binary labels
            if int(targets.max()) >= classes:
                self._warn(
                    "index",
                    f"LazinessMonitor: the labels taken for the kernel alignment (the batch's {place}) hold a "
                    f"distinct value for every one of the {len(targets)} probe examples, up to {int(targets.max())}, "
                    f"beyond the network's {classes} outputs: an example index rather than class labels? The "
                    "alignment would be measured against it. Pass `target_fn(batch)` returning the labels, e.g. "
                    "`target_fn=lambda batch: batch[1]`.",
                )
        return targets

    @staticmethod
    def _params(pl_module: pl.LightningModule) -> dict[str, Tensor]:
        """The trainable parameters by name without ``_orig_mod.``: the initial weights of a checkpoint saved with
        a submodule compiled match the same network resumed uncompiled, and the other way round."""
        return {uncompiled_name(name): p for name, p in pl_module.named_parameters() if p.requires_grad}

    def _observe(self, pl_module: pl.LightningModule, batch: Any) -> tuple[dict[str, Tensor], Tensor | None]:
        """The activation patterns and (with ``ntk``) the empirical NTK of the probe batch, leaving no trace."""
        forward = self.forward_fn or _first_tensor_forward
        with _evaluated(pl_module), torch.inference_mode(False), torch.enable_grad():
            layers = self.layers if self.layers is not None else activation_layers(pl_module)
            patterns = activation_patterns(pl_module, batch, layers, forward) if layers else {}
            kernel = (
                empirical_ntk(pl_module, batch, forward, self.chunk_size, self.hold_jacobians, self.output_chunk_size)
                if self.ntk
                else None
            )
        return patterns, kernel

    def _measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert self._initial is not None
        self._last_step = trainer.global_step
        started = time.perf_counter()
        if self._params(pl_module).keys() != self._initial["weights"].keys():
            self._restart_reference(trainer, pl_module)
        initial = self._initial
        patterns, kernel = self._observe(pl_module, prepare_batch(trainer, initial["batch"], probe="train"))
        distance = relative_distance(self._params(pl_module), initial["weights"], by_layer=True)
        values = {f"{_TAG}/weight_distance": distance.overall}
        values.update({f"{_TAG}/weight_distance/{layer}": value for layer, value in distance.parts.items()})
        patterns = self._as_recorded(patterns, initial["patterns"])
        if patterns:
            flips = pattern_flips(initial["patterns"], patterns)
            values[f"{_TAG}/activation_flips"] = flips.pop("")
            values.update({f"{_TAG}/activation_flips/{layer}": value for layer, value in flips.items()})
        if kernel is not None:
            values.update(self._kernel_values(kernel.cpu().double(), initial["kernel"].double(), initial["targets"]))
        self._log(trainer, values, started)

    def _log(self, trainer: pl.Trainer, values: dict[str, float], started: float) -> None:
        """Log the mean over ranks of every value some rank measured finite; name the others in one warning.

        Each rank's values are reduced key by key over the union of the ranks' keys, NaN and inf left out of the
        mean (:func:`~lightning_nt.common.distributed.mean_across_ranks`), so every rank logs the same keys."""
        not_finite = sum_across_ranks(trainer, {key: 1.0 for key, value in values.items() if not math.isfinite(value)})
        values = mean_across_ranks(trainer, values)  # every rank logs the mean of the ranks' own probe sets
        if not_finite:
            self._warn(
                "nan",
                f"LazinessMonitor: {sorted(not_finite)} were not finite (NaN/inf) at step {trainer.global_step}; "
                "they are left out of the mean over ranks (not logged where no rank measured them finite), the "
                "other figures are logged.",
            )
        values = {key: value for key, value in values.items() if math.isfinite(value)}
        values[f"{_TAG}/seconds"] = time.perf_counter() - started
        log_scalars(trainer, values)
        self.history.append({"step": trainer.global_step, **values})

    def _as_recorded(self, patterns: dict[str, Tensor], initial: dict[str, Tensor]) -> dict[str, Tensor]:
        """The patterns (on the CPU) of the layers the initial ones cover, recorded as those were.

        A checkpoint saved before clamps had piece patterns holds ReLU6's signs (its input ``> 0``, which is its
        piece ``> 0``) and no pattern of a Hardtanh, a LeakyReLU or a clamp of another class: a resumed run goes on
        counting what its initial patterns recorded, with one warning."""
        comparable = {
            name: pattern.cpu() > 0 if initial[name].dtype == torch.bool else pattern.cpu()
            for name, pattern in patterns.items()
            if name in initial
        }
        signs = [name for name, pattern in patterns.items() if name in initial and pattern.dtype != initial[name].dtype]
        new = sorted(patterns.keys() - initial.keys())
        if signs or new:
            self._warn(
                "patterns",
                f"LazinessMonitor: the initial activation patterns hold signs for {signs} and nothing for {new}: "
                "they were recorded by an older version (before ReLU6 and Hardtanh had patterns of three linear "
                "pieces and hand-written clamps and LeakyReLUs were recognised). This run counts sign flips for the "
                "former and no flips for the latter; a new run counts them all.",
            )
        return comparable

    def _restart_reference(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """The trainable parameters changed (a fine-tuning schedule froze or unfroze some): distances and kernels
        over different parameter sets don't compare, so the reference is taken again now, on the same probe set."""
        assert self._initial is not None
        before, now = set(self._initial["weights"]), set(self._params(pl_module))
        changes = [f"{sorted(now - before)} became trainable"] if now - before else []
        changes += [f"{sorted(before - now)} were frozen"] if before - now else []
        rank_zero_warn(
            f"LazinessMonitor: the trainable parameters changed at step {trainer.global_step} ({'; '.join(changes)}). "
            "From this step on, distances, activation flips and the NTK change are measured from the weights and "
            "kernel of this step."
        )
        self._initial = self._capture(trainer, pl_module, self._initial["batch"])

    def _kernel_values(self, kernel: Tensor, initial: Tensor, targets: Tensor | None) -> dict[str, float]:
        """The kernel's change, extreme eigenvalues and alignment: NaN where the kernel is not finite, and no
        alignment where it is undefined (with a warning naming the centred kernel that is zero)."""
        names = [f"{_TAG}/{name}" for name in ("ntk_change", "ntk_lambda_min", "ntk_lambda_max", "kernel_alignment")]
        if not bool(torch.isfinite(kernel).all()):
            return dict.fromkeys(names[: 3 if targets is None else 4], math.nan)
        eigenvalues = torch.linalg.eigvalsh(kernel)
        change = float((kernel - initial).norm() / initial.norm())
        values = dict(zip(names, [change, float(eigenvalues[0]), float(eigenvalues[-1])]))
        alignment = kernel_alignment(kernel, targets) if targets is not None else math.nan
        if math.isfinite(alignment):
            values[names[3]] = alignment
        elif targets is not None:  # left out here; the mean over ranks still logs it where another rank has it
            self._warn_undefined_alignment(zero_centred_kernels(kernel, targets))
        return values

    def _warn_undefined_alignment(self, zero: list[str]) -> None:
        reasons = "; ".join(f"the centred {name} is zero: {_ZERO_KERNEL_REASONS[name]}" for name in zero)
        self._warn(
            "alignment",
            f"LazinessMonitor: the kernel-target alignment is undefined (0/0) on this probe set ({reasons}). "
            "kernel_alignment is left out of those measurements, the other figures are logged.",
        )

    def _warn(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            rank_zero_warn(message)
