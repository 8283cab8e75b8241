"""Lightning adapter: is there still gradient signal? Kim & Ramdas' cross test of ``E[grad loss] = 0`` in training."""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
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
    prepare_batch,
    preserved_state,
    select_examples,
    training_loss,
)
from lightning_nt.common.callback import Callback
from lightning_nt.common.distributed import sum_across_ranks
from lightning_nt.common.errors import explained_errors
from lightning_nt.common.loss import example_losses
from lightning_nt.common.state import continues_run
from lightning_nt.common.validation import (
    above,
    at_least,
    below,
    checked_arguments,
    renamed_arguments,
    renamed_property,
)
from lightning_nt.stats.cross import p_value_or_no_evidence, ratio_or_limit, split_indices
from lightning_nt.stats.gradient import directional_derivatives, per_example_losses

__all__ = ["GradientSignalTest"]

TAGS = ("gradtest/statistic", "gradtest/p_value", "gradtest/reject", "gradtest/signal")


class GradientSignalTest(Callback):
    """Tests ``H0: E[grad loss] = 0`` during training: does the population gradient still carry signal?

    Every ``every_n_steps`` optimizer steps (step 0 included), ``num_examples`` held-out examples (the
    first of the validation loader, ``data="val"``) or training examples (``data="train"``) cached once are
    split in two halves with a fixed seeded split. The mean gradient ``v`` of the second half comes from one
    backward; for every example ``i`` of the first half ``f_i = <grad l_i, v>`` is the directional derivative
    of its loss along ``v``, all of them from one batched forward-mode JVP (per-example gradients are never
    formed). ``f`` is Kim & Ramdas' cross U-statistic for the mean of the per-example gradients:
    ``gradtest/signal`` = mean ``f`` is an unbiased estimate of ``||E grad l||²``, and
    ``gradtest/statistic`` = ``sqrt(n1) mean f / sd f`` is ``N(0, 1)`` under ``H0`` whatever the number of
    parameters (one-sided: large values reject; ``gradtest/p_value``, ``gradtest/reject`` at ``alpha``).

    The losses are taken in eval mode (dropout off, BatchNorm on its running statistics), so that the
    examples' losses are independent of each other, as the test needs. A measurement leaves the run exactly as
    it was (parameters, ``.grad``, buffers, RNG, modes); the optimizer is not touched. A run resumed with
    ``ckpt_path``, or another ``fit`` on the same Trainer, goes on with the run's ``.history``; a new Trainer without
    a checkpoint starts a new one (:func:`~lightning_nt.common.state.continues_run`).

    Args:
        every_n_steps: optimizer steps between measurements.
        num_examples: examples per measurement (``n``; ``n // 2`` of them give the ``f_i``), at least 4.
        data: ``"val"`` (held-out examples: the test of the population gradient) or ``"train"`` (the first
            training examples: the gradient of the training objective on them).
        alpha: level of ``gradtest/reject``.
        loss_fn: ``loss_fn(pl_module, batch)`` returning one loss per example (``[B]``, e.g.
            ``F.cross_entropy(..., reduction="none")``: the cheapest) or their mean; default: the module's
            ``training_step`` with logging muted, on one-example batches under ``torch.func.vmap``.
        seed: seed of the split.

    Examples:
        >>> GradientSignalTest(every_n_steps=50, num_examples=256).state_key
        "GradientSignalTest{'every_n_steps': 50, 'num_samples': 256, 'data': 'val', 'alpha': 0.05, 'seed': 0}"
    """

    num_samples = renamed_property("num_samples", "num_examples")

    @checked_arguments(every_n_steps=at_least(1), num_examples=at_least(4), alpha=(above(0), below(1)))
    @renamed_arguments(num_samples="num_examples")
    def __init__(
        self,
        every_n_steps: int = 100,
        num_examples: int = 512,
        data: Literal["val", "train"] = "val",
        alpha: float = 0.05,
        loss_fn: LossFn | None = None,
        seed: int = 0,
    ) -> None:
        self.every_n_steps, self.num_examples, self.data = every_n_steps, num_examples, data
        self.alpha, self.loss_fn, self.seed = alpha, loss_fn, seed
        self.history: list[dict[str, float]] = []
        self._probe: ProbeSet | None = None
        self._restored = False
        self._last_step = -1
        self._warned: set[str] = set()
        self._loss_fn_gives_vector: bool | None = None  # learnt at the first measurement

    @property
    def reads_training_data_outside_step(self) -> bool:
        """With ``data="train"`` the test reads training examples outside the training step (declared for
        DPStrategy, :mod:`lightning_nt.common.capabilities`); held-out examples are not private training data."""
        return self.data == "train"

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(
            every_n_steps=self.every_n_steps,
            num_samples=self.num_examples,  # old name kept in the key: older checkpoints load
            data=self.data,
            alpha=self.alpha,
            seed=self.seed,
        )

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._probe = ProbeSet.from_trainer(  # each example once: in both halves it would break the null
            trainer, self.num_examples, self.data, argument="data", distinct_across_ranks=True
        )
        if len(self._probe) < 4:
            raise ValueError(
                f"GradientSignalTest needs at least 4 examples, the {self.data} data gave {len(self._probe)}."
            )
        if len(self._probe) < self.num_examples:
            self._warn(
                "few",
                f"GradientSignalTest(num_examples={self.num_examples}): the {self.data} data hold only "
                f"{len(self._probe)} examples; every measurement uses those {len(self._probe)}.",
            )
        first_half = len(self._probe) // 2 * trainer.world_size
        if first_half < _FEW_FOR_THE_NORMAL:
            self._warn(
                "small",
                f"GradientSignalTest: about {first_half} examples in the first half of the split; the p-values take "
                f"T as N(0, 1), which makes the test anti-conservative at such sizes (for Gaussian terms T is "
                f"Student's t with n1 - 1 degrees of freedom: a level-0.05 test rejects about 6% of the time at "
                f"n1 = 16, 7% at 8). Use num_examples of a few hundred where the data allow.",
            )
        if not continues_run(trainer, self._restored):  # a new Trainer without a checkpoint: a new run
            self.history = []
        self._restored = False
        self._last_step = self.history[-1]["step"] if self.history else -1  # a resumed run measured before it stopped
        step = trainer.global_step
        measured = self._last_step == step
        if step % self.every_n_steps == 0 and not measured:
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
        if self.history and trainer.is_global_zero and trainer.loggers:
            log_figure(trainer, "gradtest/signal_test", self.figure())

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict["history"])
        self._restored = True

    def figure(self) -> Any:
        """The statistic and the gradient signal over training steps, with the rejection threshold."""
        import matplotlib.pyplot as plt

        figure, (top, bottom) = plt.subplots(2, 1, figsize=(6, 5), sharex=True)
        steps = [entry["step"] for entry in self.history]
        top.plot(steps, [entry["gradtest/statistic"] for entry in self.history], marker=".")
        threshold = float(torch.special.ndtri(torch.tensor(1 - self.alpha, dtype=torch.float64)))
        top.axhline(threshold, color="black", linestyle="--", label=f"reject at alpha={self.alpha}")
        top.set_ylabel("statistic T")
        top.legend()
        bottom.plot(steps, [max(entry["gradtest/signal"], 1e-30) for entry in self.history], marker=".")
        bottom.set_yscale("log")
        bottom.set_ylabel("signal (||E grad||² estimate)")
        bottom.set_xlabel("optimizer step")
        figure.tight_layout()
        return figure

    def _measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._last_step = trainer.global_step
        assert self._probe is not None
        batch = prepare_batch(trainer, next(iter(self._probe.chunks()))[0], probe=self.data)
        with (
            preserved_state(pl_module, parameters=False),
            torch.enable_grad(),
            torch.inference_mode(False),
            _explained_vmap_failures(),
        ):
            pl_module.eval()
            moments = self._moments(trainer, pl_module, batch)
        count, mean, variance = moments[0], moments[1] / moments[0], moments[2]
        if not (math.isfinite(mean) and math.isfinite(variance)):
            self._warn("nan", "GradientSignalTest: a measurement was not finite (NaN/inf); skipped.")
            return
        if variance == 0:  # a sum of squares: never negative
            self._warn(
                "spread",
                "GradientSignalTest: the directional derivatives had no spread (all equal, e.g. every gradient zero); "
                "the statistic is its limit, as in `cross_mean_test`: 0 (p = 1) when they are all zero, else +-inf.",
            )
        numerator, spread = torch.tensor([math.sqrt(count) * mean, math.sqrt(variance)], dtype=torch.float64)
        statistic = ratio_or_limit(numerator, spread)
        p_value = float(p_value_or_no_evidence(statistic, torch.tensor(mean), variance == 0))
        statistic = float(statistic)
        values = {
            "gradtest/statistic": statistic,
            "gradtest/p_value": p_value,
            "gradtest/reject": float(p_value <= self.alpha),
            "gradtest/signal": mean,
        }
        log_scalars(trainer, values)
        self.history.append({"step": trainer.global_step, **values})

    def _moments(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any) -> list[float]:
        """``[n1, sum f, sample variance of f]`` over every rank's first half, the direction from all second halves."""
        parameters = [(name, p) for name, p in pl_module.named_parameters() if p.requires_grad]
        first, second = split_indices(batch_size(batch), self.seed, pl_module.device)
        second_losses = self._losses(pl_module, select_examples(batch, second))
        gradient = torch.autograd.grad(second_losses.float().sum(), [p for _, p in parameters], allow_unused=True)
        direction = [torch.zeros_like(p) if g is None else g for g, (_, p) in zip(gradient, parameters)]
        count = torch.tensor(float(len(second)), device=pl_module.device)
        direction, count = sum_across_ranks(trainer, direction), sum_across_ranks(trainer, count)
        direction = [g / count for g in direction]
        _, scores = directional_derivatives(
            pl_module, self._losses, select_examples(batch, first), parameters, direction
        )
        scores = scores.detach().to(torch.float64)
        sums = torch.stack([torch.tensor(float(len(scores)), dtype=torch.float64, device=scores.device), scores.sum()])
        sums = sum_across_ranks(trainer, sums)
        centred = sum_across_ranks(trainer, (scores - sums[1] / sums[0]).square().sum())
        return [float(sums[0]), float(sums[1]), float(centred) / (float(sums[0]) - 1)]

    def _losses(self, module: pl.LightningModule, batch: Any) -> Tensor:
        """One loss per example: ``loss_fn``'s own vector, or the scalar loss of one-example batches under vmap."""
        if self._loss_fn_gives_vector is not False:  # a loss_fn returning a mean is not called on whole batches again
            values = example_losses(module, batch, self.loss_fn)
            self._loss_fn_gives_vector = values is not None
            if values is not None:
                return values
        with _explained_one_example_failures(self.loss_fn is None):
            return per_example_losses(lambda example: training_loss(module, example, 0, self.loss_fn), batch, module)

    def _warn(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            rank_zero_warn(message)


_FEW_FOR_THE_NORMAL = 50  # first-half examples below which N(0, 1) p-values are visibly anti-conservative


def _explained_vmap_failures() -> AbstractContextManager[None]:
    """torch.func's failures to differentiate a vmapped loss, turned into the reason and the fix."""
    return explained_errors(
        lambda text: "vmap" in text and not text.startswith("GradientSignalTest"),  # not one explained already
        lambda error: (
            "GradientSignalTest forms each example's loss with torch.func.vmap when `loss_fn` gives no per-example "
            f"vector, and PyTorch can't differentiate through that here ({error}). Activation checkpointing "
            f"(torch.utils.checkpoint) is one such case. {_LOSS_FN_FIX}"
        ),
    )


_LOSS_FN_FIX = (
    "Pass `loss_fn(pl_module, batch)` returning the per-example losses [B], "
    "e.g. F.cross_entropy(logits, y, reduction='none')."
)


@contextmanager
def _explained_one_example_failures(training_step: bool) -> Iterator[None]:
    """Any failure of the loss on one-example batches (a ``.squeeze()`` that turns ``[1]`` into ``[]``, an operation
    vmap can't batch) raised again as a ``RuntimeError`` naming the reason and ``loss_fn``, chained to it. A missing
    derivative passes unchanged: the caller falls back on it (``NotImplementedError``) or explains it
    (:func:`~lightning_nt.common.autodiff.differentiable_kernels`)."""
    try:
        yield
    except NotImplementedError:
        raise
    except Exception as error:
        if re.search(r"derivative for .* is not implemented", str(error)):
            raise
        source = "the module's training_step" if training_step else "`loss_fn`"
        raise RuntimeError(
            f"GradientSignalTest needs one loss per example; without a per-example `loss_fn` it calls {source} on "
            f"one-example batches under torch.func.vmap, and that failed ({type(error).__name__}: {error}). Code "
            "that only works on larger batches (`.squeeze()` turning [1] into [], batch statistics) fails there. "
            f"{_LOSS_FN_FIX}"
        ) from error
