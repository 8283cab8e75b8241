"""Checks on the module itself that make DP-SGD fail closed, each naming what is wrong and the fix.

* before the first step (:func:`check_module`): modules compiled with ``torch.compile``, trainable BatchNorm and
  what Opacus can't give per-example gradients for (or their repair with ``fix_modules``), each by its name,
  parametrized modules (also by the old ``weight_norm``/``spectral_norm`` hooks), embeddings with ``max_norm``,
  trainable ``EmbeddingBag(mode="max")`` and trainable embeddings with ``scale_grad_by_freq`` or ``sparse``, lazy
  modules not yet materialised, trainable parameters in ``nn.ParameterList``/``nn.ParameterDict``;
* before every step (:func:`check_batch_norm_in_eval`): a frozen BatchNorm in training mode;
* during a backward pass under ghost clipping (:func:`refusing_recomputation`): a layer that activation
  checkpointing runs again;
* around every step (:func:`state_versions`, :func:`check_state_unchanged`): a ``training_step`` that changes the
  module's parameters or buffers itself, which would release the private batch outside the noisy update.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
from collections.abc import Iterator
from typing import Any

import torch
from opacus.layers.param_rename import RenameParamsMixin
from opacus.utils.module_utils import trainable_modules
from opacus.validators import ModuleValidator
from torch import nn
from torch.nn.modules.lazy import LazyModuleMixin

from lightning_nt.common.compiled import compiled_parts
from lightning_nt.common.errors import explained_errors
from lightning_nt.common.layers import reparametrized_modules
from lightning_nt.privacy.book_keeping.rules import reregistered_parameters

__all__ = [
    "check_batch_norm_in_eval",
    "check_module",
    "check_state_unchanged",
    "naming_in_place_changes_of_hooked_outputs",
    "refusing_recomputation",
    "state_versions",
]


def check_module(module: nn.Module, fix_modules: bool) -> None:
    """Refuse modules whose per-example gradients Opacus can't compute (or repair them with ``fix_modules``)."""
    compiled = compiled_parts(module)
    if compiled:  # the per-example hooks are missed by a graph compiled before they were registered
        raise RuntimeError(
            f"{compiled} of {type(module).__name__} are compiled with torch.compile, which DP-SGD does not support: "
            "Opacus's per-example gradient hooks are not seen by code compiled before them. Train uncompiled under "
            "DP: pass the module itself to trainer.fit (not torch.compile(module)) and don't compile submodules."
        )
    lazy = [name or "<root>" for name, m in module.named_modules() if _unmaterialised(m)]
    if lazy:
        raise RuntimeError(
            f"Modules {lazy} are lazy (e.g. nn.LazyLinear) and not materialised yet: their parameters would be "
            "created by the first private forward pass, after DP-SGD has set up per-example clipping and the "
            "optimizer for the parameters that exist, so no clipping engine (hooks, ghost or bk) can clip them. "
            "Materialise them before fit: call the module once on a dummy input of the data's shape (e.g. "
            "`model(torch.zeros(1, *input_shape))`), or use the layer with its sizes given (nn.Linear(in, out))."
        )
    parametrized = reparametrized_modules(module)
    if parametrized:
        raise RuntimeError(
            f"Modules {parametrized} are parametrized (torch.nn.utils.parametrize, e.g. SubspaceTraining or "
            "weight_norm, or the older torch.nn.utils.weight_norm/spectral_norm hooks): their weight is computed "
            "from other parameters, and DP-SGD with Opacus can't compute per-example gradients through that. "
            "SubspaceTraining is not supported under DP; remove the parametrization (e.g. "
            "torch.nn.utils.remove_weight_norm)."
        )
    _check_embeddings(module)
    _refuse_parameter_containers(module)
    _refuse_reregistered_parameters(module)
    errors = _unsupported_layers(module)  # only layers with trainable parameters
    coupled = [name for name, m in module.named_modules() if _coupling_batch_norm(m)]
    if not errors and not coupled:
        return
    if fix_modules:
        _fix_in_place(module)
        remaining = _unsupported_layers(module)
        if remaining:
            raise RuntimeError(f"fix_modules=True could not repair: {'; '.join(remaining)}.")
        return
    problems = "; ".join(errors + [f"{n}: BatchNorm couples the examples of a batch" for n in coupled])
    raise RuntimeError(
        f"DP-SGD needs every example's gradient on its own, and this module can't give it: {problems}. "
        "Replace each layer named here as its message says (BatchNorm by GroupNorm; nn.MultiheadAttention, "
        "nn.LSTM, nn.GRU and nn.RNN by DPMultiheadAttention, DPLSTM, DPGRU and DPRNN from opacus.layers), or pass "
        "fix_modules=True to let Opacus swap them before training; or freeze a BatchNorm (requires_grad_(False)) "
        "and keep it in eval mode while training, as a fine-tuned backbone is. Coupling written by hand (e.g. "
        "`x - x.mean(0)` in forward) is looked for on a fit's first batch only (the example-independence check; see "
        "also DPStrategy's sensitivity_probe)."
    )


