"""Cheap capacity measures to log beside a compression bound (Jiang et al. 2019, "Fantastic generalization measures").

None of these is a certified bound: they are the norm-, margin- and sharpness-based quantities that Jiang et al.
found more or less predictive of the generalization gap, cheap enough to log during training. All run on one fixed
batch, in eval mode, and leave the model's parameters, buffers, ``.grad``, training flags and the global random
generators exactly as they found them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn
from torchmetrics import Metric

from lightning_nt.common.compiled import renamed_state_dict
from lightning_nt.common.state import preserved_state
from lightning_nt.compression.subspace import detached_deepcopy

__all__ = ["LAYER_TYPES", "capacity_measures", "classification_margins", "margin_quantile", "r_norm"]

LAYER_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
"""The modules treated as layers: their ``weight`` is the layer's linear map."""

SIGMA_RANGE = (1e-4, 10.0)
"""The interval the PAC-Bayes sharpness bisection searches, on a log scale."""

BISECTION_STEPS = 12
"""Halvings of ``log(sigma)``: ~5 decades / 2^12, so sigma is known to a factor of ~1.003."""

_SHAPE_ONLY = (nn.Flatten, nn.Identity, nn.Dropout)


def classification_margins(logits: Tensor, labels: Tensor) -> Tensor:
    """``f(x)[y] - max_{j != y} f(x)[j]`` per example.

    Examples:
        >>> classification_margins(torch.tensor([[3.0, 1.0, 2.0], [0.0, 5.0, 1.0]]), torch.tensor([0, 2]))
        tensor([ 1., -4.])
    """
    index = labels.to(logits.device).long().unsqueeze(1)
    correct = logits.gather(1, index).squeeze(1)
    others = logits.scatter(1, index, -math.inf).amax(dim=1)
    return correct - others


def margin_quantile(logits: Tensor, labels: Tensor, quantile: float = 0.1) -> float:
    """The ``quantile`` of the margins over the batch (``torch.quantile``: linear interpolation between examples).

    Examples:
        >>> margin_quantile(torch.tensor([[1.0, 0.0]] * 10), torch.zeros(10, dtype=torch.long))
        1.0
    """
    return float(torch.quantile(classification_margins(logits, labels).double(), quantile))


