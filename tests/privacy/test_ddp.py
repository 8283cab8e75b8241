import pytest
import pytorch_lightning as pl
import torch

from lightning_nt import DPDDPStrategy
from tests.helpers import tiny_trainer
from tests.privacy.test_strategy import Plain, _clipped_sum


class SaveRankState(pl.Callback):
    def __init__(self, directory):
        self.directory = directory

    def on_train_start(self, trainer, pl_module):
        self.before = {n: p.detach().clone() for n, p in pl_module.named_parameters()}
        self.empty_batches, self.first_batch = 0, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.empty_batches += int(len(batch[0]) == 0)
        if self.first_batch is None:
            self.first_batch = [t.clone() for t in batch]

    def on_train_end(self, trainer, pl_module):
        after = {n: p.detach().clone() for n, p in pl_module.named_parameters()}
        state = {"before": self.before, "after": after, "steps": trainer.global_step, "empty": self.empty_batches}
        state["first_batch"] = self.first_batch
        state["epsilon"] = trainer.strategy.epsilon
        private = ("summed_grad", "grad_sample", "_norm_sample", "_current_grad_sample")
        state["left"] = [n for n, p in pl_module.named_parameters() if any(a in vars(p) for a in private)]
        torch.save(state, f"{self.directory}/rank{trainer.global_rank}.pt")


@pytest.mark.ddp
def test_update_is_the_clipped_sum_over_both_ranks(tmp_path):
    pl.seed_everything(0)
    strategy = DPDDPStrategy(start_method="spawn", noise_multiplier=0.0, max_grad_norm=0.5)
    trainer = tiny_trainer(
        None, strategy=strategy, devices=2, max_steps=1, limit_val_batches=0, callbacks=[SaveRankState(str(tmp_path))]
    )
    module = Plain(num_samples=64, batch_size=16)
    trainer.fit(module)
    rank0, rank1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    for name in rank0["after"]:
        assert torch.equal(rank0["after"][name], rank1["after"][name])
    # the global batch is the union of the ranks' shards (q = 16 x 2 / 64); they are disjoint
    inputs = torch.cat([rank0["first_batch"][0], rank1["first_batch"][0]])
    labels = torch.cat([rank0["first_batch"][1], rank1["first_batch"][1]])
    dataset = module.train_dataloader().dataset.tensors[0]
    rows = [int(torch.nonzero((dataset == row).all(dim=1))[0]) for row in inputs]
    assert len(set(rows)) == len(rows) and all(r % 2 == 0 for r in rows[: len(rank0["first_batch"][0])])
    expected = _clipped_sum(module, rank0["before"], (inputs, labels), 0.5)
    for name, after in rank0["after"].items():
        torch.testing.assert_close(after - rank0["before"][name], -expected[name] / 32.0, rtol=1e-4, atol=1e-6)


@pytest.mark.ddp
def test_ranks_stay_in_lockstep_through_empty_batches_with_one_ledger(tmp_path):
    pl.seed_everything(0)
    strategy = DPDDPStrategy(start_method="spawn", noise_multiplier=1.0)
    trainer = tiny_trainer(
        None, strategy=strategy, devices=2, max_epochs=1, limit_val_batches=0, callbacks=[SaveRankState(str(tmp_path))]
    )
    trainer.fit(Plain(num_samples=64, batch_size=1))  # q = 2/64: many empty local batches
    rank0, rank1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert rank0["steps"] == rank1["steps"] == 32
    assert rank0["empty"] > 0 and rank1["empty"] > 0 and rank0["empty"] != 32
    assert rank0["epsilon"] == rank1["epsilon"] > 0
    assert rank0["left"] == rank1["left"] == []  # no un-noised clipped sum left on any rank
    for name in rank0["after"]:  # one noise draw, all-reduced: identical weights everywhere
        assert torch.equal(rank0["after"][name], rank1["after"][name])
