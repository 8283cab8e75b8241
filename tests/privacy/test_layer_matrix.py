"""Every clipping engine, over a matrix of layer types, against a ``vmap(grad)`` per-example clip-and-sum reference.

For every layer a network contains, each engine must either form exactly ``sum_i g_i min(1, C / ||g_i||)`` (and
nothing of other examples) or refuse, before any step, naming the layer: a wrong per-example norm is a privacy hole
(the noise is calibrated to ``C``). Each case is a tiny float64 network (the layer under test, then a trainable
linear head) on a batch of five distinct examples, with ``C`` between their gradient norms (some clipped, some
not). The engines are driven through the strategy's own entry points, in its order: the module checks
(``check_module``), ``resolved_mode`` and the engine's option and precision checks, the engine factory, the
example-independence check on the batch, the watch for parameters used outside their layers, then the step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from opacus.layers import DPGRU, DPLSTM, DPRNN, DPMultiheadAttention
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from lightning_nt.common import loss_from_output
from lightning_nt.common.layers import StandardizedConv2d
from lightning_nt.privacy.engines import engine_class, resolved_mode
from lightning_nt.privacy.engines.uses import ParameterUses
from lightning_nt.privacy.independence import check_example_independence
from lightning_nt.privacy.module_guards import (
    check_batch_norm_in_eval,
    check_module,
    check_state_unchanged,
    state_versions,
)
from tests.helpers.engines import NoPrecision, noiseless_engine
from tests.helpers.third_party import Conv1D, LayerNorm2d

ENGINES = ["hooks", "functorch", "ghost", "bk", "auto"]
ROWS = 5
OUTPUTS = 2
TOLERANCE = 1e-10


class Transposed(nn.Module):
    """A sequence-first layer inside a batch-first network: ``[B, T, d] -> [T, B, d]``, the layer, and back."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: Tensor) -> Tensor:
        return _first(self.layer(x.transpose(0, 1))).transpose(0, 1)


class FirstOutput(nn.Module):
    """A layer that returns a tuple (recurrent layers, attention): its first element."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: Tensor) -> Tensor:
        return _first(self.layer(x))


class SelfAttention(nn.Module):
    """``nn.MultiheadAttention`` as self-attention on a batch-first ``[B, T, d]`` input."""

    def __init__(
        self,
        batch_first: bool,
        layer: type[nn.Module] = nn.MultiheadAttention,
        positional: bool = False,
        **options: object,
    ) -> None:
        super().__init__()
        self.attention = layer(4, 2, batch_first=batch_first, **options)
        self.positional = positional  # the optional arguments passed positionally, the mask as None

    def forward(self, x: Tensor) -> Tensor:
        if not self.attention.batch_first:
            x = x.transpose(0, 1)
        if self.positional:
            out = self.attention(x, x, x, None, False)[0]
        else:
            out = self.attention(x, x, x, need_weights=False)[0]
        return out if self.attention.batch_first else out.transpose(0, 1)


class Functional(nn.Module):
    """A custom layer: a Parameter of its own used through ``F.linear`` (no per-sample rule exists for it)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(3, 4) / 2)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight)


class WeightedBag(nn.Module):
    """``nn.EmbeddingBag`` with ``per_sample_weights`` (each token weighted by a function of its id)."""

    def __init__(self) -> None:
        super().__init__()
        self.bag = nn.EmbeddingBag(10, 3, mode="sum")

    def forward(self, tokens: Tensor) -> Tensor:
        return self.bag(tokens, per_sample_weights=(tokens % 3 + 1).to(self.bag.weight.dtype))


