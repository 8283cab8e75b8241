import os
import re
import subprocess
import sys
import time
import warnings
from datetime import timedelta

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_nt import DPDDPStrategy
from lightning_nt.common.validation import ArgumentError
from tests.helpers import assert_ranks_agree, rank_states, save_rank_state, tiny_trainer
from tests.helpers.scripts import ROOT
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
        state["buffers"] = {n: b.detach().clone() for n, b in pl_module.named_buffers()}
        private = ("summed_grad", "grad_sample", "_norm_sample", "_current_grad_sample")
        state["left"] = [n for n, p in pl_module.named_parameters() if any(a in vars(p) for a in private)]
        save_rank_state(trainer, self.directory, state)


def _fit_on_two_ranks(build, callback, folder, dp=None, start_method="fork", **trainer_arguments):
    """Seed, build the module, fit it on 2 processes (forked, unless ``start_method`` says otherwise) under
    ``DPDDPStrategy(**dp)`` (default: noise 1) with ``callback``, which saves each rank's state under ``folder``; the
    module and both ranks' saved states."""
    pl.seed_everything(0)
    module = build()
    strategy = DPDDPStrategy(start_method=start_method, **(dp or {"noise_multiplier": 1.0}))
    trainer = tiny_trainer(
        None, strategy=strategy, devices=2, limit_val_batches=0, callbacks=[callback], **trainer_arguments
    )
    trainer.fit(module)
    return module, rank_states(folder)


@pytest.mark.ddp
def test_update_is_the_clipped_sum_over_both_ranks(tmp_path):
    module, (rank0, rank1) = _fit_on_two_ranks(
        lambda: Plain(num_samples=64, batch_size=16),
        SaveRankState(str(tmp_path)),
        tmp_path,
        dp={"noise_multiplier": 0.0, "max_grad_norm": 0.5},
        start_method="spawn",
        max_steps=1,
    )
    assert_ranks_agree([rank0["after"], rank1["after"]])
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
    # q = 2/64: many empty local batches
    _, (rank0, rank1) = _fit_on_two_ranks(
        lambda: Plain(num_samples=64, batch_size=1), SaveRankState(str(tmp_path)), tmp_path
    )
    assert rank0["steps"] == rank1["steps"] == 32
    assert rank0["empty"] > 0 and rank1["empty"] > 0 and rank0["empty"] != 32
    assert rank0["epsilon"] == rank1["epsilon"] > 0
    assert rank0["left"] == rank1["left"] == []  # no un-noised clipped sum left on any rank
    assert_ranks_agree([rank0["after"], rank1["after"]])  # one noise draw, all-reduced: identical weights


class WithBuffer(Plain):
    """A registered buffer used in ``forward`` (a fixed input scale), drawn in ``setup`` differently on each rank (as
    after per-rank seeding): DDP broadcasts buffers in each forward pass, and rank 0's once when it wraps the module."""

    def setup(self, stage):
        generator = torch.Generator().manual_seed(self.trainer.global_rank)
        self.register_buffer("scale", 1.0 + torch.rand((), generator=generator))

    def forward(self, x):
        return super().forward(x * self.scale)


@pytest.mark.ddp
def test_a_model_with_buffers_goes_through_empty_batches_without_waiting(tmp_path):
    """A rank whose Poisson batch is empty runs no forward pass; with DDP's buffer broadcast in every forward pass,
    the other rank waited in it until the process group's timeout (here 180 s, far beyond the fit's 10-40 s on a
    loaded 2-core machine, so a hang fails the test). Without it,
    the buffers drawn differently on the two ranks are still rank 0's on both (broadcast once at set-up)."""
    started = time.monotonic()
    _, (rank0, rank1) = _fit_on_two_ranks(
        lambda: WithBuffer(num_samples=64, batch_size=1),
        SaveRankState(str(tmp_path)),
        tmp_path,
        dp={"noise_multiplier": 1.0, "timeout": timedelta(seconds=180)},
    )
    assert time.monotonic() - started < 180
    assert rank0["steps"] == rank1["steps"] == 32
    assert rank0["empty"] != rank1["empty"] or rank0["empty"] > 0
    assert_ranks_agree([rank0["after"], rank1["after"]])
    assert torch.equal(rank0["buffers"]["scale"], rank1["buffers"]["scale"])


