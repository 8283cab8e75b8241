import pytest
import torch

from lightning_nt.compression.bounds import occam_kl_bound
from lightning_nt.compression.certificate import certify
from lightning_nt.compression.coding import TensorSpec, configuration_grid, decode


def _bits_of(data: bytes, length: int) -> list[int]:
    return [(byte >> (7 - i)) & 1 for byte in data for i in range(8)][:length]


def _setup():
    generator = torch.Generator().manual_seed(0)
    weights = torch.randn(10, 5, generator=generator)
    inputs = torch.randn(300, 5, generator=generator)
    labels = (inputs @ weights.T).argmax(dim=1)

    def error_of(tensors):
        return float(((inputs @ tensors[0].T).argmax(dim=1) != labels).float().mean())

    return weights, error_of, len(labels)


def test_certificate_is_about_the_decoded_model_and_the_real_stream():
    weights, error_of, m = _setup()
    configs = configuration_grid(levels=(2, 4, 16), prune=(0.0, 0.5))
    certificate = certify([weights], error_of, m, configs, delta=0.05)
    index, seed, decoded = decode(
        _bits_of(certificate.bitstream, certificate.code_bits), [TensorSpec.of(weights)], configs
    )
    assert configs[index] == certificate.config and seed is None
    assert torch.equal(decoded[0], certificate.decoded[0])
    assert certificate.train_error == error_of(decoded)
    assert certificate.error_bound == occam_kl_bound(certificate.train_error, certificate.code_bits, m, 0.05)
    assert certificate.hoeffding_bound >= certificate.error_bound
    best = min(certificate.candidates, key=lambda c: c.estimated_bound)
    assert best.config == certificate.config and len(certificate.candidates) == len(configs)


def test_a_bigger_search_costs_its_index():
    weights, error_of, m = _setup()
    single = certify([weights], error_of, m, configuration_grid(levels=(16,), methods=("uniform",)))
    searched = certify([weights], error_of, m, configuration_grid(levels=(16,), methods=("uniform",)) * 8)
    assert searched.config == single.config
    assert searched.code_bits == single.code_bits + 3  # the index of one of 8 configurations


def test_seed_is_written_and_nothing_can_be_certified_from_nothing():
    weights, error_of, m = _setup()
    configs = configuration_grid(levels=(4,), methods=("uniform",))
    with_seed = certify([weights], error_of, m, configs, seed=7)
    without = certify([weights], error_of, m, configs)
    assert with_seed.code_bits == without.code_bits + 32
    with pytest.raises(ValueError, match="configs"):
        certify([weights], error_of, m, [])
    with pytest.raises(ValueError, match="No configuration"):
        certify([torch.tensor([1e6])], error_of, m, configs)


def test_screening_ranks_the_grid_and_only_finalists_count():
    weights, error_of, m = _setup()
    configs = configuration_grid(levels=(2, 3, 4, 8, 16), prune=(0.0, 0.5))
    calls, screened = [], []

    def full(tensors):
        calls.append("full")
        return error_of(tensors)

    def screen(tensors):  # a crude estimate that ranks differently: the error plus noise
        screened.append(1)
        return min(1.0, error_of(tensors) + 0.05 * (len(screened) % 3))

    certificate = certify([weights], full, m, configs, screening_error_of=screen, finalists=3)
    assert len(screened) == len(configs) and len(calls) == 3 + 1  # three finalists, then the decoded model
    finalists = [c for c in certificate.candidates if not c.screened]
    assert len(finalists) == 3 and certificate.config == finalists[0].config
    assert finalists[0].estimated_bound == min(c.estimated_bound for c in finalists)
    assert certificate.train_error == error_of(certificate.decoded)
    assert len(certificate.candidates) == len(configs)
