"""An adversarial audit of DPStrategy: modules written as users write them, through which something derived from the
private batch left the strategy without the noise, or with more than ``max_grad_norm`` of one example in it.

Each case is refused before the step's noise (naming the thing and the fix), or no longer releases anything."""

from __future__ import annotations

import warnings

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_nt import DPStrategy
from tests.helpers import assert_ranks_agree, rank_states, save_rank_state, tiny_trainer

DIM, TOKENS, CLASSES = 4, 5, 3


def _data(tokens: int | None = None) -> TensorDataset:
    generator = torch.Generator().manual_seed(0)
    shape = (32, tokens, DIM) if tokens else (32, DIM)
    labels = torch.randint(CLASSES, shape[:-1], generator=generator)
    return TensorDataset(torch.randn(*shape, generator=generator), labels)


class Audited(pl.LightningModule):
    """Two linear layers over a ``[B, DIM]`` batch; ``per_example=True`` returns the ``[B]`` losses (ghost)."""

    tokens: int | None = None

    def __init__(self, per_example: bool = False) -> None:
        super().__init__()
        self.fc, self.out = nn.Linear(DIM, DIM), nn.Linear(DIM, CLASSES)
        self.per_example = per_example

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.fc(inputs)))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        inputs, labels = batch
        return F.cross_entropy(self(inputs), labels, reduction="none" if self.per_example else "mean")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=1.0)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(_data(self.tokens), batch_size=8)


def _fit(module: pl.LightningModule, callbacks: tuple[pl.Callback, ...] = (), **strategy: object) -> pl.Trainer:
    pl.seed_everything(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the seed warning
        dp = DPStrategy(**{"noise_multiplier": 0.0, "max_grad_norm": 1.0, "seed": 3, **strategy})
    trainer = tiny_trainer(None, strategy=dp, max_steps=2, limit_val_batches=0, callbacks=list(callbacks))
    trainer.fit(module)
    return trainer


def _refused_before_any_release(module: pl.LightningModule, match: str, **strategy: object) -> None:
    before = [p.detach().clone() for p in module.parameters()]
    with pytest.raises(RuntimeError, match=match):
        _fit(module, **strategy)
    assert all(torch.equal(b, p) for b, p in zip(before, module.parameters())), "a step was taken"
    assert all(p.grad is None for p in module.parameters()), "a raw gradient was left behind"


# -- per-example clipping must see one row per example ----------------------------------------------------------


class FoldsTokensIntoTheBatch(Audited):
    """A per-token model written the usual way: ``[B, T, d]`` folded into ``[B * T, d]`` rows before its layers.

    Opacus clipped each token's gradient to C: one example (T tokens) moved the clipped sum by up to 2 T C."""

    tokens = TOKENS

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        inputs, labels = batch
        losses = F.cross_entropy(self(inputs.reshape(-1, DIM)), labels.reshape(-1), reduction="none")
        return losses if self.per_example else losses.mean()


class RunsALayerOnPrototypes(Audited):
    """Scores against three fixed prototypes encoded by the same layer: Opacus added the prototypes' gradient (which
    depends on the whole batch) to the first three examples' per-example gradients."""

    def __init__(self, per_example: bool = False) -> None:
        super().__init__(per_example)
        self.register_buffer("prototypes", torch.randn(CLASSES, DIM, generator=torch.Generator().manual_seed(1)))

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.fc(inputs)) @ torch.tanh(self.fc(self.prototypes)).T


class PerTokenLosses(Audited):
    """Ghost clipping with the natural per-token losses (``[B * T]``) of a sequence model whose layers see ``B``."""

    tokens = TOKENS

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        inputs, labels = batch
        return F.cross_entropy(self(inputs).reshape(-1, CLASSES), labels.reshape(-1), reduction="none")


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_a_layer_that_sees_its_tokens_as_examples_is_refused_before_the_first_step(mode):
    _refused_before_any_release(FoldsTokensIntoTheBatch(mode == "ghost"), "saw these rows", grad_sample_mode=mode)


def test_a_layer_also_run_on_other_inputs_is_refused_before_the_first_step():
    _refused_before_any_release(RunsALayerOnPrototypes(), r"fc: \d+ and 3\)")


def test_ghost_clipping_refuses_more_losses_than_examples():
    _refused_before_any_release(PerTokenLosses(per_example=True), "one loss per example", grad_sample_mode="ghost")