def test_ddp_buffer_broadcast_is_refused_by_name():
    """Buffers can't change in a private step (refused), so DDP's per-forward broadcast only costs, and hangs a rank
    whose batch is empty: asking for it is refused, naming the argument."""
    for name in ("broadcast_buffers", "forward_sync_buffers"):
        with pytest.raises(ValueError, match=rf"{name}=True\).*Poisson batch is empty"):
            DPDDPStrategy(**{name: True})


@pytest.mark.parametrize("value", [1, 0, "yes", "False", None, 1.0])
@pytest.mark.parametrize("name", ["broadcast_buffers", "forward_sync_buffers"])
def test_a_buffer_broadcast_that_is_not_a_bool_is_refused_showing_the_value(name, value):
    """``broadcast_buffers=1`` was refused as ``broadcast_buffers=True`` (and ``0`` or ``""`` taken as ``False``): it is
    checked as a strict bool, naming the argument and showing the value given."""
    with pytest.raises(ArgumentError, match=rf"^`{name}` must be True or False, got {re.escape(repr(value))}\.$"):
        DPDDPStrategy(**{name: value})


def test_no_buffer_broadcast_is_accepted():
    DPDDPStrategy(broadcast_buffers=False)


class CountingGathers(DPDDPStrategy):
    """Counts its ``all_gather`` calls (the agreement of the ranks' first-step checks is one per hook)."""

    gathers = 0

    def all_gather(self, *args, **kwargs):
        self.gathers += 1
        return super().all_gather(*args, **kwargs)


class SaveGathersPerStep(pl.Callback):
    def __init__(self, directory):
        self.directory = directory

    def on_train_start(self, trainer, pl_module):
        self.per_step = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.before = trainer.strategy.gathers

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.per_step.append(trainer.strategy.gathers - self.before)

    def on_train_end(self, trainer, pl_module):
        save_rank_state(trainer, self.directory, self.per_step)


@pytest.mark.ddp
def test_the_ranks_agree_on_the_checks_of_the_first_step_only(tmp_path):
    """The agreement of the ranks' verdicts is two small collectives (after ``training_step`` and after the backward
    pass) on the first step, where the checks run, and none on later steps."""
    pl.seed_everything(0)
    strategy = CountingGathers(start_method="fork", noise_multiplier=1.0)
    callback = SaveGathersPerStep(str(tmp_path))
    trainer = tiny_trainer(None, strategy=strategy, devices=2, limit_val_batches=0, callbacks=[callback], max_steps=4)
    trainer.fit(Plain(num_samples=128, batch_size=16))
    assert rank_states(tmp_path) == [[2, 0, 0, 0]] * 2


class PoisonedOddExamples(Plain):
    """Every odd-indexed example has a NaN input: all of them are in rank 1's shard (index % 2 == 1)."""

    def train_dataloader(self):
        inputs, labels = super().train_dataloader().dataset.tensors
        inputs = inputs.clone()
        inputs[1::2] = float("nan")
        return DataLoader(TensorDataset(inputs, labels), batch_size=self.batch_size)


class RecordWarnings(pl.Callback):
    """Each rank's warnings during the fit (spawned processes: pytest can't see them) and the NaN rows it saw."""

    def __init__(self, directory):
        self.directory = directory

    def on_fit_start(self, trainer, pl_module):
        self.catcher = warnings.catch_warnings(record=True)
        self.caught = self.catcher.__enter__()
        warnings.simplefilter("always")
        self.poisoned = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.poisoned += int(batch[0].isnan().any(dim=1).sum())

    def on_fit_end(self, trainer, pl_module):  # after the strategy's end-of-run warning
        self.catcher.__exit__(None, None, None)
        state = {"poisoned": self.poisoned, "warnings": [str(w.message) for w in self.caught]}
        save_rank_state(trainer, self.directory, state)


@pytest.mark.ddp
def test_the_end_of_run_count_of_nonfinite_examples_is_summed_over_the_ranks(tmp_path):
    """Only rank 0 warns, and it counted only its own examples: rank 1's poisoned examples went unreported."""
    _, (rank0, rank1) = _fit_on_two_ranks(
        lambda: PoisonedOddExamples(num_samples=64, batch_size=16), RecordWarnings(str(tmp_path)), tmp_path, max_steps=2
    )
    assert rank0["poisoned"] == 0 and rank1["poisoned"] > 0
    counts = [w for w in rank0["warnings"] if "per-example gradient(s) in this run were not finite" in w]
    assert counts == [
        f"{rank1['poisoned']} per-example gradient(s) in this run were not finite (NaN or inf) and were left out of "
        "the clipped sums (each such example contributed zero; the sensitivity stays max_grad_norm). The count is "
        "over the whole run and is not covered by the guarantee. Check the data and the loss."
    ]


