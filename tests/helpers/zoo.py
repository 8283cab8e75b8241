"""A zoo of small LightningModules in the shapes users write them, each with the facts a capability may depend on.

Every entry is a self-contained ``LightningModule`` (its own train and validation loaders: 32 training examples in
4 unshuffled batches of 8, 16 validation examples), a few hundred parameters, training in well under a second on a
CPU. The :class:`ZooEntry` beside each one declares what a capability might need to know about it (is it a
classifier read by ``batch[0]``/``batch[1]``, does it have BatchNorm, unused or frozen parameters, tied weights, a
learning rate of 0 at the first step, ...), so that a capability can list the entries it refuses *by design* rather
than skip them silently. The contract suite (``tests/contract/``) runs every capability over every entry.

Example:
    >>> entry = ZOO["mlp"]
    >>> module = entry.build()
    >>> sum(p.numel() for p in module.parameters()) < 1000
    True
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

__all__ = ["ZOO", "ZooEntry", "ZooModule", "zoo_data"]

BatchKind = Literal["tuple", "dict", "namedtuple", "dataclass"]
LossKind = Literal["cross_entropy", "mse", "bce"]

DIM, HIDDEN, CLASSES, LENGTH, VOCAB = 8, 8, 3, 5, 11
TRAIN_SAMPLES, VAL_SAMPLES, BATCH = 32, 16, 8


@dataclasses.dataclass(frozen=True)
class ZooEntry:
    """One module shape and the facts about it that a capability may depend on."""

    name: str
    build: Callable[[], pl.LightningModule]
    description: str
    classifier: bool = True
    """Multi-class logits from ``module(batch[0])`` compared by argmax with integer labels ``batch[1]``."""
    batch_kind: BatchKind = "tuple"
    loss_kind: LossKind = "cross_entropy"
    batch_norm: bool = False
    batch_norm_in_eval: bool = False
    """Every BatchNorm is frozen and kept in eval mode while training (running statistics, no batch statistics)."""
    unused_parameters: bool = False
    frozen_parameters: bool = False
    tied_weights: bool = False
    shared_submodule: bool = False
    recurrent: bool = False
    attention: bool = False
    lr_starts_at_zero: bool = False
    several_lrs: bool = False
    validation_loaders: int = 1
    optimizer: Literal["sgd", "adam"] = "sgd"
    manual_optimization: bool = False
    goes_non_finite: bool = False
    output_object: bool = False
    """``forward`` returns an object with ``.logits`` (HuggingFace style), not a tensor."""
    activation_checkpointing: bool = False
    reparametrized: bool = False
    """Weights computed from other parameters (``weight_norm``, ``spectral_norm``, parametrizations)."""
    bare_parameters: bool = False
    """Trainable parameters held by no layer with ``reset_parameters`` and applied functionally in ``forward`` (an
    ``nn.Parameter`` on the LightningModule itself, ``nn.ParameterList``/``nn.ParameterDict`` with ``F.linear``)."""
    parameter_containers: bool = False
    """Trainable parameters in ``nn.ParameterList``/``nn.ParameterDict``, modules that are never called."""
    parametric_activation: bool = False
    """An activation with a learned parameter (``nn.PReLU``)."""
    forward_updates_buffers: bool = False
    """The training forward pass writes buffers (a running mean of the batch's features, a step counter)."""
    integer_buffers: bool = False
    """A persistent integer buffer besides BatchNorm's ``num_batches_tracked`` (a step counter, an index table)."""
    shared_input_rows: bool = False
    """A trainable layer runs once on one row shared by the batch and broadcast over it (HuggingFace's position
    embeddings, indexed by ``position_ids`` of shape ``[1, T]``)."""
    in_place_on_outputs: bool = False
    """In-place operations on trainable layers' outputs (``nn.ReLU(inplace=True)``, ``out += identity``)."""
    recomputed_layers: bool = False
    """A layer with trainable parameters of its own and no per-sample rule (Opacus recomputes its forward under
    ``torch.func``) also holds buffers or draws random numbers (Swin's bias table beside its index buffer, ConvNeXt's
    layer scale over stochastic depth)."""
    shared_layers: tuple[str, ...] = ()
    """Modules run once on inputs the whole batch shares (Swin V2's position-bias MLP): their outputs don't hold the
    examples along dimension 0."""
    second_order: bool = True
    """PyTorch can differentiate the loss twice (``nn.EmbeddingBag`` can't)."""
    trainer_arguments: dict[str, Any] = dataclasses.field(default_factory=dict)
    """What the entry asks of the Trainer (e.g. ``accumulate_grad_batches``)."""
    compiled: Literal["module", "submodule"] | None = None
    """``torch.compile``: the whole LightningModule given to ``trainer.fit`` compiled (``build`` returns the
    ``OptimizedModule``), or a submodule compiled inside it (its names carry an ``_orig_mod.`` prefix)."""

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps per epoch of the 4 training batches."""
        return TRAIN_SAMPLES // BATCH // self.trainer_arguments.get("accumulate_grad_batches", 1)

    def __str__(self) -> str:
        return self.name


def zoo_data(num_samples: int, seed: int, kind: Literal["vectors", "sequences", "tokens", "images"] = "vectors"):
    """Inputs and integer labels in 3 classes (Gaussian blobs in the shape the network reads), from ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(CLASSES, (num_samples,), generator=generator)
    if kind == "tokens":
        tokens = torch.randint(VOCAB, (num_samples, LENGTH), generator=generator)
        return tokens, tokens[:, 0] % CLASSES
    centres = torch.randn(CLASSES, DIM, generator=generator) * 2
    inputs = centres[labels] + torch.randn(num_samples, DIM, generator=generator)
    if kind == "sequences":
        inputs = inputs[:, None, :] + 0.5 * torch.randn(num_samples, LENGTH, DIM, generator=generator)
    elif kind == "images":
        inputs = inputs.view(num_samples, 2, 2, 2).repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    return inputs, labels


class ZooModule(pl.LightningModule):
    """Tuple batches ``(inputs, labels)``, cross-entropy, SGD(lr=0.1); subclasses change one thing each."""

    data_kind: Literal["vectors", "sequences", "tokens", "images"] = "vectors"

    def __init__(self) -> None:
        super().__init__()
        self.net = self.network()

    def network(self) -> nn.Module:
        return nn.Sequential(nn.Linear(DIM, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, CLASSES))

    def forward(self, inputs: Tensor) -> Tensor:
        return self.net(inputs)

    def unpack(self, batch: Any) -> tuple[Tensor, Tensor]:
        """``(inputs, targets)`` of a batch (the users' ``predict_fn``/``target_fn`` read it this way too)."""
        return batch[0], batch[1]

    def loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        return F.cross_entropy(outputs, targets)

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        inputs, targets = self.unpack(batch)
        loss = self.loss(self(inputs), targets)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        inputs, targets = self.unpack(batch)
        self.log("val_loss", self.loss(self(inputs), targets))

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def dataset(self, num_samples: int, seed: int) -> Dataset:
        return TensorDataset(*zoo_data(num_samples, seed, self.data_kind))

    def collate(self) -> Callable[[list[Any]], Any] | None:
        return None

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.dataset(TRAIN_SAMPLES, 0), batch_size=BATCH, collate_fn=self.collate())

    def val_dataloader(self) -> Any:
        return DataLoader(self.dataset(VAL_SAMPLES, 1), batch_size=VAL_SAMPLES, collate_fn=self.collate())