def test_the_row_check_refuses_what_breaks_clipping_and_nothing_else():
    """Dropping examples in training_step keeps one row per example (allowed); an example twice is two rows."""

    class DropsOne(Audited):
        def training_step(self, batch, batch_idx):
            return super().training_step((batch[0][1:], batch[1][1:]), batch_idx)

    class RepeatsTheBatch(Audited):
        def training_step(self, batch, batch_idx):
            return super().training_step((batch[0].repeat(2, 1), batch[1].repeat(2)), batch_idx)

    assert _fit(DropsOne()).global_step == 2
    _refused_before_any_release(RepeatsTheBatch(), "saw these rows")


# -- ghost clipping sees only the layers' calls ------------------------------------------------------------------


class UsesTheWeightOutsideItsLayer(Audited):
    """``F.linear(x, self.fc.weight)`` next to ``self.fc(x)``: under ghost clipping its gradient reached the update
    unclipped (a canary moved the clipped sum by 2.9 C where 2 C is the bound)."""

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.fc(inputs)) + F.linear(inputs, self.fc.weight))


class CallsForwardDirectly(Audited):
    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.fc(inputs)) + self.fc.forward(inputs))


class PenalisesTheWeights(Audited):
    def training_step(self, batch, batch_idx):
        return super().training_step(batch, batch_idx) + 1e-3 * self.fc.weight.square().sum()


class LearnsATemperature(Audited):
    """A parameter of the LightningModule itself, used in ``forward`` (seen by Opacus's hooks of the module) or in
    ``training_step`` (seen by none)."""

    in_training_step = False

    def __init__(self, per_example: bool = False) -> None:
        super().__init__(per_example)
        self.temperature = nn.Parameter(torch.ones(()))

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return super().forward(inputs) * (1.0 if self.in_training_step else self.temperature)

    def training_step(self, batch, batch_idx):
        if not self.in_training_step:
            return super().training_step(batch, batch_idx)
        losses = F.cross_entropy(self(batch[0]) / self.temperature, batch[1], reduction="none")
        return losses if self.per_example else losses.mean()


class ScalesByATemperatureInTrainingStep(LearnsATemperature):
    in_training_step = True


@pytest.mark.parametrize(
    ("module", "named"),
    [
        (UsesTheWeightOutsideItsLayer, "fc.weight"),
        (CallsForwardDirectly, "fc.weight"),
        (PenalisesTheWeights, "fc.weight"),
    ],
)
def test_ghost_clipping_refuses_a_parameter_used_outside_its_layer(module, named):
    _refused_before_any_release(module(per_example=True), f"{named}.* outside a call", grad_sample_mode="ghost")


@pytest.mark.parametrize("module", [LearnsATemperature, ScalesByATemperatureInTrainingStep])
def test_ghost_clipping_refuses_a_parameter_of_the_module_itself(module):
    """A parameter of the LightningModule itself has no per-sample rule: Opacus would re-run the whole module under
    torch.func for its norms while ghost clipping releases the real backward pass's gradient. Refused by name."""
    _refused_before_any_release(
        module(per_example=True), r"<root> \(\w+: \['temperature'\]\).*not be bounded", grad_sample_mode="ghost"
    )


class LogsAWeightNorm(Audited):
    """A use of a weight outside its layer that the loss does not depend on: nothing to clip, not refused."""

    def training_step(self, batch, batch_idx):
        self.log("fc_norm", self.fc.weight.norm())
        return super().training_step(batch, batch_idx)


@pytest.mark.parametrize("module", [Audited, LogsAWeightNorm])
def test_ghost_clipping_still_trains_a_module_that_uses_its_parameters_in_their_layers(module):
    trained = module(per_example=True)
    before = [p.detach().clone() for p in trained.parameters()]
    assert _fit(trained, grad_sample_mode="ghost").global_step == 2
    assert all(not torch.equal(b, p) for b, p in zip(before, trained.parameters()))


class TiesTheOutputLayerByHand(Audited):
    """GPT-style weight tying written functionally: the output logits are ``h @ embed.weight.T``. Opacus's hooks and
    book-keeping saw only the embedding's own calls, and the output layer's part of its gradient was silently left
    out of every update."""

    def __init__(self, per_example: bool = False) -> None:
        super().__init__(per_example)
        self.embed = nn.Embedding(CLASSES, DIM)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        hidden = torch.tanh(self.fc(inputs)) + self.embed(torch.zeros(len(inputs), dtype=torch.long))
        return F.linear(hidden, self.embed.weight)