def _check_embeddings(module: nn.Module) -> None:
    """Refuse, by name, embedding options whose gradients are not sums of per-example gradients, or that change the
    table outside the noisy update."""
    renormed = [
        name or "<root>"
        for name, m in module.named_modules()
        if isinstance(m, nn.Embedding | nn.EmbeddingBag) and m.max_norm is not None
    ]
    if renormed:
        raise RuntimeError(
            f"Embeddings {renormed} have max_norm: their forward renormalises, in place, the rows of the tokens in "
            "each batch, outside the noisy update, so the weights would tell which tokens the private batch held. "
            "Remove max_norm (to bound the looked-up vectors, normalise them in forward without changing the "
            "weight, e.g. with F.normalize)."
        )
    max_pooled = [
        name or "<root>" for name, m in trainable_modules(module) if isinstance(m, nn.EmbeddingBag) and m.mode == "max"
    ]
    if max_pooled:
        raise RuntimeError(
            f"EmbeddingBags {max_pooled} pool with mode='max', for which no clipping engine has a per-example "
            "gradient rule. Use mode='sum' or 'mean' (or freeze the table)."
        )
    coupled = [
        name or "<root>"
        for name, m in trainable_modules(module)
        if isinstance(m, nn.Embedding | nn.EmbeddingBag) and (m.scale_grad_by_freq or m.sparse)
    ]
    if coupled:
        raise RuntimeError(
            f"Embeddings {coupled} have scale_grad_by_freq=True or sparse=True: the first divides each token's "
            "gradient by its count in the whole batch (so every example's gradient depends on the others), the "
            "second gives sparse gradients, which DP-SGD's dense noise and per-example clipping don't take. Remove "
            "both options under DP-SGD."
        )


def _unsupported_layers(module: nn.Module) -> list[str]:
    """Opacus's validators' objections to ``module``, each naming its layer (Opacus's own messages don't)."""
    errors = [] if module.training else ["the module needs to be in training mode"]
    for name, layer in trainable_modules(module):
        validator = ModuleValidator.VALIDATORS.get(type(layer))
        found = [str(error) for error in validator(layer)] if validator is not None else []
        if type(layer) is nn.RNN:  # Opacus has no validator for it, and its functorch path crashes on it
            found.append("nn.RNN's fused kernel has no per-example gradient rule; use opacus.layers.DPRNN")
        errors.extend(f"layer {name or '<root>'} ({type(layer).__name__}): {error}" for error in found)
    return errors


def _refuse_parameter_containers(module: nn.Module) -> None:
    """Refuse trainable parameters held in an ``nn.ParameterList``/``nn.ParameterDict``: such a module is never
    called, so no clipping engine's per-layer rule sees the uses of its parameters (``F.linear(x, weights[0])``)."""
    containers = [
        name or "<root>"
        for name, m in module.named_modules()
        if isinstance(m, nn.ParameterList | nn.ParameterDict) and any(p.requires_grad for p in m.parameters())
    ]
    if containers:
        raise RuntimeError(
            f"{containers} hold trainable parameters in an nn.ParameterList/nn.ParameterDict, a module that is never "
            "called: every clipping engine forms each example's gradient from the calls of the layer that holds a "
            "parameter, so their uses (F.linear(x, weights[0]), ...) can't be clipped per example. Hold each weight "
            "in a layer whose forward applies it (nn.Linear, or a small nn.Module of your own with the weight as its "
            "attribute), or freeze them (requires_grad_(False))."
        )


