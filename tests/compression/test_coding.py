import math
import random

import pytest
import torch

from lightning_nt.compression.arithmetic import (
    ArithmeticDecoder,
    ArithmeticEncoder,
    BitReader,
    BitWriter,
    adaptive_code_length,
)
from lightning_nt.compression.coding import (
    QuantizationConfig,
    TensorSpec,
    configuration_grid,
    decode,
    encode,
    estimated_code_bits,
    header_bits,
    quantize,
)


def _encode_sequences(sequences, alphabet_size):
    writer = BitWriter()
    encoder = ArithmeticEncoder(writer)
    for symbols in sequences:
        encoder.encode(symbols, alphabet_size)
    encoder.finish()
    return writer.bits


def _sequential_kt_bits(symbols, alphabet_size):
    """The adaptive Krichevsky-Trofimov code length, symbol by symbol."""
    counts, bits = [0] * alphabet_size, 0.0
    for n, symbol in enumerate(symbols):
        bits -= math.log2((counts[symbol] + 0.5) / (n + alphabet_size / 2))
        counts[symbol] += 1
    return bits


@pytest.mark.parametrize("alphabet_size", [2, 3, 17, 66])
@pytest.mark.parametrize("length", [0, 1, 50, 3000])
def test_arithmetic_round_trip_and_length(alphabet_size, length):
    rng = random.Random(alphabet_size * 1000 + length)
    first = [min(alphabet_size - 1, int(rng.expovariate(0.7))) for _ in range(length)]
    second = [rng.randrange(alphabet_size) for _ in range(length // 3)]
    bits = _encode_sequences([first, second], alphabet_size)
    decoder = ArithmeticDecoder(BitReader(bits))
    assert decoder.decode(len(first), alphabet_size) == first
    assert decoder.decode(len(second), alphabet_size) == second
    ideal = _sequential_kt_bits(first, alphabet_size) + _sequential_kt_bits(second, alphabet_size)
    assert ideal <= len(bits) <= ideal + 3


def test_code_is_prefix_free_whatever_follows():
    rng = random.Random(0)
    symbols = [rng.randrange(5) for _ in range(400)]
    bits = _encode_sequences([symbols], 5)
    for tail in ([], [0] * 70, [1] * 70, [rng.randrange(2) for _ in range(70)]):
        assert ArithmeticDecoder(BitReader(bits + tail)).decode(400, 5) == symbols


def test_closed_form_code_length_equals_the_sequential_one():
    rng = random.Random(1)
    symbols = [rng.choice([0, 0, 0, 1, 2]) for _ in range(500)]
    counts = [symbols.count(s) for s in range(4)]
    assert adaptive_code_length(counts) == pytest.approx(_sequential_kt_bits(symbols, 4), rel=1e-9)


def test_bit_writer_packs_bytes_and_rejects_overflow():
    writer = BitWriter()
    writer.write_uint(0b101, 3)
    assert writer.to_bytes() == bytes([0b10100000])
    with pytest.raises(ValueError, match="does not fit"):
        writer.write_uint(8, 3)


def test_uniform_quantisation_error_is_half_a_step():
    tensor = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    config = QuantizationConfig("uniform", 9)
    values = quantize(tensor, config).values(config)
    assert values.unique().numel() <= 9
    step = float(tensor.max() - tensor.min()) / 8
    assert (values - tensor).abs().max() <= step / 2 + 1e-2  # plus float16 rounding of the end points


def test_kmeans_beats_uniform_on_heavy_tails():
    tensor = torch.distributions.StudentT(2.0).sample((4000,))
    errors = {}
    for method in ("uniform", "kmeans"):
        config = QuantizationConfig(method, 8)
        errors[method] = float(((quantize(tensor, config).values(config) - tensor) ** 2).mean())
    assert errors["kmeans"] < 0.5 * errors["uniform"]


def test_pruning_zeroes_the_smallest_magnitudes():
    tensor = torch.randn(200, generator=torch.Generator().manual_seed(2))
    config = QuantizationConfig("uniform", 4, prune=0.75)
    values = quantize(tensor, config).values(config)
    pruned = values == 0
    assert int(pruned.sum()) >= 150
    assert tensor[pruned].abs().max() <= tensor[~pruned].abs().min()


def test_model_round_trip_is_exact_and_counted():
    generator = torch.Generator().manual_seed(3)
    tensors = [torch.randn(20, 30, generator=generator), torch.randn(7, generator=generator).double(), torch.zeros(4)]
    configs = configuration_grid(levels=(3, 16), prune=(0.0, 0.5))
    for index, config in enumerate(configs):
        quantized = [quantize(t, config) for t in tensors]
        stream = encode(quantized, configs, index, seed=12345)
        decoded_index, seed, decoded = decode(stream.bits, [TensorSpec.of(t) for t in tensors], configs, True)
        assert (decoded_index, seed) == (index, 12345)
        for d, q, t in zip(decoded, quantized, tensors):
            assert d.dtype == t.dtype and torch.equal(d, q.values(config))
        estimate = estimated_code_bits(quantized, config, header_bits(len(configs), with_seed=True))
        assert abs(len(stream) - estimate) <= 3
        assert len(stream.to_bytes()) == math.ceil(len(stream) / 8)


def test_search_is_paid_for_in_the_header():
    assert header_bits(1, with_seed=False) == 0
    assert header_bits(5, with_seed=False) == 3
    assert header_bits(64, with_seed=True) == 6 + 32


def test_bad_configurations_are_refused():
    with pytest.raises(ValueError, match="`method`"):
        QuantizationConfig("lloyd", 4)
    with pytest.raises(ValueError, match="`levels`"):
        QuantizationConfig("uniform", 1)
    with pytest.raises(ValueError, match="`prune`"):
        QuantizationConfig("uniform", 4, prune=1.0)
    with pytest.raises(ValueError, match="NaN"):
        quantize(torch.tensor([0.0, math.nan]), QuantizationConfig("uniform", 4))
    with pytest.raises(ValueError, match="float16"):
        quantize(torch.tensor([1e6]), QuantizationConfig("uniform", 4))
