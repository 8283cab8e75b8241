"""The example-independence check of a fit's first batch: layers that mix the examples are refused, every model
that keeps its examples in dimension 0 still trains, and the check leaves the step as it would have been.

The counter-examples (sequence-first layers, a loop over the batch, and how far they moved the update) are in
``test_audit.py``."""

from __future__ import annotations

import math
import warnings
from typing import ClassVar

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_nt.privacy.step
from lightning_nt import DPStrategy
from tests.helpers import classification_data, tiny_trainer
from tests.privacy.test_audit import (
    BATCH,
    DIM,
    TOKENS,
    Audited,
    SequenceFirst,
    SequenceFirstAttention,
    UpdateOfAll,
    _data,
    _fit,
    _refused_before_any_release,
)

MIXES = "mixes the examples of the batch"


class BatchFirstAttention(SequenceFirstAttention):
    """The same attention block written batch-first (``[B, T, d]`` into every layer): nothing mixes the examples."""

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        scores = torch.einsum("btd,bsd->bts", self.query(inputs), self.key(inputs)) / DIM**0.5
        attended = torch.einsum("bts,bsd->btd", scores.softmax(-1), self.value(inputs))
        return self.out(torch.tanh(self.fc(self.dropout(inputs + attended)))).mean(1)

    def __init__(self, per_example: bool = False, tokens: int = TOKENS) -> None:
        super().__init__(per_example, tokens)
        self.dropout = nn.Dropout(0.3)  # the check's passes and the step must draw the same masks


class PoolsTheBatch(Audited):
    """One row for the whole batch: its only trainable layer sees the batch's mean (``[1, d]``), within every row
    count check (one row, at most the batch's), and each replacement changes that one row."""

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.fc(inputs.mean(0, keepdim=True)))).expand(len(inputs), -1)


class Jittery(Audited):
    """Inputs multiplied by ``1 + 1e-4 * noise`` from a generator of its own (not restored between passes): the
    run-to-run differences of a platform whose kernels are not deterministic."""

    def __init__(self, per_example: bool = False, mixes: bool = False) -> None:
        super().__init__(per_example)
        self.generator, self.mixes = torch.Generator().manual_seed(5), mixes

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        inputs = inputs * (1 + 1e-4 * torch.randn(inputs.shape, generator=self.generator))
        return super().forward(inputs - inputs.mean(0) if self.mixes else inputs)


def _trains(module: pl.LightningModule, **strategy: object) -> None:
    before = [p.detach().clone() for p in module.parameters()]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # poisson_sampling=False
        assert _fit(module, **strategy).global_step == 2
    assert any(not torch.equal(b, p) for b, p in zip(before, module.parameters()))


@pytest.mark.parametrize("mode", ["hooks", "ghost", "bk"])
@pytest.mark.parametrize("module", [Audited, BatchFirstAttention, SequenceFirst])
def test_a_model_that_keeps_its_examples_in_dimension_0_still_trains(mode, module):
    """``SequenceFirst`` with ``T = 5`` positions over batches of 8: under ghost and bk the rows (5) are not the
    batch's, refused by their own row checks; under hooks, by the independence check."""
    if module is SequenceFirst:
        match = MIXES if mode == "hooks" else "one loss per example" if mode == "ghost" else "saw 5 rows"
        _refused_before_any_release(SequenceFirst(mode == "ghost"), match, grad_sample_mode=mode)
        return
    _trains(module(mode == "ghost"), grad_sample_mode=mode, poisson_sampling=False)


class WithoutBatchIndex(Audited):
    """``training_step(self, batch)``: Lightning passes ``batch_idx`` only to a step that takes it."""

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:  # type: ignore[override]
        return super().training_step(batch, 0)


@pytest.mark.parametrize("mode", ["hooks", "ghost", "bk"])
def test_a_training_step_without_batch_idx_is_checked_and_trains(mode):
    """Before: the check called ``training_step(batch, batch_idx)`` itself, a TypeError for such a step."""
    _trains(WithoutBatchIndex(mode == "ghost"), grad_sample_mode=mode, poisson_sampling=False)


