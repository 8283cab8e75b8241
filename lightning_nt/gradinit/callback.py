"""Lightning adapter: run GradInit once, before the first training step, then rescale the weights in place."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any, Literal

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from typing_extensions import override

from lightning_nt.common import (
    LossFn,
    batch_size,
    check_choice,
    log_figure,
    log_scalars,
    log_text,
    prepare_batch,
    preserved_loader_rng,
    preserved_state,
    training_loss,
)
from lightning_nt.gradinit.core import GradInitResult, apply_scales, gradinit

__all__ = ["GradInit"]


class GradInit(pl.Callback):
    """Learn one initial scale per parameter tensor before training (Zhu et al., GradInit, NeurIPS 2021).

    Before the first training step, on batches of the train dataloader and through the module's own loss
    (``training_step`` with logging muted, or ``loss_fn``), the scales are searched so that one step of the
    module's configured optimizer (SGD or Adam, ``algorithm="auto"``) with learning rate ``eta`` (default: the
    optimizer's) lowers the loss most while the gradient norm stays below ``gamma``. Then every parameter is
    multiplied in place by its scale: parameter objects, the optimizer and the state-dict keys are unchanged.

    Args:
        iterations: search iterations (each uses 2 or 3 loader batches as half-batches).
        lr: learning rate of the scale optimizer (official: 1e-2 for VGG without BN, 1e-3 for ResNet with BN).
        eta: learning rate of the simulated first step (default: the configured optimizer's).
        gamma: gradient-norm constraint (1 for SGD on CIFAR; the official Transformer uses 1000 with Adam).
        algorithm: simulated optimizer: ``"auto"`` (from the configured one), ``"sgd"`` or ``"adam"``.
        normalize_grad: SGD step ``eta g/||g||`` (official default) instead of ``eta g``.
        min_scale: lower bound of weights' scales (biases' are >= 0).
        max_scale: upper bound of weights' scales (the official Transformer uses 100), ``None``: none.
        batch_overlap: the look-ahead batch shares half its examples with the gradient batch (official).
        second_order: backpropagate through the simulated step as well (slower; first order is the default).
        grad_clip: clip of each scale's gradient.
        loss_fn: ``loss_fn(pl_module, batch)``; default: ``training_step`` with logging muted.

    Example::

        trainer = pl.Trainer(max_epochs=10, callbacks=[GradInit(iterations=200)])
        trainer.fit(model, datamodule)   # GradInit runs first, then training starts from the rescaled weights
        callback.scales                  # {"features.0.weight": 0.37, ...}
    """

    reads_training_data_outside_step = True  # declared for DPStrategy (lightning_nt.common.capabilities)

    def __init__(
        self,
        iterations: int = 390,
        lr: float = 1e-2,
        eta: float | None = None,
        gamma: float = 1.0,
        algorithm: Literal["auto", "sgd", "adam"] = "auto",
        normalize_grad: bool = True,
        min_scale: float = 0.01,
        max_scale: float | None = None,
        batch_overlap: bool = True,
        second_order: bool = False,
        grad_clip: float = 1.0,
        loss_fn: LossFn | None = None,
    ) -> None:
        if iterations < 1:
            raise ValueError(f"`iterations` must be >= 1, got {iterations}.")
        for name, value in (("lr", lr), ("gamma", gamma), ("min_scale", min_scale), ("grad_clip", grad_clip)):
            if not value > 0:
                raise ValueError(f"`{name}` must be > 0, got {value}.")
        if eta is not None and not eta > 0:
            raise ValueError(f"`eta` must be > 0 (or None for the optimizer's learning rate), got {eta}.")
        if max_scale is not None and not max_scale > min_scale:
            raise ValueError(f"`max_scale` must be > min_scale={min_scale}, got {max_scale}.")
        check_choice("algorithm", algorithm, ("auto", "sgd", "adam"))
        self.iterations, self.lr, self.eta, self.gamma, self.algorithm = iterations, lr, eta, gamma, algorithm
        self.normalize_grad, self.min_scale, self.max_scale = normalize_grad, min_scale, max_scale
        self.batch_overlap, self.second_order, self.grad_clip, self.loss_fn = (
            batch_overlap,
            second_order,
            grad_clip,
            loss_fn,
        )
        self.scales: dict[str, float] = {}
        self.result: GradInitResult | None = None
        self._done = False

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._done or trainer.global_step > 0 or trainer.ckpt_path is not None:
            rank_zero_info("GradInit: resuming a run, the initialisation search is skipped.")
            self._done = True
            return
        optimizer = trainer.optimizers[0] if trainer.optimizers else None
        algorithm, eta = self._simulated_optimizer(optimizer)
        dataloader = trainer.train_dataloader
        reduce_mean = (lambda t: trainer.strategy.reduce(t, reduce_op="mean")) if trainer.world_size > 1 else None
        bar = _progress_bar(trainer, self.iterations)
        with (
            preserved_state(pl_module, parameters=False, grads=False),
            preserved_loader_rng(dataloader),
        ):
            self.result = gradinit(
                pl_module,
                lambda module, batch: training_loss(module, batch, 0, self.loss_fn),
                _endless(trainer, dataloader),
                iterations=self.iterations,
                lr=self.lr,
                eta=eta,
                gamma=self.gamma,
                algorithm=algorithm,
                normalize_grad=self.normalize_grad,
                min_scale=self.min_scale,
                max_scale=self.max_scale,
                grad_clip=self.grad_clip,
                batch_overlap=self.batch_overlap,
                second_order=self.second_order,
                reduce_mean=reduce_mean,
                progress=lambda i, r: bar.update(1) if bar is not None else None,
            )
        if bar is not None:
            bar.close()
        self._done = True
        if self.result.diverged:
            rank_zero_warn("GradInit diverged (NaN/inf): the original weights are kept. Try a smaller `lr` or `eta`.")
            return
        self.scales = self.result.scales
        apply_scales(pl_module, self.scales)
        self._report(trainer)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"done": self._done, "scales": self.scales}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._done = bool(state_dict["done"])
        self.scales = dict(state_dict["scales"])

    def _simulated_optimizer(self, optimizer: torch.optim.Optimizer | None) -> tuple[str, float]:
        is_adam = isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW)
        if self.algorithm == "auto" and not is_adam and not isinstance(optimizer, torch.optim.SGD):
            rank_zero_warn(f"GradInit: {type(optimizer).__name__} is neither SGD nor Adam; simulating an SGD step.")
        algorithm = self.algorithm if self.algorithm != "auto" else ("adam" if is_adam else "sgd")
        if self.eta is not None:
            return algorithm, self.eta
        if optimizer is None:
            raise ValueError("GradInit needs `eta=` when the module configures no optimizer.")
        return algorithm, float(optimizer.param_groups[0]["lr"])

    def _report(self, trainer: pl.Trainer) -> None:
        assert self.result is not None
        lookahead = self.result.lookahead_losses
        metrics = {
            "gradinit/grad_norm": self.result.grad_norms[-1],
            "gradinit/constraint_iterations": self.result.constraint_iterations,
        }
        if lookahead:
            metrics |= {"gradinit/lookahead_loss_start": lookahead[0], "gradinit/lookahead_loss_end": lookahead[-1]}
        log_scalars(trainer, metrics)
        table = "| parameter | scale |\n|---|---|\n" + "\n".join(f"| {n} | {s:.4g} |" for n, s in self.scales.items())
        log_text(trainer, "gradinit/scales", table)
        if trainer.is_global_zero and trainer.loggers:
            log_figure(trainer, "gradinit/scales", self.figure())

    def figure(self) -> Any:
        """The learned scale of every parameter tensor, in module order (log scale)."""
        import matplotlib.pyplot as plt

        figure, axes = plt.subplots(figsize=(max(6, 0.25 * len(self.scales)), 4))
        axes.bar(range(len(self.scales)), list(self.scales.values()))
        axes.set_yscale("log")
        axes.axhline(1.0, color="black", linewidth=0.8)
        axes.set_xticks(range(len(self.scales)), list(self.scales), rotation=90, fontsize=7)
        axes.set_ylabel("GradInit scale")
        figure.tight_layout()
        return figure


def _endless(trainer: pl.Trainer, dataloader: Any) -> Iterator[Any]:
    """The train loader's batches, on the module's device, over and over."""
    for batch in itertools.chain.from_iterable(itertools.repeat(dataloader)):
        if batch_size(batch) > 0:  # Poisson-sampled loaders can yield empty batches
            yield prepare_batch(trainer, batch)


def _progress_bar(trainer: pl.Trainer, total: int) -> Any:
    if not trainer.is_global_zero or trainer.progress_bar_callback is None:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="GradInit", leave=False)
