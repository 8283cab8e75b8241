"""The registry of book-keeping rules: layer type -> the rule that forms its pieces, and the check of its options.

A layer type listed here has a rule of its own (``layers.py``, ``conv.py``): PyTorch's by their type, other packages'
(HuggingFace's ``Conv1D``, torchvision's ``LayerNorm2d``) by their qualified class name, so that those packages need
not be installed or imported. A layer of another type falls back to Opacus's per-sample rule for it
(:data:`opacus.grad_sample.GradSampleModule.GRAD_SAMPLERS`). :func:`layers_of` finds the layers of a module that own
trainable parameters and refuses, before anything is computed, one that no rule covers, one with options a rule can't
handle, and a parameter shared by two layers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from opacus.grad_sample import GradSampleModule
from opacus.layers.param_rename import RenameParamsMixin
from torch import Tensor, nn

from lightning_nt.common.layers import StandardizedConv2d
from lightning_nt.privacy.book_keeping.conv import check_conv, conv_pieces, transposed_conv_pieces
from lightning_nt.privacy.book_keeping.layers import (
    channels_first_layer_norm_pieces,
    check_embedding,
    embedding_pieces,
    linear_pieces,
    normalization_pieces,
    opacus_pieces,
    prelu_pieces,
    qualified_name,
    transposed_linear_pieces,
)
from lightning_nt.privacy.book_keeping.pieces import Piece

if TYPE_CHECKING:
    from lightning_nt.privacy.book_keeping.clipper import BookKeepingClipper

__all__ = [
    "LayerRule",
    "aliases_only",
    "formed_parameters",
    "layers_of",
    "opacus_formed_parameters",
    "pieces_for",
    "qualified_name",
    "reregistered_parameters",
    "rule_of",
    "supported_layer_names",
    "supported_layer_types",
]


@dataclass(frozen=True)
class LayerRule:
    """How a layer type's pieces are formed (``pieces(layer, inputs, grads, clipper)``), the check of its
    options when the clipper is built (``check(name, layer)``, raising a ``ValueError`` naming the layer), and the
    names of the parameters it forms pieces of (a layer holding others, such as ``weight_g``/``weight_v`` of the old
    ``torch.nn.utils.weight_norm``, is refused: their gradients would never be formed)."""

    pieces: Callable[[Any, list[Tensor], list[Tensor], BookKeepingClipper], list[Piece]]
    check: Callable[[str, Any], None] | None = None
    parameters: tuple[str, ...] = ("weight", "bias")


_CONV = LayerRule(conv_pieces, check_conv)
_TRANSPOSED_CONV = LayerRule(transposed_conv_pieces)
_RULES: dict[type[nn.Module], LayerRule] = {
    nn.Linear: LayerRule(linear_pieces),
    nn.Conv1d: _CONV,
    nn.Conv2d: _CONV,
    nn.Conv3d: _CONV,
    nn.ConvTranspose1d: _TRANSPOSED_CONV,
    nn.ConvTranspose2d: _TRANSPOSED_CONV,
    nn.ConvTranspose3d: _TRANSPOSED_CONV,
    nn.Embedding: LayerRule(embedding_pieces, check_embedding),
    nn.LayerNorm: LayerRule(normalization_pieces),
    nn.GroupNorm: LayerRule(normalization_pieces),
    nn.PReLU: LayerRule(prelu_pieces),
    StandardizedConv2d: _CONV,
}
_NAMED_RULES: dict[str, LayerRule] = {  # other packages' layers, by qualified class name (not imported here)
    "transformers.pytorch_utils.Conv1D": LayerRule(transposed_linear_pieces),
    "torchvision.models.convnext.LayerNorm2d": LayerRule(channels_first_layer_norm_pieces),
}
_OPACUS = LayerRule(opacus_pieces)


def supported_layer_types() -> tuple[type, ...]:
    """PyTorch's and this project's layer types with a book-keeping rule of their own (others need an Opacus
    per-sample rule, or one of :func:`supported_layer_names`)."""
    return tuple(_RULES)


def supported_layer_names() -> tuple[str, ...]:
    """Other packages' layer classes with a book-keeping rule of their own, by :func:`qualified_name`."""
    return tuple(_NAMED_RULES)


def rule_of(layer: nn.Module) -> LayerRule | None:
    """The book-keeping rule of ``layer``'s exact type (a subclass may compute something else), found by the type
    itself or, for another package's layer, by its qualified name; ``None`` if it has none here."""
    kind = type(layer)
    return _RULES.get(kind) or _NAMED_RULES.get(qualified_name(kind))