@pytest.mark.parametrize("mode", ["hooks", "bk", "auto"])
@pytest.mark.parametrize(
    ("module", "named"),
    [
        (UsesTheWeightOutsideItsLayer, "fc.weight"),
        (TiesTheOutputLayerByHand, "embed.weight"),
        (ScalesByATemperatureInTrainingStep, "temperature"),
        (PenalisesTheWeights, "fc.weight"),
    ],
)
def test_a_parameter_used_outside_its_layer_is_refused_where_its_gradient_would_be_left_out(mode, module, named):
    """Opacus's hooks and book-keeping form each example's gradient from the layers' calls: the gradient of another
    use was silently left out of every update (the model trained on part of its gradient). Book-keeping's
    parameters do not require grad while it records, so the watch is told which parameters it clips."""
    match = rf"{named}.* used outside a call of its own layer"
    if mode == "bk" and module is ScalesByATemperatureInTrainingStep:  # a LightningModule's own parameter: no bk rule
        match = "neither a book-keeping nor an Opacus per-sample rule"
    _refused_before_any_release(module(), match, grad_sample_mode=mode)


@pytest.mark.parametrize("mode", ["hooks", "bk"])
@pytest.mark.parametrize("module", [Audited, LogsAWeightNorm])
def test_a_module_that_uses_its_parameters_in_their_layers_is_not_refused(mode, module):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _fit(module(), grad_sample_mode=mode)
    assert not [w for w in caught if "outside a call of its own layer" in str(w.message)]


# -- buffers and gradients travel with the module ---------------------------------------------------------------


class KeepsTheLargestInput(Audited):
    """A buffer updated from the batch in ``forward`` (running statistics written by hand): saved with the weights
    and in every checkpoint, without noise (a canary input of 1e3 showed up as 792 in it)."""

    def __init__(self, per_example: bool = False) -> None:
        super().__init__(per_example)
        self.register_buffer("largest", torch.zeros(DIM))

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.largest.copy_(torch.maximum(self.largest, inputs.detach().abs().amax(0)))
        return super().forward(inputs)


class ReplacesABuffer(KeepsTheLargestInput):
    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        self.largest = inputs.detach().mean(0)
        return Audited.forward(self, inputs)


class UpdatesABufferThroughData(KeepsTheLargestInput):
    """``.data`` leaves the buffer's version counter as it was: found by value on the first step."""

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        self.largest.data = 0.9 * self.largest.data + 0.1 * inputs.detach().mean(0)
        return Audited.forward(self, inputs)


class ClampsTheBatchsRows(Audited):
    """A weight changed in place in forward from the batch (which rows were looked up)."""

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            self.fc.weight[inputs.argmax(1)] *= 0.5
        return super().forward(inputs)


@pytest.mark.parametrize("mode", ["hooks", "bk"])
@pytest.mark.parametrize(
    ("module", "named"),
    [
        (KeepsTheLargestInput, "largest"),
        (ReplacesABuffer, "largest"),
        (UpdatesABufferThroughData, "largest"),
        (ClampsTheBatchsRows, "fc.weight"),
    ],
)
def test_a_parameter_or_buffer_changed_by_training_step_is_refused_before_the_step(mode, module, named):
    before = {name: t.clone() for name, t in module().state_dict().items()}
    refused = module()
    with pytest.raises(RuntimeError, match=rf"changed the module's \['{named}'\]"):
        _fit(refused, grad_sample_mode=mode)
    assert all(p.grad is None for p in refused.parameters()), "a raw gradient was left behind"
    assert before.keys() == refused.state_dict().keys()