# ---- batch structures -------------------------------------------------------------------------------------------


class _Examples(Dataset):
    """A ``TensorDataset``'s examples wrapped into another structure by ``wrap(inputs, labels)``."""

    def __init__(self, data: TensorDataset, wrap: Callable[[Tensor, Tensor], Any]) -> None:
        self.data, self.wrap = data, wrap

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> Any:
        return self.wrap(*self.data[index])


class DictBatches(ZooModule):
    def dataset(self, num_samples: int, seed: int) -> Dataset:
        return _Examples(super().dataset(num_samples, seed), lambda x, y: {"inputs": x, "labels": y})

    def unpack(self, batch: Any) -> tuple[Tensor, Tensor]:
        return batch["inputs"], batch["labels"]


class Example(NamedTuple):
    inputs: Tensor
    labels: Tensor


class NamedTupleBatches(ZooModule):
    def dataset(self, num_samples: int, seed: int) -> Dataset:
        return _Examples(super().dataset(num_samples, seed), Example)

    def unpack(self, batch: Any) -> tuple[Tensor, Tensor]:
        return batch.inputs, batch.labels


@dataclasses.dataclass
class ExampleBatch:
    inputs: Tensor
    labels: Tensor


def _collate_dataclass(examples: list[ExampleBatch]) -> ExampleBatch:
    return ExampleBatch(torch.stack([e.inputs for e in examples]), torch.stack([e.labels for e in examples]))


class DataclassBatches(ZooModule):
    def dataset(self, num_samples: int, seed: int) -> Dataset:
        return _Examples(super().dataset(num_samples, seed), ExampleBatch)

    def collate(self) -> Callable[[list[Any]], Any] | None:
        return _collate_dataclass

    def unpack(self, batch: Any) -> tuple[Tensor, Tensor]:
        return batch.inputs, batch.labels


class DictOutput(ZooModule):
    def training_step(self, batch: Any, batch_idx: int) -> Any:
        inputs, targets = self.unpack(batch)
        logits = self(inputs)
        loss = self.loss(logits, targets)
        self.log_dict({"train_loss": loss})
        return {"loss": loss, "logits": logits.detach()}


class ManualOptimization(ZooModule):
    """``automatic_optimization = False``: ``training_step`` steps the optimizer itself and returns nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch: Any, batch_idx: int) -> None:
        optimizer = self.optimizers()
        inputs, targets = self.unpack(batch)
        loss = self.loss(self(inputs), targets)
        self.log("train_loss", loss)
        optimizer.zero_grad()
        self.manual_backward(loss)
        optimizer.step()


# ---- parameter sharing and freezing -----------------------------------------------------------------------------


class _TiedLM(nn.Module):
    """Embedding and output layer share one Parameter; the logits are the first CLASSES tokens' scores."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(VOCAB, HIDDEN)
        self.hidden = nn.Linear(HIDDEN, HIDDEN)
        self.output = nn.Linear(HIDDEN, VOCAB, bias=False)
        self.output.weight = self.embedding.weight

    def forward(self, tokens: Tensor) -> Tensor:
        return self.output(torch.tanh(self.hidden(self.embedding(tokens).mean(dim=1))))[:, :CLASSES]


class TiedWeights(ZooModule):
    data_kind = "tokens"

    def network(self) -> nn.Module:
        return _TiedLM()