def formed_parameters(layer: nn.Module) -> tuple[str, ...] | None:
    """The names of the parameters ``layer``'s per-sample rule forms: its book-keeping rule's, else, for PyTorch's and
    Opacus's layers under Opacus's rules, ``weight`` and ``bias``; ``None`` when not known here (a user's own Opacus
    rule for a class of theirs may form any)."""
    rule = rule_of(layer)
    if rule is not None:
        return rule.parameters
    return opacus_formed_parameters(layer)


def opacus_formed_parameters(layer: nn.Module) -> tuple[str, ...] | None:
    """The names of the parameters Opacus's per-sample rule for ``layer`` forms, for PyTorch's and Opacus's own layers
    (``weight`` and ``bias``); ``None`` for a layer without one of those rules."""
    known = type(layer) in GradSampleModule.GRAD_SAMPLERS and type(layer).__module__.startswith(("torch.", "opacus."))
    return ("weight", "bias") if known else None


def pieces_for(layer: nn.Module, inputs: list[Tensor], grads: list[Tensor], clipper: BookKeepingClipper) -> list[Piece]:
    """The layer's pieces by its rule (:func:`rule_of`; Opacus's for a type without one here)."""
    return (rule_of(layer) or _OPACUS).pieces(layer, inputs, grads, clipper)


def aliases_only(layer: nn.Module) -> bool:
    """Whether ``layer`` is one of Opacus's modules that register their cells' weights again under other names
    (``DPLSTM``'s ``weight_ih_l0``, ...), every one of them: the cells are the layers that compute. Any other module
    that re-registers a submodule's parameter (``self.out = self.embedding.weight``) may use it in its own forward,
    so it stays a layer, refused where no rule covers it."""
    own = list(layer.named_parameters(recurse=False))
    return isinstance(layer, RenameParamsMixin) and bool(own) and len(reregistered_parameters(layer)) == len(own)


def reregistered_parameters(layer: nn.Module) -> dict[str, str]:
    """The parameters ``layer`` registers itself that one of its submodules registers too: each of ``layer``'s names
    for one, with the submodule's (``{"out": "embedding.weight"}`` for ``self.out = self.embedding.weight``).

    Examples:
        >>> net = nn.Sequential(nn.Linear(2, 2))
        >>> net.out = net[0].weight
        >>> reregistered_parameters(net)
        {'out': '0.weight'}
    """
    held = {id(p): f"{child}.{n}" for child, m in layer.named_children() for n, p in m.named_parameters()}
    return {alias: held[id(p)] for alias, p in layer.named_parameters(recurse=False) if id(p) in held}


def layers_of(module: nn.Module) -> list[nn.Module]:
    """The layers that own trainable parameters, checked to be covered by a rule and not to share parameters."""
    layers, owner = [], {}
    for name, layer in module.named_modules():
        own = [(n, p) for n, p in layer.named_parameters(recurse=False) if p.requires_grad]
        if not own or aliases_only(layer):
            continue
        for parameter_name, parameter in own:
            full = f"{name}.{parameter_name}" if name else parameter_name
            if id(parameter) in owner:
                raise ValueError(
                    f"Parameter {full} is the same tensor as {owner[id(parameter)]}: book-keeping clipping forms each "
                    "layer's per-example norm separately, which is wrong for a tied parameter. Use "
                    "grad_sample_mode='hooks' for this model."
                )
            owner[id(parameter)] = full
        rule = rule_of(layer)
        if rule is None and type(layer) not in GradSampleModule.GRAD_SAMPLERS:
            raise ValueError(
                f"Layer {name or type(layer).__name__} ({type(layer).__name__}) has trainable parameters but neither "
                "a book-keeping nor an Opacus per-sample rule. Use grad_sample_mode='hooks' (Opacus falls back to "
                "functorch for it), or freeze its parameters."
            )
        formed = formed_parameters(layer)
        unformed = [n for n, _ in own if formed is not None and n not in formed]
        if unformed:
            raise ValueError(
                f"Layer {name or type(layer).__name__} ({type(layer).__name__}) has trainable parameters {unformed} "
                f"that its per-sample rule doesn't form (it forms {list(formed)}): they would never train. "
                "Use grad_sample_mode='hooks', or freeze them."
            )
        if rule is not None and rule.check is not None:
            rule.check(name, layer)
        elif isinstance(layer, nn.Embedding):  # a subclass with an Opacus rule: the same options are refused
            check_embedding(name, layer)
        layers.append(layer)
    return layers