class PositionalNone(nn.Module):
    """``layer(x, None)``: an optional second input passed positionally as ``None`` (``bag(tokens, None)``: no
    offsets). Opacus's hooks failed on it with an AttributeError (they detached every positional input)."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x, None)


class Scaled(nn.Module):
    """A custom layer (no per-sample rule: Opacus re-runs it with ``torch.func``) with an optional second input."""

    def __init__(self, outputs: int = 3) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(outputs, 4) / 2)

    def forward(self, x: Tensor, scale: Tensor | None = None) -> Tensor:
        out = F.linear(x, self.weight)
        return out if scale is None else out * scale


class FunctionalWeightedBag(nn.Module):
    """A custom layer pooling its own table by ``F.embedding_bag`` with ``per_sample_weights`` computed from the
    tokens: Opacus re-runs it whole with ``torch.func``, the weights included, so its per-example gradients are exact
    (they were refused as an ``EmbeddingBag`` with weights on a fit's first step)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(10, 3) / 2)

    def forward(self, tokens: Tensor) -> Tensor:
        weights = (tokens % 3 + 1).to(self.weight.dtype)
        return F.embedding_bag(tokens, self.weight, per_sample_weights=weights, mode="sum")


def _first(output: Tensor | tuple[Tensor, ...]) -> Tensor:
    return output[0] if isinstance(output, tuple) else output


class Case(pl.LightningModule):
    """The network under test as the strategy sees it: ``layer``, then a trainable head; per-example squared-error
    losses (their mean, or the ``[B]`` vector under ghost clipping). ``root`` adds a Parameter on the module itself."""

    def __init__(self, layer: nn.Module, sample: Tensor, per_example: bool = False, root: bool = False) -> None:
        super().__init__()
        self.layer = layer.double()
        self.head = nn.Sequential(nn.Flatten(), nn.LazyLinear(OUTPUTS, dtype=torch.float64))
        self.per_example = per_example
        self.scale = nn.Parameter(torch.tensor(1.5)) if root else None
        with torch.no_grad():
            self.head(self.layer(sample))  # materialise the head

    def forward(self, x: Tensor) -> Tensor:
        out = self.head(self.layer(x))
        return out * self.scale if self.scale is not None else out

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        inputs, targets = batch
        losses = 0.5 * (self(inputs) - targets).square().sum(1)
        return losses if self.per_example else losses.mean()


@dataclass(frozen=True)
class Layer:
    """One row of the matrix: the layer, and its input (a float ``[B, *shape]``, or tokens below ``vocab``)."""

    build: Callable[[], nn.Module]
    shape: tuple[int, ...]
    vocab: int | None = None
    root: bool = False
    vectorised: bool = True  # the reference by vmap (else example by example)

    def batch(self) -> tuple[Tensor, Tensor]:
        generator = torch.Generator().manual_seed(1)
        if self.vocab is not None:
            tokens = torch.randint(1, self.vocab, (ROWS, *self.shape), generator=generator).view(ROWS, -1)
            tokens[:, -1] = torch.arange(1, ROWS + 1)  # distinct examples
            if tokens.shape[1] > 2:
                tokens[:, 0] = tokens[:, 1]  # a repeated token in every example
                tokens[0, 2] = 0  # padding_idx, where a layer has one
            inputs = tokens.view(ROWS, *self.shape)
        else:
            inputs = torch.randn(ROWS, *self.shape, generator=generator, dtype=torch.float64)
            inputs = inputs * torch.linspace(0.2, 3.0, ROWS, dtype=torch.float64).view(-1, *[1] * len(self.shape))
        return inputs, torch.randn(ROWS, OUTPUTS, generator=generator, dtype=torch.float64)


def _conv_layers() -> dict[str, Layer]:
    spatial = {1: (9,), 2: (7, 6), 3: (5, 5, 4)}
    convs = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
    rows: dict[str, Layer] = {}
    for dims, conv in convs.items():
        shape = (4, *spatial[dims])
        name = f"conv{dims}d"
        rows[f"{name}"] = Layer(lambda c=conv: c(4, 6, 3), shape)
        rows[f"{name}-nobias-stride-dilation"] = Layer(
            lambda c=conv: c(4, 6, 2, stride=2, dilation=2, padding=1, bias=False), shape
        )
        rows[f"{name}-groups-tuple-padding"] = Layer(
            lambda c=conv, d=dims: c(4, 6, 3, groups=2, padding=(1, 0, 2)[:d]), shape
        )
        rows[f"{name}-depthwise"] = Layer(lambda c=conv: c(4, 8, 3, groups=4, padding=1), shape)
        rows[f"{name}-same"] = Layer(lambda c=conv: c(4, 6, 3, padding="same", dilation=2), shape)
        for mode in ("reflect", "replicate", "circular"):
            rows[f"{name}-{mode}"] = Layer(lambda c=conv, m=mode: c(4, 6, 3, padding=1, padding_mode=m), shape)
    rows["conv2d-same-even-kernel"] = Layer(lambda: nn.Conv2d(4, 6, (4, 2), padding="same"), (4, 7, 6))
    rows["conv2d-reflect-ghost-norms"] = Layer(  # few positions, wide channels: book-keeping's ghost norms
        lambda: nn.Conv2d(12, 12, 3, padding=1, padding_mode="reflect"), (12, 3, 3)
    )
    for mode in ("reflect", "circular"):  # the forward pads as the per-example rules do (it ignored padding_mode)
        rows[f"standardized-conv2d-{mode}"] = Layer(
            lambda m=mode: StandardizedConv2d(4, 6, 3, padding=1, padding_mode=m), (4, 5, 4)
        )
    rows["standardized-conv2d-same"] = Layer(lambda: StandardizedConv2d(4, 6, 3, padding="same"), (4, 5, 4))
    rows["convtranspose1d"] = Layer(lambda: nn.ConvTranspose1d(4, 6, 3, stride=2, output_padding=1), (4, 5))
    rows["convtranspose1d-groups"] = Layer(lambda: nn.ConvTranspose1d(4, 6, 3, groups=2, bias=False), (4, 5))
    rows["convtranspose2d"] = Layer(lambda: nn.ConvTranspose2d(4, 6, 3, stride=2, output_padding=1), (4, 3, 4))
    rows["convtranspose2d-groups"] = Layer(
        lambda: nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, groups=2, dilation=2), (4, 3, 4)
    )
    rows["convtranspose3d"] = Layer(
        lambda: nn.ConvTranspose3d(4, 6, 2, stride=(2, 1, 1), padding=(0, 1, 0)), (4, 3, 3, 2)
    )
    return rows