class RenormalisesEmbeddings(Audited):
    """``nn.Embedding(max_norm=1)`` renormalises, in place, the rows of the batch's tokens: after one noisy step
    those rows had norm 1.1 and the others 4.0, which told exactly which tokens the private batch held."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, DIM, max_norm=1.0)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        tokens = (inputs.abs() * 3).long().clamp(max=9)
        return super().forward(self.embed(tokens).mean(1))


@pytest.mark.parametrize("mode", ["hooks", "bk"])
def test_an_embedding_with_max_norm_is_refused_before_the_first_step(mode):
    _refused_before_any_release(
        RenormalisesEmbeddings(), r"Embeddings \['embed'\] have max_norm", grad_sample_mode=mode
    )


def test_buffers_only_read_in_training_step_still_work():
    class ReadsABuffer(Audited):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("scale", torch.full((DIM,), 0.5))

        def forward(self, inputs: torch.Tensor) -> torch.Tensor:
            return super().forward(inputs * self.scale)

    assert _fit(ReadsABuffer()).global_step == 2


class OptimisesTheHeadOnly(Audited):
    """The common fine-tuning slip: only the head in the optimizer, the body not frozen. The body's ``.grad`` (the
    raw gradient under hooks, the clipped sum under ghost and bk, no noise) stayed on the module after every step."""

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.out.parameters(), lr=1.0)


@pytest.mark.parametrize("mode", ["hooks", "ghost", "bk"])
def test_a_trainable_parameter_outside_the_optimizer_keeps_no_unnoised_gradient(mode):
    module = OptimisesTheHeadOnly(per_example=mode == "ghost")
    _fit(module, grad_sample_mode=mode)
    assert module.fc.weight.grad is None and module.fc.bias.grad is None
    assert module.out.weight.grad is not None  # the noisy gradient of the last step, as documented


# -- what the module's own hooks log, and the noise of a seeded run ---------------------------------------------


class LogsGradientNorms(Audited):
    """Lightning's recipe for watching gradients: their norms before the optimizer step, i.e. before the noise (the
    raw, unclipped gradient under hooks). It was logged without a word."""

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        self.log_dict(pl.utilities.grad_norm(self, norm_type=2))


def test_what_the_modules_other_training_hooks_log_is_flagged_as_not_covered():
    with pytest.warns(UserWarning, match=r"on_before_optimizer_step logs \['grad_2.0_norm/fc.bias'.*NOT covered"):
        _fit(LogsGradientNorms(), noise_multiplier=1.0)


class ZeroGradient(Audited):
    """Its clipped sum is zero: every update is the noise alone."""

    def training_step(self, batch, batch_idx):
        return 0.0 * super().training_step(batch, batch_idx)


class UpdateRecorder(pl.Callback):
    """Each step's update of ``pl_module.<layer>.weight``."""

    def __init__(self, layer: str = "fc") -> None:
        self.layer, self.updates = layer, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.before = getattr(pl_module, self.layer).weight.detach().clone()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.updates.append(getattr(pl_module, self.layer).weight.detach() - self.before)


def test_no_two_steps_of_one_ledger_share_their_seeded_noise():
    """One strategy (one ledger) over two Trainers, a fit per fine-tuning stage: the second fit's steps drew the
    first fit's noise again (keyed on the Trainer's step count), so the difference of two released updates was the
    difference of their clipped sums without noise, while the ledger composed them as independent."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        strategy = DPStrategy(noise_multiplier=1.0, seed=5)
    module, recorder = ZeroGradient(), UpdateRecorder()
    for stage in range(2):
        settings = {"accelerator": "cpu"} if stage == 0 else {}  # the strategy keeps its accelerator
        quiet = {"logger": False, "enable_checkpointing": False, "enable_progress_bar": False}
        trainer = pl.Trainer(
            strategy=strategy, max_steps=2, callbacks=[recorder], enable_model_summary=False, **quiet, **settings
        )
        trainer.fit(module)
    assert len(recorder.updates) == 4 and all(u.abs().sum() > 0 for u in recorder.updates)
    for first, second in zip(recorder.updates[:2], recorder.updates[2:]):
        assert not torch.allclose(first, second, atol=1e-4)


class WideZeroGradient(pl.LightningModule):
    """4160 weights whose clipped sum is zero: one update is the noise alone, sampled 4160 times."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 64)

    def training_step(self, batch, batch_idx):
        return 0.0 * self.fc(batch[0]).sum()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=1.0)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(torch.randn(64, 64)), batch_size=16)


class SaveUpdate(pl.Callback):
    def __init__(self, directory: str) -> None:
        self.directory = directory

    def on_train_start(self, trainer, pl_module):
        self.before = torch.cat([p.detach().flatten() for p in pl_module.parameters()])

    def on_train_end(self, trainer, pl_module):
        after = torch.cat([p.detach().flatten() for p in pl_module.parameters()])
        save_rank_state(trainer, self.directory, after - self.before)


