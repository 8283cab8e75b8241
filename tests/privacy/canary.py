"""Canary harness: what a DP run releases, with and without one canary example, compared channel by channel.

A canary is one training example whose gradient is huge (its input scaled by ``CANARY_SCALE``). Two fits are run
on the same data, the same Poisson batches (``DPStrategy(seed=...)``) and the same noise draws (the global RNG is
seeded): one with the canary in place of an ordinary example, one without. DP-SGD promises that the canary can
only act through the noisy update, where its clipped gradient moves the summed update by at most ``2 C``
(replace-one neighbours). Every other channel must be identical: logged scalars, callback metrics, tensors left
on the module (after a ``torch.save`` round trip) or reachable from the strategy and its optimizer, and the
checkpoint apart from the weights and the optimizer state, and the module's buffers (saved with the weights).
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.loggers import Logger
from torch.utils.data import DataLoader, Dataset

from tests.helpers import TinyClassifier, classification_data, tiny_trainer

CANARY_SCALE = 1e4
SAMPLING_SEED = 7


class CanaryData(Dataset):
    """``classification_data(num_samples)`` with example ``canary_index`` replaced by a canary, if given.

    The canary is an example with its input multiplied by ``scale`` (``nan`` makes a poisoned record).
    """

    def __init__(self, num_samples: int, canary_index: int | None, scale: float = CANARY_SCALE) -> None:
        self.data = classification_data(num_samples)
        self.canary_index, self.scale = canary_index, scale

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        inputs, label = self.data[index]
        if index == self.canary_index:
            return inputs * self.scale, (label + 1) % 3
        return inputs, label


class Audited(TinyClassifier):
    """SGD with lr 1 (an update is minus the released gradient); logs nothing from the private batch itself."""

    canary_scale = CANARY_SCALE

    def __init__(self, canary_index: int | None = None, num_samples: int = 64, batch_size: int = 16) -> None:
        super().__init__(num_samples=num_samples, batch_size=batch_size)
        self.canary_index = canary_index

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        inputs, labels = batch
        return F.cross_entropy(self(inputs), labels)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=1.0)

    def train_dataloader(self) -> DataLoader:
        data = CanaryData(self.num_samples, self.canary_index, self.canary_scale)
        return DataLoader(data, batch_size=self.batch_size)


class MemoryLogger(Logger):
    """Every scalar any code logs, with its step."""

    def __init__(self) -> None:
        super().__init__()
        self.scalars: dict[str, list[tuple[int | None, float]]] = {}

    @property
    def name(self) -> str:
        return "memory"

    @property
    def version(self) -> int:
        return 0

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        for tag, value in metrics.items():
            self.scalars.setdefault(tag, []).append((step, float(value)))

    def log_hyperparams(self, *args: Any, **kwargs: Any) -> None:
        pass


@dataclass
class Releases:
    """Everything a fit released, by channel."""

    weights: dict[str, torch.Tensor]
    logged: dict[str, list[tuple[int | None, float]]]
    callback_metrics: dict[str, float]
    module_tensors: dict[str, torch.Tensor]
    strategy_tensors: dict[str, torch.Tensor]
    checkpoint: dict[str, Any]
    epsilon: float
    steps: int
    buffers: dict[str, torch.Tensor] = field(default_factory=dict)  # saved and released with the weights, no noise
    extra: dict[str, Any] = field(default_factory=dict)


def first_batch_indices(make_strategy: Callable[[], Any], module: Callable[..., Audited] = Audited) -> list[int]:
    """The dataset indices of the first Poisson batch that ``make_strategy()`` draws (a scouting fit)."""
    seen: list[int] = []

    class Scout(pl.Callback):
        def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
            if batch_idx == 0:
                data = classification_data(pl_module.num_samples)
                seen.extend(i for i in range(len(data)) for row in batch[0] if torch.equal(row, data[i][0]))

    fit(make_strategy(), module(), callbacks=[Scout()], max_steps=1)
    return seen


def fit(strategy: Any, module: pl.LightningModule, callbacks: list[pl.Callback] = (), **kwargs: Any) -> pl.Trainer:
    pl.seed_everything(0)
    trainer = tiny_trainer(None, strategy=strategy, callbacks=list(callbacks), limit_val_batches=0, **kwargs)
    trainer.fit(module)
    return trainer


def releases_of(
    make_strategy: Callable[[], Any],
    canary_index: int | None,
    directory: Path,
    module: Callable[..., Audited] = Audited,
    **trainer_kwargs: Any,
) -> Releases:
    """Fit ``module(canary_index)`` under ``make_strategy()`` and gather every channel it released."""
    pl.seed_everything(0)
    model = module(canary_index)
    logger = MemoryLogger()
    strategy = make_strategy()
    trainer = fit(strategy, model, logger=logger, **trainer_kwargs)
    path = directory / "after_fit.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=False)
    noisy = {"state_dict", "optimizer_states"}  # what the noisy update itself produced
    return Releases(
        weights={n: p.detach().clone() for n, p in model.named_parameters()},
        logged=logger.scalars,
        callback_metrics={k: float(v) for k, v in trainer.callback_metrics.items()},
        module_tensors=tensors_left_on(model),
        strategy_tensors=tensors_reachable(strategy, allowed=_noisy_tensors(model, strategy)),
        checkpoint={k: v for k, v in checkpoint.items() if k not in noisy},
        epsilon=strategy.epsilon,
        steps=trainer.global_step,
        buffers={n: b.detach().cpu().clone() for n, b in model.named_buffers()},
    )


def tensors_left_on(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor a ``torch.save(module)`` carries besides the parameters, their (noisy) ``.grad`` and buffers.

    Attributes set on the module's submodules (activations) and on its parameters (``summed_grad``,
    ``grad_sample``, ``_norm_sample``) are found after a pickling round trip, as a user who saved the model
    would find them.
    """
    buffer = io.BytesIO()
    torch.save(module, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    found: dict[str, torch.Tensor] = {}
    for prefix, submodule in loaded.named_modules():
        state = {k: v for k, v in vars(submodule).items() if k not in ("_parameters", "_buffers", "_modules")}
        _collect(state, f"{prefix}.", found, allowed=set(), depth=3)
        for name, parameter in submodule.named_parameters(recurse=False):
            _collect(vars(parameter), f"{prefix}.{name}.", found, allowed=set(), depth=3)
    return found


def tensors_reachable(strategy: Any, allowed: set[int]) -> dict[str, torch.Tensor]:
    """Tensors reachable from the strategy's attributes (its optimizer included), except the ``allowed`` ones."""
    state = {k: v for k, v in vars(strategy).items() if k not in ("_lightning_module", "_model", "accelerator")}
    found: dict[str, torch.Tensor] = {}
    _collect(state, "strategy.", found, allowed, depth=5)
    return found


def _noisy_tensors(module: torch.nn.Module, strategy: Any) -> set[int]:
    """Parameters, their noisy gradients and the optimizer state built from them."""
    ids = set()
    for p in module.parameters():
        ids.add(id(p))
        if p.grad is not None:
            ids.add(id(p.grad))
    for optimizer in strategy.optimizers:
        for state in getattr(optimizer, "state", {}).values():
            ids.update(id(t) for t in state.values() if isinstance(t, torch.Tensor))
    return ids


def _collect(value: Any, prefix: str, found: dict[str, torch.Tensor], allowed: set[int], depth: int) -> None:
    if isinstance(value, torch.Tensor):
        if id(value) not in allowed:
            found[prefix.rstrip(".")] = value.detach().cpu().clone()
        return
    if depth == 0 or isinstance(value, torch.nn.Module | pl.Trainer | str | bytes | type):
        return
    if isinstance(value, dict):
        items = [(str(k) if not isinstance(k, torch.Tensor) else f"<{tuple(k.shape)}>", v) for k, v in value.items()]
    elif isinstance(value, list | tuple):
        items = list(enumerate(value))
    elif hasattr(value, "__dict__") and type(value).__module__.split(".")[0] in ("opacus", "lightning_nt", "tests"):
        items = list(vars(value).items())
    else:
        return
    for key, item in items:
        _collect(item, f"{prefix}{key}.", found, allowed, depth - 1)


def assert_only_the_noisy_update_differs(
    without: Releases, canary: Releases, max_grad_norm: float, expected_batch: float
) -> None:
    """Every channel equal, and the weights (after one step of SGD with lr 1) within ``2 C / expected batch``."""
    assert without.logged == canary.logged, "logged scalars differ"
    assert without.callback_metrics == canary.callback_metrics, "callback metrics differ"
    _assert_same_tensors(without.module_tensors, canary.module_tensors, "left on the module")
    _assert_same_tensors(without.buffers, canary.buffers, "in the module's buffers")
    _assert_same_tensors(without.strategy_tensors, canary.strategy_tensors, "reachable from the strategy")
    assert _plain(without.checkpoint) == _plain(canary.checkpoint), "checkpoints differ beyond weights"
    assert without.epsilon == canary.epsilon or (math.isnan(without.epsilon) and math.isnan(canary.epsilon))
    assert without.steps == canary.steps
    moved = torch.cat([(canary.weights[n] - without.weights[n]).flatten() for n in without.weights]).norm().item()
    assert moved <= 2 * max_grad_norm / expected_batch * (1 + 1e-4), f"the canary moved the weights by {moved}"


def _assert_same_tensors(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor], where: str) -> None:
    assert first.keys() == second.keys(), f"different tensors {where}: {sorted(first.keys() ^ second.keys())}"
    for name in first:
        assert torch.equal(first[name], second[name]), f"{name} ({where}) depends on the canary"


def _plain(value: Any) -> Any:
    """A checkpoint as comparable Python values (tensors as lists)."""
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value
