"""Lightning adapter: how similar each layer's representation is to a reference's, up to its symmetries."""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from types import TracebackType
from typing import Any, NamedTuple

import pytorch_lightning as pl
import torch
from pytorch_lightning.trainer.states import TrainerFn
from pytorch_lightning.utilities import rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from lightning_nt.common import (
    LossFn,
    ProbeLoader,
    ProbeSet,
    batch_size,
    compiled_parts,
    log_figure,
    log_scalars,
    log_text,
    named_modules,
    prepare_batch,
    preserved_state,
    running_stage,
    select_examples,
    tensors_of,
    training_loss,
    uncompiled_name,
    validation_step_output,
)
from lightning_nt.common.callback import Callback
from lightning_nt.common.compiled import renamed_state_dict
from lightning_nt.common.distributed import gather_across_ranks, min_across_ranks
from lightning_nt.common.state import continues_run
from lightning_nt.common.validation import (
    ArgumentError,
    Rule,
    at_least,
    check_choice,
    checked_arguments,
    non_empty,
    renamed_arguments,
    renamed_property,
)
from lightning_nt.similarity.activations import recognised_activation
from lightning_nt.similarity.core import (
    ACTIVATIONS,
    Activation,
    PreparedFeatures,
    SimilarityMetric,
    cka_matrix,
    similarities,
)

__all__ = ["ACTIVATION_MODULES", "RepresentationSimilarity"]

ACTIVATION_MODULES: dict[type[nn.Module], Activation] = {
    nn.ReLU: "relu",
    nn.LeakyReLU: "relu",
    nn.PReLU: "relu",
    nn.ReLU6: "gelu",
    nn.Tanh: "tanh",
    nn.GELU: "gelu",
    nn.SiLU: "gelu",
    nn.Sigmoid: "sigmoid",
}
"""Module classes whose outputs ``layers=None`` compares, with the intertwiner group of each (SiLU, like GELU,
has the permutations; LeakyReLU and PReLU, like ReLU, the permutations times positive scalings: a PReLU with one
slope per unit is permuted with its units; ReLU6, saturating at 6, the permutations only). An ``nn.Hardtanh``'s
group depends on its bounds (:func:`~lightning_nt.similarity.activations.clamp_group`): it is found by what it
computes, as activation classes written elsewhere are."""


_NOT_READ_DURING_VALIDATION = {
    "examples": "this validation did not run the probe set's examples first, in order (a shuffled or augmented "
    "validation loader, or one shorter than num_examples)",
    "compiled": "the module runs code compiled by torch.compile, inside which the forward hooks that read the "
    "layers' outputs don't fire",
    "calls": "validation_step ran a compared layer a different number of times on a validation batch than on the "
    "probe set (an extra forward pass on some batches)",
}
"""Why a validation's layer outputs can't be read (``data="val"``), by the key its warning is given once under."""


def _is_reference(value: Any) -> bool:
    return not isinstance(value, str) or value in ("init", "previous") or os.path.isfile(value)