LAYERS: dict[str, Layer] = {
    "linear": Layer(lambda: nn.Linear(4, 3), (4,)),
    "linear-nobias": Layer(lambda: nn.Linear(4, 3, bias=False), (4,)),
    "linear-sequence": Layer(lambda: nn.Linear(4, 3), (3, 4)),
    "linear-sequence-nobias": Layer(lambda: nn.Linear(4, 3, bias=False), (3, 4)),
    **_conv_layers(),
    "embedding": Layer(lambda: nn.Embedding(10, 3), (4,), vocab=10),
    "embedding-padding": Layer(lambda: nn.Embedding(10, 3, padding_idx=0), (4,), vocab=10),
    "embedding-max-norm": Layer(lambda: nn.Embedding(10, 3, max_norm=1.0), (4,), vocab=10),
    "embeddingbag-sum": Layer(lambda: nn.EmbeddingBag(10, 3, mode="sum"), (4,), vocab=10),
    "embeddingbag-mean-padding": Layer(lambda: nn.EmbeddingBag(10, 3, mode="mean", padding_idx=0), (4,), vocab=10),
    "embedding-one-token": Layer(lambda: nn.Embedding(10, 3), (), vocab=10),
    "embedding-scale-grad-by-freq": Layer(lambda: nn.Embedding(10, 3, scale_grad_by_freq=True), (4,), vocab=10),
    "embedding-sparse": Layer(lambda: nn.Embedding(10, 3, sparse=True), (4,), vocab=10),
    "embeddingbag-per-sample-weights": Layer(WeightedBag, (4,), vocab=10),
    "embeddingbag-max": Layer(lambda: nn.EmbeddingBag(10, 3, mode="max"), (4,), vocab=10),
    "layernorm": Layer(lambda: nn.LayerNorm(4), (3, 4)),
    "layernorm-nobias": Layer(lambda: nn.LayerNorm(4, bias=False), (3, 4)),
    "layernorm-2d-shape": Layer(lambda: nn.LayerNorm((3, 4)), (3, 4)),
    "layernorm-no-affine": Layer(
        lambda: nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4, elementwise_affine=False)), (3, 4)
    ),
    "groupnorm": Layer(lambda: nn.GroupNorm(2, 4), (4, 5)),
    "instancenorm2d": Layer(lambda: nn.InstanceNorm2d(4, affine=True), (4, 3, 3)),
    "instancenorm1d-running-stats": Layer(lambda: nn.InstanceNorm1d(4, affine=True, track_running_stats=True), (4, 5)),
    "groupnorm-2d-input": Layer(lambda: nn.GroupNorm(2, 4), (4,)),
    "conv2d-valid": Layer(lambda: nn.Conv2d(4, 6, 3, padding="valid"), (4, 7, 6)),
    "linear-4d": Layer(lambda: nn.Linear(4, 3), (2, 3, 4)),
    "embedding-2d-positions": Layer(lambda: nn.Embedding(10, 3), (2, 3), vocab=10),
    "batchnorm1d": Layer(lambda: nn.BatchNorm1d(4), (4,)),
    "prelu": Layer(lambda: nn.PReLU(), (4, 5)),
    "prelu-channels": Layer(lambda: nn.PReLU(4), (4, 5)),
    "hf-conv1d": Layer(lambda: Conv1D(3, 4), (3, 4)),
    "convnext-layernorm2d": Layer(lambda: LayerNorm2d(4), (4, 3, 2)),
    "attention": Layer(lambda: SelfAttention(batch_first=True), (3, 4)),
    "attention-nobias": Layer(lambda: SelfAttention(batch_first=True, bias=False), (3, 4)),
    "attention-sequence-first": Layer(lambda: SelfAttention(batch_first=False), (3, 4)),
    **{
        f"{name}{'' if first else '-sequence-first'}": Layer(
            (lambda r=rnn: FirstOutput(r(4, 3, batch_first=True)))
            if first
            else (lambda r=rnn: Transposed(r(4, 3, batch_first=False))),
            (3, 4),
            vectorised=False,
        )
        for name, rnn in (
            ("lstm", nn.LSTM),
            ("gru", nn.GRU),
            ("rnn", nn.RNN),
            ("dplstm", DPLSTM),
            ("dpgru", DPGRU),
            ("dprnn", DPRNN),
        )
        for first in (True, False)
    },
    "dplstm-sequence-first-square": Layer(
        lambda: Transposed(DPLSTM(4, 3, batch_first=False)), (ROWS, 4), vectorised=False
    ),
    "dpattention": Layer(lambda: SelfAttention(batch_first=True, layer=DPMultiheadAttention), (3, 4)),
    "dpattention-sequence-first": Layer(lambda: SelfAttention(batch_first=False, layer=DPMultiheadAttention), (3, 4)),
    "dpattention-sequence-first-square": Layer(  # as many positions as examples: the rows agree in number
        lambda: SelfAttention(batch_first=False, layer=DPMultiheadAttention), (ROWS, 4)
    ),
    "attention-sequence-first-square": Layer(lambda: SelfAttention(batch_first=False), (ROWS, 4)),
    "custom-functional": Layer(Functional, (4,)),
    "custom-positional-none": Layer(lambda: PositionalNone(Scaled()), (4,)),
    "custom-weighted-bag": Layer(FunctionalWeightedBag, (4,), vocab=10),
    "embeddingbag-positional-none": Layer(lambda: PositionalNone(nn.EmbeddingBag(10, 3, mode="sum")), (4,), vocab=10),
    "dpattention-positional-none": Layer(
        lambda: SelfAttention(batch_first=True, layer=DPMultiheadAttention, positional=True), (3, 4)
    ),
    "root-parameter": Layer(lambda: nn.Linear(4, 3), (4,), root=True),
}


