"""Noise-stability quantities of Arora, Ge, Neyshabur & Zhang (2018) and their "effective number of parameters".

Arora et al. show that a network which attenuates noise injected at its layers can be compressed to few
parameters, and bound its error through that compressed network. The attenuation is described by the layer
cushion ``mu_i``, the interlayer cushion ``mu_{i->}``, the activation contraction ``c`` and the interlayer
smoothness ``rho``; Theorem 4.1 turns them into ``c^2 d^2 max ||f(x)||^2 sum_i 1 / (mu_i^2 mu_{i->}^2) / gamma^2``,
the "effective parameters" reported here. Constants and logarithms of the theorem are left out and the quantities
are measured on one batch, so the number is a capacity measure to compare runs, not a certified bound.

Everything is measured through the model's own forward: forward hooks record each layer's input and output,
replace a layer's output by a perturbed one, or make it a forward-mode dual tensor so that one forward gives the
Jacobian-vector products ``J^{i,j} v`` to every later layer ``j`` at once. The model is put in eval mode, so each
example's quantities depend on that example only (train-mode BatchNorm would mix the examples of the batch).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor, nn

from lightning_nt.common.autodiff import differentiable_kernels
from lightning_nt.common.state import preserved_state
from lightning_nt.compression.capacity import LAYER_TYPES, margin_quantile

__all__ = ["NoiseStability", "layer_jvp", "noise_stability"]

_ONE_HOT_CHUNK = 256


@dataclass
class NoiseStability:
    """The noise-stability report of one batch. A quantity that could not be measured is ``nan``, or absent from
    its dict, with the reason in ``skipped``."""

    layers: list[str] = field(default_factory=list)
    """Qualified names of the measured layers, in forward order."""
    layer_cushion: dict[str, float] = field(default_factory=dict)
    """``mu_i = ||A_i phi(x_{i-1})|| / (||A_i||_F ||phi(x_{i-1})||)``, minimum over the batch."""
    interlayer_cushion: dict[str, float] = field(default_factory=dict)
    """``mu_{i->} = min_{j > i} ||J^{i,j} x_i|| / (||J^{i,j}||_F ||x_i||)``, minimum over the batch; no last layer."""
    activation_contraction: float = math.nan
    """``c = max ||x_i|| / ||phi(x_i)||`` over layers but the last and over the batch."""
    interlayer_smoothness: float = math.nan
    """Monte-Carlo ``rho``: the minimum over layer pairs, examples and noise draws."""
    noise_attenuation: dict[str, float] = field(default_factory=dict)
    """``||f(x; x_i + eta) - f(x)|| / ||f(x)||`` with ``||eta|| = noise_scale ||x_i||``, mean over batch and draws."""
    effective_params: float = math.nan
    """The Theorem 4.1 quantity (``mu_{i->} = 1`` for a layer without later layers depending on it)."""
    skipped: list[str] = field(default_factory=list)
    """Why a layer or quantity was not measured."""

    def scalars(self) -> dict[str, float]:
        """Flat tags (no prefix) for a logger; ``nan`` quantities are left out.

        Examples:
            >>> NoiseStability(["fc"], {"fc": 0.5}, activation_contraction=1.2).scalars()
            {'layer_cushion/fc': 0.5, 'min_layer_cushion': 0.5, 'activation_contraction': 1.2}
        """
        values = {f"layer_cushion/{name}": value for name, value in self.layer_cushion.items()}
        if self.layer_cushion:
            values["min_layer_cushion"] = min(self.layer_cushion.values())
        values.update({f"interlayer_cushion/{name}": value for name, value in self.interlayer_cushion.items()})
        if self.interlayer_cushion:
            values["min_interlayer_cushion"] = min(self.interlayer_cushion.values())
        values.update({f"noise_attenuation/{name}": value for name, value in self.noise_attenuation.items()})
        values["activation_contraction"] = self.activation_contraction
        values["interlayer_smoothness"] = self.interlayer_smoothness
        values["effective_params"] = self.effective_params
        return {tag: value for tag, value in values.items() if not math.isnan(value)}


@dataclass
class _Layer:
    name: str
    module: nn.Module
    input: Tensor
    """``phi(x_{i-1})``, what the layer received."""
    output: Tensor
    """``x_i``, the layer's output (bias included)."""


