"""Lightning adapter: run GradInit once, before the first training step, then rescale the weights in place."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from functools import partial
from typing import Any, Literal

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from typing_extensions import override

from lightning_nt.common import (
    LossFn,
    batch_size,
    log_figure,
    log_scalars,
    log_text,
    prepare_batch,
    preserved_loader_rng,
    preserved_state,
    training_loss,
)
from lightning_nt.common.callback import Callback
from lightning_nt.common.capabilities import run_before_other_callbacks
from lightning_nt.common.distributed import mean_across_ranks
from lightning_nt.common.validation import ArgumentError, checked_arguments
from lightning_nt.gradinit.core import SEARCH_RULES, GradInitResult, apply_scales, gradinit

__all__ = ["GradInit"]


class GradInit(Callback):
    """Learn one initial scale per parameter tensor before training (Zhu et al., GradInit, NeurIPS 2021).

    Before the first training step, on batches of the train dataloader and through the module's own loss
    (``training_step`` with logging muted, or ``loss_fn``), the scales are searched so that one step of the
    module's configured optimizer (SGD or Adam, ``algorithm="auto"``) with learning rate ``eta`` (default: the
    optimizer's) lowers the loss most while the gradient norm stays below ``gamma``. Then every parameter is
    multiplied in place by its scale: parameter objects, the optimizer and the state-dict keys are unchanged.
    A parameter shared by several modules (tied weights, a shared block) gets one scale; a parameter the loss
    does not use keeps scale 1.

    Args:
        iterations: search iterations (each uses 2 or 3 loader batches as half-batches).
        lr: learning rate of the scale optimizer (official: 1e-2 for VGG without BN, 1e-3 for ResNet with BN).
        eta: learning rate of the simulated first step (default: the configured optimizer's base learning rate,
            ``initial_lr`` when a scheduler set one, e.g. the peak of a warm-up that starts at 0).
        gamma: gradient-norm constraint (1 for SGD on CIFAR; the official Transformer uses 1000 with Adam).
        algorithm: simulated optimizer: ``"auto"`` (from the configured one), ``"sgd"`` or ``"adam"``.
        normalize_grad: SGD step ``eta g/||g||`` (official default) instead of ``eta g``.
        min_scale: lower bound of weights' scales (biases' are >= 0).
        max_scale: upper bound of weights' scales (the official Transformer uses 100), ``None``: none.
        batch_overlap: the look-ahead batch shares half its examples with the gradient batch (official).
        second_order: backpropagate through the simulated step as well (slower; first order is the default).
        grad_clip: clip of each scale's gradient (0: none).
        loss_fn: ``loss_fn(pl_module, batch)``; default: ``training_step`` with logging muted.

    Example::

        trainer = pl.Trainer(max_epochs=10, callbacks=[GradInit(iterations=200)])
        trainer.fit(model, datamodule)   # GradInit runs first, then training starts from the rescaled weights
        callback.scales                  # {"features.0.weight": 0.37, ...}
    """

    reads_training_data_outside_step = True  # declared for DPStrategy (lightning_nt.common.capabilities)

    @checked_arguments(**SEARCH_RULES)
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
        if max_scale is not None and not max_scale > min_scale:
            raise ArgumentError(f"`max_scale` must be > min_scale={min_scale}, got {max_scale}.")
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
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Run first: every other callback's ``on_train_start`` (a monitor's step-0 reference) sees GradInit's
        weights, the ones training starts from, whatever the order of ``callbacks=``."""
        super().setup(trainer, pl_module, stage)
        if stage == "fit":
            run_before_other_callbacks(trainer, self)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._done or trainer.global_step > 0 or trainer.ckpt_path is not None:
            rank_zero_info("GradInit: resuming a run, the initialisation search is skipped.")
            self._done = True
            return
        if not any(bool(p.detach().any()) for p in pl_module.parameters() if p.requires_grad):
            rank_zero_warn(
                "GradInit has nothing to scale: every trainable parameter is zero (SubspaceTraining's subspace "
                "coordinates start at 0, and the weights it trains around are fixed), so the search is skipped and "
                "the weights are left as they are. To search an initialisation for a subspace model, rescale the "
                "module with `lightning_nt.gradinit.gradinit` and `apply_scales` before attaching "
                "SubspaceTraining, or leave GradInit out."
            )
            self._done = True
            return
        optimizer = trainer.optimizers[0] if trainer.optimizers else None
        schedules = [type(config.scheduler).__name__ for config in trainer.lr_scheduler_configs]
        algorithm, eta = self._simulated_optimizer(optimizer, schedules[0] if schedules else None)
        dataloader = trainer.train_dataloader
        reduce_mean = partial(mean_across_ranks, trainer) if trainer.world_size > 1 else None
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
        self._warn_if_held_at_a_bound()

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"done": self._done, "scales": self.scales}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._done = bool(state_dict["done"])
        self.scales = dict(state_dict["scales"])

    def _simulated_optimizer(
        self, optimizer: torch.optim.Optimizer | None, schedule: str | None = None
    ) -> tuple[str, float]:
        """The optimizer whose first step is simulated (``"sgd"`` or ``"adam"``) and its learning rate ``eta``."""
        is_adam = isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW)
        if self.algorithm == "auto" and not is_adam and not isinstance(optimizer, torch.optim.SGD):
            rank_zero_warn(f"GradInit: {type(optimizer).__name__} is neither SGD nor Adam; simulating an SGD step.")
        algorithm = self.algorithm if self.algorithm != "auto" else ("adam" if is_adam else "sgd")
        if self.eta is not None:
            return algorithm, self.eta
        if optimizer is None:
            raise ValueError("GradInit needs `eta=` when the module configures no optimizer.")
        return algorithm, _base_learning_rate(optimizer, schedule)

    def _report(self, trainer: pl.Trainer) -> None:
        assert self.result is not None
        result = self.result
        log_scalars(
            trainer,
            {
                "gradinit/grad_norm": result.grad_norms[-1],
                "gradinit/constraint_iterations": result.constraint_iterations,
                "gradinit/lookahead_loss_start": result.lookahead_loss_start,
                "gradinit/lookahead_loss_end": result.lookahead_loss_end,
            },
        )
        unused = set(result.unused)
        rows = "\n".join(f"| {n} | {s:.4g}{' (unused)' if n in unused else ''} |" for n, s in self.scales.items())
        log_text(trainer, "gradinit/scales", "| parameter | scale |\n|---|---|\n" + rows)
        if trainer.is_global_zero and trainer.loggers:
            log_figure(trainer, "gradinit/scales", self.figure())
        rank_zero_info(self.summary())

    def summary(self) -> str:
        """What the search changed (the scales) and the look-ahead loss it lowered, in words (logged at info level).

        Example::

            GradInit: 300 iterations (52 on the gradient-norm constraint); look-ahead loss 2850 -> 2.295; weight
            scales in [0.3, 0.78].
        """
        result = self.result
        if result is None:
            return "GradInit: no search has run in this fit (skipped when resuming, or with nothing to scale)."
        if result.diverged:
            return "GradInit: the search diverged (NaN/inf); the original weights were kept."
        weights = [s for n, s in self.scales.items() if not n.split(".")[-1].startswith("bias")] or [1.0]
        text = (
            f"GradInit: {len(result.grad_norms)} iterations ({result.constraint_iterations} on the gradient-norm "
            f"constraint); look-ahead loss {result.lookahead_loss_start:.4g} -> {result.lookahead_loss_end:.4g}; "
            f"weight scales in [{min(weights):.3g}, {max(weights):.3g}]."
        )
        if result.unused:
            text += f" Parameters the loss does not use keep scale 1: {result.unused}."
        return text

    def figure(self) -> Any:
        """The learned scale of every parameter tensor, one labelled bar each in module order (log axis).

        The line at 1 marks "unchanged"; scales held at ``min_scale`` / ``max_scale`` and parameters the loss does
        not use are drawn in their own colors; the title gives the look-ahead loss before and after the search.
        """
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FuncFormatter

        names, values = list(self.scales), list(self.scales.values())
        unused = set(self.result.unused) if self.result is not None else set()
        colors = [self._bar_color(name, value, unused) for name, value in zip(names, values)]
        figure, axes = plt.subplots(figsize=(7, max(3.0, 0.28 * len(names) + 1.5)))
        rows = range(len(names))
        axes.barh(rows, values, color=colors)
        for row, value in zip(rows, values):
            axes.annotate(f"{value:.3g}", (value, row), xytext=(3, 0), textcoords="offset points", va="center", size=7)
        axes.set_yticks(rows, names, fontsize=7)
        axes.invert_yaxis()
        axes.set_xscale("log")
        plain = FuncFormatter(lambda x, _: f"{x:g}")
        axes.xaxis.set_major_formatter(plain)
        axes.xaxis.set_minor_formatter(plain)
        axes.axvline(1.0, color="black", linewidth=0.8, label="1 = weights unchanged")
        for color, label in (("tab:red", "held at min_scale / max_scale"), ("tab:gray", "unused by the loss")):
            if color in colors:
                axes.barh([], [], color=color, label=label)
        axes.set_xlabel("GradInit scale (log axis): weights are multiplied by it")
        title = "GradInit scales"
        if self.result is not None and not self.result.diverged:
            start, end = self.result.lookahead_loss_start, self.result.lookahead_loss_end
            title += f": look-ahead loss {start:.4g} -> {end:.4g}"
        axes.set_title(title, fontsize=10)
        axes.legend(fontsize=7, loc="lower right")
        figure.tight_layout()
        return figure

    def _bar_color(self, name: str, value: float, unused: set[str]) -> str:
        if name in unused:
            return "tab:gray"
        return "tab:red" if self._held_at_a_bound(name, value) else "tab:blue"

    def _held_at_a_bound(self, name: str, value: float) -> bool:
        """Whether a weight's scale ended at ``min_scale`` or ``max_scale``: the search wanted to go further."""
        limits = [self.min_scale] + ([self.max_scale] if self.max_scale is not None else [])
        return not name.endswith("bias") and any(math.isclose(value, limit, rel_tol=1e-6) for limit in limits)

    def _warn_if_held_at_a_bound(self) -> None:
        """A weight shrunk to ``min_scale`` carries 1% of its signal (at the default) and can stall training for
        epochs: say which, and what to change, instead of leaving it to the scale table."""
        assert self.result is not None
        unused = set(self.result.unused)
        held = {n: s for n, s in self.scales.items() if n not in unused and self._held_at_a_bound(n, s)}
        if held:
            start, end = self.result.lookahead_loss_start, self.result.lookahead_loss_end
            rank_zero_warn(
                f"GradInit: the scales of {sorted(held)} ended at a bound (min_scale={self.min_scale}, "
                f"max_scale={self.max_scale}): the search would have moved them further (look-ahead loss "
                f"{start:.4g} -> {end:.4g}). A weight shrunk to min_scale can stall training for several epochs. "
                "Check that the network needs a new initialisation at all (one that trains from its own rarely "
                "does), or search more gently: a smaller `lr`, fewer `iterations`, or a larger `min_scale`."
            )


def _base_learning_rate(optimizer: torch.optim.Optimizer, schedule: str | None) -> float:
    """The learning rate the optimizer's first step is meant to have: a scheduler's base ``initial_lr`` (a warm-up
    starts below it, often at 0), else ``lr``, of the first parameter group (with a warning if the groups differ)."""
    rates = [float(group.get("initial_lr", group["lr"])) for group in optimizer.param_groups]
    if len(set(rates)) > 1:
        rank_zero_warn(
            f"GradInit: the optimizer's parameter groups have different learning rates {rates}; the first step is "
            f"simulated with group 0's ({rates[0]}) for every parameter. Pass `eta=` to choose another."
        )
    if not rates[0] > 0:
        source = f"the schedule {schedule} starts" if schedule else "the optimizer has"
        raise ValueError(
            f"GradInit can't simulate a first step of learning rate {rates[0]} ({source} there and no base "
            "learning rate `initial_lr` is set): pass `eta=` (e.g. the peak learning rate of the schedule)."
        )
    return rates[0]


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
