"""Lightning adapter: sharpness against the optimizer's edge of stability, measured during training."""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Sequence
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
    check_choice,
    log_figure,
    log_scalars,
    preserved_state,
    training_loss,
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
from lightning_nt.sharpness.thresholds import adam_preconditioner, stability_threshold

__all__ = ["SharpnessMonitor"]


def _groups_differ(optimizer: torch.optim.Optimizer) -> bool:
    keys = ("lr", "momentum", "betas", "nesterov", "dampening", "weight_decay")
    settings = [tuple(group.get(key) for key in keys) for group in optimizer.param_groups]
    return len(set(settings)) > 1


class SharpnessMonitor(pl.Callback):
    """Top Hessian eigenvalues of the training loss, against the optimizer's edge-of-stability threshold.

    Every ``every_n_steps`` optimizer steps (and before the first), warm-started Lanczos with full
    reorthogonalisation over fp32 Hessian-vector products finds the top ``num_eigenvalues`` eigenvalues and
    ``lambda_min`` of the loss on a fixed probe set of ``num_samples`` training examples (or on the current
    batch). The threshold is read from the live optimizer: ``2/lr`` for SGD, ``2(1+beta)/lr`` with momentum,
    ``2(1+beta)/((1+2beta)lr)`` with Nesterov, and for Adam/AdamW ``(2+2beta1)/((1-beta1)lr)`` against the
    preconditioned sharpness (Cohen et al. 2021, 2022). ``sharpness/ratio`` is the (preconditioned, for Adam)
    sharpness over the threshold: near 1 means training is at the edge of stability.

    The run is left exactly as without the monitor: parameters, ``.grad``, BatchNorm buffers, RNG, modes and
    optimizer state are restored after each measurement.

    Args:
        every_n_steps: optimizer steps between measurements (``max_overhead`` may lengthen it).
        num_eigenvalues: how many top eigenvalues (``sharpness/lambda_2``... beyond the first).
        num_samples: training examples in the probe set, cached when training starts.
        chunk_size: examples per forward/backward when the probe set does not fit at once (``None``: all).
        mode: ``"train"`` (dropout and batch statistics as in training, the usual choice) or ``"eval"``.
        data: ``"probe"`` (fixed probe set) or ``"batch"`` (the batch just trained on).
        tol: Ritz residual tolerance relative to the largest eigenvalue's magnitude.
        max_iter: most Lanczos steps (Hessian-vector products) per solve.
        trace: also estimate the Hessian trace (``sharpness/trace`` with ``sharpness/trace_stderr``).
        trace_samples: Hessian-vector products for the trace.
        trace_method: ``"hutch++"`` or ``"hutchinson"``.
        batch_sharpness: also measure batch sharpness (Andreyev & Beneventano), the quantity that reaches
            ``2/lr`` under mini-batch SGD.
        batch_sharpness_batches: mini-batches (of the train loader's batch size, from the probe set) averaged.
        smoothness: also log Santurkar et al.'s ``smoothness/loss_range``, ``grad_predictiveness``, ``beta``.
        smoothness_steps: step sizes along the gradient, as multiples of the current learning rate.
        spherical: also log ``sharpness/spherical`` = ||w||^2 lambda_max (for scale-invariant networks).
        lambda_min: also converge and log the smallest eigenvalue (``sharpness/lambda_min``); the bottom of a
            Hessian's spectrum is often a cluster near zero, so this can double the products per measurement.
        max_overhead: skip a due measurement while the time spent measuring, plus the dearest measurement's cost,
            would exceed this share of the wall time spent training (default 5%); the measurement when training
            starts is always taken. ``None`` measures every ``every_n_steps`` whatever it costs. The share so
            far is logged as ``sharpness/overhead``.
        loss_fn: ``loss_fn(pl_module, batch)``; default: the module's ``training_step`` with logging muted.
        seed: seed of the random start vectors and trace probes (the global RNG is not touched).

    Example::

        monitor = SharpnessMonitor(every_n_steps=50, num_eigenvalues=2, trace=True)
        trainer = pl.Trainer(callbacks=[monitor])
        trainer.fit(model, datamodule)
        monitor.history[-1]["sharpness/ratio"]   # also in TensorBoard, with the picture at the end
    """

    reads_training_data_outside_step = True  # declared for DPStrategy (lightning_nt.common.capabilities)

    def __init__(
        self,
        every_n_steps: int = 100,
        num_eigenvalues: int = 1,
        num_samples: int = 1024,
        chunk_size: int | None = None,
        mode: Literal["train", "eval"] = "train",
        data: Literal["probe", "batch"] = "probe",
        tol: float = 1e-3,
        max_iter: int = 100,
        trace: bool = False,
        trace_samples: int = 30,
        trace_method: Literal["hutch++", "hutchinson"] = "hutch++",
        batch_sharpness: bool = False,
        batch_sharpness_batches: int = 8,
        smoothness: bool = False,
        smoothness_steps: Sequence[float] = (0.5, 1.0, 2.0, 4.0),
        spherical: bool = False,
        lambda_min: bool = True,
        max_overhead: float | None = 0.05,
        loss_fn: LossFn | None = None,
        seed: int = 0,
    ) -> None:
        for name, value in (
            ("every_n_steps", every_n_steps),
            ("num_eigenvalues", num_eigenvalues),
            ("num_samples", num_samples),
            ("max_iter", max_iter),
            ("batch_sharpness_batches", batch_sharpness_batches),
        ):
            if value < 1:
                raise ValueError(f"`{name}` must be >= 1, got {value}.")
        if trace_samples < 3:
            raise ValueError(f"`trace_samples` must be >= 3, got {trace_samples}.")
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"`chunk_size` must be >= 1 or None, got {chunk_size}.")
        check_choice("mode", mode, ("train", "eval"))
        check_choice("data", data, ("probe", "batch"))
        check_choice("trace_method", trace_method, ("hutch++", "hutchinson"))
        if not 0 < tol < 1:
            raise ValueError(f"`tol` must be in (0, 1), got {tol}.")
        if max_overhead is not None and not 0 < max_overhead < 1:
            raise ValueError(f"`max_overhead` must be in (0, 1) or None, got {max_overhead}.")
        if not smoothness_steps or any(step <= 0 for step in smoothness_steps):
            raise ValueError(
                f"`smoothness_steps` must be positive multiples of the learning rate, got {smoothness_steps}."
            )
        self.every_n_steps, self.num_eigenvalues, self.num_samples = every_n_steps, num_eigenvalues, num_samples
        self.chunk_size, self.mode, self.data, self.tol, self.max_iter = chunk_size, mode, data, tol, max_iter
        self.trace, self.trace_samples, self.trace_method = trace, trace_samples, trace_method
        self.batch_sharpness, self.batch_sharpness_batches = batch_sharpness, batch_sharpness_batches
        self.smoothness, self.smoothness_steps, self.spherical = smoothness, tuple(smoothness_steps), spherical
        self.max_overhead, self.loss_fn, self.seed, self.lambda_min = max_overhead, loss_fn, seed, lambda_min
        self.history: list[dict[str, float]] = []
        self._probe: ProbeSet | None = None
        self._warm: dict[str, list[Tensor]] = {}
        self._measuring_seconds = 0.0
        self._max_cost = 0.0
        self._train_start = 0.0
        self._last_step = -1
        self._warned: set[str] = set()

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(every_n_steps=self.every_n_steps, num_samples=self.num_samples, data=self.data)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.data == "probe":
            self._probe = ProbeSet.from_trainer(trainer, self.num_samples)
        self._train_start = time.perf_counter()
        self._measuring_seconds = self._max_cost = 0.0
        if self.data == "probe":
            self._measure(trainer, pl_module, None)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if step == self._last_step or step % self.every_n_steps:
            return
        self._last_step = step
        if (
            self.max_overhead is None
            or self._measuring_seconds + self._max_cost <= self.max_overhead * self._training_seconds()
        ):
            self._measure(trainer, pl_module, batch)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.history and trainer.is_global_zero and trainer.loggers:
            log_figure(trainer, "sharpness/edge_of_stability", self.figure())

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict["history"])

    def figure(self) -> Any:
        """Sharpness and the stability threshold over training steps (the edge-of-stability picture)."""
        import matplotlib.pyplot as plt

        figure, axes = plt.subplots(figsize=(6, 4))
        steps = [entry["step"] for entry in self.history]
        preconditioned_run = any("sharpness/preconditioned" in entry for entry in self.history)
        key = "sharpness/preconditioned" if preconditioned_run else "sharpness/lambda_max"
        axes.plot(steps, [entry.get(key, math.nan) for entry in self.history], marker=".", label=key.split("/")[1])
        if any("sharpness/threshold" in entry for entry in self.history):
            thresholds = [entry.get("sharpness/threshold", math.nan) for entry in self.history]
            axes.plot(steps, thresholds, linestyle="--", color="black", label="stability threshold")
        if preconditioned_run:
            axes.plot(steps, [e["sharpness/lambda_max"] for e in self.history], alpha=0.5, label="lambda_max")
        axes.set_xlabel("optimizer step")
        axes.set_ylabel("top Hessian eigenvalue")
        axes.legend()
        figure.tight_layout()
        return figure

    def _measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any) -> None:
        started = time.perf_counter()
        params = [p for p in pl_module.parameters() if p.requires_grad]
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + trainer.global_step)
        with preserved_state(pl_module, parameters=False), torch.enable_grad(), torch.inference_mode(False):
            pl_module.train(self.mode == "train")
            try:
                values, solves = self._solve(trainer, pl_module, params, batch, generator)
            except FloatingPointError:
                values, solves = {"sharpness/lambda_max": math.nan}, 0
        seconds = time.perf_counter() - started
        self._measuring_seconds += seconds  # a skipped measurement still cost its time
        self._max_cost = max(self._max_cost, seconds)
        if not all(math.isfinite(v) for v in values.values()):
            self._warn("nan", "SharpnessMonitor: a measurement was not finite (NaN/inf); it is skipped.")
            self._warm.clear()
            return
        values["sharpness/seconds"] = seconds
        values["sharpness/hvps"] = float(solves)
        values["sharpness/overhead"] = self._measuring_seconds / max(self._training_seconds(), 1e-9)
        log_scalars(trainer, values)
        self.history.append({"step": trainer.global_step, **values})

    def _solve(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        params: list[Tensor],
        batch: Any,
        generator: torch.Generator,
    ) -> tuple[dict[str, float], int]:
        operator = self._operator(trainer, pl_module, params, batch)
        result = self._lanczos("hessian", operator.matvec, operator, generator)
        values = {"sharpness/lambda_max": float(result.eigenvalues[0])}
        if self.lambda_min:
            values["sharpness/lambda_min"] = result.lambda_min
        values.update({f"sharpness/lambda_{i + 1}": float(v) for i, v in enumerate(result.eigenvalues) if i > 0})
        values["sharpness/converged"] = float(result.converged)
        sharpness = values["sharpness/lambda_max"]
        optimizer = trainer.optimizers[0] if trainer.optimizers else None
        threshold = stability_threshold(optimizer) if optimizer is not None else None
        if optimizer is not None and _groups_differ(optimizer):
            self._warn(
                "groups",
                "SharpnessMonitor: the optimizer's param groups have different hyper-parameters; "
                "the threshold uses group 0's.",
            )
        if threshold is None:
            self._warn(
                "threshold",
                f"SharpnessMonitor: no stability threshold is known for {type(optimizer).__name__}; "
                "logging the eigenvalues only.",
            )
        elif threshold.preconditioned:
            assert optimizer is not None
            diagonal = adam_preconditioner(optimizer, params)
            if diagonal is not None:
                adam = self._lanczos("adam", preconditioned(operator.matvec, diagonal), operator, generator)
                values["sharpness/preconditioned"] = sharpness = float(adam.eigenvalues[0])
        if threshold is not None and (not threshold.preconditioned or "sharpness/preconditioned" in values):
            values["sharpness/threshold"] = threshold.value
            values["sharpness/ratio"] = sharpness / threshold.value
        if self.spherical:
            values["sharpness/spherical"] = flat_norm(params) ** 2 * values["sharpness/lambda_max"]
        if self.trace:
            estimate = hutchinson_trace(
                operator.matvec, operator.numel, self.trace_samples, params[0].device, generator, self.trace_method
            )
            values["sharpness/trace"], values["sharpness/trace_stderr"] = estimate.value, estimate.standard_error
        solves = operator.num_matvecs
        operator.release()
        if self.batch_sharpness:
            values["sharpness/batch_sharpness"] = self._batch_sharpness(trainer, pl_module, params)
        if self.smoothness and optimizer is not None:
            values.update(self._smoothness(trainer, pl_module, params, batch, float(optimizer.param_groups[0]["lr"])))
        return values, solves

    def _lanczos(self, name: str, matvec: Any, operator: HessianOperator, generator: torch.Generator) -> LanczosResult:
        previous = self._warm.get(name)
        start = (
            warm_start(previous, generator=generator) if previous else torch.randn(operator.numel, generator=generator)
        )
        start = start.to(operator.params[0].device, operator.dtype)
        result = lanczos(matvec, start, self.num_eigenvalues, self.tol, self.max_iter, smallest=self.lambda_min)
        self._warm[name] = [*result.eigenvectors, *([result.vector_min] if self.lambda_min else [])]
        if not result.converged:
            self._warn(
                f"converge-{name}",
                f"SharpnessMonitor: Lanczos stopped at max_iter={self.max_iter} before the "
                f"residuals reached tol={self.tol}; raise max_iter for exact values ('sharpness/converged' is 0).",
            )
        return result

    def _operator(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, params: list[Tensor], batch: Any
    ) -> HessianOperator:
        chunks = [(batch, 1.0)] if self._probe is None or self.data == "batch" else None

        def loss_chunks() -> Iterable[tuple[Tensor, float]]:
            source = chunks if chunks is not None else self._probe.chunks(self.chunk_size, pl_module.device)  # type: ignore[union-attr]
            for chunk, share in source:
                yield training_loss(pl_module, chunk, 0, self.loss_fn).float(), share

        single_chunk = chunks is not None or self.chunk_size is None or self.chunk_size >= self.num_samples
        reduce_sum, weight = self._data_parallel(trainer, batch)
        return HessianOperator(params, loss_chunks, reuse_graph=single_chunk, reduce_sum=reduce_sum, weight=weight)

    def _data_parallel(self, trainer: pl.Trainer, batch: Any) -> tuple[Any, float]:
        """All-reduced products: every rank measures on its own data, all see the mean, and stay in lockstep."""
        if trainer.world_size == 1:
            return None, 1.0
        local = float(len(self._probe) if self._probe is not None and self.data == "probe" else batch_size(batch))
        total = float(
            trainer.strategy.reduce(torch.tensor(local, device=trainer.strategy.root_device), reduce_op="sum")
        )
        return (lambda tensor: trainer.strategy.reduce(tensor, reduce_op="sum")), local / total

    def _batch_sharpness(self, trainer: pl.Trainer, pl_module: pl.LightningModule, params: list[Tensor]) -> float:
        if self._probe is None:
            raise RuntimeError("batch_sharpness needs the probe set (data='probe').")
        size = getattr(trainer.train_dataloader, "batch_size", None) or self.num_samples
        batches = list(self._probe.chunks(size, pl_module.device))[: self.batch_sharpness_batches]

        def operator(chunk: Any) -> HessianOperator:
            return HessianOperator(params, lambda: [(training_loss(pl_module, chunk, 0, self.loss_fn).float(), 1.0)])

        value = batch_sharpness(operator(chunk) for chunk, _ in batches)
        if trainer.world_size > 1:
            value = float(trainer.strategy.reduce(torch.tensor(value, device=pl_module.device), reduce_op="mean"))
        return value

    def _smoothness(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, params: list[Tensor], batch: Any, lr: float
    ) -> dict[str, float]:
        operator = self._operator(trainer, pl_module, params, batch)
        operator.reuse_graph = False
        steps = [lr * multiple for multiple in self.smoothness_steps]
        result = smoothness_along_gradient(params, lambda: (operator.loss(), operator.gradient()), steps)
        return {
            "smoothness/loss_range": result.loss_range,
            "smoothness/grad_predictiveness": result.grad_predictiveness,
            "smoothness/beta": result.beta,
        }

    def _training_seconds(self) -> float:
        return time.perf_counter() - self._train_start - self._measuring_seconds

    def _warn(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            rank_zero_warn(message)