class _SharedBlock(nn.Module):
    """ALBERT-style: one block registered under two names and applied twice."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(DIM, HIDDEN)
        block = nn.Linear(HIDDEN, HIDDEN)
        self.first, self.second = block, block
        self.head = nn.Linear(HIDDEN, CLASSES)

    def forward(self, inputs: Tensor) -> Tensor:
        hidden = torch.tanh(self.embed(inputs))
        hidden = hidden + torch.tanh(self.first(hidden))
        return self.head(hidden + torch.tanh(self.second(hidden)))


class SharedSubmodule(ZooModule):
    def network(self) -> nn.Module:
        return _SharedBlock()


class FrozenBackbone(ZooModule):
    """A frozen first layer, and ``Adam(self.parameters())`` over everything (as fine-tuning code often has)."""

    def network(self) -> nn.Module:
        net = super().network()
        net[0].requires_grad_(False)
        return net

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.parameters(), lr=0.01)


class UnusedParameter(ZooModule):
    def __init__(self) -> None:
        super().__init__()
        self.unused = nn.Linear(DIM, 2)  # registered (and optimised) but never part of the forward pass


# ---- architectures ----------------------------------------------------------------------------------------------


class _Recurrent(nn.Module):
    def __init__(self, cell: type[nn.RNNBase]) -> None:
        super().__init__()
        self.rnn = cell(DIM, HIDDEN, batch_first=True)
        self.head = nn.Linear(HIDDEN, CLASSES)

    def forward(self, sequences: Tensor) -> Tensor:
        outputs, _ = self.rnn(sequences)
        return self.head(outputs[:, -1])


class LSTMClassifier(ZooModule):
    data_kind = "sequences"

    def network(self) -> nn.Module:
        return _Recurrent(nn.LSTM)


class GRUClassifier(ZooModule):
    data_kind = "sequences"

    def network(self) -> nn.Module:
        return _Recurrent(nn.GRU)


class _Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(DIM, nhead=2, dim_feedforward=16, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=1, enable_nested_tensor=False)
        self.head = nn.Linear(DIM, CLASSES)

    def forward(self, sequences: Tensor) -> Tensor:
        return self.head(self.encoder(sequences).mean(dim=1))


class TransformerClassifier(ZooModule):
    data_kind = "sequences"

    def network(self) -> nn.Module:
        return _Encoder()


class ConvGroupNorm(ZooModule):
    data_kind = "images"

    def network(self) -> nn.Module:
        return nn.Sequential(
            nn.Conv2d(2, 4, 3, padding=1),
            nn.GroupNorm(2, 4),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(4, CLASSES),
        )


class BatchNormNet(ZooModule):
    def network(self) -> nn.Module:
        return nn.Sequential(nn.Linear(DIM, HIDDEN), nn.BatchNorm1d(HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, CLASSES))


# ---- optimisation set-ups ---------------------------------------------------------------------------------------


class WarmupFromZero(ZooModule):
    """A linear warm-up over 4 steps from lr 0 (``LambdaLR``, stepped every optimizer step)."""

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.SGD(self.parameters(), lr=0.1)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, step / 4))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


class ParamGroups(ZooModule):
    def configure_optimizers(self) -> Any:
        first, last = self.net[0], self.net[2]
        return torch.optim.SGD([{"params": first.parameters(), "lr": 0.1}, {"params": last.parameters(), "lr": 0.01}])


class SeveralValidationLoaders(ZooModule):
    def val_dataloader(self) -> Any:
        return [
            DataLoader(self.dataset(VAL_SAMPLES, 1), batch_size=VAL_SAMPLES),
            DataLoader(self.dataset(VAL_SAMPLES, 2), batch_size=BATCH),
        ]


class GoesNonFinite(ZooModule):
    """From step 5 on (the second epoch), the loss is scaled by inf: gradients and then weights turn NaN.

    Lightning trains on; every capability must too (skipping a measurement with a warning, never crashing).
    """

    def loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        loss = super().loss(outputs, targets)
        return loss * math.inf if self.training and self.global_step >= 5 else loss


# ---- other losses -----------------------------------------------------------------------------------------------


class Regression(ZooModule):
    """MSE on a scalar target (the distance of the blob's centre label, as a float)."""

    def network(self) -> nn.Module:
        return nn.Sequential(nn.Linear(DIM, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, 1))

    def dataset(self, num_samples: int, seed: int) -> Dataset:
        inputs, labels = zoo_data(num_samples, seed)
        return TensorDataset(inputs, labels.float()[:, None])

    def loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        return F.mse_loss(outputs, targets)


class BinarySingleLogit(ZooModule):
    """One logit and ``binary_cross_entropy_with_logits`` (class 0 against the rest)."""

    def network(self) -> nn.Module:
        return nn.Sequential(nn.Linear(DIM, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, 1))

    def dataset(self, num_samples: int, seed: int) -> Dataset:
        inputs, labels = zoo_data(num_samples, seed)
        return TensorDataset(inputs, (labels == 0).float()[:, None])

    def loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        return F.binary_cross_entropy_with_logits(outputs, targets)


# ---- shapes from the second new-user sweep -----------------------------------------------------------------------


@dataclasses.dataclass
class HFOutput:
    """What a HuggingFace model returns: an object with ``.loss`` (when labels are given) and ``.logits``."""

    loss: Tensor | None
    logits: Tensor


def _hf_example(tokens: Tensor, label: Tensor, index: int) -> dict[str, Any]:
    mask = (torch.arange(LENGTH) < LENGTH - index % 2).long()  # every other example padded at the end
    return {"input_ids": tokens * mask, "attention_mask": mask, "labels": label, "ids": f"example-{index}"}


class _HFExamples(Dataset):
    def __init__(self, data: TensorDataset) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return _hf_example(*self.data[index], index)


class HuggingFaceStyle(ZooModule):
    """``forward(**batch)`` returns an output object; batches carry an attention mask, a ``padding_idx`` of 0 and
    a list of string ids (what ``default_collate`` makes of a string field)."""

    data_kind = "tokens"

    def network(self) -> nn.Module:
        return nn.ModuleDict(
            {
                "embed": nn.Embedding(VOCAB, HIDDEN, padding_idx=0),
                "act": nn.GELU(),
                "head": nn.Linear(HIDDEN, CLASSES),
            }
        )

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor | None = None, labels: Tensor | None = None, **_: Any
    ) -> HFOutput:
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        pooled = (self.net["embed"](input_ids) * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        logits = self.net["head"](self.net["act"](pooled))
        return HFOutput(None if labels is None else F.cross_entropy(logits, labels), logits)

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        outputs = self(**batch)
        self.log("train_loss", outputs.loss)
        return outputs.loss

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self.log("val_loss", self(**batch).loss)

    def dataset(self, num_samples: int, seed: int) -> Dataset:
        return _HFExamples(TensorDataset(*zoo_data(num_samples, seed, self.data_kind)))

    def unpack(self, batch: Any) -> tuple[Tensor, Tensor]:
        return batch["input_ids"], batch["labels"]


class ActivationCheckpointing(ZooModule):
    """The hidden layer under ``torch.utils.checkpoint`` (non-reentrant), which re-runs it in the backward pass."""

    def forward(self, inputs: Tensor) -> Tensor:
        return self.net[2](torch.utils.checkpoint.checkpoint(self.net[:2], inputs, use_reentrant=False))


class WeightNorm(ZooModule):
    """``parametrizations.weight_norm`` on the first layer, the older ``nn.utils.weight_norm`` hook on the last."""

    def network(self) -> nn.Module:
        net = super().network()
        nn.utils.parametrizations.weight_norm(net[0])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # deprecated, and still in many models
            nn.utils.weight_norm(net[2])
        return net


class Float64(ZooModule):
    """Built in float64 and trained with ``precision="64-true"`` (Lightning restores a checkpoint before it converts
    the module: a module built in float32 would resume from weights rounded to float32)."""

    def __init__(self) -> None:
        super().__init__()
        self.double()


class EmbeddingBagClassifier(ZooModule):
    """``nn.EmbeddingBag`` (mean over the tokens, ``padding_idx`` 0) on 2-D token batches."""

    data_kind = "tokens"

    def network(self) -> nn.Module:
        return nn.Sequential(nn.EmbeddingBag(VOCAB, HIDDEN, padding_idx=0), nn.Tanh(), nn.Linear(HIDDEN, CLASSES))


def _note_gradient_norm(layer: nn.Module, grad_input: Any, grad_output: Any) -> None:
    layer.last_gradient_norm = grad_output[0].detach().norm()


class BackwardHook(ZooModule):
    """A full backward hook on a layer (gradient monitoring, as users and libraries such as Captum register them)."""

    def network(self) -> nn.Module:
        network = super().network()
        network[0].register_full_backward_hook(_note_gradient_norm)
        return network


# ---- module structures from the third new-user sweep -------------------------------------------------------------


class BareParameter(ZooModule):
    """A learned logit temperature registered on the LightningModule itself, outside every submodule, and used
    functionally in ``forward`` (CLIP's ``logits * logit_scale.exp()``)."""

    def __init__(self) -> None:
        super().__init__()
        self.log_scale = nn.Parameter(torch.tensor(0.5))

    def forward(self, inputs: Tensor) -> Tensor:
        return self.net(inputs) * self.log_scale.exp()


class _ContainerLayers(nn.Module):
    """A hand-written MLP: weights in an ``nn.ParameterList``, biases in an ``nn.ParameterDict``, ``F.linear``."""

    def __init__(self) -> None:
        super().__init__()
        shapes = ((HIDDEN, DIM), (CLASSES, HIDDEN))
        self.weights = nn.ParameterList(nn.Parameter(torch.randn(shape) / math.sqrt(shape[1])) for shape in shapes)
        self.biases = nn.ParameterDict(
            {"hidden": nn.Parameter(torch.zeros(HIDDEN)), "out": nn.Parameter(torch.zeros(CLASSES))}
        )

    def forward(self, inputs: Tensor) -> Tensor:
        hidden = torch.tanh(F.linear(inputs, self.weights[0], self.biases["hidden"]))
        return F.linear(hidden, self.weights[1], self.biases["out"])


class ParameterContainers(ZooModule):
    def network(self) -> nn.Module:
        return _ContainerLayers()


class PReLULayerNorm(ZooModule):
    """LayerNorm, PReLU (an activation with a learned slope), GELU and SiLU: the activation modules found by type."""

    def network(self) -> nn.Module:
        return nn.Sequential(
            nn.Linear(DIM, HIDDEN),
            nn.LayerNorm(HIDDEN),
            nn.PReLU(),
            nn.Linear(HIDDEN, HIDDEN),
            nn.GELU(),
            nn.Linear(HIDDEN, HIDDEN),
            nn.SiLU(),
            nn.Linear(HIDDEN, CLASSES),
        )


class EvalModeBatchNorm(ZooModule):
    """Fine-tuning a head on a frozen BatchNorm backbone kept in eval mode (running statistics fixed) while the
    rest trains: ``on_train_epoch_start`` puts the backbone back in eval mode after Lightning's ``train()``."""

    def network(self) -> nn.Module:
        backbone = nn.Sequential(nn.Linear(DIM, HIDDEN), nn.BatchNorm1d(HIDDEN), nn.Tanh())
        with torch.no_grad():  # running statistics as a pre-trained backbone has them, not the defaults
            backbone[1].running_mean.uniform_(-0.5, 0.5)
            backbone[1].running_var.uniform_(0.5, 2.0)
        backbone.requires_grad_(False)
        return nn.Sequential(backbone, nn.Linear(HIDDEN, CLASSES))

    def on_train_epoch_start(self) -> None:
        self.net[0].eval()


class TwoLosses(ZooModule):
    """Two heads on one trunk: ``training_step`` returns cross-entropy plus an auxiliary MSE (reconstructing the
    input's mean) and logs both; ``forward`` gives the classifier's logits."""

    def network(self) -> nn.Module:
        return nn.ModuleDict(
            {
                "trunk": nn.Sequential(nn.Linear(DIM, HIDDEN), nn.Tanh()),
                "classifier": nn.Linear(HIDDEN, CLASSES),
                "auxiliary": nn.Linear(HIDDEN, 1),
            }
        )

    def forward(self, inputs: Tensor) -> Tensor:
        return self.net["classifier"](self.net["trunk"](inputs))

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        inputs, targets = self.unpack(batch)
        features = self.net["trunk"](inputs)
        classification = F.cross_entropy(self.net["classifier"](features), targets)
        auxiliary = F.mse_loss(self.net["auxiliary"](features), inputs.mean(dim=1, keepdim=True))
        self.log("train_ce", classification)
        self.log("train_aux", auxiliary)
        return classification + auxiliary


class DropoutNet(ZooModule):
    """``nn.Dropout(0.5)`` after the hidden layer. The global RNG is seeded before each epoch's first batch (Lightning
    doesn't checkpoint it; so a resumed run draws the masks of the uninterrupted one): any draw a monitor makes
    mid-epoch changes the masks of the steps that follow."""

    def network(self) -> nn.Module:
        return nn.Sequential(nn.Linear(DIM, HIDDEN), nn.Tanh(), nn.Dropout(0.5), nn.Linear(HIDDEN, CLASSES))

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if batch_idx == 0:
            torch.manual_seed(self.current_epoch)


class _Buffered(nn.Module):
    """A non-persistent buffer (a fixed input scale), an integer step counter and a running mean of the hidden
    features, both updated in every training forward pass (as EMA and schedule layers keep them)."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden, self.out = nn.Linear(DIM, HIDDEN), nn.Linear(HIDDEN, CLASSES)
        self.register_buffer("input_scale", torch.linspace(0.5, 1.5, DIM), persistent=False)
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("feature_mean", torch.zeros(HIDDEN))

    def forward(self, inputs: Tensor) -> Tensor:
        hidden = torch.tanh(self.hidden(inputs * self.input_scale))
        if self.training:
            self.steps += 1
            self.feature_mean.lerp_(hidden.detach().mean(dim=0), 0.1)
        return self.out(hidden)


class Buffers(ZooModule):
    def network(self) -> nn.Module:
        return _Buffered()


class OrthogonalParametrization(ZooModule):
    """The hidden-to-hidden weight kept orthogonal by ``torch.nn.utils.parametrizations.orthogonal``."""

    def network(self) -> nn.Module:
        return nn.Sequential(
            nn.Linear(DIM, HIDDEN),
            nn.Tanh(),
            nn.utils.parametrizations.orthogonal(nn.Linear(HIDDEN, HIDDEN)),
            nn.Tanh(),
            nn.Linear(HIDDEN, CLASSES),
        )


class PlateauSchedule(ZooModule):
    """``configure_optimizers`` returns a dict whose ``ReduceLROnPlateau`` monitors ``val_loss`` (once per epoch)."""

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.SGD(self.parameters(), lr=0.1)
        schedule = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=0.5, patience=0)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "monitor": "val_loss"}}


# ---- torch.compile -----------------------------------------------------------------------------------------------

COMPILE_BACKEND = "aot_eager"
"""Dynamo + AOTAutograd (the part that refuses a double backward) without inductor's slow C++ compile."""


class _LogsEagerly(ZooModule):
    """``self.log`` outside the compiled graph: Lightning 2.6 lets Dynamo trace ``self.log`` inside a compiled
    ``training_step``, which PyTorch 2.12+ can't do (Lightning-AI/pytorch-lightning#21836; Lightning's fix puts the
    same ``torch.compiler.disable`` on ``LightningModule.log``)."""

    @torch.compiler.disable
    def log(self, *args: Any, **kwargs: Any) -> None:
        super().log(*args, **kwargs)


def compiled_module() -> nn.Module:
    """``trainer.fit(torch.compile(module))``: Lightning unwraps the ``OptimizedModule`` and compiles the
    LightningModule's ``forward`` and ``*_step`` methods in place."""
    return torch.compile(_LogsEagerly(), backend=COMPILE_BACKEND)


class CompiledSubmodule(ZooModule):
    """``self.net = torch.compile(network)`` in ``__init__``: the network's names carry an ``_orig_mod.`` prefix."""

    def network(self) -> nn.Module:
        return torch.compile(super().network(), backend=COMPILE_BACKEND)


# ---- written elsewhere: a GPT-2 block as HuggingFace's transformers writes it ---------------------------------


class _NewGELU(nn.Module):
    """GPT-2's activation as ``transformers`` writes it (the tanh approximation spelled out): not an ``nn.GELU``."""

    def forward(self, x: Tensor) -> Tensor:
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


class _Conv1D(nn.Module):
    """``transformers``' ``Conv1D``: a linear layer with its weight stored ``[in, out]``, applied with ``addmm`` on
    the positions folded into one dimension. Under this module's name neither Opacus nor the book-keeping engine has a
    rule for it (book-keeping recognises ``transformers.pytorch_utils.Conv1D``: ``tests/helpers/third_party``)."""

    def __init__(self, inputs: int, outputs: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(inputs, outputs) * 0.2)
        self.bias = nn.Parameter(torch.zeros(outputs))

    def forward(self, x: Tensor) -> Tensor:
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).view(*x.shape[:-1], -1)