def _refuse_reregistered_parameters(module: nn.Module) -> None:
    """Refuse a trainable parameter that a module registers again (``self.out = self.embedding.weight``) besides the
    submodule that holds it, unless the module is one of Opacus's renamed-parameter layers (``DPLSTM``): the module may
    use it in its own forward (``F.linear(h, self.out)``), which the per-layer rules of every engine would miss or
    crash on (PyTorch's "Tensor on device cpu is not on the expected device meta!" under hooks)."""
    found = []
    for name, layer in module.named_modules():
        if isinstance(layer, RenameParamsMixin):
            continue
        prefix = f"{name}." if name else ""
        trainable = {alias for alias, p in layer.named_parameters(recurse=False) if p.requires_grad}
        found += [
            f"{prefix}{alias} (= {prefix}{held})"
            for alias, held in reregistered_parameters(layer).items()
            if alias in trainable
        ]
    if found:
        raise RuntimeError(
            f"Parameters {found} are registered again on the module that holds the layer using them: its own forward "
            "may use them outside that layer, where no clipping engine sees each example's share. Tie weights by "
            "sharing the Parameter between two layers instead (`self.head.weight = self.embedding.weight`, the head an "
            "nn.Linear), or drop the alias attribute."
        )


def _frozen_batch_norm(module: nn.Module) -> bool:
    """A BatchNorm whose parameters are all frozen (a pre-trained backbone's): allowed, and refused by
    :func:`check_batch_norm_in_eval` on any step it runs in training mode. Any other BatchNorm (trainable, or without
    parameters: ``affine=False``) trains on batch statistics, which couple the examples."""
    parameters = list(module.parameters())
    return (
        isinstance(module, nn.modules.batchnorm._BatchNorm)
        and bool(parameters)
        and not any(p.requires_grad for p in parameters)
    )


def _coupling_batch_norm(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.batchnorm._BatchNorm) and not _frozen_batch_norm(module)


def check_batch_norm_in_eval(module: nn.Module) -> None:
    """Refuse a step in which a (frozen) BatchNorm is in training mode: it would normalise by the batch's statistics,
    coupling the examples (and update its running statistics from the private batch); so would one without running
    statistics (``track_running_stats=False``) in any mode. A frozen backbone kept in eval mode
    (``backbone.eval()`` in ``on_train_epoch_start``) uses its running statistics, one example at a time."""
    training = [name or "<root>" for name, m in module.named_modules() if _batch_norm_in_training(m)]
    if training:
        raise RuntimeError(
            f"BatchNorm {training} is in training mode during a private step, or keeps no running statistics "
            "(track_running_stats=False): it normalises by the statistics of the batch, which couples its examples, "
            "so DP-SGD's per-example clipping would not bound one example's effect. Keep a frozen BatchNorm with "
            "running statistics in eval mode while training (e.g. `self.backbone.eval()` in on_train_epoch_start, "
            "or in an override of train()), or replace BatchNorm by GroupNorm."
        )


def _batch_norm_in_training(module: nn.Module) -> bool:
    """Normalises by the batch's statistics: in training mode, or in any mode without running statistics."""
    return isinstance(module, nn.modules.batchnorm._BatchNorm) and (module.training or module.running_mean is None)


def _unmaterialised(module: nn.Module) -> bool:
    return isinstance(module, LazyModuleMixin) and module.has_uninitialized_params()


