"""Lightning adapter: sharpness against the optimizer's edge of stability, measured during training."""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Iterable, Iterator, Sequence
from functools import partial
from typing import Any, Literal

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_warn
from torch import Tensor
from typing_extensions import override

from lightning_nt.common import (
    LossFn,
    ProbeSet,
    batch_size,
    log_figure,
    log_scalars,
    log_text,
    prepare_batch,
    preserved_state,
    select_examples,
    training_loss,
)
from lightning_nt.common.autodiff import differentiable_kernels
from lightning_nt.common.callback import Callback
from lightning_nt.common.distributed import min_across_ranks, sum_across_ranks
from lightning_nt.common.state import continues_run
from lightning_nt.common.validation import (
    ArgumentError,
    above,
    at_least,
    between,
    checked_arguments,
    non_empty,
    renamed_arguments,
    renamed_property,
)
from lightning_nt.sharpness.hvp import HessianOperator
from lightning_nt.sharpness.lanczos import LanczosResult, lanczos, warm_start
from lightning_nt.sharpness.measure import (
    batch_sharpness,
    flat_norm,
    hutchinson_trace,
    preconditioned,
    smoothness_along_gradient,
)
from lightning_nt.sharpness.thresholds import (
    adam_preconditioner,
    coupled_weight_decays,
    learning_rate_ratios,
    stability_threshold,
    without_adam_state,
)

__all__ = ["SharpnessMonitor"]


OFF_SCALE = 2.5
"""The picture's y axis ends at this multiple of the threshold when a point lies beyond it (the rest stays legible)."""

OVERHEAD_WARNING = 0.25
"""Without a budget, the share of training time spent measuring beyond which the user is warned (once)."""


def _groups_differ(optimizer: torch.optim.Optimizer, keys: Sequence[str]) -> bool:
    settings = [tuple(group.get(key) for key in keys) for group in optimizer.param_groups]
    return len(set(settings)) > 1


