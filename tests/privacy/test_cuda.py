import pytest
import torch

from lightning_nt import DPStrategy
from tests.privacy.test_strategy import RecordUpdate, _clipped_sum, _fit


@pytest.mark.cuda
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_noiseless_update_on_the_gpu(precision):
    record = RecordUpdate()
    strategy = DPStrategy(noise_multiplier=0.0, max_grad_norm=0.5)
    module, _ = _fit(strategy, callbacks=[record], max_steps=1, accelerator="gpu", precision=precision)
    assert strategy.root_device.type == "cuda"
    before = {n: t.cpu() for n, t in record.before.items()}
    expected = _clipped_sum(module.cpu(), before, [t.cpu() for t in record.batch], 0.5)
    tolerance = {"rtol": 1e-4, "atol": 1e-5} if precision == "32-true" else {"rtol": 0.1, "atol": 2e-3}
    for name, update in record.update.items():
        torch.testing.assert_close(update.cpu(), -expected[name] / 16.0, **tolerance)