def capacity_measures(
    model: nn.Module,
    predict: Callable[[], Tensor],
    labels: Tensor,
    *,
    initial_parameters: Mapping[str, Tensor] | None = None,
    sharpness_target: float = 0.1,
    num_sharpness_samples: int = 4,
    generator: torch.Generator | None = None,
    inputs: Tensor | None = None,
    loss: Callable[[], Tensor] | None = None,
) -> tuple[dict[str, float], list[str]]:
    """Norm, margin and sharpness capacity measures of ``model`` on the batch ``predict()`` evaluates.

    ``predict()`` runs the model's forward on a fixed batch and returns logits ``(batch, classes)``; ``labels``
    are that batch's class indices. Layers are the ``nn.Linear`` / ``nn.Conv1d/2d/3d`` submodules, and ``W`` is a
    layer's weight reshaped to ``(out, -1)``. Returns ``(scalars, skipped)``; a measure that can't be taken is left
    out of ``scalars`` and a reason is appended to ``skipped``. The keys:

    - ``num_params``: number of trainable parameters.
    - ``log_spectral_product``, ``log_frobenius_product``: ``sum ln ||W||_2`` and ``sum ln ||W||_F`` over layers.
    - ``sum_frobenius_sq``: ``sum ||W||_F^2`` over layers.
    - ``distance_from_init``: ``||theta - theta0||_2`` over the parameters named in ``initial_parameters``
      (names as in ``model.named_parameters()``, same shapes).
    - ``path_norm``: l2 path norm, the sum of the outputs of a copy of the model with every parameter squared
      (buffers kept) on one all-ones example shaped like ``inputs[0]``; needs ``inputs``.
    - ``margin``: 10th percentile of ``f(x)[y] - max_{j != y} f(x)[j]`` over the batch.
    - ``pacbayes_sigma``: the largest ``sigma`` in ``SIGMA_RANGE`` (log-scale bisection, ``BISECTION_STEPS``
      steps) such that adding ``N(0, sigma^2 I)`` to every parameter raises the batch's 0-1 error (or ``loss()``,
      when given), averaged over ``num_sharpness_samples`` draws, by at most ``sharpness_target``. The same draws
      are reused at every sigma.
    - ``pacbayes_flatness``: ``1 / sigma^2``.
    - ``pacbayes_bound_term``: ``||theta - theta0||^2 / (4 sigma^2) + ln(m / sigma) + 10`` with ``m`` the batch
      size (needs ``initial_parameters``).
    - ``r_norm``: for a two-layer net ``Linear -> ReLU -> Linear`` (read from the module order), the exact R-norm
      of the function it computes (:func:`r_norm`: biases unpenalised, units on one hyperplane merged), which
      splitting a unit or rescaling ``(w, b, a) -> (c w, c b, a / c)`` leaves unchanged.
    - ``f1_path_norm``: for the same nets, ``sum_k ||a_k||_2 ||(w_k, b_k)||_2`` with ``(w_k, b_k)`` row ``k`` of the
      first weight with its bias appended and ``a_k`` column ``k`` of the second weight: an upper bound on the
      R-norm that depends on how the function is written (formerly reported as ``r_norm``).

    Examples:
        >>> _ = torch.manual_seed(0)
        >>> net = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 2))
        >>> x = torch.randn(16, 2)
        >>> scalars, skipped = capacity_measures(net, lambda: net(x), net(x).argmax(1), inputs=x)
        >>> scalars["num_params"], scalars["margin"] >= 0, skipped
        (17.0, True, ['distance_from_init: no initial_parameters'])
    """
    if sharpness_target <= 0 or num_sharpness_samples < 1:
        raise ValueError(
            "`sharpness_target` must be > 0 and `num_sharpness_samples` >= 1, got "
            f"{sharpness_target}, {num_sharpness_samples}."
        )
    scalars: dict[str, float] = {"num_params": float(sum(p.numel() for p in model.parameters() if p.requires_grad))}
    skipped: list[str] = []
    with preserved_state(model):
        model.eval()
        with torch.no_grad():
            logits = predict()
        scalars["margin"] = margin_quantile(logits, labels)
        scalars.update(_weight_norms(model, skipped))
        distance = _distance_from_init(model, initial_parameters, skipped)
        if distance is not None:
            scalars["distance_from_init"] = distance
        if inputs is not None:
            scalars.update(_path_norm(model, inputs, skipped))
        else:
            skipped.append("path_norm: needs `inputs` (the batch's input tensor)")

        def objective() -> float:
            return float(loss()) if loss is not None else _batch_error(predict(), labels)

        sigma = _pacbayes_sigma(model, objective, sharpness_target, num_sharpness_samples, generator)
    if sigma in SIGMA_RANGE:
        skipped.append(f"pacbayes_sigma: the search stopped at its limit {sigma:g} of {SIGMA_RANGE}")
    scalars["pacbayes_sigma"] = sigma
    scalars["pacbayes_flatness"] = 1.0 / sigma**2
    if distance is not None:
        scalars["pacbayes_bound_term"] = distance**2 / (4 * sigma**2) + math.log(len(labels) / sigma) + 10
    scalars.update(_two_layer_norms(model, skipped))
    return scalars, skipped


def _layer_weights(model: nn.Module) -> list[Tensor]:
    return [m.weight.detach().reshape(m.weight.shape[0], -1) for m in model.modules() if isinstance(m, LAYER_TYPES)]