def _case(layer: Layer, frozen: bool, per_example: bool) -> Case:
    torch.manual_seed(0)
    inputs, _ = layer.batch()
    module = Case(layer.build(), inputs, per_example=per_example, root=layer.root).double()
    if frozen:
        module.layer.requires_grad_(False)
    return module


def _reference(module: Case, batch: tuple[Tensor, Tensor], vectorised: bool = True) -> tuple[dict[str, Tensor], Tensor]:
    """Each example's gradient of its own loss by ``vmap(grad)``; their norms."""
    trained = {n: p for n, p in module.named_parameters() if p.requires_grad}
    params = {n: p.detach() for n, p in trained.items()}
    buffers = dict(module.named_buffers())

    def loss(p: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        out = functional_call(module, (p, buffers), (x[None],))
        return 0.5 * (out - y[None]).square().sum()

    if vectorised:
        samples = vmap(grad(loss), in_dims=(None, 0, 0), randomness="error")(params, *batch)
    else:  # a layer without batching rules (recurrent kernels): one example at a time, by autograd
        rows = [
            torch.autograd.grad(0.5 * (module(x[None]) - y[None]).square().sum(), list(trained.values()))
            for x, y in zip(*batch)
        ]
        samples = {n: torch.stack([row[i] for row in rows]) for i, n in enumerate(trained)}
    norms = torch.stack([g.reshape(len(g), -1).norm(dim=1) for g in samples.values()], dim=1).norm(dim=1)
    return samples, norms


def _clipped_mean(samples: dict[str, Tensor], norms: Tensor, bound: float) -> dict[str, Tensor]:
    factors = (bound / (norms + 1e-6)).clamp(max=1.0)
    return {n: torch.einsum("b,b...->...", factors, g) / len(norms) for n, g in samples.items()}


def _private_step(mode: str, module: Case, batch: tuple[Tensor, Tensor], bound: float) -> dict[str, Tensor]:
    """One noiseless private step, through the strategy's checks and the engine's calls in the strategy's order;
    the update of every trainable parameter (the clipped sum over the batch size, at lr 1)."""
    check_module(module, fix_modules=False)
    chosen = resolved_mode(mode, module, sensitivity_probe=False)
    engine_class(chosen).check_options(chosen, virtual_steps=False, views=1, sensitivity_probe=False)
    engine_class(chosen).check_precision("32-true")
    before = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    engine = noiseless_engine(chosen, module, bound, ROWS)
    try:
        check_batch_norm_in_eval(module)
        engine.start()
        check_example_independence(module, engine, batch, 0)
        engine.discard_per_example_state()
        state = state_versions(module, buffer_values=True)
        uses = ParameterUses(module, engine.trainable_ids)
        uses.begin()
        try:
            output = module.training_step(batch, 0)
        finally:
            outside = uses.end(loss_from_output(output, "training_step") if "output" in locals() else None)
        engine.check_parameter_uses(outside)
        check_state_unchanged(module, state)
        loss = engine.take_output(output)
        engine.backward(loss, loss.backward, ROWS, NoPrecision())
        engine.optimizer.step()
    finally:
        engine.stop()
        engine.forget()
        engine.close()
    return {n: before[n] - p.detach() for n, p in module.named_parameters() if n in before}


_OPACUS_LAYER = r"this module can't give it: layer layer\.{} \({}\)"
_NO_RULE = r"Layer {} \({}\) has trainable parameters.*'hooks'"
_FUNCTORCH = r"'functorch'.*layers \['{} \(EmbeddingBag\)'\].*'hooks'"
_GHOST_REPLAY = r"^grad_sample_mode='ghost' can't clip layers \[\"{} \({}: .*not be bounded by max_grad_norm.*'hooks'"
_REPLAYED = [  # no per-sample rule of Opacus's: re-run under torch.func, which ghost clipping refuses
    ("convtranspose1d", "ConvTranspose1d"),
    ("convtranspose1d-groups", "ConvTranspose1d"),
    ("convtranspose2d", "ConvTranspose2d"),
    ("convtranspose2d-groups", "ConvTranspose2d"),
    ("convtranspose3d", "ConvTranspose3d"),
    ("prelu", "PReLU"),
    ("prelu-channels", "PReLU"),
    ("hf-conv1d", "Conv1D"),
    ("convnext-layernorm2d", "LayerNorm2d"),
]


def _every(message: str) -> dict[str, str]:
    return dict.fromkeys(ENGINES, message)


REFUSED: dict[tuple[str, bool], dict[str, str]] = {
    # (layer, frozen) -> {engine: what its refusal says (the layer's name, and the fix)}; any other case is exact
    **{("embedding-max-norm", frozen): _every(r"Embeddings \['layer'\] have max_norm") for frozen in (False, True)},
    **{
        (name, False): _every(r"Embeddings \['layer'\] have scale_grad_by_freq=True or sparse=True")
        for name in ["embedding-scale-grad-by-freq", "embedding-sparse"]
    },
    ("embeddingbag-max", False): _every(r"EmbeddingBags \['layer'\] pool with mode='max'"),
    ("embeddingbag-per-sample-weights", False): {
        **_every(r"layer\.bag\.weight is pooled by an EmbeddingBag with per_sample_weights"),
        "functorch": _FUNCTORCH.format(r"layer\.bag"),
    },
    **{
        (name, False): {"functorch": _FUNCTORCH.format("layer")}
        for name in ["embeddingbag-sum", "embeddingbag-mean-padding"]
    },
    ("embeddingbag-positional-none", False): {"functorch": _FUNCTORCH.format(r"layer\.layer")},
    **{(name, False): {"ghost": _GHOST_REPLAY.format("layer", kind)} for name, kind in _REPLAYED},
    ("custom-positional-none", False): {
        "bk": _NO_RULE.format(r"layer\.layer", "Scaled"),
        "ghost": _GHOST_REPLAY.format(r"layer\.layer", "Scaled"),
    },
    ("instancenorm1d-running-stats", False): _every(r"layer layer \(InstanceNorm1d\): .*running stats"),
    ("instancenorm1d-running-stats", True): _every(r"changed the module's \[.*'layer\.running_mean'"),  # in train()
    ("batchnorm1d", False): _every(r"layer: BatchNorm couples the examples"),
    ("batchnorm1d", True): _every(r"BatchNorm \['layer'\] is in training mode during a private step"),
    **{
        (name, False): _every(_OPACUS_LAYER.format("attention", "MultiheadAttention"))
        for name in ["attention", "attention-nobias", "attention-sequence-first", "attention-sequence-first-square"]
    },
    **{
        (f"{name}{suffix}", False): _every(_OPACUS_LAYER.format("layer", kind))
        for name, kind in [("lstm", "LSTM"), ("gru", "GRU"), ("rnn", "RNN")]
        for suffix in ("", "-sequence-first")
    },
    **{
        (name, False): {"bk": _NO_RULE.format("layer", kind), "ghost": _GHOST_REPLAY.format("layer", kind)}
        for name, kind in [("custom-functional", "Functional"), ("custom-weighted-bag", "FunctionalWeightedBag")]
    },
    **{
        ("root-parameter", frozen): {
            "bk": _NO_RULE.format("Case", "Case"),
            "ghost": _GHOST_REPLAY.format("<root>", "Case"),
        }
        for frozen in (False, True)
    },
    **{
        (f"dp{name}", False): {"ghost": r"Layer 'layer\.layer\.l0\.ih' ran twice.*'hooks' or 'bk'"}
        for name in [
            "lstm",
            "lstm-sequence-first",
            "lstm-sequence-first-square",
            "gru",
            "gru-sequence-first",
            "rnn",
            "rnn-sequence-first",
        ]
    },
    ("dpattention-sequence-first", False): _every(r"layer\.attention\.qlinear.*3"),  # its 3 positions as rows
    ("dpattention-sequence-first-square", False): _every(r"mixes the examples of the batch"),  # as many as examples
}


def _expected_refusal(mode: str, layer: str, frozen: bool) -> str | None:
    return REFUSED.get((layer, frozen), {}).get(mode)


@pytest.mark.parametrize("frozen", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["trainable", "frozen"])
@pytest.mark.parametrize("layer", list(LAYERS))
@pytest.mark.parametrize(
    "mode", [pytest.param(mode, marks=pytest.mark.slow) if mode == "functorch" else mode for mode in ENGINES]
)
def test_every_engine_clips_every_layer_exactly_or_refuses_it_by_name(mode, layer, frozen):
    """The noiseless update is the clipped sum of the ``vmap(grad)`` reference to 1e-10 (float64), or the engine
    refuses before the step, naming the layer (and the parameters are untouched)."""
    row = LAYERS[layer]
    batch = row.batch()
    module = _case(row, frozen, per_example=mode == "ghost")
    refusal = _expected_refusal(mode, layer, frozen)
    if refusal is not None:
        before = [p.detach().clone() for p in module.parameters()]
        with pytest.raises(RuntimeError, match=refusal):
            _private_step(mode, module, batch, 1.0)
        assert all(torch.equal(p, q) for p, q in zip(module.parameters(), before))
        return
    samples, norms = _reference(_case(row, frozen, per_example=False), batch, row.vectorised)
    ordered = norms.sort().values
    bound = float(ordered[1:3].mean())  # two examples below the bound, three clipped
    assert ordered[0] < ordered[1] < bound < ordered[2]
    expected = _clipped_mean(samples, norms, bound)
    update = _private_step(mode, module, batch, bound)
    assert set(update) == set(expected)
    scale = max(float(value.abs().max()) for value in expected.values())
    errors = {name: float((update[name] - expected[name]).abs().max()) / scale for name in expected}
    assert max(errors.values()) < TOLERANCE, errors


def test_the_matrix_names_every_refusal_it_expects():
    """Every expected refusal is for a row of the matrix (a renamed row can't silently turn a refusal into a pass)."""
    assert {layer for layer, _ in REFUSED} <= set(LAYERS)


class Fitted(Case):
    """A :class:`Case` that a Trainer fits: 20 distinct examples, batches of 5 (Poisson-sampled by the strategy)."""

    def __init__(self, layer: Layer, per_example: bool) -> None:
        torch.manual_seed(0)
        generator = torch.Generator().manual_seed(2)
        self.data = (
            torch.randn(4 * ROWS, *layer.shape, generator=generator, dtype=torch.float64)
            * torch.linspace(0.2, 3.0, 4 * ROWS, dtype=torch.float64).view(-1, *[1] * len(layer.shape)),
            torch.randn(4 * ROWS, OUTPUTS, generator=generator, dtype=torch.float64),
        )
        super().__init__(layer.build(), self.data[0][:1], per_example=per_example)

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*self.data), batch_size=ROWS)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=1.0)