def layer_jvp(
    model: nn.Module, predict: Callable[[], Tensor], source: str, tangent: Tensor, targets: Sequence[str]
) -> dict[str, Tensor]:
    """``J^{source,j} tangent`` for each target layer ``j``: forward-mode AD through the forward ``predict()`` runs.

    ``tangent`` is shaped like the source layer's output (batch first); a target that does not depend on the
    source gets zeros. In eval mode the examples don't mix, so row ``b`` is example ``b``'s own Jacobian product.

    Examples:
        >>> _ = torch.manual_seed(0)
        >>> net = nn.Sequential(nn.Linear(3, 4, bias=False), nn.ReLU(), nn.Linear(4, 2, bias=False))
        >>> x = torch.randn(5, 3)
        >>> jvp = layer_jvp(net, lambda: net(x), "0", net[0](x), ["2"])["2"]   # J x_0 = x_2: ReLU is homogeneous
        >>> torch.allclose(jvp, net(x), atol=1e-6)
        True
    """
    modules = dict(model.named_modules())
    products = _jvp(predict, modules[source], tangent, [modules[name] for name in targets])
    return dict(zip(targets, products))


def noise_stability(
    model: nn.Module,
    predict: Callable[[], Tensor],
    labels: Tensor | None = None,
    *,
    gamma: float | None = None,
    noise_scale: float = 0.1,
    num_noise_samples: int = 4,
    num_probes: int = 16,
    generator: torch.Generator | None = None,
) -> NoiseStability:
    """Measure Arora et al.'s noise-stability quantities on the batch ``predict()`` evaluates.

    ``predict()`` must run the model's forward once on a fixed batch and return logits ``(batch, classes)``. The
    layers are the ``nn.Linear`` / ``nn.Conv1d/2d/3d`` submodules in the order they run; ``x_i`` is layer ``i``'s
    output, ``phi(x_{i-1})`` its input and ``A_i`` its linear map without bias. ``phi(x_i)`` is the next measured
    layer's input (so activation, pooling and flattening in between all count; with skip connections it also
    carries other branches). A layer run more than once per forward is not measured (a reason goes to ``skipped``).

    ``||A_i||_F`` is exact: ``||W||_F`` (times the square root of the number of positions a Linear is applied at),
    and for a convolution the operator's norm on the input's shape (squared weights applied to an all-ones input,
    or, for a padding mode other than zeros, the operator applied to every one-hot input). ``||J^{i,j}||_F^2`` is
    exact when ``x_i`` has at most ``num_probes`` entries per example (one JVP per basis vector), else Hutchinson's
    estimate from ``num_probes`` Gaussian probes (relative standard error at most ``sqrt(2 / num_probes)``).
    Interlayer smoothness takes ``num_noise_samples`` Gaussian ``eta`` with ``||eta|| = noise_scale ||x_i||`` per
    example and reports the minimum of ``||eta|| ||x_j|| / (||x_i|| ||M^{i,j}(x_i + eta) - J^{i,j}(x_i + eta)||)``,
    which over-estimates the worst case over all ``eta``. Pairs ``(i, j)`` with ``J^{i,j} = 0`` are left out, and
    ``mu_{i->}`` takes only ``j > i`` (Arora et al. also allow ``j = i``, where it is ``1 / sqrt(dim x_i)``).

    Cost: per layer, ``1 + min(dim x_i, num_probes) + 2 num_noise_samples`` forwards of the batch; memory: a copy
    of every layer's input and output for the batch. An operation without forward-mode AD in the forward makes
    the affected layers' noise response a reason in ``skipped`` instead of an error; so does BatchNorm under
    autocast (torch's forward-mode AD mixes dtypes there), so measure in full precision where possible.

    ``gamma`` defaults to the 10th percentile of the margins when ``labels`` are given. Parameters, buffers,
    ``.grad``, training flags and the global generators are left as found; ``generator`` drives all noise.

    Examples:
        >>> _ = torch.manual_seed(0)
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        >>> x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
        >>> report = noise_stability(net, lambda: net(x), y, gamma=1.0)
        >>> report.layers, report.activation_contraction >= 1, report.skipped
        (['0', '2'], True, [])
    """
    if noise_scale <= 0 or num_noise_samples < 1 or num_probes < 1:
        raise ValueError(
            "`noise_scale` must be > 0 and `num_noise_samples`, `num_probes` >= 1, got "
            f"{noise_scale}, {num_noise_samples}, {num_probes}."
        )
    with preserved_state(model), differentiable_kernels():  # forward-mode AD through attention (ViT)
        model.eval()
        logits, layers, left_out = _record(model, predict)
        skipped = [f"{name}: {why}" for name, why in left_out.items()]
        if not layers:
            return NoiseStability(skipped=[*skipped, "no nn.Linear / nn.Conv layer ran once in the forward"])
        report = _noiseless_report(layers, skipped)
        failed = _measure_noise_responses(
            report, predict, layers, logits, noise_scale, num_noise_samples, num_probes, generator
        )
        if failed:
            report.skipped.append("effective_params: needs every layer's interlayer cushion")
        elif left_out or len(report.layer_cushion) < len(layers):  # Theorem 4.1 sums over every layer
            unmeasured = [*left_out, *(layer.name for layer in layers if layer.name not in report.layer_cushion)]
            report.skipped.append(f"effective_params: sums over every layer, and {unmeasured} could not be measured")
        else:
            report.effective_params = _effective_params(report, logits, labels, gamma)
    return report


