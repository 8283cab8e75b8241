"""Lightning adapters: certify the trained model's error with a compression bound; train in a random subspace."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_warn
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset
from typing_extensions import override

from lightning_nt.common import (
    ProbeSet,
    log_scalars,
    log_text,
    prepare_batch,
    preserved_rng,
    preserved_state,
    select_examples,
    uncompiled_name,
)
from lightning_nt.common.callback import Callback
from lightning_nt.common.flavours import lightning_classes
from lightning_nt.common.loss import training_loss
from lightning_nt.common.validation import (
    at_least,
    between,
    checked_arguments,
    non_empty,
    renamed_arguments,
    renamed_property,
)
from lightning_nt.compression.capacity import capacity_measures
from lightning_nt.compression.certificate import Certificate, certify
from lightning_nt.compression.coding import QuantizationMethod, configuration_grid, uncodable
from lightning_nt.compression.stability import noise_stability
from lightning_nt.compression.subspace import (
    DIMENSION_RULE,
    SEED_RULE,
    Initializer,
    RandomSubspace,
    find_subspace,
    subspace_mismatches,
    subspace_originals,
    to_subspace,
)

__all__ = ["CompressionBoundReporter", "PredictFn", "SubspaceTraining", "TargetFn", "class_scores"]

_CHECKED_EXAMPLES = 8
"""Training examples ``predict_fn``/``target_fn`` are tried on when training starts."""

PredictFn = Callable[[pl.LightningModule, Any], Tensor]
TargetFn = Callable[[Any], Tensor]


def default_predict(pl_module: pl.LightningModule, batch: Any) -> Tensor:
    """``pl_module(batch[0])``: the logits of a ``(inputs, labels, ...)`` batch."""
    return pl_module(_field(batch, 0, "inputs"))


def default_target(batch: Any) -> Tensor:
    """``batch[1]``: the labels of a ``(inputs, labels, ...)`` batch."""
    return _field(batch, 1, "labels")


class CompressionBoundReporter(Callback):
    """A certified compression bound on the trained model's error, beside Arora et al.'s noise stability.

    The model is quantised over a grid of configurations (uniform or k-means levels per tensor, optional
    magnitude pruning), the tightest candidate is entropy-coded into a real bitstream and decoded again,
    and the decoded model's 0-1 error ``e`` on the ``m`` training examples gives, with probability
    ``1 - delta``, ``error <= kl^-1(e, (L ln 2 + ln(1/delta)) / m)`` where ``L`` is the stream's length
    in bits: codebooks, headers and the ``ceil(log2 N)`` bits that pay for the search all included.
    A network trained with :class:`SubspaceTraining` is described by its subspace coordinates and seed
    only, which is what makes the bound non-vacuous for networks much larger than ``m``.

    Beside it, uncertified: Arora et al.'s layer and interlayer cushions, activation contraction,
    interlayer smoothness, noise attenuation and "effective parameters" (``arora/*``), and capacity
    measures (``capacity/*``: parameter count, norm products, distance from initialisation, path norm,
    margin, sharpness-based PAC-Bayes flatness, the R-norm and the F1 path norm of two-layer ReLU nets).

    Predictions are ``predict_fn(pl_module, batch)``, by default ``pl_module(batch[0])``, compared by
    argmax with the class indices ``target_fn(batch)``, by default ``batch[1]``. A model with one output column
    (or a 1-D output) is a binary classifier, as trained with ``BCEWithLogitsLoss``: it predicts class 1 where its
    logit is > 0, and its labels must be 0 or 1 (of any dtype). Labels of shape ``(batch, classes)``, one-hot or
    soft (mixup, label smoothing), count as their argmax class: the certified error is against the argmax of the
    soft label (a warning says so once when rows are not one-hot). A model whose targets aren't class indices (a
    regressor) has no 0-1 error: it is refused when training starts, naming ``predict_fn``/``target_fn``.

    The training examples are the train dataloader's dataset read in order (``num_examples`` of them drawn with a
    fixed seed, if given): ``m`` distinct examples, whatever sampler, shuffling or DP sampling the training used.
    With random augmentation inside the dataset the bound is about the augmented distribution. Each report is its
    own certificate: picking the best of several reports afterwards would need ``log2(#reports)`` bits more.

    What the decoder is assumed to know in advance, and so is not paid for: the architecture (the module's code
    with its non-persistent buffers and plain tensor attributes, which must not depend on the training data),
    the grid, ``delta``, and a subspace's dimension; choosing these by looking at the bound is a search the bits
    don't cover. Persistent integer buffers (other than BatchNorm's counter) and a subspace whose ``theta0`` or ``P``
    the seed doesn't rebuild (e.g. after loading a checkpoint of another seed) are refused with a warning: one that
    training never changed and that the architecture fixes (Swin's ``relative_position_index``) is declared part of
    the architecture by registering it again with ``persistent=False``. If the
    train/validation split is a sampler over one dataset, ``m`` counts the whole dataset (still valid, but
    ``compression/test_error`` then isn't held out); ``test_error`` is the decoded model's error on the whole
    validation dataset(s), whatever their sampler. Non-finite weights or statistics can't be encoded: that report
    is skipped with a warning (the previous one is kept) and training goes on.
    The ``m`` examples are cached on the CPU: use ``num_examples`` for data sets that don't fit in memory.

    Everything is logged to every logger and ``trainer.callback_metrics``, the table as TensorBoard text
    (``compression/report``), and the latest report with the searched candidates is written to
    ``compression_report.json`` in the logger's directory.

    Args:
        delta: the bound holds with probability at least ``1 - delta``.
        when: ``"fit_end"`` (once, when training ends) or ``"epoch"`` (every ``every_n_epochs`` epochs, and once
            more at the end if the last epoch wasn't reported).
        every_n_epochs: report period when ``when="epoch"``.
        levels: numbers of quantisation levels searched.
        prune: magnitude-pruning fractions searched (``0.0``: none).
        methods: quantisers searched, ``"uniform"`` and/or ``"kmeans"``.
        num_examples: ``m``; default: the whole training set.
        screening_samples: rank the whole grid by the error on this many of the ``m`` examples (drawn with a
            fixed seed), then measure the ``finalists`` most promising candidates on all ``m`` (``None``: measure
            every candidate on all ``m``).
        finalists: candidates measured on all ``m`` after screening.
        arora: compute the noise-stability quantities.
        capacity: compute the capacity measures.
        stability_samples: training examples the ``arora/*`` and ``capacity/*`` measures use.
        predict_fn: ``predict_fn(pl_module, batch) -> logits`` of shape ``(batch, classes)``.
        target_fn: ``target_fn(batch) -> labels``: class indices ``(batch,)``, or one-hot or soft labels
            ``(batch, classes)`` (scored against their argmax).
        loss_fn: ``loss_fn(pl_module, batch) -> loss``; when given, the sharpness-based flatness perturbs
            this loss instead of the 0-1 error.

    Example::

        reporter = CompressionBoundReporter()
        trainer = pl.Trainer(max_epochs=30, callbacks=[SubspaceTraining(dimension=120), reporter])
        trainer.fit(DigitsMLP(optimizer="adam", lr=0.05), DigitsDataModule())
        reporter.report["compression/error_bound"]   # 0.422: certified, with probability 0.95
    """

    reads_training_data_outside_step = True  # declared for DPStrategy (lightning_nt.common.capabilities)

    num_samples = renamed_property("num_samples", "num_examples")

    @checked_arguments(
        delta=between(0.0, 1.0, low_open=True, high_open=True),
        every_n_epochs=at_least(1),
        levels=(non_empty(), at_least(2)),
        prune=(non_empty(), between(0.0, 1.0, high_open=True)),
        methods=non_empty(),
        num_examples=at_least(1),
        screening_samples=at_least(1),
        finalists=at_least(1),
        stability_samples=at_least(1),
    )
    @renamed_arguments(num_samples="num_examples")
    def __init__(
        self,
        delta: float = 0.05,
        when: Literal["fit_end", "epoch"] = "fit_end",
        every_n_epochs: int = 1,
        levels: Sequence[int] = (2, 3, 4, 5, 7, 9, 13, 17, 33, 65),
        prune: Sequence[float] = (0.0, 0.5, 0.8, 0.9),
        methods: Sequence[QuantizationMethod] = ("uniform", "kmeans"),
        num_examples: int | None = None,
        screening_samples: int | None = 128,
        finalists: int = 4,
        arora: bool = True,
        capacity: bool = True,
        stability_samples: int = 128,
        predict_fn: PredictFn | None = None,
        target_fn: TargetFn | None = None,
        loss_fn: Callable[[pl.LightningModule, Any], Tensor] | None = None,
    ) -> None:
        self.configs = configuration_grid(levels, prune, methods)
        self.delta, self.when, self.every_n_epochs = delta, when, every_n_epochs
        self.num_examples, self.stability_samples = num_examples, stability_samples
        self.screening_samples, self.finalists = screening_samples, finalists
        self.arora, self.capacity = arora, capacity
        self.predict_fn = predict_fn or default_predict
        self.target_fn = target_fn or default_target
        self.loss_fn = loss_fn
        self.report: dict[str, float] = {}
        self.certificate: Certificate | None = None
        self._initial_parameters: dict[str, Tensor] = {}
        self._built_integer_buffers: dict[str, Tensor] = {}
        self._reported_step = -1
        self._warned_soft_labels = False

    @property
    @override
    def state_key(self) -> str:
        # the key keeps the argument's old name `num_samples`: checkpoints written before the rename still load
        return self._generate_state_key(when=self.when, num_samples=self.num_examples)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        # before a checkpoint is restored and before any training step: the integer buffers as the module was built
        if not self._built_integer_buffers:
            self._built_integer_buffers = {name: b.detach().cpu().clone() for name, b in _integer_buffers(pl_module)}

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.capacity and not self._initial_parameters:
            self._initial_parameters = {n: p.detach().cpu().clone() for n, p in pl_module.named_parameters()}
        self._check_predictions(trainer, pl_module)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.when == "epoch" and (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self.compute(trainer, pl_module)
            self._reported_step = trainer.global_step

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        reported_last_epoch = self.when == "epoch" and self._reported_step == trainer.global_step
        if not reported_last_epoch:
            self.compute(trainer, pl_module)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"initial_parameters": self._initial_parameters, "report": self.report}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._initial_parameters = dict(state_dict["initial_parameters"])
        self.report = dict(state_dict["report"])

    def compute(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        """Certify the module as it is now, log everything, and return the report (also kept in ``.report``).

        Parameters, buffers, ``training`` flags and every random generator are left as they were. A model that
        can't be certified (see above) gets a warning, and the previous report is returned unchanged.
        """
        with preserved_rng():
            return self._compute(trainer, pl_module)

    def _compute(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        """Certify the model as it is now, then report and log it; the previous report if it can't be certified."""
        train_set = self._training_examples(trainer)
        encoded = _encoded_tensors(pl_module)
        problems = _uncodable_state(pl_module, encoded, self._built_integer_buffers)
        if train_set is None or problems:
            if problems:
                rank_zero_warn(
                    f"CompressionBoundReporter can't certify this model: {'; '.join(problems)}. This report is "
                    "skipped (the previous one is kept) and training goes on."
                )
            return self.report
        certificate = self._certify(trainer, pl_module, train_set, encoded)
        report = {
            "compression/error_bound": certificate.error_bound,
            "compression/hoeffding_bound": certificate.hoeffding_bound,
            "compression/train_error": certificate.train_error,
            "compression/code_bits": float(certificate.code_bits),
            "compression/num_examples": float(certificate.num_examples),
        }
        test_error = self._test_error(trainer, pl_module, encoded, certificate.decoded)
        if test_error is not None:
            report["compression/test_error"] = test_error
        report.update(self._uncertified(trainer, pl_module, train_set))
        self.report, self.certificate = report, certificate
        log_scalars(trainer, report)
        if trainer.is_global_zero and trainer.loggers:
            log_text(trainer, "compression/report", self.table())
            self._write_json(Path(trainer.log_dir or trainer.default_root_dir), trainer)
        return report

    def _certify(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        train_set: ProbeSet,
        encoded: list[tuple[str, Tensor]],
    ) -> Certificate:
        """Search the grid, encode the best candidate and bound its error on the ``m`` examples of ``train_set``
        (screening the grid on ``screening_samples`` of them first, when that is fewer than ``m``)."""
        subspace = find_subspace(pl_module)
        num_examples = len(train_set)

        def train_error(values: Sequence[Tensor]) -> float:
            batches = (chunk for chunk, _ in train_set.chunks(512))
            return self._error(trainer, pl_module, encoded, values, batches, expected=num_examples)

        screening_error = None
        if self.screening_samples is not None and self.screening_samples < num_examples:
            screening_batch = _random_examples(train_set, self.screening_samples)

            def screening_error(values: Sequence[Tensor]) -> float:
                return self._error(trainer, pl_module, encoded, values, [screening_batch])

        return certify(
            [tensor for _, tensor in encoded],
            train_error,
            num_examples,
            self.configs,
            self.delta,
            seed=subspace.seed if subspace is not None else None,
            screening_error_of=screening_error,
            finalists=self.finalists,
        )

    def table(self) -> str:
        """The latest report as a Markdown table (what TensorBoard's text tab shows)."""
        rows = ["| quantity | value |", "|---|---|"]
        if self.certificate is not None:
            c = self.certificate
            rows.append(f"| code | {c.config}, {c.code_bits} bits, searched {c.num_configs} configurations |")
            rows.append(f"| certificate | m = {c.num_examples}, delta = {c.delta:g} |")
        rows += [f"| {tag} | {value:.6g} |" for tag, value in self.report.items()]
        return "\n".join(rows)

    def _training_examples(self, trainer: pl.Trainer) -> ProbeSet | None:
        """``m`` distinct training examples, read in order from the train dataloader's dataset."""
        dataset = _map_style_dataset(trainer)
        if dataset is None:
            rank_zero_warn(
                "CompressionBoundReporter needs one train DataLoader over a map-style dataset (with `__len__`) to "
                "count distinct training examples; no bound was computed."
            )
            return None
        if self.num_examples is not None and self.num_examples < len(dataset):
            generator = torch.Generator().manual_seed(0)
            dataset = Subset(dataset, torch.randperm(len(dataset), generator=generator)[: self.num_examples].tolist())
        return ProbeSet.from_batches(_in_order(trainer.train_dataloader, dataset), num_examples=len(dataset))

    def _check_predictions(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Run ``predict_fn``/``target_fn`` on a few training examples now, so that a model the bound can't measure
        (a regressor, a batch the defaults can't read) is refused before training rather than after it."""
        dataset = _map_style_dataset(trainer)
        if dataset is None:
            return  # warned about when the bound is computed
        few = Subset(dataset, range(min(_CHECKED_EXAMPLES, len(dataset))))
        with preserved_rng(), preserved_state(pl_module, grads=False), torch.no_grad():
            batch = next(iter(_in_order(trainer.train_dataloader, few)))
            pl_module.eval()
            self._predict(trainer, pl_module, prepare_batch(trainer, batch))

    def _error(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        encoded: Sequence[tuple[str, Tensor]],
        values: Sequence[Tensor],
        batches: Iterable[Any],
        expected: int | None = None,
    ) -> float:
        """0-1 error of the module holding ``values`` in the ``encoded`` tensors, over ``batches``."""
        wrong = total = 0
        with preserved_state(pl_module, grads=False), torch.no_grad():
            for (_, tensor), value in zip(encoded, values):
                tensor.copy_(value)
            pl_module.eval()
            for batch in batches:
                batch = prepare_batch(trainer, batch)
                logits, labels = self._predict(trainer, pl_module, batch)
                wrong += int((logits.argmax(dim=-1) != labels).sum())
                total += len(labels)
        if expected is not None and total != expected:
            raise ValueError(
                f"`predict_fn`/`target_fn` gave {total} predictions for {expected} training examples; the bound "
                "needs exactly one prediction per example."
            )
        return wrong / total

    def _predict(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any) -> tuple[Tensor, Tensor]:
        with trainer.precision_plugin.forward_context():
            logits = self.predict_fn(pl_module, batch)
        labels = self.target_fn(batch)
        scores, indices = class_scores(logits, labels.to(logits.device) if isinstance(logits, Tensor) else labels)
        if not self._warned_soft_labels and _soft(labels):
            self._warned_soft_labels = True
            rank_zero_warn(
                "CompressionBoundReporter: `target_fn(batch)` gives soft labels (rows that are not one-hot, as "
                "mixup or label smoothing make): the certified 0-1 error is against each row's argmax class."
            )
        return scores, indices

    def _loss(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any) -> Tensor:
        with trainer.precision_plugin.forward_context():
            return training_loss(pl_module, batch, 0, self.loss_fn)

    def _test_error(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        encoded: Sequence[tuple[str, Tensor]],
        decoded: Sequence[Tensor],
    ) -> float | None:
        loaders = trainer.val_dataloaders
        if not loaders:
            return None
        loaders = loaders if isinstance(loaders, list | tuple) else [loaders]
        batches = (batch for loader in loaders for batch in _in_order(loader, loader.dataset))
        return self._error(trainer, pl_module, encoded, decoded, batches)

    def _uncertified(self, trainer: pl.Trainer, pl_module: pl.LightningModule, train_set: ProbeSet) -> dict[str, float]:
        if not (self.arora or self.capacity):
            return {}
        batch = prepare_batch(trainer, _random_examples(train_set, self.stability_samples))
        generator = torch.Generator(device=pl_module.device).manual_seed(0)

        def predict() -> Tensor:
            return self._predict(trainer, pl_module, batch)[0]

        report: dict[str, float] = {}
        skipped: list[str] = []
        with preserved_state(pl_module):
            pl_module.eval()
            with torch.no_grad():
                labels = self._predict(trainer, pl_module, batch)[1]
            if self.arora:
                stability = noise_stability(pl_module, predict, labels, generator=generator)
                scalars = stability.scalars().items()  # layers named without a compiled submodule's _orig_mod.
                report.update({f"arora/{uncompiled_name(tag)}": value for tag, value in scalars})
                skipped += [f"arora: {reason}" for reason in stability.skipped]
            if self.capacity:
                inputs = _field(batch, 0, "inputs") if self.predict_fn is default_predict else None
                measures, reasons = capacity_measures(
                    pl_module,
                    predict,
                    labels,
                    initial_parameters=self._initial_parameters or None,
                    inputs=inputs,
                    generator=generator,
                    loss=None if self.loss_fn is None else lambda: self._loss(trainer, pl_module, batch),
                )
                report.update({f"capacity/{tag}": value for tag, value in measures.items()})
                skipped += [f"capacity: {reason}" for reason in reasons]
        if skipped:
            rank_zero_warn("CompressionBoundReporter skipped: " + "; ".join(skipped))
        return {tag: value for tag, value in report.items() if math.isfinite(value)}

    def _write_json(self, directory: Path, trainer: pl.Trainer) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        certificate = self.certificate
        content = {
            "epoch": trainer.current_epoch,
            "step": trainer.global_step,
            "report": self.report,
            "code": None
            if certificate is None
            else {
                "config": str(certificate.config),
                "bits": certificate.code_bits,
                "num_configs": certificate.num_configs,
                "delta": certificate.delta,
                "candidates": [
                    {
                        "config": str(c.config),
                        "error": c.train_error,
                        "error_on": "screening examples" if c.screened else "all m",
                        "estimated_bits": c.estimated_bits,
                    }
                    for c in certificate.candidates
                ],
            },
        }
        (directory / "compression_report.json").write_text(json.dumps(content, indent=2))


class SubspaceTraining(Callback):
    """Train any LightningModule in a random ``dimension``-dimensional subspace ``theta0 + P w`` (Lotfi et al.).

    At ``setup`` the module's trainable parameters are re-drawn from ``seed`` (each submodule's
    ``reset_parameters``, or ``_reset_parameters`` as in ``nn.MultiheadAttention``), frozen as ``theta0``, and made
    functions of the shared coordinates ``w``, so that ``configure_optimizers`` (which runs after) optimises only
    ``w``. :class:`CompressionBoundReporter` then encodes ``w`` and the seed. Parameters frozen by the user
    (``requires_grad=False``, e.g. a pretrained backbone) stay outside the subspace with their values (the reporter
    encodes them as they are); a parameter shared by several modules (tied embedding and output weights) stays
    shared. Modules of any kind work, ``nn.TransformerEncoder`` and ``nn.LSTM`` included, as long as every trainable
    parameter belongs to a submodule with such an initialiser, or ``initializer`` draws them.

    Args:
        dimension: ``d``, the number of trainable coordinates.
        seed: draws ``theta0`` and ``P``.
        initializer: draws ``theta0`` instead of the submodules' ``reset_parameters``: a function that initialises
            one module in place, run under ``seed`` on every submodule, children first (as ``module.apply`` does);
            values that neither change with the seed nor are constant (copied pretrained weights) are refused. For
            layers without ``reset_parameters`` (``transformers``' ``Conv1D`` in GPT-2, a bare parameter of the
            model): e.g. a Hugging Face model's ``_init_weights``. It is part of the code a decoder must know, like
            the architecture; under DDP with ``start_method="spawn"`` it must pickle (a function defined at module
            level, or a bound method).

    Example::

        trainer = pl.Trainer(callbacks=[SubspaceTraining(dimension=150), CompressionBoundReporter()])
        # a Hugging Face GPT-2 inside the LightningModule as self.model:
        SubspaceTraining(dimension=1000, initializer=module.model._init_weights)
    """

    @checked_arguments(dimension=DIMENSION_RULE, seed=SEED_RULE)
    def __init__(self, dimension: int, seed: int = 0, initializer: Initializer | None = None) -> None:
        self.dimension, self.seed, self.initializer = dimension, seed, initializer

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            return
        schedules = [
            type(c).__name__ for c in trainer.callbacks if isinstance(c, lightning_classes("callbacks.BaseFinetuning"))
        ]
        if schedules:
            raise ValueError(
                f"SubspaceTraining trains every trainable parameter through the same {self.dimension} coordinates "
                f"`w`, so {', '.join(schedules)} freezing part of the module would freeze `w` for all of it: remove "
                "the schedule, and freeze what should stay fixed (`requires_grad_(False)`) before `fit`; it then "
                "stays outside the subspace."
            )
        subspace = find_subspace(pl_module)
        if subspace is None:
            to_subspace(pl_module, self.dimension, self.seed, self.initializer)
        elif (subspace.dimension, subspace.seed) != (self.dimension, self.seed):
            raise ValueError(
                f"The module is already trained in a subspace of dimension {subspace.dimension} with seed "
                f"{subspace.seed}, not {self.dimension} and {self.seed}: give SubspaceTraining the same values."
            )
        self._explain_parameter_groups(pl_module)

    def _explain_parameter_groups(self, pl_module: pl.LightningModule) -> None:
        """Until the optimizers exist, turn torch's "parameters in more than one group" into the reason and the fix."""
        original = pl_module.configure_optimizers

        def configure_optimizers() -> Any:
            try:
                return original()
            except ValueError as error:
                if "more than one parameter group" not in str(error):
                    raise
                raise ValueError(
                    f"SubspaceTraining trains every parameter of {type(pl_module).__name__} through the same "
                    f"{self.dimension} coordinates `w`, so configure_optimizers can't put parameters in different "
                    "groups (per-layer learning rates or weight decay): use one parameter group, or train without "
                    "SubspaceTraining."
                ) from error

        configure_optimizers.explains_subspace_groups = True  # type: ignore[attr-defined]
        pl_module.configure_optimizers = configure_optimizers  # type: ignore[method-assign]

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        _restore_configure_optimizers(pl_module)

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        _restore_configure_optimizers(pl_module)


def _restore_configure_optimizers(pl_module: pl.LightningModule) -> None:
    """The module's own ``configure_optimizers`` back (the callback holds nothing, so it pickles for spawned DDP)."""
    if getattr(vars(pl_module).get("configure_optimizers"), "explains_subspace_groups", False):
        del pl_module.configure_optimizers


def _argmax_of_distributions(labels: Tensor) -> Tensor:
    """Each row's class, for rows that are distributions over the classes (one-hot or soft labels); refused else."""
    rows = labels.double()
    sums = rows.sum(dim=1)
    if len(rows) and not (bool((rows >= 0).all()) and bool(((sums - 1).abs() <= 1e-3).all())):
        raise ValueError(
            "CompressionBoundReporter bounds a classifier's 0-1 error: labels of shape (batch, classes) must be "
            "one-hot or soft labels (each row non-negative, summing to 1), not multi-label or regression targets "
            f"(rows sum to {float(sums.min()):.3g}..{float(sums.max()):.3g}, smallest value {float(rows.min()):.3g}). "
            "Pass `target_fn(batch)` returning class indices."
        )
    return labels.argmax(dim=1)


def class_scores(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Scores ``(batch, classes)`` whose argmax is the prediction, and labels as class indices ``(batch,)``.

    One output column (or a 1-D output) is a binary classifier's logit ``z``: its scores are ``(0, z)``, so the
    prediction is class 1 exactly where ``z > 0`` and the margin of an example is ``z`` (label 1) or ``-z`` (label
    0). Labels must be whole numbers in ``[0, classes)``: anything else (a regression target) has no 0-1 error.
    Labels of the scores' shape ``(batch, classes)``, one-hot or soft (mixup, label smoothing: rows non-negative and
    summing to 1), are replaced by their argmax: a 0-1 error needs one class per example, and against a soft label
    it is the argmax's. Other such targets (multi-label, regression) are refused.

    Examples:
        >>> class_scores(torch.tensor([[2.0], [-1.0]]), torch.tensor([1.0, 1.0]))
        (tensor([[ 0.,  2.],
                [ 0., -1.]]), tensor([1, 1]))
        >>> class_scores(torch.tensor([[2.0, 0.0, 1.0]]), torch.tensor([[0.1, 0.1, 0.8]]))[1]
        tensor([2])
    """
    if not isinstance(logits, Tensor):
        raise ValueError(
            "CompressionBoundReporter needs the class scores as one tensor (batch, classes), but the predictions "
            f"are a {type(logits).__name__} (a model with several heads, or an output object). Pass "
            "`predict_fn(pl_module, batch)` returning the scores of the head to bound, e.g. "
            "`lambda pl_module, batch: pl_module(batch[0])['head']`."
        )
    binary = logits.ndim == 1 or (logits.ndim == 2 and logits.shape[1] == 1)
    if binary:
        logits = torch.stack([torch.zeros_like(logits.reshape(-1)), logits.reshape(-1)], dim=1)
        labels = labels.reshape(-1) if labels.numel() == len(logits) else labels
    if logits.ndim == 2 and labels.shape == logits.shape:  # one-hot or soft labels (mixup, label smoothing)
        labels = _argmax_of_distributions(labels)
    if logits.ndim != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(
            "CompressionBoundReporter needs logits of shape (batch, classes), or (batch, 1) for a binary classifier, "
            "and labels of shape (batch,) (class indices) or (batch, classes) (one-hot or soft labels), got "
            f"{tuple(logits.shape)} and {tuple(labels.shape)}. Pass `predict_fn(pl_module, batch)` and "
            "`target_fn(batch)` that return them."
        )
    classes, values = logits.shape[1], labels.double()
    if len(values) and not (bool((values == values.round()).all()) and 0 <= values.min() <= values.max() < classes):
        kind = "0 or 1 (a binary classifier's logit > 0 predicts 1)" if binary else f"class indices in [0, {classes})"
        raise ValueError(
            f"CompressionBoundReporter bounds a classifier's 0-1 error, so the labels must be {kind}; got values in "
            f"[{float(values.min()):g}, {float(values.max()):g}] (a regression target has no 0-1 error). Pass "
            "`predict_fn(pl_module, batch)` returning class scores and `target_fn(batch)` returning class indices."
        )
    return logits, labels.long()


def _soft(labels: Tensor) -> bool:
    """Whether ``labels`` are ``(batch, classes)`` rows that are not all one-hot (hard labels have one 1 a row)."""
    if labels.ndim != 2 or labels.shape[1] < 2:
        return False
    return not bool((((labels == 0) | (labels == 1)).all(dim=1) & (labels.sum(dim=1) == 1)).all())


def _map_style_dataset(trainer: pl.Trainer) -> Dataset | None:
    """The train DataLoader's dataset, if it is one map-style dataset whose examples can be counted and read."""
    loader = trainer.train_dataloader
    dataset: Dataset | None = getattr(loader, "dataset", None)
    if not isinstance(loader, DataLoader) or dataset is None or isinstance(dataset, IterableDataset):
        return None
    return dataset


def _encoded_tensors(module: torch.nn.Module) -> list[tuple[str, Tensor]]:
    """What the code must describe: every parameter (for a subspace model: ``w`` and any parameter outside the
    subspace; ``theta0`` and ``P`` are drawn from the seed instead) and every persistent floating-point buffer
    (BatchNorm statistics)."""
    subspace = find_subspace(module)
    drawn_from_seed = {id(original) for _, original in subspace_originals(module)}
    tensors = [(name, p) for name, p in module.named_parameters() if id(p) not in drawn_from_seed]
    for name, buffer in _buffers(module, persistent=True):
        if buffer.is_floating_point():
            tensors.append((name, buffer))
    if subspace is not None:  # w first: the stream is read in this order
        tensors.sort(key=lambda item: item[1] is not subspace.weight)
    return tensors


def _uncodable_state(
    module: torch.nn.Module, encoded: Sequence[tuple[str, Tensor]], built: Mapping[str, Tensor]
) -> list[str]:
    """Why the decoder couldn't rebuild the model from the code and what it knows in advance, if it couldn't.

    ``built``: the integer buffers as the module was set up, before training (to tell the user which ones training
    wrote; empty when unknown)."""
    problems = [f"`{name}` has {problem}" for name, tensor in encoded if (problem := uncodable(tensor))]
    integer = dict(_integer_buffers(module))
    written = [name for name, buffer in integer.items() if name in built and not torch.equal(buffer.cpu(), built[name])]
    fixed = [name for name in integer if name not in written]
    if written:
        problems.append(
            f"integer buffers {written} changed while training: they are not encoded and depend on the data"
        )
    if fixed:
        problems.append(
            f"integer buffers {fixed} are not encoded; if the architecture fixes them (an index table such as Swin's "
            "relative_position_index, never written by training), declare them part of it, which the decoder builds "
            "itself: register each again before fit with `module.register_buffer(name, module.<name>, "
            "persistent=False)`"
        )
    mismatched = subspace_mismatches(module)
    if mismatched:
        problems.append(f"{mismatched} differ from what the subspace seed draws (e.g. a checkpoint of another seed)")
    return problems


def _integer_buffers(module: torch.nn.Module) -> Iterator[tuple[str, Tensor]]:
    """The persistent integer buffers but BatchNorm's ``num_batches_tracked`` (which the bound doesn't use)."""
    for name, buffer in _buffers(module, persistent=True):
        if not buffer.is_floating_point() and not name.endswith("num_batches_tracked"):
            yield name, buffer


def _buffers(module: torch.nn.Module, persistent: bool) -> Iterator[tuple[str, Tensor]]:
    for owner_name, owner in module.named_modules():
        if isinstance(owner, RandomSubspace):
            continue  # its projections are checked against the seed
        for name, buffer in owner.named_buffers(recurse=False):
            if (name not in owner._non_persistent_buffers_set) == persistent:
                yield (f"{owner_name}.{name}" if owner_name else name), buffer


def _in_order(loader: DataLoader, dataset: Dataset) -> DataLoader | Iterable[Any]:
    """All of a map-style ``dataset`` once, in order, collated as ``loader`` does; whatever the sampler (a
    ``DistributedSampler`` would give each rank a shard). An iterable dataset is read through ``loader``."""
    if isinstance(dataset, IterableDataset):
        return loader
    return DataLoader(dataset, batch_size=512, shuffle=False, collate_fn=loader.collate_fn)


def _random_examples(train_set: ProbeSet, count: int) -> Any:
    """``count`` of the cached examples, drawn with a fixed seed (the dataset may be sorted by class)."""
    whole, _ = next(train_set.chunks())
    chosen = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(0))[:count]
    return select_examples(whole, chosen)


def _field(batch: Any, index: int, what: str) -> Tensor:
    if isinstance(batch, list | tuple) and len(batch) > index and isinstance(batch[index], Tensor):
        return batch[index]
    raise ValueError(
        f"By default CompressionBoundReporter reads the {what} from batch[{index}], but the batch is a "
        f"{type(batch).__name__} without a tensor there. Pass `predict_fn(pl_module, batch)` and `target_fn(batch)`."
    )
