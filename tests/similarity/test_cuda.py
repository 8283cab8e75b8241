import math
import warnings

import pytest
import torch

from lightning_nt.similarity import PreparedFeatures, RepresentationSimilarity, cka_matrix, similarities
from tests.helpers import TinyClassifier, tiny_trainer
from tests.similarity.test_callback import CompiledNet
from tests.similarity.test_validation_probe import Validated

METRICS = ("cka", "cka_debiased", "intertwiner", "orthogonal_procrustes")


@pytest.mark.cuda
@pytest.mark.parametrize("activation", ["relu", "tanh", "identity"])
def test_core_on_the_gpu_equals_the_cpu(activation):
    x = torch.randn(300, 12, generator=torch.Generator().manual_seed(0))
    y = torch.tanh(x @ torch.randn(12, 12, generator=torch.Generator().manual_seed(1)))
    on_gpu = similarities(x.cuda().half(), y.cuda().bfloat16(), METRICS, activation)
    on_cpu = similarities(x.half(), y.bfloat16(), METRICS, activation)
    assert on_gpu == pytest.approx(on_cpu, rel=1e-9)
    matrix = cka_matrix([x.cuda(), y.cuda()])  # float32 inputs: compared with the CPU's on the same inputs
    assert matrix.device.type == "cuda"
    assert float(matrix[0, 1]) == pytest.approx(float(cka_matrix([x, y])[0, 1]), rel=1e-9)
    reference = PreparedFeatures(y.bfloat16())  # prepared on the CPU, moved to the other input's device
    assert similarities(x.cuda().half(), reference, METRICS, activation) == pytest.approx(on_cpu, rel=1e-9)
    on_the_gpu = PreparedFeatures(y.cuda().bfloat16())
    assert similarities(x.half(), on_the_gpu, METRICS, activation) == pytest.approx(on_cpu, rel=1e-9)


@pytest.mark.cuda
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_callback_on_the_gpu(precision):
    devices = set()

    def loss_fn(module, batch):
        devices.add(batch[0].device.type)
        return torch.nn.functional.cross_entropy(module(batch[0]), batch[1])

    monitor = RepresentationSimilarity(num_examples=40, metrics=METRICS, loss_fn=loss_fn)
    previous = RepresentationSimilarity(num_examples=40, reference="previous", max_rows=16, loss_fn=loss_fn)
    trainer = tiny_trainer(None, accelerator="gpu", precision=precision, max_epochs=2, callbacks=[monitor, previous])
    trainer.fit(TinyClassifier(num_samples=96))
    assert devices == {"cuda"}
    assert len(monitor.history) == 2 and len(previous.history) == 2
    assert all(matrix.centred.device.type == "cuda" for matrix in previous._prepared_reference.values())
    assert all(math.isfinite(value) for value in monitor.history[-1].values())
    assert 0 < monitor.history[-1]["similarity/cka/net.2"] <= 1 + 1e-9
    assert monitor.layer_cka is not None and monitor.layer_cka.device.type == "cpu"


@pytest.mark.cuda
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_a_compiled_network_on_the_gpu_against_an_uncompiled_reference_on_the_cpu(precision, tmp_path):
    reference = TinyClassifier(num_samples=64)
    torch.save({"state_dict": reference.state_dict()}, tmp_path / "other.ckpt")
    monitors = [
        RepresentationSimilarity(num_examples=40, reference=r) for r in (reference, str(tmp_path / "other.ckpt"))
    ]
    trainer = tiny_trainer(None, accelerator="gpu", precision=precision, max_epochs=1, callbacks=monitors)
    trainer.fit(CompiledNet())
    assert monitors[0].history[-1] == monitors[1].history[-1]
    assert 0 < monitors[0].history[-1]["similarity/cka/net.2"] <= 1 + 1e-9


@pytest.mark.cuda
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_relu6_and_hardtanh_layers_on_the_gpu(precision):
    """ReLU6 and a Hardtanh, found by ``layers=None`` on a CUDA module (their recognition runs on the CPU grid)."""
    module = TinyClassifier(num_samples=96)
    module.net[1], module.net[2] = torch.nn.ReLU6(), torch.nn.Hardtanh()
    monitor = RepresentationSimilarity(num_examples=40, metrics=METRICS)
    trainer = tiny_trainer(None, accelerator="gpu", precision=precision, max_epochs=1, callbacks=[monitor])
    trainer.fit(module)
    assert "| net.1 | gelu |" in monitor.table() and "| net.2 | tanh |" in monitor.table()
    assert all(math.isfinite(value) for value in monitor.history[-1].values())


@pytest.mark.cuda
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_the_validation_probe_on_the_gpu_reads_validation_and_equals_a_forward_pass(precision):
    """data="val" on CUDA: read during validation (no warning: the batches compare equal on the device), and
    the values those of a fit whose features come from the forward pass instead (loss_fn: validation's forward)."""
    runs = []
    for loss_fn in (None, lambda module, batch: module(batch[0]).sum()):
        torch.manual_seed(0)
        monitor = RepresentationSimilarity(num_examples=20, metrics=METRICS, data="val", loss_fn=loss_fn)
        trainer = tiny_trainer(None, accelerator="gpu", precision=precision, max_epochs=2, callbacks=[monitor])
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message=".*RepresentationSimilarity.*")
            trainer.fit(Validated())
        runs.append(monitor.history)
    read, forward = runs
    assert [entry["epoch"] for entry in read] == [0, 1]
    for entry, expected in zip(read, forward):
        assert entry == pytest.approx(expected, rel=1e-2 if precision == "bf16-mixed" else 1e-5)


@pytest.mark.cuda
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_kept_rows_token_units_and_in_place_ops_on_the_gpu(precision):
    """The rows picked on the GPU (chunk by chunk, copied in the hooks), the units of a token model placed by its
    Linear, an in-place residual after a GELU: the values of the same run on the CPU (within TF32 or bf16 rounding),
    the reference's rows held on the CPU."""
    from tests.similarity.test_layer_outputs import ConvNet, ResidualGELU, TokenMLP, _seeded

    for cls in (ConvNet, TokenMLP, ResidualGELU):
        histories = []
        for accelerator, run_precision in (("cpu", "32-true"), ("gpu", precision)):
            monitor = RepresentationSimilarity(num_examples=64, max_rows=500, chunk_size=24, metrics=METRICS)
            trainer = tiny_trainer(None, accelerator=accelerator, precision=run_precision, callbacks=[monitor])
            trainer.fit(_seeded(cls, 0))
            assert all(rows.device.type == "cpu" for rows in monitor._reference_features.values())
            assert all(len(rows) <= 500 for rows in monitor._reference_features.values())
            histories.append(monitor.history[-1])
        on_cpu, on_gpu = histories
        assert on_gpu.keys() == on_cpu.keys()
        measured = {tag: value for tag, value in on_gpu.items() if tag not in ("epoch", "step")}
        assert measured and all(math.isfinite(value) and value <= 1 + 1e-9 for value in measured.values())
        if precision == "32-true":
            assert on_gpu == pytest.approx(on_cpu, abs=5e-3), cls.__name__