class _GPTBlock(nn.Module):
    """Token and learned position embeddings (the positions indexed by ``arange(T)[None]``, one row broadcast over the
    batch, as ``transformers`` does), one pre-LayerNorm block of causal self-attention and MLP, the last position's
    hidden state classified."""

    def __init__(self, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.wte, self.wpe = nn.Embedding(VOCAB, HIDDEN), nn.Embedding(LENGTH, HIDDEN)
        self.ln_1, self.ln_2 = nn.LayerNorm(HIDDEN), nn.LayerNorm(HIDDEN)
        self.c_attn, self.c_proj = _Conv1D(HIDDEN, 3 * HIDDEN), _Conv1D(HIDDEN, HIDDEN)
        self.mlp = nn.Sequential(_Conv1D(HIDDEN, 2 * HIDDEN), _NewGELU(), _Conv1D(2 * HIDDEN, HIDDEN))
        self.head = nn.Linear(HIDDEN, CLASSES)
        self.register_buffer("causal", torch.ones(LENGTH, LENGTH, dtype=torch.bool).tril(), persistent=False)

    def attention(self, x: Tensor) -> Tensor:
        batch, length, width = x.shape
        q, k, v = (t.view(batch, length, self.heads, -1).transpose(1, 2) for t in self.c_attn(x).split(width, dim=2))
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
        scores = scores.masked_fill(~self.causal[:length, :length], torch.finfo(scores.dtype).min)
        return self.c_proj((scores.softmax(dim=-1) @ v).transpose(1, 2).reshape(batch, length, width))

    def forward(self, tokens: Tensor) -> Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device)[None]
        hidden = self.wte(tokens) + self.wpe(positions)
        hidden = hidden + self.attention(self.ln_1(hidden))
        hidden = hidden + self.mlp(self.ln_2(hidden))
        return self.head(hidden[:, -1])