def _weight_norms(model: nn.Module, skipped: list[str]) -> dict[str, float]:
    weights = [w.double() for w in _layer_weights(model)]
    if not weights:
        skipped.append("weight norms: the model has no nn.Linear / nn.Conv layer")
        return {}
    frobenius = [float(torch.linalg.matrix_norm(w)) for w in weights]
    return {
        "log_spectral_product": sum(math.log(float(torch.linalg.matrix_norm(w, ord=2))) for w in weights),
        "log_frobenius_product": sum(math.log(f) for f in frobenius),
        "sum_frobenius_sq": sum(f**2 for f in frobenius),
    }


def _distance_from_init(
    model: nn.Module, initial_parameters: Mapping[str, Tensor] | None, skipped: list[str]
) -> float | None:
    if initial_parameters is None:
        skipped.append("distance_from_init: no initial_parameters")
        return None
    initial = renamed_state_dict(model, initial_parameters)  # saved with a submodule compiled the other way
    pairs = [
        (p.detach(), initial[name])
        for name, p in model.named_parameters()
        if name in initial and initial[name].shape == p.shape
    ]
    if not pairs:
        skipped.append("distance_from_init: no parameter of the model is in initial_parameters with its shape")
        return None
    return math.sqrt(sum(float((p.double() - p0.to(p.device).double()).square().sum()) for p, p0 in pairs))


def _path_norm(model: nn.Module, inputs: Tensor, skipped: list[str]) -> dict[str, float]:
    try:
        squared = detached_deepcopy(model).eval()
        with torch.no_grad():
            for p in squared.parameters():
                p.square_()
            return {"path_norm": float(squared(torch.ones_like(inputs[:1])).sum())}
    except Exception as error:  # any model the copy or the all-ones forward does not suit
        skipped.append(f"path_norm: the squared copy's forward failed ({type(error).__name__}: {error})")
        return {}


def _batch_error(logits: Tensor, labels: Tensor) -> float:
    return float((logits.argmax(dim=1) != labels.to(logits.device)).double().mean())


def _pacbayes_sigma(
    model: nn.Module,
    objective: Callable[[], float],
    target: float,
    num_draws: int,
    generator: torch.Generator | None,
) -> float:
    """Bisect ``log(sigma)``; must run inside ``preserved_state(model)``, which puts the parameters back."""
    params = list(model.parameters())
    origin = [p.detach().clone() for p in params]
    device = "cpu" if generator is None else generator.device
    seeds = torch.randint(0, 2**62, (num_draws,), generator=generator, device=device).tolist()
    with torch.no_grad():
        allowed = objective() + target

    @torch.no_grad()
    def noisy_error(sigma: float) -> float:
        errors = []
        for seed in seeds:
            noise = torch.Generator(device=device).manual_seed(seed)
            for p, start in zip(params, origin):
                draw = torch.randn(start.shape, generator=noise, device=device, dtype=p.dtype)
                p.copy_(start + sigma * draw.to(start.device))
            errors.append(objective())
        return sum(errors) / len(errors)

    low, high = (math.log(s) for s in SIGMA_RANGE)
    if noisy_error(SIGMA_RANGE[1]) <= allowed:
        return SIGMA_RANGE[1]
    if noisy_error(SIGMA_RANGE[0]) > allowed:
        return SIGMA_RANGE[0]
    for _ in range(BISECTION_STEPS):
        middle = (low + high) / 2
        low, high = (middle, high) if noisy_error(math.exp(middle)) <= allowed else (low, middle)
    return math.exp(low)


def _two_layer_relu(model: nn.Module, skipped: list[str]) -> tuple[nn.Linear, nn.Linear] | None:
    """The two ``nn.Linear`` layers of a ``Linear -> ReLU -> Linear`` net (read from the module order), if it is one."""
    leaves = [
        m
        for name, m in model.named_modules()
        if all(child == "parametrizations" for child, _ in m.named_children())  # a parametrized Linear is a leaf
        and not isinstance(m, (*_SHAPE_ONLY, Metric))
        and "parametrizations" not in name.split(".")
    ]
    expected = (nn.Linear, nn.ReLU, nn.Linear)
    if len(leaves) != 3 or not all(isinstance(m, kind) for m, kind in zip(leaves, expected)):
        skipped.append("r_norm, f1_path_norm: the model is not Linear -> ReLU -> Linear (read from its module order)")
        return None
    return leaves[0], leaves[2]


