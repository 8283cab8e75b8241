"""Quantise tensors and write them as one exact, prefix-free bitstream; read them back bit for bit.

A model is described by a configuration (how every tensor is quantised) and, per tensor, a codebook
and one symbol per entry:

- ``uniform``: ``levels`` evenly spaced values between a minimum and a maximum, both sent as float16;
- ``kmeans``: ``levels`` values placed by one-dimensional k-means (Lloyd), each sent as float16;
- ``prune``: the given fraction of entries with the smallest magnitude become exact zeros, an extra
  symbol; the others are quantised as above.

The stream is: the configuration's index in the grid the search chose from (``ceil(log2 N)`` bits,
which is how the search is paid for), an optional 32-bit seed (the random subspace), the codebooks,
then the symbols of every tensor through the adaptive arithmetic coder. The decoder knows the
architecture (tensor shapes and dtypes) and the grid: these are fixed before seeing any data.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from lightning_nt.common.validation import at_least, between, check_argument, checked_arguments, non_empty
from lightning_nt.compression.arithmetic import (
    ArithmeticDecoder,
    ArithmeticEncoder,
    BitReader,
    BitWriter,
    adaptive_code_length,
)

__all__ = [
    "QuantizationConfig",
    "QuantizedTensor",
    "TensorSpec",
    "configuration_grid",
    "decode",
    "encode",
    "estimated_code_bits",
    "header_bits",
    "quantize",
    "uncodable",
]

QuantizationMethod = Literal["uniform", "kmeans"]
_FLOAT16_MAX = 65504.0
_SEED_BITS = 32
_KMEANS_ITERATIONS = 30


@dataclass(frozen=True)
class QuantizationConfig:
    """How every tensor of a model is quantised: ``method`` with ``levels`` values, after pruning ``prune``."""

    method: QuantizationMethod
    levels: int
    prune: float = 0.0

    def __post_init__(self) -> None:
        check_argument("method", self.method, QuantizationMethod)
        check_argument("levels", self.levels, int, at_least(2))
        check_argument("prune", self.prune, float, between(0.0, 1.0, high_open=True))

    @property
    def alphabet_size(self) -> int:
        return self.levels + (1 if self.prune > 0 else 0)

    def __str__(self) -> str:
        pruned = f", prune {self.prune:g}" if self.prune > 0 else ""
        return f"{self.method} {self.levels}{pruned}"


@dataclass(frozen=True)
class TensorSpec:
    """What the decoder knows about a tensor in advance: its shape and dtype."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @classmethod
    def of(cls, tensor: Tensor) -> TensorSpec:
        return cls(tuple(tensor.shape), tensor.dtype)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class QuantizedTensor:
    """A tensor as the code sees it: a codebook (float16 values) and one symbol per entry."""

    spec: TensorSpec
    codebook: list[float]
    symbols: Tensor

    def values(self, config: QuantizationConfig) -> Tensor:
        """The decoded tensor (on the CPU)."""
        alphabet = _alphabet(config, self.codebook)
        return alphabet[self.symbols].reshape(self.spec.shape).to(self.spec.dtype)


@checked_arguments(levels=non_empty(), prune=non_empty(), methods=non_empty())
def configuration_grid(
    levels: Sequence[int],
    prune: Sequence[float] = (0.0,),
    methods: Sequence[QuantizationMethod] = ("uniform", "kmeans"),
) -> list[QuantizationConfig]:
    """Every combination of method, number of levels and pruning fraction, in a fixed order.

    Examples:
        >>> [str(c) for c in configuration_grid(levels=(4, 8), prune=(0.0, 0.5), methods=("uniform",))]
        ['uniform 4', 'uniform 4, prune 0.5', 'uniform 8', 'uniform 8, prune 0.5']
    """
    return [QuantizationConfig(method, k, p) for method in methods for k in levels for p in prune]


def quantize(tensor: Tensor, config: QuantizationConfig) -> QuantizedTensor:
    """Quantise one tensor.

    Examples:
        >>> quantized = quantize(torch.tensor([0.0, 0.1, 0.9, 1.0]), QuantizationConfig("uniform", 2))
        >>> quantized.values(QuantizationConfig("uniform", 2))
        tensor([0., 0., 1., 1.])
    """
    problem = uncodable(tensor)
    if problem is not None:
        raise ValueError(f"Can't quantise a tensor with {problem}.")
    flat = tensor.detach().reshape(-1).float().cpu()
    kept = _kept_mask(flat, config.prune)
    values = flat[kept]
    codebook = _uniform_codebook(values) if config.method == "uniform" else _kmeans_codebook(values, config.levels)
    levels = _levels(config, codebook)
    symbols = torch.zeros(flat.numel(), dtype=torch.long)
    symbols[kept] = _nearest(values, levels) + (config.alphabet_size - config.levels)
    return QuantizedTensor(TensorSpec.of(tensor), codebook, symbols)