def _noiseless_report(layers: list[_Layer], skipped: list[str]) -> NoiseStability:
    """A report with the quantities that need no noise: layer cushions and the activation contraction."""
    report = NoiseStability(layers=[layer.name for layer in layers], skipped=skipped)
    for layer in layers:
        cushion = _layer_cushion(layer)
        if math.isnan(cushion):
            report.skipped.append(f"layer_cushion/{layer.name}: its weight is zero or so is every example's input")
        else:
            report.layer_cushion[layer.name] = cushion
    if len(layers) > 1:
        report.activation_contraction = _activation_contraction(layers, report.skipped)
    else:
        report.skipped.append("activation_contraction, interlayer cushion and smoothness need two layers")
    return report


def _measure_noise_responses(
    report: NoiseStability,
    predict: Callable[[], Tensor],
    layers: list[_Layer],
    logits: Tensor,
    noise_scale: float,
    num_draws: int,
    num_probes: int,
    generator: torch.Generator | None,
) -> bool:
    """Add every layer's noise attenuation, interlayer cushion and smoothness to ``report``; whether a layer's
    noise response failed (its reason is in ``report.skipped``)."""
    smoothness, failed = [], False
    for index, layer in enumerate(layers):
        try:
            response = _noise_response(predict, layers, index, logits, noise_scale, num_draws, num_probes, generator)
        except (RuntimeError, NotImplementedError) as error:  # e.g. an operation without forward-mode AD
            report.skipped.append(f"{layer.name}: noise response failed ({type(error).__name__}: {error})")
            failed = True
            continue
        report.noise_attenuation[layer.name] = response.attenuation
        smoothness.extend(response.smoothness)
        if response.cushion is not None:
            report.interlayer_cushion[layer.name] = response.cushion
        elif index < len(layers) - 1:
            report.skipped.append(f"interlayer_cushion/{layer.name}: no later layer depends on it")
    pairs = torch.cat(smoothness) if smoothness else torch.empty(0)
    if pairs.numel():  # none when no later layer depends on any measured one
        report.interlayer_smoothness = float(pairs.min())
    return failed


def _norms(tensor: Tensor) -> Tensor:
    return tensor.flatten(1).double().norm(dim=1)