@pytest.mark.ddp
@pytest.mark.slow
def test_the_noise_over_two_processes_is_one_draw_of_std_sigma_c(tmp_path):
    """One noise draw per step in total (process 0's), not one per process (sqrt(2) too much) nor one per process
    divided by its own share of the batch: the update's std times the global expected batch (2 x 16) is sigma C."""
    from lightning_nt import DPDDPStrategy

    pl.seed_everything(0)
    strategy = DPDDPStrategy(start_method="fork", noise_multiplier=1.5, max_grad_norm=2.0)
    trainer = tiny_trainer(None, strategy=strategy, devices=2, max_steps=1, callbacks=[SaveUpdate(str(tmp_path))])
    trainer.fit(WideZeroGradient())
    states = rank_states(tmp_path)
    assert_ranks_agree(states)
    rank0 = states[0]
    assert rank0.std().item() * 32 == pytest.approx(1.5 * 2.0, rel=0.05)


class ValidatesOnTheTrainingData(Audited):
    def __init__(self) -> None:
        super().__init__()
        self.data = _data()

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", F.cross_entropy(self(batch[0]), batch[1]))

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=8)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=8)


class ValidatesOnOtherData(ValidatesOnTheTrainingData):
    def val_dataloader(self) -> DataLoader:
        return DataLoader(_data(), batch_size=8)  # equal values, another dataset