class GPTStyle(ZooModule):
    data_kind = "tokens"

    def network(self) -> nn.Module:
        return _GPTBlock()

    def configure_optimizers(self) -> Any:
        return torch.optim.AdamW(self.parameters(), lr=0.01, weight_decay=0.01)


# ---- written elsewhere: torchvision's vision architectures --------------------------------------------------------


class _SqueezeExcitation(nn.Module):
    """torchvision's ``SqueezeExcitation`` as MobileNetV3 configures it: pooled channels, a 1x1 reduction, ReLU, a 1x1
    expansion and an ``nn.Hardsigmoid`` gate that rescales the channels (PyTorch can't differentiate the gate
    twice)."""

    def __init__(self, channels: int, squeezed: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Conv2d(channels, squeezed, 1), nn.Conv2d(squeezed, channels, 1)
        self.relu, self.gate = nn.ReLU(), nn.Hardsigmoid()

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gate(self.fc2(self.relu(self.fc1(F.adaptive_avg_pool2d(x, 1)))))


class SqueezeExcitationNet(ZooModule):
    """A MobileNetV3 block on 2x4x4 images: 1x1 expansion, ``nn.Hardswish``, a depthwise 3x3 convolution, the
    squeeze-and-excitation gate, a 1x1 projection; Adam."""

    data_kind = "images"

    def network(self) -> nn.Module:
        return nn.Sequential(
            nn.Conv2d(2, 4, 1),
            nn.Hardswish(),
            nn.Conv2d(4, 4, 3, padding=1, groups=4),
            _SqueezeExcitation(4, 2),
            nn.Conv2d(4, 4, 1),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(4, CLASSES),
        )

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.parameters(), lr=0.01)