@pytest.mark.parametrize("options", [{}, {"max_physical_batch_size": 3}, {"sensitivity_probe": True}])
def test_a_model_that_drops_examples_in_training_step_still_trains(options):
    class DropsTheFirst(Audited):
        def training_step(self, batch, batch_idx):
            return super().training_step((batch[0][1:], batch[1][1:]), batch_idx)

    _trains(DropsTheFirst(), poisson_sampling=False, **options)


def test_a_single_row_that_mixes_the_whole_batch_is_refused():
    """One row (at most the batch's, so every row check passes): both replacements reach it."""
    _refused_before_any_release(PoolsTheBatch(), MIXES)


@pytest.mark.parametrize(("mode", "tokens"), [("hooks", TOKENS), ("bk", BATCH)])
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_the_check_holds_under_bf16_autocast(mode, tokens, precision):
    """Per-example quantities formed from bf16 activations: the batch-first model still trains, the sequence-first
    one is still refused."""
    for module in (SequenceFirstAttention(False, tokens), BatchFirstAttention(False, tokens)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dp = DPStrategy(noise_multiplier=0.0, seed=3, poisson_sampling=False, grad_sample_mode=mode)
        trainer = tiny_trainer(None, strategy=dp, max_steps=1, limit_val_batches=0, precision=precision)
        if isinstance(module, BatchFirstAttention):
            trainer.fit(module)
            assert trainer.global_step == 1
        else:
            with pytest.raises(RuntimeError, match=MIXES):
                trainer.fit(module)


@pytest.mark.parametrize("mode", ["hooks", "bk"])
def test_run_to_run_differences_are_not_taken_for_mixing(mode):
    """The legitimate module's units differ by about 1e-4 between two passes of the same batch (over the fp32
    tolerance, 1e-5 relative): not mixing, once the run-to-run differences are measured; the mixing one's differ by
    far more than ten times that."""
    _trains(Jittery(), grad_sample_mode=mode)
    _refused_before_any_release(Jittery(mixes=True), MIXES, grad_sample_mode=mode)


@pytest.mark.parametrize("mode", ["hooks", "ghost", "bk"])
def test_the_check_leaves_the_step_as_it_would_have_been(mode, monkeypatch):
    """Dropout draws the same masks, the module's state and logs are untouched: the first update is bitwise the one
    a fit without the check releases."""
    updates = []
    for checked in (True, False):
        if not checked:
            monkeypatch.setattr(lightning_nt.privacy.step, "check_example_independence", lambda *args, **kw: True)
        torch.manual_seed(0)
        module, recorder = BatchFirstAttention(mode == "ghost", BATCH), UpdateOfAll()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _fit(module, grad_sample_mode=mode, callbacks=(recorder,))
        updates.append(recorder.update)
    assert updates[0].abs().sum() > 0
    assert torch.equal(updates[0], updates[1])


def test_the_check_waits_for_a_batch_of_two_distinct_examples():
    """A first batch of identical examples can't show mixing: that step is taken and the next batch is checked."""

    class Identical(SequenceFirst):
        def train_dataloader(self) -> DataLoader:
            inputs, labels = _data(BATCH).tensors
            inputs[:BATCH], labels[:BATCH] = inputs[0], labels[0]
            return DataLoader(TensorDataset(inputs, labels), batch_size=BATCH)

    module, steps = Identical(False, BATCH), []

    class Steps(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            steps.append(trainer.global_step)

    with pytest.raises(RuntimeError, match=MIXES), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _fit(module, poisson_sampling=False, callbacks=(Steps(),))
    assert steps == [1]


def test_the_check_waits_through_at_most_twenty_batches_of_identical_examples():
    class AllIdentical(SequenceFirst):
        def train_dataloader(self) -> DataLoader:
            inputs, labels = _data(BATCH).tensors
            count = BATCH * (lightning_nt.privacy.step.INDEPENDENCE_TRIES + 2)
            return DataLoader(TensorDataset(inputs[:1].expand(count, -1, -1), labels[:1].expand(count, -1)), BATCH)

    dp = DPStrategy(noise_multiplier=0.0, max_grad_norm=1.0, poisson_sampling=False)
    with pytest.raises(RuntimeError, match="no two distinct examples in 20 batches"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tiny_trainer(None, strategy=dp, max_epochs=1, limit_val_batches=0).fit(AllIdentical(False, BATCH))


def test_a_per_example_loss_is_not_mistaken_for_mixing():
    """Labels and inputs of every kind (integer tokens, float features) are replaced together."""

    class Tokens(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.embed, self.head = nn.Embedding(10, DIM), nn.Linear(DIM, 3)

        def training_step(self, batch, batch_idx):
            tokens, weights, labels = batch
            return F.cross_entropy(self.head(self.embed(tokens).mean(1) * weights[:, None]), labels)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=1.0)

        def train_dataloader(self):
            generator = torch.Generator().manual_seed(0)
            tokens = torch.randint(10, (32, TOKENS), generator=generator)
            data = TensorDataset(tokens, torch.rand(32, generator=generator), torch.randint(3, (32,)))
            return DataLoader(data, batch_size=BATCH)

    for mode in ("hooks", "bk"):
        _trains(Tokens(), grad_sample_mode=mode)


class PaddedTokens(pl.LightningModule):
    """A language-model loss over padded sequences of different lengths."""

    def __init__(self, per_example_mean: bool) -> None:
        super().__init__()
        self.embed, self.head, self.per_example_mean = nn.Embedding(10, DIM), nn.Linear(DIM, 10), per_example_mean

    def training_step(self, batch, batch_idx):
        tokens, targets = batch
        losses = F.cross_entropy(
            self.head(self.embed(tokens)).transpose(1, 2), targets, ignore_index=-100, reduction="none"
        )
        if not self.per_example_mean:  # the usual mean over the batch's tokens: divided by every example's count
            return losses.sum() / (targets != -100).sum()
        return (losses.sum(1) / (targets != -100).sum(1)).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        generator = torch.Generator().manual_seed(0)
        tokens, targets = torch.randint(10, (2, 32, TOKENS), generator=generator)
        targets[torch.arange(TOKENS) >= torch.randint(1, TOKENS + 1, (32, 1), generator=generator)] = -100
        return DataLoader(TensorDataset(tokens, targets), batch_size=BATCH)


@pytest.mark.parametrize("mode", ["hooks", "bk"])
def test_a_mean_over_the_batchs_tokens_is_refused_and_a_mean_per_example_trains(mode):
    """Dividing by the count of all the batch's tokens scales every example's gradient by the others' lengths."""
    _refused_before_any_release(
        PaddedTokens(per_example_mean=False), "average each example's own tokens", grad_sample_mode=mode
    )
    _trains(PaddedTokens(per_example_mean=True), grad_sample_mode=mode)


class KeepsTheFirstBatchsMean(Audited):
    """Registers a buffer holding its first batch's mean, then centres every batch with it (data-dependent
    initialisation): the private first batch would sit un-noised in the module and its checkpoints."""

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        if not hasattr(self, "center"):
            self.register_buffer("center", inputs.detach().mean(0))
        return super().forward(inputs - self.center)


@pytest.mark.parametrize("mode", ["hooks", "ghost", "bk"])
def test_a_buffer_registered_from_the_first_batch_is_refused_before_any_release(mode):
    """Before (in this change): the check's passes registered the buffer before the step's state snapshot, and the
    step went through with the first batch's mean in the module."""
    module = KeepsTheFirstBatchsMean(mode == "ghost")
    _refused_before_any_release(module, "mixes the examples|changed the module", grad_sample_mode=mode)
    assert not hasattr(module, "center")


class ScalesItsBatchInPlace(Audited):
    """Preprocesses its batch in place (``x.mul_(2)``, as ``x.div_(255)`` or MLM masking ``ids[mask] = MASK`` do)."""

    mixes = False

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return super().forward(inputs - inputs.mean(0) if self.mixes else inputs)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        batch[0].mul_(2.0)
        return super().training_step(batch, batch_idx)


class MixesAndScalesItsBatchInPlace(ScalesItsBatchInPlace):
    mixes = True


@pytest.mark.parametrize("mode", ["hooks", "ghost", "bk"])
def test_a_step_that_changes_its_batch_in_place_is_checked_on_copies(mode, monkeypatch):
    """Before: every pass ran on the step's own batch, so the first step trained on a batch scaled four times, and
    the re-run of the 'same' batch differed so much that its margin hid a layer that mixes the examples."""
    updates = []
    for checked in (True, False):
        if not checked:
            monkeypatch.setattr(lightning_nt.privacy.step, "check_example_independence", lambda *args, **kw: True)
        torch.manual_seed(0)
        recorder = UpdateOfAll()
        _fit(ScalesItsBatchInPlace(mode == "ghost"), grad_sample_mode=mode, callbacks=(recorder,))
        updates.append(recorder.update)
    assert torch.equal(updates[0], updates[1])
    monkeypatch.undo()
    _refused_before_any_release(MixesAndScalesItsBatchInPlace(mode == "ghost"), MIXES, grad_sample_mode=mode)


class MixesWithACallCounter(Audited):
    """Mixes the examples, and scales its inputs by a schedule advanced at every ``training_step`` call: kept in the
    module's own attribute (which the check's runs put back) or outside it (a counter shared by the class)."""

    shared_calls: ClassVar[list[int]] = [0]

    def __init__(self, ghost: bool, counter: str) -> None:
        super().__init__(ghost)
        self.counter, self.calls = counter, 0

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return super().forward(inputs - inputs.mean(0))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        if self.counter == "attribute":
            self.calls += 1
            calls = self.calls
        else:
            self.shared_calls[0] += 1
            calls = self.shared_calls[0]
        return super().training_step((batch[0] * (1 + 0.01 * calls), batch[1]), batch_idx)


@pytest.mark.parametrize("mode", ["hooks", "ghost", "bk"])
def test_a_step_that_is_not_repeatable_on_a_batch_is_refused(mode):
    """Before: ten times the run-to-run difference of the same batch was allowed, however large: a step whose
    result changes from call to call hid the mixing. A counter in the module's own attribute is put back after each
    of the check's runs (``common.frozen_attributes``): that step is repeatable, and its mixing is found."""
    match = "not repeatable|Make training_step repeatable"
    _refused_before_any_release(MixesWithACallCounter(mode == "ghost", "shared"), match, grad_sample_mode=mode)
    _refused_before_any_release(MixesWithACallCounter(mode == "ghost", "attribute"), MIXES, grad_sample_mode=mode)


class LeavesOutUnlabelledThenMixes(Audited):
    """Leaves out the examples labelled -1 and mixes the rest; the first example of every batch is unlabelled, or
    only that of the first batch (``every_batch=False``)."""

    def __init__(self, per_example: bool = False, every_batch: bool = False) -> None:
        super().__init__(per_example)
        self.every_batch = every_batch

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        inputs, labels = batch
        kept = labels >= 0
        inputs, labels = inputs[kept], labels[kept]
        losses = F.cross_entropy(self(inputs - inputs.mean(0)), labels, reduction="none")
        return losses if self.per_example else losses.mean()

    def train_dataloader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(0)
        inputs, labels = torch.randn(8 * 24, DIM, generator=generator), torch.randint(3, (8 * 24,), generator=generator)
        labels[:: 8 if self.every_batch else len(labels)] = -1
        return DataLoader(TensorDataset(inputs, labels), batch_size=8)


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_a_replacement_that_changes_what_is_compared_is_not_a_check(mode):
    """Before: a replaced example left out of the loss changed every quantity's shape, nothing was compared and the
    check counted as done: a model that mixes the kept examples trained. Now the next example is replaced instead.
    (bk's own row check refuses it.)"""
    fixed = {"grad_sample_mode": mode, "poisson_sampling": False}  # batches of 8 in order: example 0 unlabelled
    _refused_before_any_release(LeavesOutUnlabelledThenMixes(mode == "ghost"), MIXES, **fixed)
    _refused_before_any_release(LeavesOutUnlabelledThenMixes(mode == "ghost", every_batch=True), MIXES, **fixed)


class LeavesOutUnlabelled(LeavesOutUnlabelledThenMixes):
    """Leaves out the examples labelled -1 (the first of every batch); the kept ones don't mix."""

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        inputs, labels = batch
        kept = labels >= 0
        losses = F.cross_entropy(self(inputs[kept]), labels[kept], reduction="none")
        return losses if self.per_example else losses.mean()


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_a_step_that_leaves_out_its_first_example_is_checked_and_trains(mode):
    _trains(LeavesOutUnlabelled(mode == "ghost", every_batch=True), grad_sample_mode=mode, poisson_sampling=False)


class ImputesAMissingColumnThenMixes(Audited):
    """Every example misses its first value (NaN, imputed in ``forward``), and the model mixes the examples."""

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        inputs = torch.nan_to_num(inputs)
        return super().forward(inputs - inputs.mean(0))

    def train_dataloader(self) -> DataLoader:
        inputs, labels = _data().tensors
        inputs = inputs.clone()
        inputs[:, 0] = float("nan")
        return DataLoader(TensorDataset(inputs, labels), batch_size=8)


def test_an_example_with_nan_is_never_its_own_replacement():
    """Before: NaN != NaN made example 0 its own donor, so its replacement changed nothing."""
    from lightning_nt.privacy.independence import _donors

    assert _donors((torch.tensor([[math.nan, 1.0], [math.nan, 2.0], [math.nan, 1.0]]),), 0) == [1]
    _refused_before_any_release(ImputesAMissingColumnThenMixes(), MIXES, grad_sample_mode="hooks")


class RunsItsLayerTwice(Audited):
    """One layer applied twice in a forward pass (a block shared between depths, ALBERT-style)."""

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.fc(torch.tanh(self.fc(inputs)))))


@pytest.mark.parametrize("mode", ["hooks", "ghost", "bk"])
def test_a_layer_run_twice_trains_under_hooks_and_bk_and_ghost_refuses_it_by_name(mode):
    """Before: ghost clipping ended in Opacus's NotImplementedError 'Parameter tying is not supported', naming no
    layer and no fix."""
    if mode == "ghost":
        match = "Layer 'fc' ran twice in one training step.*grad_sample_mode='hooks' or 'bk'"
        _refused_before_any_release(RunsItsLayerTwice(True), match, grad_sample_mode=mode)
    else:
        _trains(RunsItsLayerTwice(), grad_sample_mode=mode, poisson_sampling=False)


def test_one_example_per_physical_part_needs_no_independence_check_and_trains_on():
    """With ``max_physical_batch_size=1`` every forward pass sees one example, so no layer can mix two: the check,
    which needs two examples in one pass, is not waited for (it used to count each batch as a try and refuse the fit
    after 20 steps for "no two distinct examples")."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        strategy = DPStrategy(noise_multiplier=1.0, max_grad_norm=1.0, max_physical_batch_size=1, seed=0)
        trainer = tiny_trainer(None, strategy=strategy, max_steps=24, max_epochs=-1, limit_val_batches=0)
        trainer.fit(Audited())
    assert trainer.global_step == 24


class KeepsStepOutputs(pl.LightningModule):
    """Lightning's documented ``self.training_step_outputs.append(loss)``."""

    def __init__(self) -> None:
        super().__init__()
        self.net, self.training_step_outputs = torch.nn.Linear(8, 3), []

    def training_step(self, batch, batch_idx):
        loss = torch.nn.functional.cross_entropy(self.net(batch[0]), batch[1])
        self.training_step_outputs.append(loss.detach())
        return loss

    def train_dataloader(self) -> DataLoader:
        return DataLoader(classification_data(64), batch_size=16)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize("sensitivity_probe", [False, True])
def test_the_checks_extra_training_steps_leave_the_modules_attributes_alone(sensitivity_probe):
    """The independence check's (and the canary's) own runs of ``training_step`` (on modified batches, one scaled by
    100) used to land in the user's list, and in the epoch metric computed from it."""
    module = KeepsStepOutputs()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dp = DPStrategy(noise_multiplier=1.0, max_grad_norm=1.0, sensitivity_probe=sensitivity_probe)
        tiny_trainer(None, strategy=dp, max_steps=2, limit_val_batches=0).fit(module)
    assert len(module.training_step_outputs) == 2
