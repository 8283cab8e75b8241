import copy
import math

import pytest
import torch

from lightning_nt import CompressionBoundReporter, SubspaceTraining
from lightning_nt.compression.capacity import r_norm
from lightning_nt.compression.subspace import subspace_mismatches, to_subspace
from tests.compression.models import AttentionClassifier, OneLogitClassifier
from tests.helpers import TinyClassifier, tiny_trainer


@pytest.mark.cuda
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_report_on_the_gpu(precision):
    devices = set()

    def predict(module, batch):
        devices.add(batch[0].device.type)
        return module(batch[0])

    reporter = CompressionBoundReporter(levels=(3, 8), prune=(0.0, 0.5), stability_samples=32, predict_fn=predict)
    module = TinyClassifier(num_samples=96, hidden=32)
    trainer = tiny_trainer(
        None, accelerator="gpu", precision=precision, max_epochs=2, callbacks=[SubspaceTraining(16), reporter]
    )
    trainer.fit(module)
    assert devices == {"cuda"}
    assert 0 < reporter.report["compression/error_bound"] <= 1
    assert all(math.isfinite(value) for value in reporter.report.values())
    assert "arora/min_layer_cushion" in reporter.report and "capacity/pacbayes_sigma" in reporter.report
    if precision == "32-true":  # the decoded model's error, evaluated again on the CPU (where fit leaves the module)
        subspace = module.net[0].parametrizations.weight[0].subspace
        subspace.weight.data.copy_(reporter.certificate.decoded[0])
        inputs, labels = module.train_dataloader().dataset.tensors
        with torch.no_grad():
            error = float((module(inputs).argmax(dim=1) != labels).float().mean())
        assert error == pytest.approx(reporter.certificate.train_error, abs=1 / 96)


@pytest.mark.cuda
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_attention_in_a_subspace_is_certified_on_the_gpu(precision, monkeypatch):
    monkeypatch.delattr(torch.nn.MultiheadAttention, "reset_parameters", raising=False)  # Lightning's demo adds it
    reporter = CompressionBoundReporter(levels=(3, 8), prune=(0.0,), stability_samples=32)
    trainer = tiny_trainer(
        None, accelerator="gpu", precision=precision, max_epochs=1, callbacks=[SubspaceTraining(8), reporter]
    )
    trainer.fit(AttentionClassifier(num_samples=96))
    assert 0 < reporter.report["compression/error_bound"] <= 1


@pytest.mark.cuda
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_a_one_logit_classifier_is_measured_on_the_gpu(precision):
    reporter = CompressionBoundReporter(levels=(3, 8), prune=(0.0,), stability_samples=32)
    trainer = tiny_trainer(None, accelerator="gpu", precision=precision, max_epochs=10, callbacks=[reporter])
    trainer.fit(OneLogitClassifier(num_samples=96, lr=0.5))
    assert reporter.certificate.train_error < 0.2 and "capacity/r_norm" not in reporter.report


@pytest.mark.cuda
def test_subspace_core_and_r_norm_on_the_gpu(monkeypatch):
    monkeypatch.delattr(torch.nn.MultiheadAttention, "reset_parameters", raising=False)
    model = AttentionClassifier().cuda()
    subspace = to_subspace(model, dimension=8, seed=3)
    assert subspace.weight.device.type == "cuda" and subspace_mismatches(model) == []
    model(torch.randn(4, 8, device="cuda")).sum().backward()
    assert subspace.weight.grad is not None
    weights, biases, outgoing = torch.randn(6, 3), torch.randn(6), torch.randn(6, 2)
    on_gpu = r_norm(weights.cuda(), biases.cuda(), outgoing.cuda())
    assert on_gpu == pytest.approx(r_norm(weights, biases, outgoing), rel=1e-12)


def _normal_init(module: torch.nn.Module) -> None:
    """A user's initializer (GPT-2's): normal(0, 0.02) weights and zero biases for every Linear."""
    if isinstance(module, torch.nn.Linear):
        torch.nn.init.normal_(module.weight, std=0.02)
        torch.nn.init.zeros_(module.bias)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_subspace_drawn_by_an_initializer_on_the_gpu(dtype):
    """``to_subspace(..., initializer=...)`` on a CUDA module: theta0 is the initializer's CPU draw under the seed,
    bit for bit as on the CPU (cast to the module's dtype), and ``w`` trains on the GPU."""
    torch.manual_seed(0)
    on_cpu = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)).to(dtype)
    on_gpu = copy.deepcopy(on_cpu).cuda()
    to_subspace(on_cpu, dimension=10, seed=3, initializer=_normal_init)
    subspace = to_subspace(on_gpu, dimension=10, seed=3, initializer=_normal_init)
    assert subspace.weight.device.type == "cuda" and subspace.initializer is _normal_init
    assert subspace_mismatches(on_gpu) == []  # the bound's decoder draws the same theta0
    for name, value in on_gpu.state_dict().items():
        assert value.device.type == "cuda" and torch.equal(value.cpu(), on_cpu.state_dict()[name]), name
    on_gpu(torch.randn(5, 4, device="cuda", dtype=dtype)).float().sum().backward()
    assert subspace.weight.grad is not None and subspace.weight.grad.device.type == "cuda"


@pytest.mark.cuda
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_subspace_training_with_an_initializer_is_certified_on_the_gpu(precision):
    module = TinyClassifier(num_samples=96, hidden=32)
    reporter = CompressionBoundReporter(levels=(3, 8), prune=(0.0,), stability_samples=32)
    callbacks = [SubspaceTraining(16, initializer=_normal_init), reporter]
    tiny_trainer(None, accelerator="gpu", precision=precision, max_epochs=2, callbacks=callbacks).fit(module)
    assert 0 < reporter.report["compression/error_bound"] <= 1
    assert float(module.net[0].parametrizations.bias.original.abs().max()) == 0.0  # theta0 is the initializer's