class _Permute(nn.Module):
    """torchvision's ``Permute``: the dimensions reordered (ConvNeXt's blocks run their MLP channels-last)."""

    def __init__(self, *dims: int) -> None:
        super().__init__()
        self.dims = dims

    def forward(self, x: Tensor) -> Tensor:
        return x.permute(*self.dims)


class _LayerNorm2d(nn.LayerNorm):
    """torchvision's ``LayerNorm2d``: an ``nn.LayerNorm`` subclass over the channels of ``[B, C, H, W]``, through two
    permutes. Under this module's name it has no per-sample rule (an exact-type lookup doesn't find ``nn.LayerNorm``'s;
    book-keeping recognises ``torchvision.models.convnext.LayerNorm2d`` itself: ``tests/helpers/third_party.py``)."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class _StochasticDepth(nn.Module):
    """torchvision's ``StochasticDepth(p, mode="row")``: in training, each example's residual branch is dropped with
    probability ``p`` (the kept ones scaled by ``1 / (1 - p)``), drawn from the global generator."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        return x * torch.empty(shape, dtype=x.dtype, device=x.device).bernoulli_(1.0 - self.p) / (1.0 - self.p)


class _ConvNeXtBlock(nn.Module):
    """torchvision's ``CNBlock``: a depthwise convolution, LayerNorm and a Linear-GELU-Linear MLP channels-last, the
    branch scaled by a bare layer-scale ``nn.Parameter`` of the block itself, then stochastic depth, plus the input."""

    def __init__(self, channels: int, drop: float) -> None:
        super().__init__()
        self.block = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1, groups=channels),
            _Permute(0, 2, 3, 1),
            nn.LayerNorm(channels),
            nn.Linear(channels, 2 * channels),
            nn.GELU(),
            nn.Linear(2 * channels, channels),
            _Permute(0, 3, 1, 2),
        )
        self.layer_scale = nn.Parameter(torch.full((channels, 1, 1), 0.5))
        self.stochastic_depth = _StochasticDepth(drop)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.stochastic_depth(self.layer_scale * self.block(x))