@pytest.mark.parametrize("sanity_steps", [0, 2])
def test_validation_on_the_train_dataset_is_flagged_as_not_covered(sanity_steps):
    """An accident of quick experiments: val_dataloader returns the train dataset, so val_loss (and what monitors
    it) is a noiseless figure of the private data."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for module in (ValidatesOnTheTrainingData(), ValidatesOnOtherData()):
            pl.seed_everything(0)
            strategy = DPStrategy(noise_multiplier=1.0)
            tiny_trainer(None, strategy=strategy, max_steps=2, num_sanity_val_steps=sanity_steps).fit(module)
    flagged = [w for w in caught if "evaluation loader reads the train dataset" in str(w.message)]
    assert len(flagged) == 1  # once, for the first module only


@pytest.mark.parametrize("secure_mode", [False, True])
def test_the_noise_is_not_drawn_from_torchs_publicly_seeded_global_rng(secure_mode):
    """Lightning scripts call ``pl.seed_everything(42)``, and papers publish the 42. The noise came from torch's global
    RNG (also with ``secure_mode``), so anyone with the seed and the code could regenerate it and subtract it."""
    updates = []
    for _ in range(2):
        recorder = UpdateRecorder()
        pl.seed_everything(42)
        strategy = DPStrategy(noise_multiplier=1.0, secure_mode=secure_mode)
        tiny_trainer(None, strategy=strategy, max_steps=1, callbacks=[recorder], limit_val_batches=0).fit(
            ZeroGradient()
        )
        updates.append(recorder.updates[0])
    assert updates[0].abs().sum() > 0 and not torch.allclose(updates[0], updates[1])


def test_seeded_noise_is_the_same_in_every_python_process():
    """``seed=`` promises that a resumed run (another process) adds the noise the uninterrupted run added; the
    generator's seed came from ``hash()`` of a tuple with a str in it, which differs from process to process."""
    import os
    import subprocess
    import sys

    from lightning_nt.privacy.accounting import seeded_noise

    script = (
        "import torch; from lightning_nt.privacy.accounting import seeded_noise; "
        "print(torch.randn(3, generator=seeded_noise(7, 2, torch.device('cpu'))).tolist())"
    )
    other = subprocess.run(
        [sys.executable, "-c", script],
        env={**os.environ, "PYTHONHASHSEED": str(1 + hash("a") % 1000)},  # surely not this process's hash seed
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    here = torch.randn(3, generator=seeded_noise(7, 2, torch.device("cpu"))).tolist()
    assert other.strip() == str(here)


# -- on a GPU ---------------------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
@pytest.mark.parametrize("seed", [None, 5])
def test_the_noise_generator_and_the_state_checks_on_the_gpu(precision, seed):
    """The noise comes from a generator on the parameters' device (secret or seeded), of std sigma C; a buffer
    changed by training_step is refused there too."""
    from tests.privacy.test_strategy import Wide

    recorder, cuda = UpdateRecorder("layer"), {"accelerator": "gpu", "precision": precision}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        strategy = DPStrategy(noise_multiplier=1.3, max_grad_norm=0.7, seed=seed)
    tiny_trainer(None, strategy=strategy, max_steps=1, callbacks=[recorder], limit_val_batches=0, **cuda).fit(Wide())
    noise = recorder.updates[0].float().cpu() * 40.0  # expected batch q N = 40
    assert noise.std().item() == pytest.approx(1.3 * 0.7, rel=0.05)
    with pytest.raises(RuntimeError, match=r"changed the module's \['largest'\]"):
        pl.seed_everything(0)
        tiny_trainer(None, strategy=DPStrategy(noise_multiplier=1.0), max_steps=1, **cuda).fit(KeepsTheLargestInput())


# -- a layer must not mix the examples of a batch ---------------------------------------------------------------

BATCH = 8  # the loader's batch; poisson_sampling=False keeps it, so a layer can see exactly that many rows


class SequenceFirst(Audited):
    """A per-token model written sequence-first: its layers see ``[T, B, d]`` (``x.transpose(0, 1)``), so each row
    of dimension 0 is one position of every example. Every row check passed (``T <= B`` rows under hooks; ``T == B``
    under ghost and bk), and each position's gradient, summed over the whole batch, was clipped as one example's."""

    def __init__(self, per_example: bool = False, tokens: int = TOKENS) -> None:
        super().__init__(per_example)
        self.tokens = tokens

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return super().forward(inputs.transpose(0, 1)).mean(0)  # [T, B, C] -> [B, C]

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        inputs, labels = batch
        return F.cross_entropy(self(inputs), labels[:, 0], reduction="none" if self.per_example else "mean")

    def train_dataloader(self) -> DataLoader:
        return DataLoader(_data(self.tokens), batch_size=BATCH)


class SequenceFirstAttention(SequenceFirst):
    """Self-attention written as ``nn.TransformerEncoderLayer(batch_first=False)`` lays it out: ``[T, B, d]`` through
    trainable query, key, value and output projections, attention over dimension 0 within each example."""

    def __init__(self, per_example: bool = False, tokens: int = TOKENS) -> None:
        super().__init__(per_example, tokens)
        self.query, self.key, self.value = nn.Linear(DIM, DIM), nn.Linear(DIM, DIM), nn.Linear(DIM, DIM)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        x = inputs.transpose(0, 1)  # [T, B, d]
        scores = torch.einsum("tbd,sbd->bts", self.query(x), self.key(x)) / DIM**0.5
        attended = torch.einsum("bts,sbd->tbd", scores.softmax(-1), self.value(x))
        return self.out(torch.tanh(self.fc(x + attended))).mean(0)


class LoopsOverTheBatch(SequenceFirst):
    """A hand-written RNN cell stepped along dimension 0 of a batch-first ``[B, T, d]`` tensor: each call sees one
    example's ``T`` tokens as rows, and the hidden state carries from one example into the next."""

    def __init__(self, per_example: bool = False, tokens: int = TOKENS) -> None:
        super().__init__(per_example, tokens)
        self.cell = nn.Linear(2 * DIM, DIM)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        hidden, states = torch.zeros_like(inputs[0]), []
        for step in inputs:  # the examples, not the positions
            hidden = torch.tanh(self.cell(torch.cat([step, hidden], -1)))
            states.append(hidden)
        return self.out(torch.tanh(self.fc(torch.stack(states)))).mean(1)


class ScoresPositionsSequenceFirst(pl.LightningModule):
    """One linear scorer over ``[T, B, d]``, its score averaged over the positions: the loss is linear in the weight,
    so each position's row of Opacus's per-example gradients is the sum over the batch of every example's part."""

    def __init__(self, per_example: bool = False) -> None:
        super().__init__()
        self.score, self.per_example = nn.Linear(DIM, CLASSES, bias=False), per_example

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        inputs, labels = batch
        scores = self.score(inputs.transpose(0, 1)).mean(0)  # [T, B, C] -> [B, C]
        losses = -scores.gather(1, labels[:, :1]).squeeze(1)
        return losses if self.per_example else losses.mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=1.0)


