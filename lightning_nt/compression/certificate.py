"""Certify a model: search the quantisation grid, encode the best candidate, decode it, bound its error.

The bound is about the decoded model, so :func:`certify` measures the error of exactly the tensors
the decoder returns (checked bit for bit against the encoder's), and charges the real length of the
stream, in which the chosen configuration's index already pays ``ceil(log2 N)`` bits for the search.
Candidates are ranked by the bound their closed-form code length gives; the real coder then runs once.
How the candidate is chosen doesn't affect validity (the code is fixed before the data), so the grid
can be screened on a cheap error estimate and only the most promising candidates measured on all ``m``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from lightning_nt.compression.arithmetic import BitWriter
from lightning_nt.compression.bounds import occam_hoeffding_bound, occam_kl_bound
from lightning_nt.compression.coding import (
    QuantizationConfig,
    QuantizedTensor,
    TensorSpec,
    decode,
    encode,
    estimated_code_bits,
    header_bits,
    quantize,
)

__all__ = ["Candidate", "Certificate", "certify"]


@dataclass(frozen=True)
class Candidate:
    """One configuration of the search: its error (on the screening examples until it is a finalist), its
    estimated code length and the bound those give."""

    config: QuantizationConfig
    train_error: float
    estimated_bits: float
    estimated_bound: float
    screened: bool = False


@dataclass
class Certificate:
    """A certified bound on the decoded model's error, with everything needed to check it."""

    error_bound: float
    train_error: float
    code_bits: int
    num_examples: int
    delta: float
    config: QuantizationConfig
    num_configs: int
    bitstream: bytes
    decoded: list[Tensor] = field(repr=False)
    candidates: list[Candidate] = field(repr=False)
    skipped: list[str] = field(default_factory=list, repr=False)

    @property
    def hoeffding_bound(self) -> float:
        """The looser Occam-Hoeffding form of the same certificate."""
        return occam_hoeffding_bound(self.train_error, self.code_bits, self.num_examples, self.delta)


def certify(
    tensors: Sequence[Tensor],
    error_of: Callable[[Sequence[Tensor]], float],
    num_examples: int,
    configs: Sequence[QuantizationConfig],
    delta: float = 0.05,
    seed: int | None = None,
    screening_error_of: Callable[[Sequence[Tensor]], float] | None = None,
    finalists: int = 4,
) -> Certificate:
    """Bound the error of the best decodable quantisation of ``tensors``, with probability ``1 - delta``.

    Args:
        tensors: what the code describes (all of the model the decoder can't rebuild on its own).
        error_of: the 0-1 error, on the ``num_examples`` training examples, of the model holding these tensors.
        num_examples: ``m``, the number of examples ``error_of`` averages over.
        configs: the grid searched, fixed before seeing the data.
        delta: the bound fails with probability at most ``delta``.
        seed: the random subspace's seed, written into the stream when given.
        screening_error_of: a cheaper estimate of ``error_of`` (e.g. on a fixed subset) to rank the whole grid;
            then only the ``finalists`` best candidates are measured with ``error_of``.
        finalists: how many screened candidates are measured on all ``num_examples``.

    Examples:
        >>> from lightning_nt.compression.coding import configuration_grid
        >>> weights = [torch.tensor([1.0, -1.0, 1.0, 1.0])]
        >>> certificate = certify(weights, lambda t: 0.0, 1000, configuration_grid(levels=(2,), methods=("uniform",)))
        >>> certificate.code_bits, round(certificate.error_bound, 4)
        (38, 0.0289)
    """
    if not configs:
        raise ValueError("`configs` must name at least one quantisation configuration.")
    if finalists < 1:
        raise ValueError(f"`finalists` must be >= 1, got {finalists}.")
    screened = screening_error_of is not None
    header = header_bits(len(configs), seed is not None)
    quantized, candidates, skipped = _search(
        tensors, configs, header, screening_error_of or error_of, num_examples, delta, screened
    )
    if screened:  # measure the most promising candidates on all m examples
        measured = [
            _candidate(c.config, quantized[c.config], c.estimated_bits, error_of, num_examples, delta, screened=False)
            for c in candidates[:finalists]
        ]
        candidates = sorted(measured, key=_rank) + candidates[finalists:]
    best = candidates[0]
    stream, decoded = _encode_checked(tensors, quantized[best.config], configs, best.config, seed)
    train_error = error_of(decoded)
    return Certificate(
        error_bound=occam_kl_bound(train_error, len(stream), num_examples, delta),
        train_error=train_error,
        code_bits=len(stream),
        num_examples=num_examples,
        delta=delta,
        config=best.config,
        num_configs=len(configs),
        bitstream=stream.to_bytes(),
        decoded=decoded,
        candidates=candidates,
        skipped=skipped,
    )


def _search(
    tensors: Sequence[Tensor],
    configs: Sequence[QuantizationConfig],
    header: int,
    error_of: Callable[[Sequence[Tensor]], float],
    num_examples: int,
    delta: float,
    screened: bool,
) -> tuple[dict[QuantizationConfig, list[QuantizedTensor]], list[Candidate], list[str]]:
    """Quantise ``tensors`` with every configuration and measure each with ``error_of``: the quantised tensors by
    configuration, the candidates best first, and why the configurations that could not quantise were skipped."""
    quantized_by_config: dict[QuantizationConfig, list[QuantizedTensor]] = {}
    searched, skipped = [], []
    for config in configs:
        try:
            quantized_by_config[config] = [quantize(tensor, config) for tensor in tensors]
        except ValueError as error:
            skipped.append(f"{config}: {error}")
            continue
        bits = estimated_code_bits(quantized_by_config[config], config, header)
        searched.append(
            _candidate(config, quantized_by_config[config], bits, error_of, num_examples, delta, screened=screened)
        )
    if not searched:
        raise ValueError(f"No configuration could quantise the model: {skipped}")
    return quantized_by_config, sorted(searched, key=_rank), skipped


def _candidate(
    config: QuantizationConfig,
    quantized: Sequence[QuantizedTensor],
    bits: float,
    error_of: Callable[[Sequence[Tensor]], float],
    num_examples: int,
    delta: float,
    *,
    screened: bool,
) -> Candidate:
    """The candidate ``config``: the error of its quantised tensors and the bound its estimated code length gives."""
    error = error_of([q.values(config) for q in quantized])
    return Candidate(config, error, bits, occam_kl_bound(error, bits, num_examples, delta), screened)


def _encode_checked(
    tensors: Sequence[Tensor],
    quantized: Sequence[QuantizedTensor],
    configs: Sequence[QuantizationConfig],
    config: QuantizationConfig,
    seed: int | None,
) -> tuple[BitWriter, list[Tensor]]:
    """Encode the chosen candidate and decode the stream as a receiver would; both must agree bit for bit."""
    index = list(configs).index(config)
    stream = encode(quantized, configs, index, seed)
    decoded_index, decoded_seed, decoded = decode(
        stream.bits, [TensorSpec.of(t) for t in tensors], configs, seed is not None
    )
    if (
        decoded_index != index
        or decoded_seed != seed
        or not all(torch.equal(d, q.values(config)) for d, q in zip(decoded, quantized))
    ):
        raise RuntimeError("The decoded model differs from the encoded one; please report this as a bug.")
    return stream, decoded


def _rank(candidate: Candidate) -> tuple[float, float]:
    """Tightest estimated bound first; among equal (e.g. vacuous) bounds, the shorter code."""
    return candidate.estimated_bound, candidate.estimated_bits