class _ShiftedWindowAttention(nn.Module):
    """torchvision's ``ShiftedWindowAttention`` (V1 and V2 at once) on one window of ``T`` tokens, in one dimension:
    the tokens cyclically shifted with ``torch.roll`` (and back), multi-head attention whose logits get a bias looked
    up in a bare ``nn.Parameter`` table (``2T - 1`` offsets x heads) through a persistent integer index buffer, plus
    V2's continuous bias: a small MLP run once on a buffer of the offsets, shared by the whole batch."""

    def __init__(self, width: int, tokens: int, heads: int = 2, shift: int = 2) -> None:
        super().__init__()
        self.heads, self.shift = heads, shift
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.relative_position_bias_table = nn.Parameter(torch.randn(2 * tokens - 1, heads) * 0.1)
        offsets = torch.arange(tokens)
        self.register_buffer("relative_position_index", (offsets[:, None] - offsets[None, :] + tokens - 1).flatten())
        self.register_buffer("relative_coords_table", torch.linspace(-1.0, 1.0, 2 * tokens - 1)[None, :, None])
        self.cpb_mlp = nn.Sequential(nn.Linear(1, 8), nn.ReLU(), nn.Linear(8, heads, bias=False))

    def forward(self, x: Tensor) -> Tensor:
        x = torch.roll(x, shifts=-self.shift, dims=1)
        batch, tokens, width = x.shape
        q, k, v = self.qkv(x).view(batch, tokens, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        table = self.relative_position_bias_table + 4 * torch.sigmoid(self.cpb_mlp(self.relative_coords_table)[0])
        bias = table[self.relative_position_index].view(tokens, tokens, self.heads).permute(2, 0, 1)
        attention = (q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]) + bias).softmax(dim=-1)
        out = self.proj((attention @ v).transpose(1, 2).reshape(batch, tokens, width))
        return torch.roll(out, shifts=self.shift, dims=1)


class _ConvNeXtSwin(nn.Module):
    """A ConvNeXt stage then a Swin block, on 2x4x4 images: a 1x1 stem and ``LayerNorm2d``, one ConvNeXt block, the
    16 positions as tokens through pre-LayerNorm shifted-window attention and an MLP, mean-pooled and classified."""

    def __init__(self, channels: int = 4) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(2, channels, 1), _LayerNorm2d(channels))
        self.convnext = _ConvNeXtBlock(channels, drop=0.25)
        self.norm1, self.norm2 = nn.LayerNorm(channels), nn.LayerNorm(channels)
        self.attn = _ShiftedWindowAttention(channels, tokens=16)
        self.mlp = nn.Sequential(nn.Linear(channels, 2 * channels), nn.GELU(), nn.Linear(2 * channels, channels))
        self.head = nn.Linear(channels, CLASSES)

    def forward(self, images: Tensor) -> Tensor:
        tokens = self.convnext(self.stem(images)).flatten(2).transpose(1, 2)
        tokens = tokens + self.attn(self.norm1(tokens))
        tokens = tokens + self.mlp(self.norm2(tokens))
        return self.head(tokens.mean(dim=1))


class ConvNeXtSwin(ZooModule):
    """Stochastic depth draws from the global generator: seeded before each epoch's first batch, as the dropout
    entry's masks are (Lightning doesn't checkpoint the generator, so a resumed run draws as the uninterrupted one)."""

    data_kind = "images"

    def network(self) -> nn.Module:
        return _ConvNeXtSwin()

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if batch_idx == 0:
            torch.manual_seed(self.current_epoch)


