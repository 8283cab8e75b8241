"""What one layer saw during a recorded forward and backward pass, and whether its pieces can be formed from it."""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

from torch import Tensor

from lightning_nt.privacy.book_keeping.pieces import Piece

__all__ = ["Record", "positional_input_refusal", "second_backward_refusal", "shared_input_advice"]


@dataclass
class Record:
    """What one layer saw during the forward/backward passes: inputs and output gradients, one per call.

    Once every call's output gradient has arrived (in the backward pass) the layer's pieces are formed and the
    tensors are let go, so the activations are freed as the backward pass proceeds, as in an ordinary one. The
    tensors a layer's pieces may keep for the clipped sum are ``held`` weakly with their versions: one changed in
    place after the norms were taken (by a hook later in the backward pass) is refused, not summed.
    """

    inputs: list[Tensor] = field(default_factory=list)
    grads: list[Tensor | None] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)
    held: list[tuple[weakref.ref[Tensor], int]] = field(default_factory=list)  # what the pieces may keep, and versions
    rows: int = 0
    pieces: list[Piece] | None = None

    def problem(self, group_size: int, batch_size: int | None = None, name: str = "") -> str | None:
        """Why the layer's per-example gradients can't be formed (yet) from this record, or None.

        In the backward pass (``batch_size`` None) the calls' rows only need to agree; at the clipped sum they must
        be the batch's. ``name`` names the layer in the message.
        """
        if any(grad is None for grad in self.grads):
            return (
                f"Layer {name} ran in the forward pass but received no gradient: its output does not reach the "
                "loss, or activation checkpointing (torch.utils.checkpoint) re-ran it in the backward pass. "
                "Book-keeping clipping needs every recorded call to be part of the backward pass (and DP-SGD can't "
                "record a layer re-run by checkpointing: turn it off for DP training)."
            )
        rows = {tensor.shape[0] for tensor in self.inputs} | ({self.rows} if self.pieces is not None else set())
        expected = {batch_size} if batch_size is not None else {next(iter(rows))}  # in the backward: consistent rows
        if rows != expected or next(iter(expected)) % group_size:
            seen = " and ".join(map(str, sorted(rows)))
            shared = rows == {1} and (batch_size or 0) > 1
            return (
                f"Layer {name} saw {seen} rows in dimension 0 where the batch has {batch_size}: per-example "
                "gradients need the batch in dimension 0 (e.g. batch_first=True)."
            ) + (shared_input_advice([name]) if shared else "")
        if any(tensor._version != version for tensor, version in zip(self.inputs, self.versions)):
            return (
                f"The input of layer {name} was modified in place after the layer used it, so its "
                "per-example gradients can't be formed from it; avoid the in-place operation."
            )
        if any((tensor := held()) is not None and tensor._version != version for held, version in self.held):
            return (
                f"The input or output gradient of layer {name} was modified in place in the backward pass after its "
                "per-example norms were taken (by a hook), so its clipped sum can't be formed from it; avoid the "
                "in-place operation."
            )
        return None


def shared_input_advice(layers: list[str]) -> str:
    """What to do about trainable layers that ran once on one row shared by every example of the batch, whose output
    was then broadcast over the batch: autograd sums the examples' gradients before any hook sees them."""
    return (
        f" {', '.join(layers)} ran on one row shared by the whole batch and broadcast over it (as HuggingFace models "
        "index their position embeddings with position_ids of shape [1, T]), so the examples' gradients are summed "
        f"before they can be told apart. Freeze it (`{layers[0]}.requires_grad_(False)`), or give it one row per "
        "example (for a HuggingFace model, pass position_ids=torch.arange(T).expand(B, T))."
    )


def positional_input_refusal(name: str, kind: str) -> RuntimeError:
    """The refusal of a trainable layer called without a tensor as its first positional input (``fc(input=x)``, a
    dict): every engine's per-example rules read that input (Opacus's hooks and book-keeping failed with an
    ``IndexError``)."""
    return RuntimeError(
        f"Layer {name!r} ({kind}) was called without a tensor as its first positional input (by keyword, e.g. "
        "fc(input=x), or on another object): DP-SGD's per-example rules read a layer's first positional input, so "
        "its per-example gradients can't be formed. Refused before any noise. Call it on the tensor positionally: "
        "fc(x)."
    )


def second_backward_refusal(name: str, kind: str) -> RuntimeError:
    """The refusal of a second backward pass through a layer's call in one step: an input-gradient penalty
    (``torch.autograd.grad(..., create_graph=True)`` inside ``training_step``, double backprop) or ``backward`` twice
    with ``retain_graph=True``. Per-example gradients are formed from the one backward pass of the loss; the first
    pass would have been taken for it (book-keeping and Opacus's hooks failed with an ``IndexError``)."""
    return RuntimeError(
        f"Layer {name!r} ({kind}) received an output gradient a second time in one step: a backward pass through the "
        "model ran before the loss's own, e.g. torch.autograd.grad(..., create_graph=True) for an input-gradient "
        "penalty in training_step, or backward(retain_graph=True) twice. DP-SGD forms each example's clipped gradient "
        "from the single backward pass of the returned loss, so a loss that differentiates through the model (double "
        "backprop) is not supported. Refused before any noise. Remove that term from the loss training_step returns, "
        "or train with it without DP. A gradient taken only to log it (torch.autograd.grad of the loss with respect "
        "to the logits) is a backward pass too: leave it out, or take it under grad_sample_mode='hooks', whose "
        "hooks only see gradients that reach the parameters."
    )
