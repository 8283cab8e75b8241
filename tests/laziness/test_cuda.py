"""The laziness core and LazinessMonitor on a GPU: fp32 and bf16-mixed, everything created on the inputs' device."""

import pytest
import pytorch_lightning as pl
import torch

from lightning_nt.laziness import (
    LazinessMonitor,
    activation_patterns,
    empirical_ntk,
    jacobian_bytes,
    relative_distance,
)
from tests.helpers import tiny_trainer
from tests.laziness.models import ReLUClassifier
from tests.laziness.test_activations import MyHardtanh
from tests.laziness.test_core import _mlp, _reference_ntk


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_core_on_the_gpu(dtype):
    net = _mlp(dtype)
    inputs = torch.randn(7, 5, dtype=dtype)
    reference = _reference_ntk(net, inputs)
    kernel = empirical_ntk(net.cuda(), {"x": inputs.cuda()}, forward_fn=lambda m, b: m(b["x"]), chunk_size=3)
    assert kernel.device.type == "cuda" and kernel.dtype == dtype
    tolerance = 1e-5 if dtype == torch.float32 else 1e-9
    torch.testing.assert_close(kernel.cpu(), reference, rtol=tolerance, atol=tolerance * float(reference.abs().max()))
    patterns = activation_patterns(net, inputs.cuda())
    assert patterns["3"].device.type == "cuda"
    start = {name: p.detach().cpu() for name, p in net.named_parameters()}
    assert relative_distance(dict(net.named_parameters()), start).overall == 0.0


@pytest.mark.cuda
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_callback_on_the_gpu(tmp_path, precision):
    pl.seed_everything(0)
    monitor = LazinessMonitor(every_n_steps=2, num_examples=24, chunk_size=8)
    trainer = tiny_trainer(tmp_path, accelerator="gpu", precision=precision, max_epochs=2, callbacks=[monitor])
    trainer.fit(ReLUClassifier(norm=True, dropout=0.1))
    assert [entry["step"] for entry in monitor.history] == [0, 2, 4, 6, 8]
    last = monitor.history[-1]
    assert 0 < last["laziness/weight_distance"] < 1 and last["laziness/ntk_change"] > 0
    assert last["laziness/ntk_lambda_min"] <= last["laziness/ntk_lambda_max"]
    assert torch.isfinite(trainer.callback_metrics["laziness/kernel_alignment"])


def _relu6_classifier(seed: int) -> ReLUClassifier:
    """``ReLUClassifier`` with ReLU6 and a hand-written clamp to [-1, 2], weights large enough for units to saturate."""
    torch.manual_seed(seed)
    module = ReLUClassifier(shuffle=False)
    module.net[2], module.net[5] = torch.nn.ReLU6(), MyHardtanh()
    with torch.no_grad():
        module.net[0].weight.mul_(20.0)
    return module


@pytest.mark.cuda
def test_piece_patterns_on_the_gpu_equal_the_cpu():
    """A clamp's piece indices (uint8) are formed on the inputs' device, equal to the CPU's."""
    net, inputs = _relu6_classifier(0), torch.randn(16, 8)
    on_cpu = activation_patterns(net, inputs)
    on_gpu = activation_patterns(net.cuda(), inputs.cuda())
    assert set(on_gpu) == {"net.2", "net.5"}
    for name, pattern in on_gpu.items():
        assert pattern.device.type == "cuda" and pattern.dtype == torch.uint8
        assert torch.equal(pattern.cpu(), on_cpu[name]), name


@pytest.mark.cuda
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_callback_with_clamps_on_the_gpu(tmp_path, precision):
    pl.seed_everything(0)
    monitor = LazinessMonitor(every_n_steps=2, num_examples=16, ntk=False)
    trainer = tiny_trainer(tmp_path, accelerator="gpu", precision=precision, max_steps=4, callbacks=[monitor])
    trainer.fit(_relu6_classifier(0))
    assert [entry["step"] for entry in monitor.history] == [0, 2, 4]
    assert 0 <= monitor.history[-1]["laziness/activation_flips/net.2"] <= 1
    assert 0 <= monitor.history[-1]["laziness/activation_flips/net.5"] <= 1


def _in_place_relu6_classifier(seed: int) -> ReLUClassifier:
    module = _relu6_classifier(seed)
    module.net[2] = torch.nn.ReLU6(inplace=True)
    return module


@pytest.mark.cuda
def test_in_place_clamps_and_the_jacobian_size_on_the_gpu_equal_the_cpu():
    copying, inputs = _relu6_classifier(0), torch.randn(16, 8)
    in_place = _in_place_relu6_classifier(0)
    expected = activation_patterns(copying, inputs)
    on_gpu = activation_patterns(in_place.cuda(), inputs.cuda())
    assert all(torch.equal(on_gpu[name].cpu(), pattern) for name, pattern in expected.items())
    assert jacobian_bytes(in_place, inputs.cuda(), chunk_size=4) == jacobian_bytes(copying, inputs, chunk_size=4)


@pytest.mark.cuda
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_the_jacobian_limit_on_the_gpu(tmp_path, precision):
    """Default: half the free CUDA memory (measured); a tighter ``max_jacobian_bytes``: refused before step 0."""
    pl.seed_everything(0)
    monitor = LazinessMonitor(every_n_steps=2, num_examples=16)
    trainer = tiny_trainer(tmp_path, accelerator="gpu", precision=precision, max_steps=4, callbacks=[monitor])
    trainer.fit(_in_place_relu6_classifier(0))
    assert [entry["step"] for entry in monitor.history] == [0, 2, 4]
    assert 0 <= monitor.history[-1]["laziness/activation_flips/net.2"] <= 1
    tight = LazinessMonitor(num_examples=16, max_jacobian_bytes=1000)
    trainer = tiny_trainer(None, accelerator="gpu", precision=precision, max_steps=4, callbacks=[tight])
    with pytest.raises(MemoryError, match="max_jacobian_bytes=1000; None: half the memory free on cuda"):
        trainer.fit(_in_place_relu6_classifier(0))