@contextlib.contextmanager
def refusing_recomputation(module: nn.Module) -> Iterator[None]:
    """Refuse, by name, a trainable layer of ``module`` whose forward call completes during the block: the block is
    a backward pass, so the call is activation checkpointing (``torch.utils.checkpoint``) running it again.

    Ghost clipping counts a layer's calls to find parameters used twice, which it can't clip: a re-run layer got
    Opacus's misleading "Parameter tying is not supported". The hook runs before Opacus's (and not at all when
    checkpointing stops its recomputation before the layer's output, which ghost clipping handles).
    """
    handles = [
        layer.register_forward_hook(functools.partial(_refuse_recomputation, name or "<root>"), prepend=True)
        for name, layer in module.named_modules()
        if any(p.requires_grad for p in layer.parameters(recurse=False))
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def naming_in_place_changes_of_hooked_outputs() -> contextlib.AbstractContextManager[None]:
    """Name the cause and the fixes of PyTorch's "Output 0 of BackwardHookFunctionBackward is a view and is being
    modified inplace": Opacus's per-example hooks (``grad_sample_mode`` hooks, functorch, ghost) are full backward
    hooks, and an in-place operation on a hooked layer's output (``nn.ReLU(inplace=True)`` after a GroupNorm, ResNet's
    ``out += identity``: torchvision's CNNs) is forbidden on their outputs. Raised in the first private forward pass,
    before any update."""
    return explained_errors(
        lambda text: "BackwardHookFunction" in text and "modified inplace" in text,
        lambda _: (
            "An in-place operation in the module's forward pass (nn.ReLU(inplace=True) or another activation with "
            "inplace=True, `out += identity`, ...) changes the output of a layer whose per-example gradients Opacus's "
            "hooks capture with a full backward hook, which PyTorch forbids. Use grad_sample_mode='bk' (or 'auto'), "
            "whose hooks are on tensors and allow in-place operations, or make those operations out-of-place (e.g. "
            "`for m in model.modules(): m.inplace = False` where the attribute exists, `out = out + identity`)."
        ),
    )


def _refuse_recomputation(name: str, *_: Any) -> None:
    raise RuntimeError(
        f"Activation checkpointing (torch.utils.checkpoint) ran layer {name!r} again in the backward pass: "
        "grad_sample_mode='ghost' takes a second call of a layer for a parameter used twice (Opacus calls it "
        "parameter tying), whose per-example gradient norms it can't compute. The step is refused before its "
        "noise. Turn activation checkpointing off for DP training: ghost clipping keeps no per-example "
        "gradients, so the memory it saves is often not needed."
    )


def _fix_in_place(module: nn.Module) -> None:
    """Replace every submodule Opacus has a fixer for (BatchNorm -> GroupNorm, ...), affine or not, in place; except a
    frozen BatchNorm: allowed (in eval mode), it keeps the running statistics a pre-trained backbone needs."""
    for name, submodule in list(module.named_modules()):
        fixer = ModuleValidator.FIXERS.get(type(submodule))
        if fixer is None or not name or _frozen_batch_norm(submodule):
            continue
        parent_name, _, child = name.rpartition(".")
        replacement = fixer(submodule)
        tensor = next(itertools.chain(submodule.parameters(), submodule.buffers()), None)
        if tensor is not None:  # the replacement where the replaced module was (a CUDA module stays on CUDA)
            replacement = replacement.to(tensor.device)
        setattr(module.get_submodule(parent_name), child, replacement)


def state_versions(module: nn.Module, buffer_values: bool = False) -> dict[str, tuple[Any, ...]]:
    """Every parameter and buffer of ``module`` by name: which tensor it is and how often it was modified in place;
    with ``buffer_values``, also a copy of each buffer (an update through ``.data`` leaves the version as it was)."""
    state: dict[str, tuple[Any, ...]] = {name: (id(p), p._version) for name, p in module.named_parameters()}
    for name, buffer in module.named_buffers():
        state[name] = (id(buffer), buffer._version, buffer.detach().clone() if buffer_values else None)
    return state


def check_state_unchanged(module: nn.Module, before: dict[str, tuple[Any, ...]]) -> None:
    """Refuse a training step that changed a parameter or buffer of ``module`` itself (``before``:
    :func:`state_versions` at its start), before the step's noise.

    Buffers travel with the weights (``state_dict``, checkpoints, ``torch.save``) but not through the noisy update:
    one updated from the private batch (running statistics written by hand in ``forward``, an EMA of the inputs, a
    count of the examples seen) would be released without noise; so would a weight changed in place by ``forward``
    (``nn.Embedding(max_norm=...)`` renormalises the rows of the batch's tokens: they told which tokens it held).
    """
    now, buffers = state_versions(module), dict(module.named_buffers())
    changed = sorted(
        name
        for name in before.keys() | now.keys()
        if before.get(name, ())[:2] != now.get(name, ())[:2] or _new_value(before[name], buffers.get(name))
    )
    if changed:
        raise RuntimeError(
            f"training_step changed the module's {changed} itself (e.g. statistics of the batch kept in a buffer in "
            "forward, a weight modified in place): the weights and buffers are saved and released, and only what "
            "goes through the noisy update is covered, so this would release the private data outside the privacy "
            "guarantee (the module in memory now holds it: don't save it). Keep statistics of public data only, "
            "outside training_step, and change the weights only through the optimizer."
        )


def _new_value(before: tuple[Any, ...], buffer: torch.Tensor | None) -> bool:
    """Whether a buffer copied in ``before`` holds another value now (NaN equal to NaN)."""
    saved = before[2] if len(before) > 2 else None
    if saved is None or buffer is None:
        return False
    if saved.is_floating_point():
        return not torch.allclose(saved, buffer, rtol=0.0, atol=0.0, equal_nan=True)
    return not torch.equal(saved, buffer)