class SharpnessMonitor(Callback):
    """Top Hessian eigenvalues of the training loss, against the optimizer's edge-of-stability threshold.

    Every ``every_n_steps`` optimizer steps (and before the first), warm-started Lanczos with full
    reorthogonalisation over Hessian-vector products in fp32 (fp64 for a double-precision module) finds the top
    ``num_eigenvalues`` eigenvalues and ``lambda_min`` of the loss on a fixed probe set of ``num_examples`` training
    examples (or on the current batch). The threshold is read from the live optimizer: ``2/lr`` for SGD,
    ``2(1+beta)/lr`` with momentum, ``2(1+beta)/((1+2beta)lr)`` with Nesterov, and for Adam/AdamW
    ``(2+2beta1)/((1-beta1)lr)`` against the preconditioned sharpness (Cohen et al. 2021, 2022).
    ``sharpness/ratio`` is the (preconditioned, for Adam) sharpness over the threshold: near 1 means training is
    at the edge of stability.
    With param groups that differ only in learning rate, the threshold is group 0's and the sharpness compared with
    it is that of ``R^1/2 H R^1/2`` (``R``: each parameter's lr over group 0's), logged as ``sharpness/lr_scaled``.

    The run is left exactly as without the monitor: parameters, ``.grad``, BatchNorm buffers, RNG, modes and
    optimizer state are restored after each measurement.

    Args:
        every_n_steps: optimizer steps between measurements (a ``max_overhead`` budget, if set, may skip some).
        num_eigenvalues: how many top eigenvalues (``sharpness/lambda_2``... beyond the first).
        num_examples: training examples in the probe set, cached when training starts.
        chunk_size: examples per forward/backward when the probe set does not fit at once (``None``: all).
        mode: ``"train"`` (dropout and batch statistics as in training, the usual choice) or ``"eval"``. In train
            mode each probe chunk's dropout masks are drawn once per measurement and kept for all its products.
        data: ``"probe"`` (fixed probe set) or ``"batch"`` (the examples of the optimizer step just taken: under
            gradient accumulation all its micro-batches, each loss weighted ``1 / accumulate_grad_batches`` as
            Lightning weights it).
        tol: Ritz residual tolerance relative to the largest eigenvalue's magnitude.
        max_iter: most Lanczos steps (Hessian-vector products) per solve.
        trace: also estimate the Hessian trace (``sharpness/trace`` with ``sharpness/trace_stderr``).
        trace_samples: Hessian-vector products for the trace.
        trace_method: ``"hutch++"`` or ``"hutchinson"``.
        batch_sharpness: also measure batch sharpness (Andreyev & Beneventano), the quantity that reaches
            ``2/lr`` under mini-batch SGD.
        batch_sharpness_batches: mini-batches from the probe set averaged, each of the examples of one optimizer
            step (the train loader's batch size times ``accumulate_grad_batches``); a last, smaller one is left out.
        smoothness: also log Santurkar et al.'s ``smoothness/loss_range``, ``grad_predictiveness``, ``beta``.
        smoothness_steps: step sizes along the gradient, as multiples of the current learning rate.
        spherical: also log ``sharpness/spherical`` = ||w||^2 lambda_max (for scale-invariant networks).
        lambda_min: also converge and log the smallest eigenvalue (``sharpness/lambda_min``); the bottom of a
            Hessian's spectrum is often a cluster near zero, so this can double the products per measurement.
        max_overhead: an optional time budget. ``None`` (default) measures every ``every_n_steps`` whatever it costs,
            and warns once if measuring passes 25% of the training time. A share in (0, 1) skips a due measurement
            while the time spent measuring, plus the dearest measurement's cost, would exceed that share of the wall
            time spent training (the measurement when training starts is always taken); the first skip is announced
            and skips are counted in ``sharpness/skipped``. The share so far is logged as ``sharpness/overhead``
            once some training time has passed.
        loss_fn: ``loss_fn(pl_module, batch)``; default: the module's ``training_step`` with logging muted.
        seed: seed of the random start vectors and trace probes (the global RNG is not touched).

    Only parameters with ``requires_grad`` are measured. For Adam, a trainable parameter that holds no optimizer
    state (unused by the loss, or not in the optimizer) does not move: it is left out of the preconditioned
    operator, with one warning. At ``lr = 0`` (warm-up) the threshold is ``inf`` and the ratio 0.

    Memory: a measurement holds the Lanczos basis (one vector per step taken, at most ``max_iter``), about
    ``4 * num_eigenvalues + 10`` more vectors, ``2 * trace_samples / 3`` with ``trace="hutch++"``, and the
    double-backward graph of one probe chunk (``chunk_size`` bounds it). A vector is an fp32 (fp64 for a
    double-precision module) copy of the trainable parameters: at the defaults, at most about 64 such copies,
    6.4 GB for a 25M-parameter model. Between measurements the monitor keeps ``num_eigenvalues + 1`` vectors per
    operator (twice that with Adam) to warm-start the next solve; they are saved in checkpoints, so a resumed run
    measures what the uninterrupted run would have. Another ``fit`` on the same Trainer goes on with the run as a
    resume does (no second measurement of the step the earlier fit ended on); a new Trainer without a checkpoint
    starts a new run: a new ``.history`` and no warm start (:func:`~lightning_nt.common.state.continues_run`).

    Example::

        monitor = SharpnessMonitor(every_n_steps=50, num_eigenvalues=2, trace=True)
        trainer = pl.Trainer(callbacks=[monitor])
        trainer.fit(model, datamodule)
        monitor.history[-1]["sharpness/ratio"]   # also in TensorBoard, with the picture at the end
    """

    reads_training_data_outside_step = True  # declared for DPStrategy (lightning_nt.common.capabilities)

    num_samples = renamed_property("num_samples", "num_examples")

    @checked_arguments(
        every_n_steps=at_least(1),
        num_eigenvalues=at_least(1),
        num_examples=at_least(1),
        chunk_size=at_least(1),
        tol=between(0, 1, low_open=True, high_open=True),
        max_iter=at_least(1),
        trace_samples=at_least(3),
        batch_sharpness_batches=at_least(1),
        smoothness_steps=(non_empty(), above(0)),
        max_overhead=between(0, 1, low_open=True, high_open=True),
        seed=between(0, 2**32 - 1),
    )
    @renamed_arguments(num_samples="num_examples")
    def __init__(
        self,
        every_n_steps: int = 100,
        num_eigenvalues: int = 1,
        num_examples: int = 1024,
        chunk_size: int | None = None,
        mode: Literal["train", "eval"] = "train",
        data: Literal["probe", "batch"] = "probe",
        tol: float = 1e-3,
        max_iter: int = 50,
        trace: bool = False,
        trace_samples: int = 30,
        trace_method: Literal["hutch++", "hutchinson"] = "hutch++",
        batch_sharpness: bool = False,
        batch_sharpness_batches: int = 8,
        smoothness: bool = False,
        smoothness_steps: Sequence[float] = (0.5, 1.0, 2.0, 4.0),
        spherical: bool = False,
        lambda_min: bool = True,
        max_overhead: float | None = None,
        loss_fn: LossFn | None = None,
        seed: int = 0,
    ) -> None:
        if max_iter < num_eigenvalues:
            raise ArgumentError(
                f"`max_iter` must be at least `num_eigenvalues` ({num_eigenvalues}): Lanczos finds at most one "
                f"eigenvalue per step, got max_iter={max_iter}."
            )
        self.every_n_steps, self.num_eigenvalues, self.num_examples = every_n_steps, num_eigenvalues, num_examples
        self.chunk_size, self.mode, self.data, self.tol, self.max_iter = chunk_size, mode, data, tol, max_iter
        self.trace, self.trace_samples, self.trace_method = trace, trace_samples, trace_method
        self.batch_sharpness, self.batch_sharpness_batches = batch_sharpness, batch_sharpness_batches
        self.smoothness, self.smoothness_steps, self.spherical = smoothness, tuple(smoothness_steps), spherical
        self.max_overhead, self.loss_fn, self.seed, self.lambda_min = max_overhead, loss_fn, seed, lambda_min
        self.history: list[dict[str, float]] = []
        self.skipped = 0
        """Due measurements skipped by the ``max_overhead`` budget in this fit."""
        self._probe: ProbeSet | None = None
        self._warm: dict[str, Tensor] = {}
        self._measuring_seconds = 0.0
        self._max_cost = 0.0
        self._train_start = 0.0
        self._start_step = 0
        self._seen_step = -1
        self._last_step = -1
        self._step_batches: list[Any] = []
        """With ``data="batch"``: the micro-batches of the optimizer step being accumulated, if it is due."""
        self._restored = False
        self._mask_seed = 0
        """The global RNG's seed for each probe chunk's forward (plus its index) in the current measurement."""
        self._reduction_checked = False
        self._warned: set[str] = set()
        self._rule: str | None = None
        """The threshold's rule (e.g. ``"SGD: 2/lr"``) at the last measurement, for the picture."""

    @property
    @override
    def state_key(self) -> str:
        # the key keeps the argument's old name `num_samples`: checkpoints written before the rename still load
        return self._generate_state_key(every_n_steps=self.every_n_steps, num_samples=self.num_examples, data=self.data)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.data == "probe":
            self._probe = ProbeSet.from_trainer(trainer, self.num_examples)
        self._train_start = time.perf_counter()
        self._measuring_seconds = self._max_cost = 0.0
        self.skipped = 0
        self._start_step = self._seen_step = trainer.global_step
        self._step_batches = []  # a fit interrupted mid-accumulation left its micro-batches
        if not continues_run(trainer, self._restored):  # a new Trainer without a checkpoint: a new run
            self.history, self._last_step, self._warm = [], -1, {}
        self._restored = False
        if self.data == "probe" and self._due(trainer.global_step):
            self._measure(trainer, pl_module, None)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if self.data == "batch" and self._due(self._seen_step + 1):
            self._step_batches.append(batch)
        if step == self._seen_step:  # no optimizer step on this batch (gradient accumulation)
            return
        self._seen_step = step
        step_batches, self._step_batches = self._step_batches, []
        if not self._due(step):
            return
        if self.max_overhead is None or self._within_budget():
            self._measure(trainer, pl_module, (step_batches or [batch]) if self.data == "batch" else None)
            return
        self._last_step = step
        self.skipped += 1
        log_scalars(trainer, {"sharpness/skipped": float(self.skipped)})
        self._warn(
            "skipped",
            f"SharpnessMonitor: skipped the measurement due at step {step} to keep measuring within "
            f"max_overhead={self.max_overhead:.0%} of the training time ({self._measuring_seconds:.2f} s measuring, "
            f"{self._training_seconds():.2f} s training). Skips are counted in 'sharpness/skipped'; raise "
            "`max_overhead`, or set it to None to measure every `every_n_steps`.",
        )

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._probe = None  # the examples are cached again when training starts
        if not (trainer.is_global_zero and trainer.loggers):
            return
        if len(self.history) >= 2:
            log_figure(trainer, "sharpness/edge_of_stability", self.figure())
        else:  # one point is no curve: say why there is no picture
            log_text(
                trainer,
                "sharpness/edge_of_stability",
                f"{len(self.history)} measurement(s): no edge-of-stability picture is drawn from fewer than two. "
                f"Measure more often (`every_n_steps`, now {self.every_n_steps}) or train longer"
                + (f"; {self.skipped} measurement(s) were skipped by `max_overhead`." if self.skipped else "."),
            )

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history, "last_step": self._last_step, "warm": dict(self._warm)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict["history"])
        last = self.history[-1]["step"] if self.history else -1
        self._last_step = int(state_dict.get("last_step", last))
        self._warm = dict(state_dict.get("warm", {}))
        self._restored = True

    def figure(self) -> Any:
        """The edge-of-stability picture: sharpness (and batch sharpness) against the threshold over steps.

        The legend gives the threshold's rule and last value (e.g. ``2/lr = 10``). For Adam the preconditioned
        sharpness is drawn (the quantity its threshold bounds), with the raw ``lambda_max`` beside it, on a
        log axis: the two differ by orders of magnitude.
        """
        import matplotlib.pyplot as plt

        figure, axes = plt.subplots(figsize=(6.4, 4.2))
        steps = [entry["step"] for entry in self.history]
        adam = any("sharpness/preconditioned" in entry for entry in self.history)
        curves = []
        for tag, label, style in _curves(adam):
            if any(tag in entry for entry in self.history):
                curves.append([_finite_or_nan(entry.get(tag, math.nan)) for entry in self.history])
                axes.plot(steps, curves[-1], label=label, **style)
        thresholds = [_finite_or_nan(entry.get("sharpness/threshold", math.nan)) for entry in self.history]
        if any(math.isfinite(value) for value in thresholds):
            last = [value for value in thresholds if math.isfinite(value)][-1]
            rule = (self._rule or "stability threshold").split(": ")[-1]
            axes.plot(steps, thresholds, linestyle="--", color="black", label=f"threshold {rule} = {last:.3g}")
            if not adam:
                _clip_far_above(axes, steps, curves, OFF_SCALE * last)
        if adam:
            axes.set_yscale("log")
        axes.set_title(f"Edge of stability{f' ({self._rule})' if self._rule else ''}")
        axes.set_xlabel("optimizer step")
        axes.set_ylabel("sharpness (log scale)" if adam else "sharpness (top Hessian eigenvalue)")
        axes.grid(alpha=0.3)
        axes.legend()
        figure.tight_layout()
        return figure

    def _due(self, step: int) -> bool:
        return step % self.every_n_steps == 0 and step != self._last_step

    def _within_budget(self) -> bool:
        assert self.max_overhead is not None
        return self._measuring_seconds + self._max_cost <= self.max_overhead * self._training_seconds()

    def _measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batches: list[Any] | None) -> None:
        """One measurement on the probe set (``batches`` None) or on the micro-batches of the step just taken."""
        started = time.perf_counter()
        self._last_step = trainer.global_step
        named = [(name, p) for name, p in pl_module.named_parameters() if p.requires_grad]
        if not named:
            self._warn(
                "frozen", "SharpnessMonitor: the module has no parameter with requires_grad; nothing to measure."
            )
            return
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + trainer.global_step)
        self._mask_seed = generator.initial_seed()
        with (
            preserved_state(pl_module, parameters=False),
            torch.enable_grad(),
            torch.inference_mode(False),
            differentiable_kernels(),
        ):
            if self.data == "probe" and not self._reduction_checked:
                self._reduction_checked = True
                self._check_reduction(trainer, pl_module)
            pl_module.train(self.mode == "train")
            try:
                values, solves = self._solve(trainer, pl_module, named, batches, generator)
            except FloatingPointError:
                values, solves = {"sharpness/lambda_max": math.nan}, 0
        seconds = time.perf_counter() - started
        self._measuring_seconds += seconds  # a skipped measurement still cost its time
        self._max_cost = max(self._max_cost, seconds)
        if not all(math.isfinite(v) for tag, v in values.items() if tag != "sharpness/threshold"):
            self._warn("nan", "SharpnessMonitor: a measurement was not finite (NaN/inf); it is skipped.")
            self._warm.clear()
            return
        values["sharpness/seconds"] = seconds
        values["sharpness/hvps"] = float(solves)
        if trainer.global_step > self._start_step:  # before any training step the share is time over ~0 s
            values["sharpness/overhead"] = overhead = self._measuring_seconds / max(self._training_seconds(), 1e-9)
            if self.max_overhead is None and overhead > OVERHEAD_WARNING:
                self._warn_overhead(overhead, seconds)
        log_scalars(trainer, values)
        self.history.append({"step": trainer.global_step, **values})

    def _warn_overhead(self, overhead: float, seconds: float) -> None:
        self._warn(
            "overhead",
            f"SharpnessMonitor: measuring has taken {overhead:.0%} of the training time so far "
            f"({self._measuring_seconds:.2f} s measuring against {self._training_seconds():.2f} s training; "
            f"{seconds:.2f} s for the last measurement). Measure less often with a larger `every_n_steps` "
            f"(now {self.every_n_steps}), or cap the share with `max_overhead` (e.g. 0.1) to skip measurements "
            "beyond it.",
        )

    def _solve(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        named: list[tuple[str, Tensor]],
        batches: list[Any] | None,
        generator: torch.Generator,
    ) -> tuple[dict[str, float], int]:
        """Every quantity of one measurement (the Hessian's on the probe set or batch, then those of other batches),
        and the number of Hessian-vector products it took."""
        params = [p for _, p in named]
        operator = self._operator(trainer, pl_module, params, batches)
        values = self._spectrum(operator, generator)
        optimizer = trainer.optimizers[0] if trainer.optimizers else None
        if optimizer is not None:
            values.update(
                self._against_threshold(optimizer, operator, named, values["sharpness/lambda_max"], generator)
            )
        if self.spherical:
            values["sharpness/spherical"] = flat_norm(params) ** 2 * values["sharpness/lambda_max"]
        if self.trace:
            values.update(self._trace(operator, params[0].device, generator))
        solves = operator.num_matvecs
        operator.release()
        if self.batch_sharpness:
            values["sharpness/batch_sharpness"] = self._batch_sharpness(trainer, pl_module, params)
        if self.smoothness and optimizer is not None:  # the same operator: under DDP no second reduction to build it
            values.update(self._smoothness(operator, params, float(optimizer.param_groups[0]["lr"])))
        return values, solves

    def _spectrum(self, operator: HessianOperator, generator: torch.Generator) -> dict[str, float]:
        """``lambda_max``, the next top eigenvalues, ``lambda_min`` (when on) and whether Lanczos converged."""
        result = self._lanczos("hessian", operator.matvec, operator, generator)
        values = {"sharpness/lambda_max": float(result.eigenvalues[0])}
        if self.lambda_min:
            values["sharpness/lambda_min"] = result.lambda_min
        values.update({f"sharpness/lambda_{i + 1}": float(v) for i, v in enumerate(result.eigenvalues) if i > 0})
        values["sharpness/converged"] = float(result.converged)
        return values

    def _trace(self, operator: HessianOperator, device: torch.device, generator: torch.Generator) -> dict[str, float]:
        """The Hessian's trace (``trace_method`` with ``trace_samples`` probes) and its standard error."""
        estimate = hutchinson_trace(
            operator.matvec,
            operator.numel,
            self.trace_samples,
            device,
            generator,
            self.trace_method,
            dtype=operator.dtype,
        )
        return {"sharpness/trace": estimate.value, "sharpness/trace_stderr": estimate.standard_error}

    def _against_threshold(
        self,
        optimizer: torch.optim.Optimizer,
        operator: HessianOperator,
        named: list[tuple[str, Tensor]],
        sharpness: float,
        generator: torch.Generator,
    ) -> dict[str, float]:
        """``threshold`` and ``ratio`` (with ``preconditioned`` first for Adam); empty when no rule is known."""
        threshold = stability_threshold(optimizer)
        keys = ("momentum", "betas", "nesterov", "dampening", "weight_decay", "lr")
        differ = [key for key in keys if _groups_differ(optimizer, (key,))]
        measured = ("lr",) if threshold is not None and threshold.preconditioned else ("lr", "weight_decay")
        if any(key not in measured for key in differ):
            self._warn(
                "groups",
                "SharpnessMonitor: the optimizer's param groups have different hyper-parameters; "
                "the threshold uses group 0's.",
            )
        elif differ:
            self._warn(
                "groups",
                f"SharpnessMonitor: the optimizer's param groups have different {' and '.join(differ)}; the "
                "threshold is group 0's, compared with the sharpness those steps see: 'sharpness/lr_scaled' = "
                "lambda_max(R^1/2 (H + D) R^1/2) - d_0 (R: each parameter's lr over group 0's, D: its SGD weight "
                "decay), or R folded into 'sharpness/preconditioned' for Adam.",
            )
        if threshold is None:
            self._warn(
                "threshold",
                f"SharpnessMonitor: no stability threshold is known for {type(optimizer).__name__}; "
                "logging the eigenvalues only.",
            )
            return {}
        values = {}
        ratios = learning_rate_ratios(optimizer, operator.params)  # per-group learning rates, relative to group 0's
        decays = coupled_weight_decays(optimizer, operator.params)  # per-group SGD weight decays
        if threshold.preconditioned:
            diagonal = self._adam_preconditioner(optimizer, named)
            if diagonal is None:  # no Adam state before the first step
                return {}
            if ratios is not None:
                diagonal = diagonal / ratios
            adam = self._lanczos("adam", preconditioned(operator.matvec, diagonal), operator, generator)
            values["sharpness/preconditioned"] = sharpness = float(adam.eigenvalues[0])
        elif ratios is not None or decays is not None:
            values["sharpness/lr_scaled"] = sharpness = self._step_sharpness(
                optimizer, operator, ratios, decays, generator
            )
        values["sharpness/threshold"] = threshold.value
        self._rule = threshold.rule
        values["sharpness/ratio"] = sharpness / threshold.value  # 0 at lr 0, where the threshold is inf
        return values

    def _step_sharpness(
        self,
        optimizer: torch.optim.Optimizer,
        operator: HessianOperator,
        ratios: Tensor | None,
        decays: Tensor | None,
        generator: torch.Generator,
    ) -> float:
        """``lambda_max(R^1/2 (H + D) R^1/2) - d_0``: the curvature SGD's steps see with per-group learning rates
        ``R lr_0`` and coupled weight decays ``D``, less group 0's decay, which group 0's threshold has subtracted; so
        the steps are stable exactly while it stays below the threshold. ``lambda_max(H)`` when ``R = I, D = d_0 I``."""
        first = float(optimizer.param_groups[0].get("weight_decay", 0.0))
        scale = ratios if ratios is not None else 1.0
        shift = scale * (decays if decays is not None else first) - first
        scaled = preconditioned(operator.matvec, 1 / ratios) if ratios is not None else operator.matvec
        return float(self._lanczos("lr", lambda v: scaled(v) + shift * v, operator, generator).eigenvalues[0])

    def _adam_preconditioner(self, optimizer: torch.optim.Optimizer, named: list[tuple[str, Tensor]]) -> Tensor | None:
        params = [p for _, p in named]
        missing = without_adam_state(optimizer, params)
        if missing and len(missing) < len(params):
            names = ", ".join(named[index][0] for index in missing[:5]) + (", ..." if len(missing) > 5 else "")
            self._warn(
                "adam-state",
                f"SharpnessMonitor: {len(missing)} trainable parameter(s) have no Adam state ({names}): unused by the "
                "loss or not in the optimizer, they do not move, so the preconditioned sharpness leaves them out. "
                "Set `requires_grad=False` on parameters that are not trained to silence this.",
            )
        return adam_preconditioner(optimizer, params)

    def _lanczos(self, name: str, matvec: Any, operator: HessianOperator, generator: torch.Generator) -> LanczosResult:
        previous = self._warm.get(name)
        if previous is not None and previous.shape[-1] == operator.numel:
            start = warm_start(previous, generator=generator)
        else:
            start = torch.randn(operator.numel, generator=generator)
        start = start.to(operator.params[0].device, operator.dtype)
        result = lanczos(matvec, start, self.num_eigenvalues, self.tol, self.max_iter, smallest=self.lambda_min)
        kept = [result.eigenvectors, result.vector_min[None]] if self.lambda_min else [result.eigenvectors]
        self._warm[name] = torch.cat(kept)  # a copy: the solve's basis and Ritz matrix are freed
        if not result.converged:
            self._warn(
                f"converge-{name}",
                f"SharpnessMonitor: Lanczos stopped at max_iter={self.max_iter} before the "
                f"residuals reached tol={self.tol}; raise max_iter for exact values ('sharpness/converged' is 0).",
            )
        return result

    def _operator(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, params: list[Tensor], batches: list[Any] | None
    ) -> HessianOperator:
        # the step's micro-batches, each weighted as Lightning weights its loss: the loss whose gradient the step took
        chunks = [(batch, 1 / trainer.accumulate_grad_batches) for batch in batches] if batches is not None else None

        def loss_chunks() -> Iterable[tuple[Tensor, float]]:
            source = chunks if chunks is not None else self._probe_chunks(trainer, self.chunk_size)
            for index, (chunk, share) in enumerate(source):
                torch.manual_seed(self._mask_seed + index)  # every product sees the same dropout masks
                yield self._loss(pl_module, chunk), share

        single_chunk = len(chunks) == 1 if chunks is not None else self.num_examples <= (self.chunk_size or math.inf)
        examples = len(self._probe) if batches is None else sum(batch_size(batch) for batch in batches)
        reduce_sum, weight = self._data_parallel(trainer, examples)
        return HessianOperator(params, loss_chunks, reuse_graph=single_chunk, reduce_sum=reduce_sum, weight=weight)

    def _data_parallel(self, trainer: pl.Trainer, local_examples: int) -> tuple[Any, float]:
        """All-reduced products: every rank computes on its own ``local_examples``, all see the products of the
        union of every rank's examples, and stay in lockstep."""
        if trainer.world_size == 1:
            return None, 1.0
        return partial(sum_across_ranks, trainer), local_examples / sum_across_ranks(trainer, float(local_examples))

    @torch.no_grad()
    def _check_reduction(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Warn once when the loss is a sum over the examples rather than a mean: compared in eval mode on the first
        probe examples, the loss of all of them is then the sum of the losses of its two halves, not their mean."""
        assert self._probe is not None
        first, _ = next(self._probe_chunks(trainer, min(len(self._probe), self.chunk_size or len(self._probe), 64)))
        size = batch_size(first)
        if size < 2:
            return
        pl_module.eval()
        half = size // 2
        try:
            whole, head, tail = (
                float(self._loss(pl_module, part))
                for part in (first, select_examples(first, slice(0, half)), select_examples(first, slice(half, size)))
            )
        except (RuntimeError, ValueError):  # a loss that needs its full batch: no verdict, and the measurement goes on
            return
        mean, total = (half * head + (size - half) * tail) / size, head + tail
        if abs(whole - total) <= 1e-3 * abs(total) and abs(whole - mean) > 1e-2 * abs(whole):
            self._warn(
                "sum",
                "SharpnessMonitor: the training loss is a sum over the batch's examples, not a mean (on "
                f"{size} probe examples it is the sum of its two halves' losses). The Hessian of a sum grows with the "
                f"number of examples: on the probe set of {len(self._probe)} it is not that of a training batch, "
                "`chunk_size` changes it, and its ratio to the threshold is meaningless. Average the loss over "
                "the batch (e.g. `reduction='mean'`) in training_step, or pass a `loss_fn` that does.",
            )

    def _probe_chunks(self, trainer: pl.Trainer, size: int | None) -> Iterator[tuple[Any, float]]:
        """The probe set in chunks, on the module's device and in the Trainer's input precision (e.g. fp64)."""
        assert self._probe is not None
        for chunk, share in self._probe.chunks(size):
            yield prepare_batch(trainer, chunk, probe="train"), share

    def _batch_sharpness(self, trainer: pl.Trainer, pl_module: pl.LightningModule, params: list[Tensor]) -> float:
        if self._probe is None:
            raise RuntimeError("batch_sharpness needs the probe set (data='probe').")
        loader_batch = getattr(trainer.train_dataloader, "batch_size", None) or self.num_examples
        size = min(loader_batch * trainer.accumulate_grad_batches, len(self._probe))  # the examples of one step
        whole = (chunk for chunk in self._probe_chunks(trainer, size) if batch_size(chunk[0]) == size)
        count = self.batch_sharpness_batches
        if trainer.world_size > 1:  # as many on every rank: their products are all-reduced
            count = min_across_ranks(trainer, min(count, len(self._probe) // size))
        batches = list(itertools.islice(whole, count))  # only these move to the device
        # under DDP a step's mini-batch is every rank's local one together: products of the union, all-reduced
        reduce_sum, weight = self._data_parallel(trainer, size)

        def operator(chunk: Any) -> HessianOperator:
            return HessianOperator(
                params, lambda: [(self._loss(pl_module, chunk), 1.0)], reduce_sum=reduce_sum, weight=weight
            )

        return batch_sharpness(operator(chunk) for chunk, _ in batches)

    def _smoothness(self, operator: HessianOperator, params: list[Tensor], lr: float) -> dict[str, float]:
        """Santurkar et al.'s metrics along the gradient of the measurement's loss (``operator``'s, released)."""
        operator.reuse_graph = False  # the loss is taken at displaced weights: no graph outlives one evaluation
        steps = [lr * multiple for multiple in self.smoothness_steps]
        result = smoothness_along_gradient(params, lambda: (operator.loss(), operator.gradient()), steps)
        return {
            "smoothness/loss_range": result.loss_range,
            "smoothness/grad_predictiveness": result.grad_predictiveness,
            "smoothness/beta": result.beta,
        }

    def _loss(self, pl_module: pl.LightningModule, batch: Any) -> Tensor:
        """The training loss on ``batch`` in at least fp32 (fp64 stays fp64): the precision products are taken in."""
        loss = training_loss(pl_module, batch, 0, self.loss_fn)
        return loss.to(torch.promote_types(loss.dtype, torch.float32))

    def _training_seconds(self) -> float:
        return time.perf_counter() - self._train_start - self._measuring_seconds

    def _warn(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            rank_zero_warn(message)


def _curves(adam: bool) -> list[tuple[str, str, dict[str, Any]]]:
    """The measured curves of the picture: tag, legend label, line style."""
    sharpness = (
        ("sharpness/preconditioned", "preconditioned sharpness, lambda_max(P^-1 H)", {"marker": ".", "color": "C0"})
        if adam
        else ("sharpness/lambda_max", "sharpness lambda_max (probe set)", {"marker": ".", "color": "C0"})
    )
    return [
        sharpness,
        *([("sharpness/lambda_max", "lambda_max (not preconditioned)", {"alpha": 0.6, "color": "C2"})] if adam else []),
        ("sharpness/lr_scaled", "lr-scaled sharpness, lambda_max(R H)", {"marker": ".", "color": "C3"}),
        ("sharpness/batch_sharpness", "batch sharpness (mini-batch Hessians)", {"marker": "x", "color": "C1"}),
    ]


def _clip_far_above(axes: Any, steps: list[int], curves: list[list[float]], top: float) -> None:
    """Cut the y axis at ``top`` when a point lies far above it (e.g. at initialisation), so that the threshold
    and what hovers near it stay readable; each point cut off is marked at the top with its value."""
    values = [value for curve in curves for value in curve if math.isfinite(value)]
    if not values or max(values) <= top:
        return
    axes.set_ylim(min(0.0, min(values)), top)
    for curve in curves:
        for step, value in zip(steps, curve):
            if value > top:
                axes.annotate(
                    f"{value:.3g} at step {step}, off the scale",
                    (step, top),
                    xytext=(10, -14),
                    textcoords="offset points",
                    ha="left",
                    color="grey",
                )


def _finite_or_nan(value: float) -> float:
    """``value``, or NaN where it is infinite (a threshold at lr 0), which matplotlib leaves out of a line."""
    return value if math.isfinite(value) else math.nan