def uncodable(tensor: Tensor) -> str | None:
    """What in ``tensor`` no quantisation configuration can describe (NaN or infinite entries, entries beyond
    float16's range), or ``None``.

    Examples:
        >>> uncodable(torch.tensor([1.0, float("nan")]))
        'NaN or infinite entries'
    """
    tensor = tensor.detach()
    if not bool(torch.isfinite(tensor).all()):
        return "NaN or infinite entries"
    if tensor.numel() and float(tensor.abs().max()) > _FLOAT16_MAX:
        return f"entries beyond {_FLOAT16_MAX:g}, which don't fit a float16 codebook"
    return None


def estimated_code_bits(quantized: Sequence[QuantizedTensor], config: QuantizationConfig, header: int) -> float:
    """The stream's length from the closed-form adaptive code length (the real coder adds at most ~2 bits)."""
    symbol_bits = sum(
        adaptive_code_length(torch.bincount(q.symbols, minlength=config.alphabet_size).tolist()) for q in quantized
    )
    return header + sum(16 * len(q.codebook) for q in quantized) + symbol_bits + 2


def header_bits(num_configs: int, with_seed: bool) -> int:
    """Bits of the stream's header: the configuration's index and, for a subspace model, its seed."""
    return math.ceil(math.log2(num_configs)) + (_SEED_BITS if with_seed else 0)


def encode(
    quantized: Sequence[QuantizedTensor], configs: Sequence[QuantizationConfig], index: int, seed: int | None = None
) -> BitWriter:
    """Write the model quantised with ``configs[index]`` (and the subspace ``seed``, if any) as one bitstream."""
    config = configs[index]
    writer = BitWriter()
    writer.write_uint(index, math.ceil(math.log2(len(configs))))
    if seed is not None:
        writer.write_uint(seed, _SEED_BITS)
    for tensor in quantized:
        for value in tensor.codebook:
            writer.write_float16(value)
    encoder = ArithmeticEncoder(writer)
    for tensor in quantized:
        encoder.encode(tensor.symbols.tolist(), config.alphabet_size)
    encoder.finish()
    return writer


def decode(
    bits: Sequence[int], specs: Sequence[TensorSpec], configs: Sequence[QuantizationConfig], with_seed: bool = False
) -> tuple[int, int | None, list[Tensor]]:
    """Read a stream written by :func:`encode`: the configuration index, the seed (or None) and the tensors."""
    reader = BitReader(bits)
    index = reader.read_uint(math.ceil(math.log2(len(configs))))
    if index >= len(configs):
        raise ValueError(f"The stream names configuration {index}, but the grid has {len(configs)}.")
    config = configs[index]
    seed = reader.read_uint(_SEED_BITS) if with_seed else None
    codebook_size = 2 if config.method == "uniform" else config.levels
    codebooks = [[reader.read_float16() for _ in range(codebook_size)] for _ in specs]
    decoder = ArithmeticDecoder(reader)
    tensors = []
    for spec, codebook in zip(specs, codebooks):
        symbols = torch.tensor(decoder.decode(spec.numel, config.alphabet_size), dtype=torch.long)
        tensors.append(QuantizedTensor(spec, codebook, symbols).values(config))
    return index, seed, tensors


def _kept_mask(flat: Tensor, prune: float) -> Tensor:
    kept = torch.ones_like(flat, dtype=torch.bool)
    num_pruned = int(prune * flat.numel())
    if num_pruned:
        kept[flat.abs().argsort(stable=True)[:num_pruned]] = False
    return kept


def _uniform_codebook(values: Tensor) -> list[float]:
    if not values.numel():
        return [0.0, 0.0]
    return [_float16(values.min()), _float16(values.max())]


def _kmeans_codebook(values: Tensor, levels: int) -> list[float]:
    if not values.numel():
        return [0.0] * levels
    ordered = values.sort().values
    quantiles = (torch.arange(levels, dtype=torch.float64) + 0.5) / levels
    centroids = ordered[(quantiles * (len(ordered) - 1)).round().long()].clone()
    for _ in range(_KMEANS_ITERATIONS):
        assignment = _nearest(values, centroids)
        sums = torch.zeros(levels).index_add_(0, assignment, values)
        counts = torch.zeros(levels).index_add_(0, assignment, torch.ones_like(values))
        updated = torch.where(counts > 0, sums / counts.clamp_min(1), centroids).sort().values
        if torch.equal(updated, centroids):
            break
        centroids = updated
    return sorted(_float16(c) for c in centroids)


def _float16(value: Tensor | float) -> float:
    return float(torch.tensor(float(value)).half())


def _levels(config: QuantizationConfig, codebook: list[float]) -> Tensor:
    """The quantisation levels a codebook stands for, computed identically by encoder and decoder."""
    if config.method == "kmeans":
        return torch.tensor(codebook, dtype=torch.float32)
    low, high = (torch.tensor(value, dtype=torch.float32) for value in codebook)
    return low + (high - low) * (torch.arange(config.levels, dtype=torch.float32) / (config.levels - 1))


def _alphabet(config: QuantizationConfig, codebook: list[float]) -> Tensor:
    levels = _levels(config, codebook)
    return torch.cat([torch.zeros(1), levels]) if config.prune > 0 else levels


def _nearest(values: Tensor, levels: Tensor) -> Tensor:
    """Index of the nearest of the sorted ``levels`` for every value."""
    midpoints = (levels[1:] + levels[:-1]) / 2
    return torch.bucketize(values, midpoints)
