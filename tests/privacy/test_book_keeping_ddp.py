"""DPDDPStrategy(grad_sample_mode="bk") on 2 CPU processes: the update is the clipped sum over the global batch."""

import pytest
import pytorch_lightning as pl
import torch

from lightning_nt import DPDDPStrategy
from tests.helpers import assert_ranks_agree, rank_states, tiny_trainer
from tests.privacy.test_ddp import SaveRankState
from tests.privacy.test_strategy import Plain, _clipped_sum


@pytest.mark.ddp
def test_update_is_the_float64_clipped_sum_over_both_ranks(tmp_path):
    pl.seed_everything(0)
    strategy = DPDDPStrategy(start_method="spawn", noise_multiplier=0.0, max_grad_norm=0.5, grad_sample_mode="bk")
    trainer = tiny_trainer(
        None, strategy=strategy, devices=2, max_steps=1, limit_val_batches=0, callbacks=[SaveRankState(str(tmp_path))]
    )
    module = Plain(num_samples=64, batch_size=16, norm="group")  # Linear, GroupNorm, Linear
    trainer.fit(module)
    rank0, rank1 = rank_states(tmp_path)
    assert_ranks_agree([rank0["after"], rank1["after"]])
    assert rank0["left"] == rank1["left"] == []
    inputs = torch.cat([rank0["first_batch"][0], rank1["first_batch"][0]]).double()
    labels = torch.cat([rank0["first_batch"][1], rank1["first_batch"][1]])
    assert len(rank0["first_batch"][0]) > 0 and len(rank1["first_batch"][0]) > 0
    before = {name: weight.double() for name, weight in rank0["before"].items()}
    expected = _clipped_sum(module.double(), before, (inputs, labels), 0.5)
    unclipped = _clipped_sum(module, before, (inputs, labels), 1e9)
    assert not torch.allclose(expected["net.0.weight"], unclipped["net.0.weight"])  # the bound clips examples
    for name, after in rank0["after"].items():  # SGD with lr 1 over the expected global batch of 16 x 2
        update = after.double() - before[name]
        assert update.abs().max() > 1e-4, name
        torch.testing.assert_close(update, -expected[name] / 32.0, rtol=1e-5, atol=1e-7, msg=name)