class FirstUpdate(pl.Callback):
    """The first step's batch and the update it made."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batch = [t.clone() for t in batch]
        self.before = {n: p.detach().clone() for n, p in pl_module.named_parameters()}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.update = {n: self.before[n] - p.detach() for n, p in pl_module.named_parameters()}


def _fit(mode: str, layer: str, bound: float = 1.0) -> tuple[Fitted, FirstUpdate]:
    """One step of a real fit under ``DPStrategy(noise_multiplier=0)``."""
    from lightning_nt import DPStrategy
    from tests.helpers import tiny_trainer

    pl.seed_everything(0)
    module, record = Fitted(LAYERS[layer], per_example=mode == "ghost"), FirstUpdate()
    strategy = DPStrategy(  # the loader's own batches: the first step's is the first five examples
        noise_multiplier=0.0, max_grad_norm=bound, grad_sample_mode=mode, poisson_sampling=False
    )
    trainer = tiny_trainer(None, strategy=strategy, callbacks=[record], max_steps=1, num_sanity_val_steps=0)
    trainer.fit(module)
    return module, record


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["hooks", "ghost", "bk"])
def test_a_fit_clips_a_reflect_padded_convolution_exactly(mode):
    """The matrix's driver is the strategy's: a real fit gives the same exact clipped sum for the layer that hooks and
    ghost clipping got wrong before (a padding mode other than zeros) and book-keeping refused."""
    bound = 4.8  # between the first batch's norms (0.4, 2.6, 4.3 | 5.3, 7.0)
    with pytest.warns(UserWarning, match="noise_multiplier=0"):
        _, record = _fit(mode, "conv2d-reflect", bound)
    reference = Fitted(LAYERS["conv2d-reflect"], per_example=False)
    reference.load_state_dict(record.before)
    samples, norms = _reference(reference, tuple(record.batch))
    assert (norms > bound).any() and (norms < bound).any()
    expected = _clipped_mean(samples, norms, bound)
    for name, value in expected.items():
        torch.testing.assert_close(record.update[name], value, rtol=1e-10, atol=1e-12)


@pytest.mark.slow
def test_a_fit_refuses_an_rnn_by_name_before_any_step():
    """A plain ``nn.RNN`` crashed inside Opacus's functorch path; the strategy now refuses it, by name, in set-up."""
    with pytest.raises(RuntimeError, match=r"layer layer\.layer \(RNN\).*DPRNN"):
        _fit("hooks", "rnn")


