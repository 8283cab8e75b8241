"""Single-backward DP-SGD clipping ("book-keeping", Bu, Wang, Zha & Karypis, ICML 2023).

Opacus's hooks materialise every example's gradient (``B x P`` floats), then take norms, clip and sum. Here
one ordinary backward pass is enough, and a per-example gradient is kept only where it is small:

1. During the forward pass each supported layer keeps its input ``A``; a tensor hook receives the gradient ``G``
   of the loss with respect to its output. The layer's parameters do not require grad while this runs, so
   autograd never computes their ordinary weight gradients (only the input gradients the chain needs).
2. As soon as a layer's ``G`` is in (still inside the backward pass), each example's squared gradient norm for
   that layer comes either from the *ghost* Gram identity ``||sum_t g_t a_tᵀ||² = sum_{t,s} (a_t·a_s)(g_t·g_s)``
   over the layer's positions ``t`` (cost ``T²(d+p)``) or from instantiating the example's ``p x d`` gradient
   (cost ``T d p``), whichever is cheaper for that layer ("mixed ghost norm"); a convolution's per-example kernels
   come from one weight-gradient call with the examples as groups on a CPU, from an im2col view and one batched
   product elsewhere. Then ``A`` and ``G`` are let go, unless the clipped sum needs them: activations are freed as
   the backward pass proceeds. The norms of all layers add up to the example's full gradient norm.
3. Clip factors ``c_b = min(1, C / ||g_b||)`` then weight the instantiated per-example gradients where they take no
   more memory than the layer's ``A`` and ``G`` (fastDP's "MixOpt"), and elsewhere enter one weight-gradient call
   per layer with ``c`` folded into ``G``: ``sum_b c_b g_bᵀ a_b`` (for a convolution,
   ``torch.nn.grad.conv2d_weight(A, shape, c * G)``).

Supported: ``Linear`` (any leading dimensions: sequences are positions), ``Conv1d``/``Conv2d``/``Conv3d`` (stride,
dilation, groups, any padding and ``padding_mode``), ``ConvTranspose1d``/``2d``/``3d`` (stride, padding,
``output_padding``, dilation, groups: the adjoint convolution's rule), ``Embedding``, ``LayerNorm``, ``GroupNorm``,
``PReLU``, the weight-standardised :class:`~lightning_nt.common.StandardizedConv2d` (its raw weight's per-example
norm is exact from ghost quantities; the chain rule through the standardisation is applied once, to the clipped
sum), and, recognised by class name without importing their packages, HuggingFace's ``Conv1D`` (GPT-2) and
torchvision's ``LayerNorm2d`` (ConvNeXt). Layers of other types fall back to Opacus's per-sample rule for that layer
inside the same backward; a parameter that no rule covers, or one shared by two layers, is refused before anything is
computed. A module whose own parameters are its submodules' (Opacus's ``DPLSTM``) is left to those submodules.

The package, by what a reader looks for: ``clipper`` (:class:`BookKeepingClipper`: the hooks, the backward-time
pieces, clip factors and the clipped sums into ``.grad``), ``record`` (what one layer saw and whether its
per-example gradients can be formed from it), ``rules`` (the registry: layer type -> rule, Opacus's rule as the
fallback), the rules themselves (``conv`` for convolutions, ``layers`` for linear, embedding and norm layers and
Opacus's fallback), ``pieces`` (one parameter's norms and clipped sum, and the weight-standardisation algebra) and
``norms`` (the ghost Gram identity, :func:`outer_product_norms`, and the cost rules that choose between ghost and
instantiated norms).

Examples:
    >>> import torch
    >>> from torch import nn
    >>> _ = torch.manual_seed(0)
    >>> net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    >>> clipper = BookKeepingClipper(net, max_grad_norm=1.0)
    >>> x, y = torch.randn(8, 3), torch.randint(2, (8,))
    >>> with clipper.recording():
    ...     nn.functional.cross_entropy(net(x), y).backward()
    >>> norms = clipper.clip_and_sum(batch_size=8)  # .grad: the sum of the clipped per-example gradients
    >>> bool(net[0].weight.grad.norm() <= 8 * 1.0), tuple(norms.shape)
    (True, (8,))
"""

from lightning_nt.privacy.book_keeping.clipper import BookKeepingClipper
from lightning_nt.privacy.book_keeping.conv import conv_per_example_grads
from lightning_nt.privacy.book_keeping.norms import outer_product_norms
from lightning_nt.privacy.book_keeping.rules import supported_layer_names, supported_layer_types

__all__ = [
    "BookKeepingClipper",
    "conv_per_example_grads",
    "outer_product_norms",
    "supported_layer_names",
    "supported_layer_types",
]