TIMEOUT = 900  # s, the script's process group's: far beyond any start-up on a loaded machine


def _run_script_launched_fit(folder, *arguments):
    """``ddp_script_refusal.py`` under Lightning's default launcher: its result, once it ended well before the process
    group's timeout (a hang in a collective fails here)."""
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, str(ROOT / "tests/privacy/ddp_script_refusal.py"), str(folder), str(TIMEOUT), *arguments],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""},
        cwd=folder,
        timeout=TIMEOUT / 3,
    )
    assert time.monotonic() - started < TIMEOUT / 3
    assert result.returncode != 0
    return result


@pytest.mark.ddp
@pytest.mark.slow
def test_a_refusal_on_one_rank_ends_a_script_launched_fit_without_waiting_for_the_process_group_timeout(tmp_path):
    """Lightning's default launcher (the script run again for rank 1), rank 1 alone refusing a model that mixes the
    examples: every rank raises rank 1's refusal, naming rank 1, before the first step, not at the process group's
    timeout, and no rank released an update. Rank 0 (whose log users read) used to fail in the step's all-reduce
    with gloo's "Connection closed by peer" when rank 1's process ended, the refusal only on rank 1's stderr."""
    result = _run_script_launched_fit(tmp_path)
    for rank in (0, 1):
        assert (
            f"[rank{rank}]: RuntimeError: A trainable layer mixes the examples of the batch (fc, out)" in result.stderr
        )
        assert f"[rank{rank}]: (Found on rank 1 of 2; every rank stops with this error" in result.stderr
        state = torch.load(tmp_path / f"rank{rank}.pt")
        assert state["error"].startswith("RuntimeError: A trainable layer mixes the examples of the batch")
        assert state["error"].endswith(
            "(Found on rank 1 of 2; every rank stops with this error before the step's update.)"
        )
        assert state["steps"] == 0 and not state["moved"]
    assert "Connection closed by peer" not in result.stderr


def _assert_rank_one_alone_failed(folder, error):
    """Rank 1 raised ``error`` itself, and no rank released an update (rank 0's state is missing when Lightning's
    child-process observer killed it first, with SIGKILL)."""
    rank1 = torch.load(folder / "rank1.pt")
    assert rank1["error"] == error
    assert rank1["steps"] == 0 and not rank1["moved"]
    if (folder / "rank0.pt").exists():
        rank0 = torch.load(folder / "rank0.pt")
        assert rank0["steps"] == 0 and not rank0["moved"]


@pytest.mark.ddp
@pytest.mark.slow
def test_a_rank_failing_outside_the_checks_does_not_leave_the_others_waiting_for_its_verdict(tmp_path):
    """Rank 1 fails in a callback before its first training step, so it never joins the agreement rank 0 waits in:
    rank 0 fails as soon as rank 1's process ends (gloo), or Lightning's child-process observer ends it, not at the
    process group's timeout; no update was released."""
    result = _run_script_launched_fit(tmp_path, "callback")
    assert "[rank1]: ValueError: rank 1 fails before its training step" in result.stderr
    _assert_rank_one_alone_failed(tmp_path, "ValueError: rank 1 fails before its training step")


@pytest.mark.ddp
@pytest.mark.slow
def test_the_modules_own_error_on_one_rank_ends_the_fit_without_an_agreement(tmp_path):
    """Rank 1's own ``training_step`` raises while rank 0 logs with ``sync_dist`` (an all-reduce of the module's own):
    the error is not agreed on (an agreement's collective would not match rank 0's, and both would wait until the
    process group's timeout); rank 1 raises its own error, as without DP, and no update was released."""
    result = _run_script_launched_fit(tmp_path, "training_step")
    assert "[rank1]: MemoryError: rank 1 runs out of memory in its training step" in result.stderr
    assert "Found on rank" not in result.stderr
    _assert_rank_one_alone_failed(tmp_path, "MemoryError: rank 1 runs out of memory in its training step")
