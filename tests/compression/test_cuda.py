import math

import pytest
import torch

from lightning_nt import CompressionBoundReporter, SubspaceTraining
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