def _record(model: nn.Module, predict: Callable[[], Tensor]) -> tuple[Tensor, list[_Layer], dict[str, str]]:
    """One forward that records every layer's calls: ``(logits, layers run once in order, {name: why} for the layers
    that ran but can't be measured)``."""
    calls: dict[str, list[_Layer]] = {}

    def recorder(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> None:
            # clones: an in-place activation would overwrite the output after the hook
            calls.setdefault(name, []).append(_Layer(name, module, args[0].detach().clone(), output.detach().clone()))

        return hook

    handles = [m.register_forward_hook(recorder(n)) for n, m in model.named_modules() if isinstance(m, LAYER_TYPES)]
    try:
        with torch.no_grad():
            logits = predict().detach()
    finally:
        for handle in handles:
            handle.remove()
    once = [records[0] for records in calls.values() if len(records) == 1]
    layers = [layer for layer in once if _per_example(layer, len(logits))]
    left_out = {name: f"ran {len(records)} times in one forward" for name, records in calls.items() if len(records) > 1}
    left_out |= {
        layer.name: f"its output {list(layer.output.shape)} doesn't hold the {len(logits)} examples along dimension 0 "
        "(a layer run on inputs the batch shares, such as Swin V2's position-bias MLP, or on positions folded into the "
        "batch dimension)"
        for layer in once
        if not _per_example(layer, len(logits))
    }
    return logits, layers, left_out


def _per_example(layer: _Layer, examples: int) -> bool:
    """Whether the layer ran on the batch's examples (along dimension 0 of its input and output)."""
    return layer.input.ndim > 0 and layer.output.ndim > 0 and len(layer.input) == len(layer.output) == examples


def _linear_part(module: nn.Module, inputs: Tensor) -> Tensor:
    if isinstance(module, nn.Linear):
        return nn.functional.linear(inputs, module.weight)
    return module._conv_forward(inputs, module.weight, None)


@torch.no_grad()
def _operator_frobenius(module: nn.Module, shape: torch.Size) -> float:
    """``||A||_F`` of the layer's linear map on one example of input shape ``shape`` (no batch dimension)."""
    weight = module.weight.double()
    if isinstance(module, nn.Linear):
        return float(weight.norm()) * math.sqrt(math.prod(shape[:-1]))
    if module.padding_mode == "zeros":
        ones = torch.ones(1, *shape, dtype=weight.dtype, device=weight.device)
        return math.sqrt(float(module._conv_forward(ones, weight.square(), None).sum()))
    size = math.prod(shape)
    total = 0.0
    for start in range(0, size, _ONE_HOT_CHUNK):
        rows = torch.arange(start, min(start + _ONE_HOT_CHUNK, size), device=weight.device)
        basis = nn.functional.one_hot(rows, size).to(weight.dtype).view(-1, *shape)
        total += float(module._conv_forward(basis, weight, None).square().sum())
    return math.sqrt(total)


@torch.no_grad()
def _layer_cushion(layer: _Layer) -> float:
    """``mu_i``, the largest ``mu`` with ``mu ||A_i|| ||phi|| <= ||A_i phi||`` on every example: an example whose
    input is zero holds it for every ``mu``, so it is left out (``nan`` if no example is left, or ``A_i = 0``)."""
    inputs = layer.input.to(layer.module.weight.dtype)  # under autocast the recorded input may be half precision
    image, norms = _norms(_linear_part(layer.module, inputs)), _norms(inputs)
    ratios = (image / (_operator_frobenius(layer.module, inputs.shape[1:]) * norms))[norms > 0]
    return float(ratios.min()) if len(ratios) else math.nan


def _activation_contraction(layers: list[_Layer], skipped: list[str]) -> float:
    """``c``, the smallest with ``||x_i|| <= c ||phi(x_i)||`` on every example: infinite where an example's
    ``phi(x_i)`` is zero but not ``x_i`` (every ReLU unit off), which ``skipped`` then explains."""
    per_pair = []
    for layer, after in itertools.pairwise(layers):
        before, kept = _norms(layer.output), _norms(after.input)
        holds = before > 0  # an example with x_i = 0 holds the inequality for every c
        dead = int((holds & (kept == 0)).sum())
        if dead:
            skipped.append(
                f"activation_contraction is infinite: {dead} example(s) have phi(x_i) = 0 but x_i != 0 after layer "
                f"{layer.name!r} (every unit off), so effective_params is infinite too: the bound says nothing"
            )
        per_pair.append(before[holds] / kept[holds])
    ratios = torch.cat(per_pair)
    if not len(ratios):
        skipped.append("activation_contraction: every layer's output is zero on every example")
        return math.nan
    return float(ratios.max())


@contextmanager
def _intervention(
    source: nn.Module,
    replace: Callable[[Tensor], Tensor],
    targets: Sequence[nn.Module],
    read: Callable[[Tensor], Tensor],
) -> Iterator[list[Tensor | None]]:
    """Replace ``source``'s output by ``replace(output)``; collect ``read(output)`` of each target (``None`` if it
    did not run) into the yielded list once the block has run the forward."""
    results: list[Tensor | None] = [None] * len(targets)

    def reader(index: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> None:
            results[index] = read(output)

        return hook

    handles = [source.register_forward_hook(lambda module, args, output: replace(output))]
    handles += [target.register_forward_hook(reader(index)) for index, target in enumerate(targets)]
    try:
        yield results
    finally:
        for handle in handles:
            handle.remove()


def _tangent_of(output: Tensor) -> Tensor:
    tangent = fwAD.unpack_dual(output).tangent
    return torch.zeros_like(output) if tangent is None else tangent.clone()


@torch.no_grad()
def _jvp(
    predict: Callable[[], Tensor], source: nn.Module, tangent: Tensor, targets: Sequence[nn.Module]
) -> list[Tensor]:
    with (
        fwAD.dual_level(),
        _intervention(source, lambda out: fwAD.make_dual(out, tangent), targets, _tangent_of) as got,
    ):
        predict()
    return [product for product in got if product is not None]


@torch.no_grad()
def _shifted(
    predict: Callable[[], Tensor], source: nn.Module, shift: Tensor, targets: Sequence[nn.Module]
) -> tuple[Tensor, list[Tensor]]:
    with _intervention(source, lambda out: out + shift, targets, lambda out: out.detach().clone()) as got:
        logits = predict()
    return logits, [output for output in got if output is not None]


def _gaussian_like(tensor: Tensor, generator: torch.Generator | None) -> Tensor:
    device = tensor.device if generator is None else generator.device
    return torch.randn(tensor.shape, generator=generator, device=device, dtype=tensor.dtype).to(tensor.device)


def _probes(like: Tensor, num_probes: int, generator: torch.Generator | None) -> Iterator[tuple[Tensor, float]]:
    """``(probe, weight)`` with ``sum weight ||J probe||^2`` equal (basis) or unbiased (Gaussian) for ``||J||_F^2``."""
    size = like[0].numel()
    if size <= num_probes:
        for index in range(size):
            basis = torch.zeros_like(like).flatten(1)
            basis[:, index] = 1
            yield basis.view_as(like), 1.0
    else:
        for _ in range(num_probes):
            yield _gaussian_like(like, generator), 1.0 / num_probes


@dataclass
class _Response:
    attenuation: float
    cushion: float | None
    smoothness: list[Tensor]
    """Per noise draw, the smoothness ratios of every (dependent later layer, example) pair."""


def _jacobian_frobenius_sq(
    predict: Callable[[], Tensor],
    source: _Layer,
    targets: Sequence[nn.Module],
    num_probes: int,
    generator: torch.Generator | None,
) -> Tensor:
    """``||J^{i,j}||_F^2`` per target ``j`` (rows) and example (columns)."""
    total = torch.zeros(len(targets), len(source.output), dtype=torch.float64, device=source.output.device)
    for probe, weight in _probes(source.output, num_probes, generator):
        total += weight * torch.stack([_norms(p).square() for p in _jvp(predict, source.module, probe, targets)])
    return total


def _interlayer_cushion(
    predict: Callable[[], Tensor],
    source: _Layer,
    targets: Sequence[nn.Module],
    num_probes: int,
    generator: torch.Generator | None,
) -> tuple[list[Tensor], Tensor, float | None]:
    """``J^{i,j} x_i`` per target, whether each (target, example) depends on ``x_i`` at all, and ``mu_{i->}``."""
    frobenius_sq = _jacobian_frobenius_sq(predict, source, targets, num_probes, generator)
    image = _jvp(predict, source.module, source.output, targets)
    depends = frobenius_sq > 0
    mu = torch.stack([_norms(p) for p in image]) / (frobenius_sq.sqrt() * _norms(source.output))
    return image, depends, float(mu[depends].min()) if bool(depends.any()) else None


def _noise_response(
    predict: Callable[[], Tensor],
    layers: list[_Layer],
    index: int,
    logits: Tensor,
    noise_scale: float,
    num_draws: int,
    num_probes: int,
    generator: torch.Generator | None,
) -> _Response:
    """Interlayer cushion and smoothness from layer ``index`` to every later layer, and its noise attenuation."""
    source, later = layers[index], layers[index + 1 :]
    modules, x = [layer.module for layer in later], source.output
    response = _Response(math.nan, None, [])
    if later:
        image, depends, response.cushion = _interlayer_cushion(predict, source, modules, num_probes, generator)
        later_norms = torch.stack([_norms(layer.output) for layer in later])
    attenuation = []
    for _ in range(num_draws):
        noise = _gaussian_like(x, generator)
        eta = noise * (noise_scale * _norms(x) / _norms(noise)).to(x.dtype).view(-1, *[1] * (x.ndim - 1))
        noisy_logits, moved = _shifted(predict, source.module, eta, modules)
        attenuation.append(_norms(noisy_logits - logits) / _norms(logits))
        if later:
            _check_tangents(moved, later, depends)
            linear = [a + b for a, b in zip(image, _jvp(predict, source.module, eta, modules))]
            residual = torch.stack([_norms(m - lin) for m, lin in zip(moved, linear)])
            response.smoothness.append((noise_scale * later_norms / residual)[depends])
    response.attenuation = float(torch.cat(attenuation).mean())
    return response


def _check_tangents(moved: list[Tensor], later: list[_Layer], depends: Tensor) -> None:
    """Refuse a zero Jacobian where the noise does move a later layer: a derivative lost on the way, not a fact. A lost
    derivative is zero for every example; one example's alone is a fact (every ReLU unit of it off: finite noise can
    switch one on, its derivative can't), so a later layer is refused only if it depends on no example at all."""
    moves = torch.stack([_norms(m - layer.output) > 1e-5 * _norms(layer.output) for m, layer in zip(moved, later)])
    if bool((moves & ~depends.any(dim=1, keepdim=True)).any()):
        raise RuntimeError(
            "the forward-mode derivative is zero where the later layers' outputs move: an operation passes no "
            "tangent (torch.utils.checkpoint with use_reentrant=True, or an autograd.Function without a jvp); "
            "use use_reentrant=False"
        )


def _effective_params(report: NoiseStability, logits: Tensor, labels: Tensor | None, gamma: float | None) -> float:
    given = gamma
    if gamma is None and labels is not None:
        gamma = margin_quantile(logits, labels)
    if gamma is None or gamma <= 0:
        if gamma is None:
            why = "no labels to take it from: pass `gamma` or `labels`"
        elif given is None:
            why = f"the margins' 10th percentile is {gamma:.3g}: at least a tenth of the examples are misclassified"
        else:
            why = f"`gamma` was given as {gamma}"
        report.skipped.append(f"effective_params: needs a margin gamma > 0; {why}")
        return math.nan
    depth = len(report.layers)
    contraction = report.activation_contraction if depth > 1 else 1.0
    total = sum(
        1.0 / (cushion**2 * report.interlayer_cushion.get(name, 1.0) ** 2)
        for name, cushion in report.layer_cushion.items()
    )
    return contraction**2 * depth**2 * float(_norms(logits).max()) ** 2 * total / gamma**2