class RepresentationSimilarity(Callback):
    """Per-layer similarity of the network's representations to a reference's: CKA, Procrustes, intertwiner.

    Every ``every_n_epochs`` epochs the outputs of ``layers`` on a fixed probe set of ``num_examples`` training
    (or, with ``data="val"``, validation) examples, cached when training starts, are compared with the
    reference's outputs on the same examples by linear CKA, orthogonal Procrustes similarity (both blind to
    rotations of a layer's units) and the intertwiner similarity of the layer's nonlinearity (blind only to the
    maps the network itself can undo: permutations and positive scalings for ReLU, Godfrey et al. 2022). A layer
    whose CKA is high but whose intertwiner similarity is low matches the reference only up to a rotation the
    network can't make.

    Features are read by forward hooks during a forward pass over the probe set (``chunk_size`` examples at a
    time if given; ``loss_fn`` or the module's ``training_step`` with logging muted), in eval mode, under the
    run's precision; parameters, buffers, RNG and modes are restored, so a run with the callback is bitwise the run
    without it. A layer's output ``[n, ...]`` is
    compared as a matrix ``[n * positions, units]`` (at most ``max_rows`` rows), the units along ``unit_dim``
    (channels of a convolution, features of a linear layer or a transformer's tokens) and every other position an
    example, because the intertwiner group maps units the same way at every position (``[n]`` is one unit). The
    hooks copy only those rows as each chunk's outputs arrive (so an in-place op after the layer, ``h += x`` or
    ``nn.ReLU(inplace=True)``, doesn't change what was read), and only they are held and checkpointed for the
    reference: per layer a float32 ``[min(rows, max_rows), units]``. Under DDP the rows of all ranks are gathered,
    so every rank compares the same features and logs the same numbers.

    Logs ``similarity/<metric>/<layer>``; ``.history`` holds one dict per measurement (with ``"step"`` and
    ``"epoch"``). When training ends, the picture ``similarity/layers`` shows the layer x layer CKA matrix of
    the final model (outputs flattened per example) beside per-layer bars of CKA and intertwiner similarity
    against the reference, and ``similarity/table`` the last measurement as a table. Another ``fit`` on the same
    Trainer goes on with the run as a resume does (its probe set and reference: ``"init"`` stays the run's start);
    a new Trainer without a checkpoint starts a new run: a new ``.history``, probe set and reference
    (:func:`~lightning_nt.common.state.continues_run`).

    Args:
        layers: module names (as in ``named_modules``) whose outputs are compared, each with its activation
            inferred from its class (see ``ACTIVATION_MODULES``) or, for a parameter-free activation class written
            elsewhere (HuggingFace's ``GELUActivation``), from what it computes
            (:func:`~lightning_nt.similarity.activations.recognised_activation`), or a mapping
            ``{name: activation}`` with activations among ``"relu"``, ``"tanh"``, ``"gelu"``, ``"sigmoid"``,
            ``"identity"``. ``None``: every ReLU, LeakyReLU, PReLU, ReLU6, Tanh, GELU, SiLU and Sigmoid module, every
            Hardtanh (its group by its bounds) and every activation module of another class recognised by what it
            computes. A module that runs several times
            in one forward pass gives one layer per call, named ``<name>#<call>``. In a submodule compiled with
            ``torch.compile`` a name may carry the ``_orig_mod.`` component or not; tags are logged without it.
        reference: ``"init"`` (the network when training starts), ``"previous"`` (the last measurement), the path
            of a checkpoint (Lightning's or a plain ``state_dict``) or a module of the same architecture (another
            seed); its weights are loaded into the network for one forward pass and the network's restored. Names
            are matched without the ``_orig_mod.`` of compiled submodules: either side may be compiled.
        every_n_epochs: epochs between measurements, taken after the epoch's last training batch (before
            validation and before a checkpoint is saved, so a resumed run has every measurement).
        num_examples: examples in the probe set (per rank), the first ones ``data``'s loader yields.
        metrics: any of ``"cka"``, ``"cka_debiased"``, ``"intertwiner"``, ``"orthogonal_procrustes"``.
        unit_dim: dimension of a 3-D or larger output that holds its units, for every layer. ``None`` (default):
            per layer, where the last ``nn.Linear``, ``nn.LayerNorm``, ``nn.Embedding`` or
            ``nn.MultiheadAttention`` (-1: ``[batch, tokens, features]``) or convolution, batch, instance or group
            norm (1: ``[batch, channels, ...]``) that ran before it in the forward pass put them (the layer itself if
            it is one), checked against the number of units it makes (dimension 1 or -1, whichever holds as many;
            both or neither: 1 for 4-D or larger outputs); with none of these before it, 1 for 4-D or larger
            outputs and, for a 3-D one, a
            ``ValueError`` naming ``unit_dim`` before training. A 1-D or 2-D output has its units along dimension 1.
        max_rows: most rows (example-position pairs) of a layer's matrix: a layer with more is compared on a
            fixed random subset of them (``torch.randperm(rows, generator=Generator().manual_seed(0))``), the
            same rows for the network and the reference; ``None``: all. Bounds the cost and the memory (what is
            held and checkpointed) for convolutions.
        loss_fn: ``loss_fn(pl_module, batch)`` for the forward pass; default: ``training_step`` with logging
            muted (needed for modules that optimize manually).
        chunk_size: probe examples per forward pass (``None``: all at once), to bound the pass's memory on a
            large model; in eval mode an example's outputs don't depend on its chunk. Of each chunk's outputs only
            the kept rows are held. The end-of-training layer x layer CKA matrix holds each layer's outputs
            flattened per example, ``[examples, features]`` float32, while it is computed.
        data: ``"train"``: the probe set is read from the train loader and run through ``training_step``
            (or ``loss_fn``) after the epoch's last batch. ``"val"``: it is read from the first validation loader,
            and the layers' outputs are read during the validation that ends a measured epoch, as it runs the
            probe set's examples (no forward pass of the callback's own: what makes ``every_n_epochs=1`` cheap).
            Each validation batch is checked against the probe set, bit for bit; where they differ (a shuffled or
            augmented validation loader, one shorter than ``num_examples``), and with ``loss_fn``, a forward pass
            of ``validation_step`` (or ``loss_fn``) over the probe set gives the outputs instead, with one warning.
            The measurement is of the network validation runs (with an averaging callback, the average); an epoch
            that ends without validation is measured after it, with a forward pass.

    Examples:
        >>> from pytorch_lightning.demos.boring_classes import BoringModel
        >>> monitor = RepresentationSimilarity(layers={"layer": "identity"}, num_examples=64)
        >>> trainer = pl.Trainer(max_epochs=2, callbacks=[monitor], logger=False, enable_checkpointing=False,
        ...                      enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
        >>> trainer.fit(BoringModel())
        >>> [entry["epoch"] for entry in monitor.history], sorted(monitor.history[-1])[:2]
        ([0, 1], ['epoch', 'similarity/cka/layer'])
    """

    num_samples = renamed_property("num_samples", "num_examples")

    reads_training_data_outside_step = True  # its probe set: declared for DPStrategy (common.capabilities)

    @checked_arguments(
        reference=Rule(_is_reference, "'init', 'previous', an existing checkpoint file or a module"),
        every_n_epochs=at_least(1),
        num_examples=at_least(4),
        metrics=non_empty(),
        max_rows=at_least(4),
        chunk_size=at_least(1),
        unit_dim=Rule(lambda dim: dim != 0, "a dimension other than 0 (the examples'), e.g. 1 or -1"),
    )
    @renamed_arguments(num_samples="num_examples")
    def __init__(
        self,
        layers: Sequence[str] | dict[str, Activation] | None = None,
        reference: str | nn.Module = "init",
        every_n_epochs: int = 1,
        num_examples: int = 512,
        metrics: Sequence[SimilarityMetric] = ("cka", "intertwiner", "orthogonal_procrustes"),
        unit_dim: int | None = None,
        max_rows: int | None = 4096,
        loss_fn: LossFn | None = None,
        chunk_size: int | None = None,
        data: ProbeLoader = "train",
    ) -> None:
        if isinstance(layers, dict):
            for activation in layers.values():
                check_choice("layers", activation, ACTIVATIONS)
        if layers is not None and not layers:
            raise ArgumentError("`layers` must name at least one module, or be None for every activation module.")
        if len(set(metrics)) != len(metrics):
            raise ArgumentError(f"`metrics` must not repeat a metric, got {metrics!r}.")
        self.layers, self.reference, self.every_n_epochs = layers, reference, every_n_epochs
        self.num_examples, self.metrics, self.unit_dim, self.loss_fn = num_examples, tuple(metrics), unit_dim, loss_fn
        self.max_rows, self.chunk_size, self.data = max_rows, chunk_size, data
        self._plan = _RowPlan(max_rows)
        self.history: list[dict[str, float]] = []
        self.layer_cka: Tensor | None = None
        self._activations: dict[str, str] = {}
        self._probe: ProbeSet | None = None
        self._saved_probe: dict[str, Any] | list[Tensor] | None = None  # list: an older checkpoint
        self._reference_features: dict[str, Tensor] | None = None  # each layer's kept rows [rows, units]
        self._whole_reference = False  # an older checkpoint's reference: each layer's whole output [n, ...]
        self._prepared_reference: dict[str, PreparedFeatures] | None = None  # built once, on the features' device
        self._layer_names: list[str] = []
        self._unit_dims: dict[str, int] = {}  # the dimension each layer's units were read from, last pass
        self._restored = False
        self._warned: set[str] = set()
        # data="val": reading the layers' outputs during validation
        self._due: int | None = None  # the epoch whose measurement is owed to the validation that ends it
        self._saved_due: int | None = None  # the same, from a checkpoint
        self._capture: _LayerOutputs | None = None  # the hooks reading the outputs
        self._covered = self._taking = 0  # probe examples read so far, and taken from the current batch
        self._local: dict[str, _Rows] | None = None  # this rank's rows of the outputs, read, not yet measured
        self._trained_weights: list[float] = []  # a fingerprint of the weights after the epoch's last step
        self._validation_swaps_weights = self._measured_without_validation = False

    @property
    @override
    def state_key(self) -> str:
        reference = self.reference if isinstance(self.reference, str) else type(self.reference).__qualname__
        layers = self.layers if not isinstance(self.layers, dict) else sorted(self.layers.items())
        loss_fn = None if self.loss_fn is None else getattr(self.loss_fn, "__qualname__", type(self.loss_fn).__name__)
        return self._generate_state_key(
            layers=layers,
            reference=reference,
            every_n_epochs=self.every_n_epochs,
            num_samples=self.num_examples,  # old name kept in the key: older checkpoints load
            metrics=self.metrics,
            unit_dim=1 if self.unit_dim is None else self.unit_dim,  # the older default's key: its checkpoints load
            max_rows=self.max_rows,
            loss_fn=loss_fn,
            **({"data": self.data} if self.data != "train" else {}),  # older keys stay
        )

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self._activations = self._resolve_layers(pl_module)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._forget_validation_reading()
        restored, self._restored = self._restored, False
        if continues_run(trainer, restored) and self._reference_features is not None:
            if restored:  # resumed: the checkpoint's probe set and reference features
                self._probe = ProbeSet.from_state_dict(self._saved_probe, trainer, self.data)
                due, self._saved_due = self._saved_due, None
                if due is not None:  # saved after an epoch's last batch, before its validation
                    self._measure(trainer, self._features(trainer, pl_module), epoch=due)
            return  # another fit on the same Trainer goes on as a resume does: same probe set and reference
        self.history = []  # a new run (a new Trainer without a checkpoint): a new history, probe set and reference
        self._probe = self._common_probe(trainer, self._probe_set(trainer))
        with self._reference_weights(pl_module):
            self._set_reference(self._features(trainer, pl_module))

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # the epoch's weights after its last step, before validation and before a checkpoint is saved
        last = trainer.is_last_batch or batch_idx + 1 >= trainer.num_training_batches
        if last and (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            if self.data == "val":  # read during the validation that ends the epoch (after the epoch, if none)
                self._due, self._trained_weights = trainer.current_epoch, _identity(pl_module)
            else:
                self._measure(trainer, self._features(trainer, pl_module))

    @override
    def on_validation_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if not self._reading(trainer) or dataloader_idx != 0 or self._local is not None:
            return
        assert self._probe is not None
        if self._covered == 0 and _identity(pl_module) != self._trained_weights:
            self._validation_swaps_weights = True  # an averaging callback's weights, copied in for validation
            self._warn_if_mixed()
        self._taking = min(batch_size(batch), len(self._probe) - self._covered)
        if self.loss_fn is not None:  # the outputs are loss_fn's, which validation doesn't run
            self._forward_instead(trainer, pl_module)
        elif compiled_parts(pl_module):
            self._forward_instead(trainer, pl_module, "compiled")
        elif not self._same_examples(trainer, batch):
            self._forward_instead(trainer, pl_module, "examples")
        else:
            if self._capture is None:
                self._capture = self._layer_outputs(pl_module)
            self._capture.start_chunk(batch_size(batch), *self._placed(trainer, self._covered), keep=self._taking)

    @override
    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if self._capture is None or dataloader_idx != 0 or self._local is not None:
            return
        assert self._probe is not None
        runs = self._capture.end_chunk()
        self._covered += self._taking
        if runs != self._runs_per_pass():  # validation_step ran the layers otherwise on this batch
            self._forward_instead(trainer, pl_module, "calls")
        elif self._covered == len(self._probe):
            self._capture.remove()
            self._local, self._capture = self._assembled(self._capture, pl_module), None
        elif batch_idx + 1 >= trainer.num_val_batches[0]:  # the loader ends short of the probe set
            self._forward_instead(trainer, pl_module, "examples")

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._reading(trainer):
            return
        if self._local is None:  # the first loader ran no batch, or ran out before its length said
            self._forward_instead(trainer, pl_module, "examples")
        assert self._local is not None and self._due is not None
        features, epoch = self._local, self._due
        self._forget_validation_reading()
        self._measure(trainer, self._gathered(trainer, features), epoch=epoch)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._due is not None:  # no validation ended the epoch: a forward pass over the probe set now
            epoch = self._due
            self._forget_validation_reading()
            self._measured_without_validation = True
            self._warn_if_mixed()
            self._measure(trainer, self._features(trainer, pl_module), epoch=epoch)

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._forget_validation_reading()

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.layer_cka = cka_matrix(list(self._flattened_features(trainer, pl_module).values())).float().cpu()
        if not self.history:
            self._warn(
                "none",
                "RepresentationSimilarity: no measurement was taken in this run "
                f"(every_n_epochs={self.every_n_epochs}, training ended after epoch {trainer.current_epoch}), so there "
                "is no history, picture or table; "
                "set every_n_epochs to at most the number of epochs trained.",
            )
        elif trainer.loggers and trainer.is_global_zero:
            log_figure(trainer, "similarity/layers", self.figure())
            log_text(trainer, "similarity/table", self.table())

    @override
    def state_dict(self) -> dict[str, Any]:
        probe = None if self._probe is None else self._probe.state_dict()
        return {
            "history": self.history,
            "probe": probe,
            "reference_features": self._reference_features,
            "reference_rows": not self._whole_reference,  # each layer's kept rows, not (as before) its whole output
            "due": self._due,  # data="val": an epoch's measurement owed to the validation after its last batch
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict["history"])
        self._saved_probe = state_dict["probe"]
        self._reference_features, self._prepared_reference = state_dict["reference_features"], None
        self._whole_reference = self._reference_features is not None and not state_dict.get("reference_rows", False)
        self._saved_due = state_dict.get("due")
        self._restored = self._saved_probe is not None and self._reference_features is not None

    def figure(self) -> Any:
        """The layer x layer CKA matrix of the final model beside per-layer CKA and intertwiner similarity."""
        import matplotlib.pyplot as plt

        names = self._names()
        figure, (matrix_axes, bar_axes) = plt.subplots(1, 2, figsize=(11, 4.5))
        if self.layer_cka is not None:
            image = matrix_axes.imshow(self.layer_cka.numpy(), vmin=0, vmax=1, cmap="magma")
            matrix_axes.set_xticks(range(len(names)), names, rotation=90)
            matrix_axes.set_yticks(range(len(names)), names)
            figure.colorbar(image, ax=matrix_axes, label="linear CKA")
        matrix_axes.set_title("final model: CKA between layers")
        shown = [metric for metric in ("cka", "intertwiner") if metric in self.metrics] or list(self.metrics)
        width = 0.8 / len(shown)
        last = self.history[-1]
        for index, metric in enumerate(shown):
            values = [last.get(f"similarity/{metric}/{name}", math.nan) for name in names]
            bar_axes.bar([i + index * width for i in range(len(names))], values, width, label=metric)
        bar_axes.set_xticks([i + 0.4 - width / 2 for i in range(len(names))], names, rotation=90)
        lowest = min([last.get(f"similarity/{metric}/{name}", 0.0) for metric in shown for name in names] + [0.0])
        bar_axes.set_ylim(min(lowest * 1.05, 0.0), 1.05)  # the intertwiner similarity can be negative (down to -1)
        bar_axes.axhline(0.0, color="black", linewidth=0.5)
        bar_axes.set_title(f"against the reference ({self._reference_name()}), epoch {int(last['epoch'])}")
        bar_axes.legend()
        figure.tight_layout()
        return figure

    def table(self) -> str:
        """The last measurement as a Markdown table: one row per layer, one column per metric."""
        last = self.history[-1]
        names = self._names()
        lines = ["| layer | group | " + " | ".join(self.metrics) + " |", "|---" * (len(self.metrics) + 2) + "|"]
        for name in names:
            values = " | ".join(f"{last.get(f'similarity/{metric}/{name}', math.nan):.4f}" for metric in self.metrics)
            lines.append(f"| {name} | {self._activations.get(name.partition('#')[0], '?')} | {values} |")
        return "\n".join(lines)

    def _names(self) -> list[str]:
        """The compared layers in forward order (from the last measurement's tags after a resume)."""
        tagged = list(dict.fromkeys(tag.split("/", 2)[2] for tag in self.history[-1] if tag.startswith("similarity/")))
        return [name for name in self._layer_names if name in tagged] or tagged

    def _measure(self, trainer: pl.Trainer, features: dict[str, Tensor], epoch: int | None = None) -> None:
        """Compare ``features`` (every rank's, gathered) with the reference's; log and record the values (as the
        measurement of ``epoch``, by default the current one)."""
        reference = self._reference_matrices(features)
        current = {name: PreparedFeatures(rows) for name, rows in features.items()}
        unmatched = [name for name in current if name not in reference]
        if unmatched:  # a checkpoint's reference from before ReLU6, Hardtanh and hand-written LeakyReLUs were found
            self._warn(
                "unmatched",
                f"RepresentationSimilarity: the reference has no features of {unmatched} (an older version, which did "
                "not compare ReLU6, Hardtanh or LeakyReLU modules written elsewhere, recorded it); they are left out "
                "of the comparisons with it.",
            )
        values = {}
        for name, matrix in current.items():
            if name not in reference:
                continue
            activation = self._activations[name.partition("#")[0]]
            layer = similarities(matrix, reference[name], self.metrics, activation)  # type: ignore[arg-type]
            values.update({f"similarity/{metric}/{name}": value for metric, value in layer.items()})
        if not all(math.isfinite(value) for value in values.values()):
            self._warn("nan", "RepresentationSimilarity: a measurement was not finite (NaN/inf); it is skipped.")
            return
        log_scalars(trainer, values)
        epoch = trainer.current_epoch if epoch is None else epoch
        self.history.append({"step": trainer.global_step, "epoch": epoch, **values})
        if self.reference == "previous":
            self._set_reference(features, current)

    def _set_reference(self, features: dict[str, Tensor], prepared: dict[str, PreparedFeatures] | None = None) -> None:
        """The reference's kept rows (on the CPU, and checkpointed) and, if at hand, their prepared matrices."""
        self._reference_features, self._prepared_reference = self._cpu(features), prepared
        self._whole_reference = False

    def _reference_matrices(self, features: dict[str, Tensor]) -> dict[str, PreparedFeatures]:
        """The reference's unit matrices, centred in float64 with their Gram matrices, once for every
        measurement against it (on the device of ``features``, the current rows)."""
        assert self._reference_features is not None
        if self._whole_reference:  # kept from now on as rows, as a new run keeps them
            self._reference_features = {
                name: self._reference_rows(name, output) for name, output in self._reference_features.items()
            }
            self._whole_reference = False
        if self._prepared_reference is None:
            self._prepared_reference = {
                name: PreparedFeatures(rows.to(features[name].device))
                for name, rows in self._reference_features.items()
                if name in features
            }
        return self._prepared_reference

    def _reference_rows(self, name: str, output: Tensor) -> Tensor:
        """The kept rows of a reference layer from an older checkpoint's whole output ``[n, ...]``, with the units
        where this run finds them: the rows that version compared."""
        if output.ndim <= 2:
            view = output.reshape(len(output), -1)
        else:
            view = output.movedim(self._unit_dims.get(name, 1 if self.unit_dim is None else self.unit_dim), -1)
        rows = self._plan.rows(view, 0, len(output))
        return _in_place([rows.values], [rows.slots], rows.total)

    @torch.no_grad()
    def _features(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Tensor]:
        """Each layer's kept rows ``[rows, units]`` on the probe set (of every rank, gathered), as float32 on the
        module's device."""
        return self._gathered(trainer, self._forward_features(trainer, pl_module))

    @torch.no_grad()
    def _flattened_features(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Tensor]:
        """Each layer's output on the probe set flattened per example, ``[examples, features]``, for the layer x
        layer CKA matrix (held only while it is computed, at the end of training)."""
        return self._gathered(trainer, self._forward_features(trainer, pl_module, flatten=True))

    @torch.no_grad()
    def _forward_features(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, flatten: bool = False
    ) -> dict[str, _Rows]:
        """This rank's rows of the layers' outputs from a forward pass over its probe set, in eval mode, state
        restored."""
        assert self._probe is not None
        with (
            preserved_state(pl_module, parameters=False, grads=False),
            running_stage(trainer, self.data),
            self._layer_outputs(pl_module, flatten) as outputs,
        ):
            pl_module.eval()
            covered = 0
            for chunk, _ in self._probe.chunks(self.chunk_size):
                examples = batch_size(chunk)
                outputs.start_chunk(examples, *self._placed(trainer, covered))
                self._forward(trainer, pl_module, prepare_batch(trainer, chunk, probe=self.data))
                outputs.end_chunk()
                covered += examples
        return self._assembled(outputs, pl_module)

    def _placed(self, trainer: pl.Trainer, covered: int) -> tuple[int, int]:
        """Where this rank's probe example ``covered`` lies among every rank's (gathered in rank order), and how many
        examples that makes."""
        assert self._probe is not None
        return trainer.global_rank * len(self._probe) + covered, trainer.world_size * len(self._probe)

    def _layer_outputs(self, pl_module: pl.LightningModule, flatten: bool = False) -> _LayerOutputs:
        """Hooks reading the outputs of the compared layers from now on."""
        modules = named_modules(pl_module)
        chosen = {name: modules[name] for name in self._activations}
        return _LayerOutputs(chosen, pl_module, self.unit_dim, self._plan, flatten)

    def _forward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any) -> None:
        """One forward pass as the probe set's loader is run: ``loss_fn`` if given, else ``training_step`` for the
        train loader's examples, ``validation_step`` for the validation loader's (logging muted)."""
        if self.data == "val" and self.loss_fn is None:
            with trainer.precision_plugin.val_step_context():
                validation_step_output(pl_module, batch)
        else:
            with trainer.precision_plugin.forward_context():
                training_loss(pl_module, batch, 0, self.loss_fn)

    def _assembled(self, outputs: _LayerOutputs, pl_module: pl.LightningModule) -> dict[str, _Rows]:
        """Each layer's rows, chunk after chunk, as one :class:`_Rows` per layer call (``<name>#<call>`` for a
        layer that runs several times in one forward pass)."""
        calls, counts = outputs.calls, outputs.counts
        self._leave_out_shared_layers(sorted(outputs.shared), calls)
        if not calls:
            raise ValueError(
                f"`layers`: no compared layer of {type(pl_module).__name__} returned an output holding the examples "
                "along dimension 0, so there is no representation to compare; name layers whose output is "
                "[examples, ...]."
            )
        silent = [name for name in self._activations if name not in calls]
        if silent:
            raise ValueError(f"`layers`: {silent} did not run in {type(pl_module).__name__}'s forward pass.")
        features = {}
        for name, layer_calls in calls.items():
            per_pass = {after.get(name, 0) - before.get(name, 0) for before, after in zip([{}, *counts], counts)}
            if len(per_pass) != 1:
                raise ValueError(
                    f"`layers`: {name!r} ran a different number of times on different chunks of the probe set; "
                    "compare modules that run a fixed number of times per forward pass, or set chunk_size=None."
                )
            (runs,) = per_pass
            for index in range(runs):
                key = name if runs == 1 else f"{name}#{index}"
                pieces = [rows for rows in layer_calls[index::runs] if rows is not None]
                values, slots = torch.cat([p.values for p in pieces]), torch.cat([p.slots for p in pieces])
                features[key] = _Rows(values, slots, pieces[0].total)
                if name in outputs.unit_dims:
                    self._unit_dims[key] = outputs.unit_dims[name]
        self._layer_names = list(features)
        return features

    @staticmethod
    def _gathered(trainer: pl.Trainer, features: dict[str, _Rows]) -> dict[str, Tensor]:
        """Every rank's rows of each layer, in their places: the layer's matrix, the same on every rank."""
        return {name: _placed_rows(trainer, rows) for name, rows in features.items()}

    def _probe_set(self, trainer: pl.Trainer) -> ProbeSet:
        return ProbeSet.from_trainer(trainer, self.num_examples, self.data, argument="data")

    def _same_examples(self, trainer: pl.Trainer, batch: Any) -> bool:
        """Whether the first ``_taking`` examples of a validation ``batch`` are the probe set's next ones, as the
        validation loop hands them to its step (same tensors, bit for bit)."""
        assert self._probe is not None
        examples = self._probe.examples(slice(self._covered, self._covered + self._taking))
        expected = prepare_batch(trainer, examples, probe="val")
        seen, wanted = tensors_of(select_examples(batch, slice(0, self._taking))), tensors_of(expected)
        return len(seen) == len(wanted) and all(
            a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b) for a, b in zip(seen, wanted)
        )

    def _reading(self, trainer: pl.Trainer) -> bool:
        """Whether this validation is the one that ends an epoch owing a measurement (in a fit, not a sanity check)."""
        return self._due is not None and trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking

    def _forget_validation_reading(self) -> None:
        self._stop_capture()
        self._due, self._local, self._covered = None, None, 0

    def _runs_per_pass(self) -> dict[str, int]:
        """How many times each compared layer runs in one forward pass, as on the probe set for the reference."""
        assert self._reference_features is not None
        return dict(Counter(name.partition("#")[0] for name in self._reference_features))

    def _warn_if_mixed(self) -> None:
        if self._validation_swaps_weights and self._measured_without_validation:
            self._warn(
                "mixed",
                "RepresentationSimilarity(data='val'): validation runs other weights than training leaves (a callback "
                "such as IterateAveraging swaps them in), and an epoch without validation was measured with the "
                "trained weights: the history mixes the two networks. Validate every measured epoch "
                "(check_val_every_n_epoch=1), or use data='train'.",
            )

    def _forward_instead(self, trainer: pl.Trainer, pl_module: pl.LightningModule, reason: str | None = None) -> None:
        """The outputs can't be read from this validation (``reason``): a forward pass over the probe set gives them,
        with the weights validation runs with (one warning per reason)."""
        self._stop_capture()
        self._local = self._forward_features(trainer, pl_module)
        if reason is not None:
            self._warn(
                reason,
                f"RepresentationSimilarity(data='val'): {_NOT_READ_DURING_VALIDATION[reason]}, so the layers' "
                "outputs come from a forward pass of validation_step over the probe set instead (the same values, at "
                "the cost of that pass).",
            )

    def _stop_capture(self) -> None:
        if self._capture is not None:
            self._capture.remove()
            self._capture = None

    def _leave_out_shared_layers(self, shared: list[str], calls: dict[str, list[Tensor]]) -> None:
        """Layers whose output doesn't hold the examples along dimension 0 (one run on inputs the whole batch shares,
        such as Swin V2's position-bias MLP) have no per-example representation to compare: left out with a warning
        when the layers were found by type, refused when the user named them."""
        if not shared:
            return
        if self.layers is not None:
            raise ValueError(
                f"`layers`: {shared} returned outputs that don't hold the examples along dimension 0 (a layer run on "
                "inputs shared by the whole batch); name layers whose output is [examples, ...]."
            )
        self._warn(
            "shared",
            f"RepresentationSimilarity: layers {shared} ran on inputs shared by the whole batch (their output doesn't "
            "hold the examples along dimension 0), so they have no per-example representation; they are left out.",
        )
        for name in shared:
            self._activations.pop(name, None)
            calls.pop(name, None)

    @staticmethod
    def _common_probe(trainer: pl.Trainer, probe: ProbeSet) -> ProbeSet:
        """Under DDP, every rank's probe set cut to the smallest one's size, so that the features gather."""
        if trainer.world_size == 1:
            return probe
        smallest = min_across_ranks(trainer, len(probe))
        return ProbeSet(select_examples(next(probe.chunks())[0], slice(0, smallest)))

    @staticmethod
    def _cpu(features: dict[str, Tensor]) -> dict[str, Tensor]:
        return {name: value.cpu() for name, value in features.items()}

    @contextmanager
    def _reference_weights(self, pl_module: pl.LightningModule) -> Iterator[None]:
        """The reference's weights in ``pl_module`` for the block (nothing to do for "init" and "previous")."""
        if isinstance(self.reference, str) and self.reference in ("init", "previous"):
            yield
            return
        if isinstance(self.reference, nn.Module):
            state = self.reference.state_dict()
        else:
            checkpoint = torch.load(self.reference, map_location="cpu", weights_only=False)
            state = checkpoint.get("state_dict", checkpoint)
        with preserved_state(pl_module, grads=False, rng=False, modes=False):
            try:
                pl_module.load_state_dict(renamed_state_dict(pl_module, state))  # compiled or not, either side
            except RuntimeError as error:
                raise ValueError(
                    f"`reference` must have the architecture of {type(pl_module).__name__}: {error}"
                ) from error
            yield

    def _resolve_layers(self, pl_module: pl.LightningModule) -> dict[str, str]:
        """The compared layers by name (without the ``_orig_mod.`` of compiled modules, given with it or not), each
        with its activation."""
        modules = named_modules(pl_module)
        if self.layers is None:
            found = {name: self._activation_of(module) for name, module in modules.items()}
            layers = {name: activation for name, activation in found.items() if activation is not None}
            if not layers:
                raise ValueError(
                    f"`layers`: {type(pl_module).__name__} has no activation modules (nn.ReLU, nn.Tanh, nn.GELU, "
                    "...), perhaps because it calls torch.nn.functional; name the layers to compare, e.g. "
                    "layers={'encoder.2': 'relu'}."
                )
            return layers
        unknown = [name for name in self.layers if uncompiled_name(name) not in modules]
        if unknown:
            raise ValueError(f"`layers`: {type(pl_module).__name__} has no modules named {unknown}.")
        if isinstance(self.layers, dict):
            return {uncompiled_name(name): activation for name, activation in self.layers.items()}
        layers = {uncompiled_name(name): self._activation_of(modules[uncompiled_name(name)]) for name in self.layers}
        unclear = [name for name, activation in layers.items() if activation is None]
        if unclear:
            raise ValueError(
                f"`layers`: the intertwiner group of {unclear} can't be inferred from their classes; give it, "
                f"e.g. layers={{{unclear[0]!r}: 'relu'}} (or 'identity' for every invertible map)."
            )
        return layers  # type: ignore[return-value]

    @staticmethod
    def _activation_of(module: nn.Module) -> str | None:
        known = next((group for cls, group in ACTIVATION_MODULES.items() if type(module) is cls), None)
        return known or recognised_activation(module)

    def _reference_name(self) -> str:
        return self.reference if isinstance(self.reference, str) else type(self.reference).__name__

    def _warn(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            rank_zero_warn(message)


@torch.no_grad()
def _identity(module: nn.Module) -> list[float]:
    """A fingerprint of the weights: each parameter's sum, in float64 (what swapping other weights in changes; a
    version counter is not bumped by a copy through ``.data``, as averaging callbacks make)."""
    sums = [parameter.detach().sum(dtype=torch.float64) for parameter in module.parameters()]
    return torch.stack(sums).tolist() if sums else []


def _placed_rows(trainer: pl.Trainer, rows: _Rows) -> Tensor:
    """``[total, units]``: the rows of every rank (padded to the longest for the gather), each in its place."""
    if trainer.world_size == 1:
        return _in_place([rows.values], [rows.slots], rows.total)
    values, slots = rows.values, rows.slots
    counts = gather_across_ranks(trainer, torch.tensor([len(slots)], device=slots.device)).tolist()
    longest = max(counts)
    padded_values, padded_slots = values.new_zeros(longest, values.shape[1]), slots.new_zeros(longest)
    padded_values[: len(values)], padded_slots[: len(slots)] = values, slots
    every_value = gather_across_ranks(trainer, padded_values).view(len(counts), longest, -1)
    every_slot = gather_across_ranks(trainer, padded_slots).view(len(counts), longest)
    ranks = list(enumerate(counts))
    return _in_place([every_value[r, :c] for r, c in ranks], [every_slot[r, :c] for r, c in ranks], rows.total)


def _in_place(values: list[Tensor], slots: list[Tensor], total: int) -> Tensor:
    """``[total, units]`` with row ``slots[i][j]`` set to ``values[i][j]``."""
    every_value = torch.cat(values)
    placed = every_value.new_empty(total, every_value.shape[1])
    placed[torch.cat(slots)] = every_value
    return placed


class _Rows(NamedTuple):
    """Rows of a layer's matrix held by this rank: ``values`` ``[m, units]`` (float32 copies), each row's place
    ``slots`` among the layer's ``total`` rows over all ranks."""

    values: Tensor
    slots: Tensor
    total: int


class _RowPlan:
    """Which rows of a layer's ``[examples, *positions, units]`` matrix are kept: all, or the ``max_rows`` that
    ``torch.randperm(rows, generator=Generator().manual_seed(0))`` picks among the rows of every rank's examples
    (row-major), drawn once per shape and device, the same for the network and the reference."""

    def __init__(self, max_rows: int | None) -> None:
        self.max_rows = max_rows
        self._subsets: dict[tuple[tuple[int, ...], torch.device], tuple[Tensor, Tensor]] = {}

    def rows(self, view: Tensor, offset: int, total: int) -> _Rows:
        """The kept rows of ``view`` ``[c, *positions, units]``, examples ``offset`` to ``offset + c`` of
        ``total``: gathered (not the whole output copied), as float32 copies (later in-place ops on the output
        don't reach them)."""
        positions, examples = tuple(view.shape[1:-1]), view.shape[0]
        per_example = math.prod(positions)
        first, stop = offset * per_example, (offset + examples) * per_example
        if self.max_rows is None or total * per_example <= self.max_rows:
            values = view.reshape(-1, view.shape[-1]).to(torch.float32, copy=True)
            return _Rows(values, torch.arange(first, stop, device=view.device), total * per_example)
        ids, slots = self._subset((total, *positions), view.device)
        low, high = torch.searchsorted(ids, torch.tensor([first, stop], device=view.device)).tolist()
        local = torch.unravel_index(ids[low:high] - first, (examples, *positions))
        return _Rows(view[local].to(torch.float32), slots[low:high], len(ids))

    def _subset(self, shape: tuple[int, ...], device: torch.device) -> tuple[Tensor, Tensor]:
        """The kept rows' flat ids, ascending, and the place of each in the documented (random) order."""
        key = (shape, device)
        if key not in self._subsets:
            assert self.max_rows is not None
            subset = torch.randperm(math.prod(shape), generator=torch.Generator().manual_seed(0))[: self.max_rows]
            ids, slots = subset.sort()
            self._subsets[key] = (ids.to(device), slots.to(device))
        return self._subsets[key]


_RMS_NORM = (nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()


def _units_of(module: nn.Module) -> tuple[int, int] | None:
    """Where ``module`` puts the units of its output and how many there are: ``(-1, width)`` for linear maps,
    embeddings, attention and layer norms over the last dimension, ``(1, channels)`` for convolutions, batch,
    instance and group norms and a layer norm over ``[C, H, W]``; None for any other module."""
    if isinstance(module, (nn.LayerNorm, *_RMS_NORM)):
        shape = module.normalized_shape
        return (1, shape[0]) if len(shape) > 1 else (-1, shape[-1])
    if isinstance(module, nn.Linear | nn.Bilinear):
        return -1, module.out_features
    if isinstance(module, nn.Embedding):
        return -1, module.embedding_dim
    if isinstance(module, nn.MultiheadAttention):
        return -1, module.embed_dim
    if isinstance(module, nn.modules.conv._ConvNd):
        return 1, module.out_channels
    if isinstance(module, nn.modules.batchnorm._NormBase):
        return 1, module.num_features
    if isinstance(module, nn.GroupNorm):
        return 1, module.num_channels
    return None


def _unit_dim_of(output: Tensor, producer: tuple[int, int] | None) -> int | None:
    """The dimension of a ``[examples, ...]`` output of three or more dimensions that holds its units, read from the
    last linear, convolution or norm module that ran (its place for units and their count): of dimensions 1 and -1,
    the one holding as many units as it made (a LayerNorm applied through a transpose, or a Linear on another
    branch, leaves channels first); where both or neither do (a module it doesn't know came between, such as
    ``transformers``' ``Conv1D``), dimension 1 for four or more dimensions (PyTorch's channels-first images) and the
    module's own place for three. Without such a module: 1 for four or more dimensions, None (refused) for three."""
    if producer is None:
        return 1 if output.ndim > 3 else None
    declared, width = producer
    matching = [dim for dim in (1, -1) if output.shape[dim] == width]
    if len(matching) == 1:
        return matching[0]
    return 1 if output.ndim > 3 else declared


class _LayerOutputs:
    """The outputs of the compared layers, call after call, over chunks of examples, read by forward hooks until
    :meth:`remove` (or the end of a ``with`` block): each call's kept rows (:class:`_RowPlan`), or with
    ``flatten`` each example's whole output flattened (for the layer x layer CKA matrix).

    A ``[examples, ...]`` output of three or more dimensions has its units along ``unit_dim``, or, if None, where
    the last linear, convolution or normalisation module that ran before it (in this forward pass; the layer
    itself if it is one) puts them: the last dimension after ``nn.Linear``, ``nn.LayerNorm``, ``nn.Embedding``,
    ``nn.MultiheadAttention``, dimension 1 after a convolution or a batch, instance or group norm; with none, 1
    for four or more dimensions (PyTorch's channels-first images) and a ``ValueError`` naming ``unit_dim`` for
    three. A 1-D output ``[examples]`` is one unit."""

    def __init__(
        self, modules: dict[str, nn.Module], every: nn.Module, unit_dim: int | None, plan: _RowPlan, flatten: bool
    ) -> None:
        self.calls: dict[str, list[_Rows | None]] = {}
        self.counts: list[dict[str, int]] = []  # calls of each layer after each chunk
        self.shared: set[str] = set()  # layers whose outputs don't hold the examples along dimension 0
        self.unit_dims: dict[str, int] = {}  # the dimension each layer's units were read from
        self._unit_dim, self._plan, self._flatten = unit_dim, plan, flatten
        self._chunk = (0, 0, None, 0)  # examples in the batch, offset among all ranks' examples, kept, total
        self._producer: tuple[int, int] | None = None  # where the last linear / conv / norm put its units, how many
        producers = [] if unit_dim is not None else [m for m in every.modules() if _units_of(m) is not None]
        self._handles = [module.register_forward_hook(self._tracker) for module in producers]
        self._handles += [module.register_forward_hook(self._recorder(name)) for name, module in modules.items()]

    def start_chunk(self, examples: int, offset: int, total: int, keep: int | None = None) -> None:
        """A forward pass on a batch of ``examples`` examples starts; of each output the rows of the first ``keep``
        (all if None) are read, examples ``offset`` onwards of the ``total`` of every rank."""
        self._chunk, self._producer = (examples, offset, keep, total), None

    def end_chunk(self) -> dict[str, int]:
        """The chunk has run: of each layer's calls in it, those whose output holds the examples along dimension 0
        are kept, other calls (on a few examples, or on inputs the batch shares) are dropped, and a layer left with
        none is ``shared``. Returns the calls kept per layer that ran (shared layers left out)."""
        before = self.counts[-1] if self.counts else {}
        runs = {}
        for name, outputs in self.calls.items():
            start = before.get(name, 0)
            if start == len(outputs):
                continue
            kept = [rows for rows in outputs[start:] if rows is not None]
            outputs[start:] = kept
            if kept:
                runs[name] = len(kept)
            else:
                self.shared.add(name)
        self.counts.append({name: len(outputs) for name, outputs in self.calls.items()})
        return runs

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> _LayerOutputs:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.remove()

    def _tracker(self, module: nn.Module, inputs: Any, output: Any) -> None:
        self._producer = _units_of(module)

    def _recorder(self, name: str) -> Any:
        def record(module: nn.Module, inputs: Any, output: Any) -> None:
            if not isinstance(output, Tensor):
                raise ValueError(
                    f"`layers`: module {name!r} returned a {type(output).__name__}, not a Tensor; "
                    "name a module whose output is a Tensor."
                )
            examples, offset, keep, total = self._chunk
            if output.ndim == 0 or len(output) != examples:
                self.calls.setdefault(name, []).append(None)
                return
            output = output.detach()[:keep]
            if self._flatten:
                values = output.reshape(len(output), -1).to(torch.float32, copy=True)
                rows = _Rows(values, torch.arange(offset, offset + len(output), device=output.device), total)
            else:
                rows = self._plan.rows(self._units_last(name, module, output), offset, total)
            self.calls.setdefault(name, []).append(rows)

        return record

    def _units_last(self, name: str, module: nn.Module, output: Tensor) -> Tensor:
        """``output`` as a view ``[examples, *positions, units]``."""
        if output.ndim <= 2:
            return output.reshape(len(output), -1)
        dim = self._unit_dim
        if dim is None:
            dim = _unit_dim_of(output, _units_of(module) or self._producer)
        if dim is None:
            raise ValueError(
                f"`unit_dim`: the output of {name!r} is {list(output.shape)}, and no linear, convolution or "
                "normalisation module ran before it to say which dimension holds its units; give unit_dim=-1 for "
                "[batch, tokens, features] or unit_dim=1 for [batch, channels, length]."
            )
        if not (-output.ndim < dim < output.ndim and dim % output.ndim):
            raise ValueError(
                f"`unit_dim={dim}`: the output of {name!r} is {list(output.shape)}, which has no dimension {dim} "
                "besides the examples' (dimension 0); give the dimension of its units, or None to read it from the "
                "module that produced them."
            )
        self.unit_dims[name] = dim
        return output.movedim(dim, -1)