CUDA_ROWS = [
    "conv2d-reflect",
    "conv3d-same",
    "conv2d-reflect-ghost-norms",
    "embedding-padding",
    "embeddingbag-mean-padding",
    "layernorm-nobias",
    "linear-4d",
    "dplstm-sequence-first",
    "convtranspose3d",
    "prelu-channels",
    "hf-conv1d",
    "convnext-layernorm2d",
]


@pytest.mark.cuda
@pytest.mark.parametrize(
    ("mode", "layer"),
    [
        (mode, layer)
        for mode in ["hooks", "ghost", "bk"]
        for layer in CUDA_ROWS
        if _expected_refusal(mode, layer, False) is None
    ],
)
def test_the_layers_fixed_here_are_clipped_exactly_on_the_gpu(mode, layer):
    """The rules added here (explicit padding, padding-row masks, bias-free layer norms, flattened positions, DPLSTM's
    cells) on CUDA tensors, in float64, against the CPU reference."""
    row = LAYERS[layer]
    batch = row.batch()
    samples, norms = _reference(_case(row, False, per_example=False), batch, row.vectorised)
    bound = float(norms.sort().values[1:3].mean())
    expected = _clipped_mean(samples, norms, bound)
    module = _case(row, False, per_example=mode == "ghost").cuda()
    update = _private_step(mode, module, tuple(t.cuda() for t in batch), bound)
    scale = max(float(value.abs().max()) for value in expected.values())
    for name, value in expected.items():
        torch.testing.assert_close(update[name].cpu(), value, rtol=0.0, atol=1e-9 * scale)


