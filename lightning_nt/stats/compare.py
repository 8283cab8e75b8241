"""Did this change matter? A dimension-agnostic test that two models' outputs differ on the same examples."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Literal

import torch
from lightning_fabric.utilities.apply_func import move_data_to_device
from torch import Tensor, nn
from torch.utils.data import DataLoader

from lightning_nt.common.batches import batch_size, tensors_of
from lightning_nt.common.probe import preserved_loader_rng
from lightning_nt.common.state import preserved_modes
from lightning_nt.common.validation import at_least, checked_arguments, renamed_arguments
from lightning_nt.stats.cross import Alternative, TestResult, cross_mean_test

__all__ = ["compare_models"]

Forward = Callable[[nn.Module, Any], Tensor]
"""``forward(model, batch) -> Tensor[B, ...]``: a model's outputs on a batch."""


@checked_arguments(num_examples=at_least(4))
@renamed_arguments(num_samples="num_examples")
def compare_models(
    model_a: nn.Module,
    model_b: nn.Module,
    dataloader: DataLoader,
    num_examples: int | None = None,
    outputs: Literal["softmax", "logits"] = "softmax",
    forward: Forward | None = None,
    alternative: Alternative = "greater",
    seed: int | None = 0,
) -> TestResult:
    """Test ``H0: E[out_a(x) - out_b(x)] = 0`` over the examples ``x`` of ``dataloader`` (cross mean test).

    Both models see the same examples, in eval mode and without gradients; the per-example differences of
    their outputs (probabilities by default, flattened) are the samples of :func:`cross_mean_test`, so
    the test is valid whatever the number of output coordinates relative to the number of examples, and its
    ``estimate`` is an unbiased estimate of ``||E[out_a - out_b]||²``. It detects a systematic change of the
    mean output (a shift of the predicted class probabilities); changes that cancel on average (outputs that
    differ per example but not in the mean) are not its alternative: for those, compare the two output samples
    with :func:`~lightning_nt.stats.cross_mmd_test`. Identical outputs give ``statistic=0``, ``p_value=1``.
    The models' modes are restored afterwards, as are the generators the loader draws from.

    Args:
        model_a: the first model; the batches go to the device of its first parameter (or buffer).
        model_b: the second model, on the same device.
        dataloader: the examples; the first ``num_examples`` (all by default, at least 4) are used (all of them,
            with a warning, when it holds fewer).
        num_examples: how many examples, or ``None`` for the whole loader.
        outputs: compare ``"softmax"`` probabilities (over the last dimension) or raw ``"logits"``. Outputs of
            shape ``[B]`` are read as ``[B, 1]``, and a last dimension of size 1 as a binary classifier's logit
            ``z``: under ``"softmax"`` its probability ``sigmoid(z)``, which is what the softmax over the two
            logits ``[0, z]`` gives (a softmax over one entry would be 1 whatever the model). For a regression
            head compare the raw values with ``"logits"``.
        forward: ``forward(model, batch)``; default: the model applied to the batch's first tensor.
        alternative: as in :func:`cross_mean_test`; ``"greater"`` tests for any difference in the mean.
        seed: seed of the split.

    Examples:
        >>> from torch.utils.data import TensorDataset
        >>> torch.manual_seed(0) and None
        >>> model = nn.Linear(5, 3)
        >>> loader = DataLoader(TensorDataset(torch.randn(400, 5)), batch_size=100)
        >>> compare_models(model, model, loader).p_value
        1.0
        >>> shifted = nn.Linear(5, 3)
        >>> shifted.load_state_dict(model.state_dict())
        <All keys matched successfully>
        >>> with torch.no_grad():
        ...     _ = shifted.bias.add_(torch.tensor([0.5, 0.0, 0.0]))
        >>> compare_models(model, shifted, loader).p_value < 1e-6
        True
    """
    differences = _differences(model_a, model_b, dataloader, num_examples, outputs, forward or _first_tensor_forward)
    if not differences.any():
        return TestResult(statistic=0.0, p_value=1.0, n=differences.shape[0], d=differences.shape[1], estimate=0.0)
    return cross_mean_test(differences, alternative=alternative, seed=seed)


def _differences(
    model_a: nn.Module,
    model_b: nn.Module,
    dataloader: DataLoader,
    num_examples: int | None,
    outputs: str,
    forward: Forward,
) -> Tensor:
    device = _device_of(model_a)
    rows: list[Tensor] = []
    count = 0
    with preserved_loader_rng(dataloader), _evaluating(model_a), _evaluating(model_b), torch.no_grad():
        for batch in dataloader:
            batch = move_data_to_device(batch, device)
            take = batch_size(batch) if num_examples is None else min(batch_size(batch), num_examples - count)
            out_a, out_b = (_outputs(forward(model, batch), outputs) for model in (model_a, model_b))
            rows.append((out_a - out_b.to(out_a.device))[:take].flatten(1).to(torch.float64))
            count += take
            if num_examples is not None and count >= num_examples:
                break
    if num_examples is not None and count < num_examples:
        warnings.warn(
            f"compare_models(num_examples={num_examples}): the dataloader holds only {count} examples; all {count} "
            "are used.",
            stacklevel=3,
        )
    return torch.cat(rows)


def _outputs(values: Tensor, kind: str) -> Tensor:
    """``[B, ...]`` outputs as compared: ``[B]`` read as ``[B, 1]``; ``"softmax"`` over the last dimension, where
    a single entry ``z`` is a binary logit, read as its probability ``sigmoid(z)`` (the softmax of ``[0, z]``)."""
    values = values.float()
    values = values.unsqueeze(1) if values.ndim == 1 else values
    if kind == "logits":
        return values
    return values.sigmoid() if values.shape[-1] == 1 else values.softmax(-1)


def _first_tensor_forward(model: nn.Module, batch: Any) -> Tensor:
    return model(batch if isinstance(batch, Tensor) else tensors_of(batch)[0])


def _device_of(model: nn.Module) -> torch.device:
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


@contextmanager
def _evaluating(model: nn.Module) -> Iterator[None]:
    with preserved_modes(model):
        model.eval()
        yield
