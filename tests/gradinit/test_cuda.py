import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_nt import GradInit
from lightning_nt.gradinit import apply_scales, gradinit
from tests.gradinit.models import SharedBlockClassifier
from tests.helpers import TinyClassifier, tiny_trainer


@pytest.mark.cuda
def test_core_on_the_gpu():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 64, 10)).cuda()
    data = [(torch.randn(16, 1, 8, 8, device="cuda"), torch.randint(10, (16,), device="cuda")) for _ in range(6)]
    result = gradinit(net, lambda m, b: F.cross_entropy(m(b[0]), b[1]), itertools.cycle(data), iterations=10, gamma=0.5)
    assert not result.diverged and result.scales
    assert math.isfinite(result.lookahead_loss_start) and math.isfinite(result.lookahead_loss_end)
    apply_scales(net, result.scales)
    assert all(p.is_cuda for p in net.parameters())


@pytest.mark.cuda
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
@pytest.mark.parametrize("module", [TinyClassifier, SharedBlockClassifier])
def test_callback_on_the_gpu(precision, module):
    gradinit = GradInit(iterations=6, lr=0.05)
    model = module(num_samples=64)
    trainer = tiny_trainer(None, accelerator="gpu", precision=precision, max_epochs=1, callbacks=[gradinit])
    trainer.fit(model)
    assert gradinit.scales and all(math.isfinite(s) for s in gradinit.scales.values())
    assert math.isfinite(gradinit.result.lookahead_loss_end)
    assert trainer.global_step == 4