CHANNELS_LAST_ROWS = ["conv2d-depthwise", "conv2d-reflect", "standardized-conv2d-same", "convtranspose2d-groups"]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize(
    ("mode", "layer"),
    [
        (mode, layer)
        for mode in ENGINES
        for layer in CHANNELS_LAST_ROWS
        if _expected_refusal(mode, layer, False) is None
    ],
)
def test_channels_last_convolutions_are_clipped_exactly(mode, layer, device):
    """Weights and images in ``channels_last`` (what mixed-precision conv nets use on GPUs): the rules reshape the
    layers' inputs and gradients, which must not assume contiguous NCHW; the update equals the NCHW reference."""
    row = LAYERS[layer]
    inputs, targets = row.batch()
    samples, norms = _reference(_case(row, False, per_example=False), (inputs, targets), row.vectorised)
    bound = float(norms.sort().values[1:3].mean())
    expected = _clipped_mean(samples, norms, bound)
    module = _case(row, False, per_example=mode == "ghost").to(device, memory_format=torch.channels_last)
    assert module.layer.weight.is_contiguous(memory_format=torch.channels_last)
    batch = (inputs.to(device).contiguous(memory_format=torch.channels_last), targets.to(device))
    update = _private_step(mode, module, batch, bound)
    scale = max(float(value.abs().max()) for value in expected.values())
    errors = {name: float((update[name].cpu() - expected[name]).abs().max()) / scale for name in expected}
    assert max(errors.values()) < TOLERANCE, errors