class UpdateOfAll(pl.Callback):
    """The first step's update of every parameter, flattened."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.before = torch.cat([p.detach().flatten() for p in pl_module.parameters()])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.update = torch.cat([p.detach().flatten() for p in pl_module.parameters()]) - self.before


class ReversesItsLosses(ScoresPositionsSequenceFirst):
    """Batch-first, but ``training_step`` returns its per-example losses in reverse order: ghost clipping weighs each
    loss by the clip factor of the row in its place, so the canary's loss was weighed by another example's factor."""

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        inputs, labels = batch
        losses = -self.score(inputs[:, 0]).gather(1, labels[:, :1]).squeeze(1)
        return losses.flip(0) if self.per_example else losses.mean()


def _moved_by_one_example(
    mode: str, tokens: int, module: type[pl.LightningModule] = ScoresPositionsSequenceFirst
) -> float:
    """How far one example of the first batch moves the released clipped sum (noise 0, SGD with lr 1, the loader's
    own batch of 8), in units of ``max_grad_norm``: example 0 is 100 x or -100 x (a replaced example: bound 2 C).
    Every position of an example holds the same input, so every position's row points the same way."""
    inputs, labels = _data(1).tensors
    inputs = inputs.expand(-1, tokens, -1).contiguous()
    updates = []
    for sign in (1.0, -1.0):
        canary = torch.cat([inputs[:1] * 100.0 * sign, inputs[1:]])
        trained, recorder = module(mode == "ghost"), UpdateOfAll()
        trained.train_dataloader = lambda canary=canary: DataLoader(TensorDataset(canary, labels), batch_size=BATCH)
        pl.seed_everything(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the seed and poisson_sampling warnings
            dp = DPStrategy(
                noise_multiplier=0.0, max_grad_norm=1.0, seed=3, poisson_sampling=False, grad_sample_mode=mode
            )
        tiny_trainer(None, strategy=dp, max_steps=1, limit_val_batches=0, callbacks=[recorder]).fit(trained)
        updates.append(recorder.update)
    return float((updates[0] - updates[1]).norm()) * BATCH


@pytest.mark.parametrize(("mode", "tokens"), [("hooks", TOKENS), ("hooks", BATCH), ("ghost", BATCH), ("bk", BATCH)])
def test_one_example_moves_a_sequence_first_layers_update_by_at_most_c_or_it_is_refused(mode, tokens):
    """Measured before the refusal existed (C = 1, bound 2 C for a replaced example): one example moved the update
    by 2 T C, 10 C with T = 5 positions under hooks and 16 C with T = 8 under hooks, ghost and bk."""
    try:
        moved = _moved_by_one_example(mode, tokens)
    except RuntimeError as refusal:
        assert "mixes the examples" in str(refusal), refusal
        return
    assert moved <= 2.0 * (1 + 1e-4), f"one example moved the clipped sum by {moved:.3g} C"


def test_ghost_clipping_refuses_losses_in_another_order_than_the_examples():
    """Measured before the refusal existed: the canary moved the update by 60 C (bound 2 C)."""
    try:
        moved = _moved_by_one_example("ghost", 1, ReversesItsLosses)
    except RuntimeError as refusal:
        assert "mixes the examples" in str(refusal) and "per-example losses" in str(refusal), refusal
        return
    assert moved <= 2.0 * (1 + 1e-4), f"one example moved the clipped sum by {moved:.3g} C"


@pytest.mark.parametrize("module", [SequenceFirst, SequenceFirstAttention, LoopsOverTheBatch])
@pytest.mark.parametrize(("mode", "tokens"), [("hooks", TOKENS), ("hooks", BATCH), ("ghost", BATCH), ("bk", BATCH)])
def test_a_layer_that_mixes_the_examples_is_refused_before_the_first_step(module, mode, tokens):
    """Each passed every row check, and its per-example gradients mixed the batch's examples."""
    if module is LoopsOverTheBatch and (mode == "ghost" or tokens != BATCH):
        pytest.skip("refused already: Opacus's ghost clipping refuses a layer called twice; fc sees 8 rows, cell 5")
    match = r"mixes the examples.*\b(fc|out|query|key|value|cell)\b.*batch_first=True"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # poisson_sampling=False
        _refused_before_any_release(
            module(mode == "ghost", tokens), match, grad_sample_mode=mode, poisson_sampling=False
        )