def _two_layer_norms(model: nn.Module, skipped: list[str]) -> dict[str, float]:
    layers = _two_layer_relu(model, skipped)
    if layers is None:
        return {}
    first, second = layers
    weights = first.weight.detach().double()
    biases = torch.zeros(len(weights), dtype=weights.dtype, device=weights.device)
    if first.bias is not None:
        biases = first.bias.detach().double()
    outgoing = second.weight.detach().double().T  # row k: what unit k adds to the outputs
    rows = torch.cat([weights, biases.unsqueeze(1)], dim=1)
    return {
        "f1_path_norm": float((outgoing.norm(dim=1) * rows.norm(dim=1)).sum()),
        "r_norm": r_norm(weights, biases, outgoing),
    }


def r_norm(weights: Tensor, biases: Tensor, outgoing: Tensor, tolerance: float = 1e-6) -> float:
    """The exact R-norm of ``x -> sum_k outgoing[k] relu(weights[k] . x + biases[k])`` (plus any affine map).

    The R-norm (Savarese et al. 2019; Ongie et al. 2020) is the least ``sum_k ||a_k|| ||w_k||`` over all two-layer
    ReLU nets computing the function, biases unpenalised and an affine part free; for a finite net it is found by
    writing every unit on its hyperplane: ``(w, b, a) -> (w / ||w||, b / ||w||, a ||w||)``, turning units on the
    same hyperplane with the opposite orientation around (``relu(-z) = relu(z) - z``, the affine part being free),
    merging the units on each hyperplane (summing their outgoing vectors) and summing the norms of the merged
    outgoing vectors. Units with ``w = 0`` are constants and cost nothing. In one dimension it is the integral of
    ``|f''|``: the sum of the jumps of the slope. Hyperplanes closer than ``tolerance`` (relative) are one.

    Examples:
        >>> w, b = torch.tensor([[2.0], [-1.0]]), torch.tensor([2.0, -1.0])   # two units, both with a knot at x = -1
        >>> r_norm(w, b, torch.tensor([[1.0], [2.0]]))   # 1 * 2 (first) + 2 * 1 (second, turned around): slope jump 4
        4.0
    """
    weights, biases, outgoing = weights.double(), biases.double(), outgoing.double()
    scale = weights.norm(dim=1)
    active = scale > 0
    if not bool(active.any()):
        return 0.0
    planes = torch.cat([weights[active], biases[active].unsqueeze(1)], dim=1) / scale[active].unsqueeze(1)
    vectors = outgoing[active] * scale[active].unsqueeze(1)
    # orientation: the sign of the first clearly nonzero coordinate of the unit normal (one has |u_i| >= 1/sqrt(d))
    normals = planes[:, :-1]
    leading = (normals.abs() >= 0.5 / math.sqrt(normals.shape[1])).double().argmax(dim=1, keepdim=True)
    planes = planes * torch.sign(normals.gather(1, leading))  # the unit's outgoing vector is unchanged
    distances = torch.cdist(planes, planes, compute_mode="donot_use_mm_for_euclid_dist")  # exact zeros for equal
    sizes = planes.norm(dim=1)
    same = distances <= tolerance * (1 + torch.maximum(sizes.unsqueeze(0), sizes.unsqueeze(1)))
    group = same.double().argmax(dim=1)  # each unit joins the first unit on its hyperplane
    merged = torch.zeros_like(vectors).index_add_(0, group, vectors)
    return float(merged.norm(dim=1).sum())