class _BasicBlock(nn.Module):
    """torchvision's ResNet ``BasicBlock`` with ``norm_layer=GroupNorm`` (how ResNets train under DP): conv, norm, an
    in-place ReLU, conv, norm, then ``out += identity`` and an in-place ReLU, in place on the layers' outputs."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1, self.conv2 = (nn.Conv2d(channels, channels, 3, padding=1, bias=False) for _ in range(2))
        self.bn1, self.bn2 = nn.GroupNorm(2, channels), nn.GroupNorm(2, channels)
        self.relu1, self.relu2 = nn.ReLU(inplace=True), nn.ReLU(inplace=True)  # torchvision calls one twice

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += x
        return self.relu2(out)


class ResNetBlock(ZooModule):
    data_kind = "images"

    def network(self) -> nn.Module:
        return nn.Sequential(
            nn.Conv2d(2, 4, 1), _BasicBlock(4), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, CLASSES)
        )


_ENTRIES = [
    ZooEntry("mlp", ZooModule, "MLP classifier, tuple batches, SGD"),
    ZooEntry("dict_batch", DictBatches, "batches are dicts", batch_kind="dict"),
    ZooEntry("namedtuple_batch", NamedTupleBatches, "batches are namedtuples", batch_kind="namedtuple"),
    ZooEntry("dataclass_batch", DataclassBatches, "batches are dataclasses", batch_kind="dataclass"),
    ZooEntry("dict_output", DictOutput, "training_step returns {'loss': ..., 'logits': ...}"),
    ZooEntry("tied_weights", TiedWeights, "embedding and output layer share one Parameter", tied_weights=True),
    ZooEntry("shared_submodule", SharedSubmodule, "one block under two names (ALBERT)", shared_submodule=True),
    ZooEntry(
        "frozen_backbone",
        FrozenBackbone,
        "frozen first layer, Adam(self.parameters())",
        frozen_parameters=True,
        optimizer="adam",
    ),
    ZooEntry("unused_parameter", UnusedParameter, "a registered, optimised, never used Linear", unused_parameters=True),
    ZooEntry("lstm", LSTMClassifier, "nn.LSTM over sequences", recurrent=True),
    ZooEntry("gru", GRUClassifier, "nn.GRU over sequences", recurrent=True),
    ZooEntry("transformer", TransformerClassifier, "nn.TransformerEncoder (nn.MultiheadAttention)", attention=True),
    ZooEntry("conv_groupnorm", ConvGroupNorm, "Conv2d + GroupNorm on 2x4x4 images"),
    ZooEntry("batchnorm", BatchNormNet, "MLP with BatchNorm1d", batch_norm=True),
    ZooEntry("warmup_from_zero", WarmupFromZero, "LambdaLR warm-up starting at lr 0", lr_starts_at_zero=True),
    ZooEntry("param_groups", ParamGroups, "two param groups, lrs 0.1 and 0.01", several_lrs=True),
    ZooEntry("several_val_loaders", SeveralValidationLoaders, "two validation loaders", validation_loaders=2),
    ZooEntry(
        "grad_accumulation",
        ZooModule,
        "Trainer(accumulate_grad_batches=2): one optimizer step every 2 batches",
        trainer_arguments={"accumulate_grad_batches": 2},
    ),
    ZooEntry("manual_optimization", ManualOptimization, "automatic_optimization=False", manual_optimization=True),
    ZooEntry("goes_non_finite", GoesNonFinite, "loss x inf from step 5: NaN weights in epoch 2", goes_non_finite=True),
    ZooEntry("regression", Regression, "MSE regression, one output", classifier=False, loss_kind="mse"),
    ZooEntry("binary_single_logit", BinarySingleLogit, "one logit, BCE with logits", classifier=False, loss_kind="bce"),
    ZooEntry(
        "huggingface_style",
        HuggingFaceStyle,
        "forward(**batch) returns an output object; padding_idx, string ids",
        batch_kind="dict",
        output_object=True,
    ),
    ZooEntry(
        "activation_checkpointing",
        ActivationCheckpointing,
        "torch.utils.checkpoint re-runs the hidden layer in the backward pass",
        activation_checkpointing=True,
    ),
    ZooEntry(
        "weight_norm", WeightNorm, "parametrizations.weight_norm and the old weight_norm hook", reparametrized=True
    ),
    ZooEntry("embedding_bag", EmbeddingBagClassifier, "nn.EmbeddingBag: no second derivative", second_order=False),
    ZooEntry("float64", Float64, "float64, Trainer(precision='64-true')", trainer_arguments={"precision": "64-true"}),
    ZooEntry("backward_hook", BackwardHook, "a full backward hook on a layer (gradient monitoring)"),
    ZooEntry(
        "compiled_module", compiled_module, "trainer.fit(torch.compile(module, backend='aot_eager'))", compiled="module"
    ),
    ZooEntry(
        "compiled_submodule",
        CompiledSubmodule,
        "self.net = torch.compile(network, backend='aot_eager'): names under _orig_mod.",
        compiled="submodule",
    ),
    ZooEntry(
        "bare_parameter",
        BareParameter,
        "nn.Parameter on the LightningModule itself (logit temperature)",
        bare_parameters=True,
    ),
    ZooEntry(
        "parameter_containers",
        ParameterContainers,
        "ParameterList / ParameterDict applied with F.linear",
        bare_parameters=True,
        parameter_containers=True,
    ),
    ZooEntry("prelu_layernorm", PReLULayerNorm, "MLP with LayerNorm, PReLU, GELU and SiLU", parametric_activation=True),
    ZooEntry(
        "eval_mode_batchnorm",
        EvalModeBatchNorm,
        "frozen BatchNorm backbone kept in eval mode (on_train_epoch_start), trained head",
        batch_norm=True,
        batch_norm_in_eval=True,
        frozen_parameters=True,
    ),
    ZooEntry("two_losses", TwoLosses, "two heads, cross-entropy + auxiliary MSE, both logged"),
    ZooEntry("dropout", DropoutNet, "nn.Dropout(0.5), global RNG seeded before every epoch's first batch"),
    ZooEntry(
        "buffers",
        Buffers,
        "non-persistent buffer, integer step counter and running mean updated in forward",
        forward_updates_buffers=True,
        integer_buffers=True,
    ),
    ZooEntry(
        "orthogonal_parametrization",
        OrthogonalParametrization,
        "parametrizations.orthogonal on the hidden layer",
        reparametrized=True,
    ),
    ZooEntry("plateau_schedule", PlateauSchedule, "ReduceLROnPlateau monitoring val_loss, from a dict"),
    ZooEntry(
        "gpt_style",
        GPTStyle,
        "a GPT-2 block as transformers writes it: Conv1D, NewGELU, causal attention, broadcast position embeddings",
        bare_parameters=True,
        shared_input_rows=True,
        optimizer="adam",
    ),
    ZooEntry(
        "squeeze_excitation",
        SqueezeExcitationNet,
        "MobileNetV3 block: Hardswish, depthwise conv, squeeze-and-excitation with an nn.Hardsigmoid gate; Adam",
        optimizer="adam",
    ),
    ZooEntry(
        "convnext_swin",
        ConvNeXtSwin,
        "ConvNeXt block (LayerNorm2d, bare layer scale, stochastic depth) then Swin attention (bias table indexed by "
        "an integer buffer, torch.roll, V2's bias MLP on a shared table)",
        bare_parameters=True,
        integer_buffers=True,
        recomputed_layers=True,
        shared_layers=("net.attn.cpb_mlp.1",),
    ),
    ZooEntry(
        "resnet_block",
        ResNetBlock,
        "ResNet BasicBlock with GroupNorm: in-place ReLU and out += identity on the layers' outputs",
        in_place_on_outputs=True,
    ),
]

ZOO: dict[str, ZooEntry] = {entry.name: entry for entry in _ENTRIES}
"""Every zoo entry by name."""
