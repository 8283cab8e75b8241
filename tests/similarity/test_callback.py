"""RepresentationSimilarity through the Trainer, against the core on features read independently."""

import copy
import dataclasses
import warnings
from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import ModelCheckpoint
from torch import Tensor, nn
from torch.utils.data import DataLoader

from lightning_nt.common.validation import ArgumentError
from lightning_nt.similarity import RepresentationSimilarity, cka_matrix, similarities
from tests.helpers import (
    TinyClassifier,
    assert_same_training,
    classification_data,
    read_tensorboard_tags,
    seeded_fit,
    tiny_trainer,
)

METRICS = ("cka", "cka_debiased", "intertwiner", "orthogonal_procrustes")


def _fit(callbacks, module=None, **kwargs):
    return seeded_fit(callbacks, module or (lambda: TinyClassifier(num_samples=64, shuffle=False)), **kwargs)


def _hidden(module, num_samples=40):
    """The Tanh layer's output on the first examples, read by calling the layers directly."""
    inputs = module.train_dataloader().dataset.tensors[0][:num_samples]
    with torch.no_grad():
        return module.net[:3](inputs)


def test_values_equal_the_core_on_independently_read_features(tmp_path):
    pl.seed_everything(0)
    module = TinyClassifier(num_samples=64, shuffle=False)
    initial = copy.deepcopy(module)
    monitor = RepresentationSimilarity(num_examples=40, metrics=METRICS)
    _fit([monitor], module=module, root=tmp_path, max_epochs=2)
    assert [(entry["epoch"], entry["step"]) for entry in monitor.history] == [(0, 4), (1, 8)]
    expected = similarities(_hidden(module), _hidden(initial), METRICS, "tanh")
    for metric, value in expected.items():
        assert monitor.history[-1][f"similarity/{metric}/net.2"] == pytest.approx(value, abs=1e-6)
        assert f"similarity/{metric}/net.2" in read_tensorboard_tags(tmp_path)["scalars"]
    assert 0.5 < expected["cka"] < 1 - 1e-4
    tags = read_tensorboard_tags(tmp_path)
    assert "similarity/layers" in tags["images"]
    assert "similarity/table/text_summary" in tags["tensors"]
    assert "| net.2 | tanh |" in monitor.table()
    assert monitor.layer_cka.shape == (1, 1)


def test_a_run_with_the_callback_is_bitwise_the_run_without():
    def module():
        return TinyClassifier(num_samples=64, norm="batch")

    plain, plain_trainer = _fit([], module=module, max_epochs=2)
    monitor = RepresentationSimilarity(num_examples=32)
    watched, trainer = _fit([monitor], module=module, max_epochs=2)
    assert len(monitor.history) == 2
    assert_same_training(watched, trainer, plain, plain_trainer)


def test_previous_module_and_checkpoint_references(tmp_path):
    pl.seed_everything(1)
    other = TinyClassifier(num_samples=64, shuffle=False)
    torch.save({"state_dict": other.state_dict()}, tmp_path / "other.ckpt")
    previous = RepresentationSimilarity(num_examples=40, reference="previous")
    seed = RepresentationSimilarity(num_examples=40, reference=other)
    path = RepresentationSimilarity(num_examples=40, reference=str(tmp_path / "other.ckpt"))
    snapshots = {}

    class Snapshot(pl.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            snapshots[trainer.current_epoch] = _hidden(pl_module)

    module, _ = _fit([Snapshot(), previous, seed, path], max_epochs=2)
    assert similarities(snapshots[1], snapshots[0], ("cka",), "tanh")["cka"] == pytest.approx(
        previous.history[1]["similarity/cka/net.2"], abs=1e-6
    )
    against_other = similarities(_hidden(module), _hidden(other), ("cka", "intertwiner"), "tanh")
    for callback in (seed, path):
        assert callback.history[-1]["similarity/cka/net.2"] == pytest.approx(against_other["cka"], abs=1e-6)
        assert callback.history[-1]["similarity/intertwiner/net.2"] == pytest.approx(
            against_other["intertwiner"], abs=1e-6
        )
    assert len({previous.state_key, seed.state_key, path.state_key}) == 3


@pytest.mark.parametrize("reference", ["init", "previous"])
def test_a_second_fit_on_the_same_trainer_goes_on_with_the_runs_probe_set_and_reference(reference):
    """Another ``fit`` on the same Trainer goes on as a resume does: the uninterrupted run's history (found: the
    probe set and the reference, "init" too, taken again at the second fit's start)."""

    def fitted(monitor, epochs):
        pl.seed_everything(0)
        module, trainer = TinyClassifier(num_samples=64, shuffle=False), tiny_trainer(None, callbacks=[monitor])
        for max_epochs in epochs:
            trainer.fit_loop.max_epochs = max_epochs
            trainer.fit(module)

    uninterrupted, twice = (RepresentationSimilarity(num_examples=40, reference=reference) for _ in range(2))
    fitted(uninterrupted, [3])
    fitted(twice, [1, 3])
    assert [entry["step"] for entry in twice.history] == [4, 8, 12]
    assert twice.history == uninterrupted.history


class CompiledNet(TinyClassifier):
    """``TinyClassifier`` whose network is compiled inside it: its names carry ``_orig_mod.``."""

    def __init__(self):
        super().__init__(num_samples=64, shuffle=False)
        self.net = torch.compile(self.net, backend="aot_eager")


def _eager_hidden(module):
    net = getattr(module, "_orig_mod", module).net
    return _hidden(SimpleNamespace(net=getattr(net, "_orig_mod", net), train_dataloader=module.train_dataloader))


@pytest.mark.parametrize("compiled", ["model", "reference"])
def test_a_reference_compiled_the_other_way_is_matched_by_name_without_orig_mod(compiled, tmp_path):
    """A module or checkpoint reference of the same architecture loads whether the model's network or the
    reference's is a compiled submodule (or the whole reference module is compiled)."""
    pl.seed_everything(1)
    plain = lambda: TinyClassifier(num_samples=64, shuffle=False)  # noqa: E731
    model, other = (CompiledNet, plain) if compiled == "model" else (plain, CompiledNet)
    reference = other()
    torch.save({"state_dict": reference.state_dict()}, tmp_path / "other.ckpt")
    references = [reference, str(tmp_path / "other.ckpt")]
    if compiled == "reference":
        references.append(torch.compile(reference, backend="aot_eager"))
    callbacks = [RepresentationSimilarity(num_examples=40, reference=r, metrics=("cka",)) for r in references]
    module, _ = _fit(callbacks, module=model, max_epochs=1)
    expected = similarities(_eager_hidden(module), _eager_hidden(reference), ("cka",), "tanh")["cka"]
    assert 0.1 < expected < 1 - 1e-4
    for callback in callbacks:
        assert callback.history[-1]["similarity/cka/net.2"] == pytest.approx(expected, abs=1e-6)


@dataclasses.dataclass
class Example:
    inputs: Tensor
    labels: Tensor


class StructuredBatches(TinyClassifier):
    """The same network fed dict or dataclass batches."""

    def __init__(self, style):
        super().__init__(num_samples=64, shuffle=False)
        self.style = style

    def train_dataloader(self):
        def collate(items):
            inputs, labels = torch.stack([i for i, _ in items]), torch.stack([t for _, t in items])
            return {"x": inputs, "y": labels} if self.style == "dict" else Example(inputs, labels)

        return DataLoader(classification_data(64, 8, 3), batch_size=16, collate_fn=collate)

    def training_step(self, batch, batch_idx):
        inputs, labels = (batch["x"], batch["y"]) if self.style == "dict" else (batch.inputs, batch.labels)
        return F.cross_entropy(self(inputs), labels)


@pytest.mark.parametrize("style", ["dict", "dataclass"])
def test_dict_and_dataclass_batches(style):
    tuples = RepresentationSimilarity(num_examples=40)
    _fit([tuples], max_epochs=1)
    structured = RepresentationSimilarity(num_examples=40)
    _fit([structured], module=lambda: StructuredBatches(style), max_epochs=1)
    assert structured.history[0]["similarity/cka/net.2"] == pytest.approx(tuples.history[0]["similarity/cka/net.2"])


def test_resume_from_a_checkpoint_equals_the_uninterrupted_run(tmp_path):
    uninterrupted = RepresentationSimilarity(num_examples=40)
    _fit([uninterrupted], max_epochs=3)
    saver = ModelCheckpoint(dirpath=tmp_path, save_last=True)  # saved at validation end, as by default
    _fit([RepresentationSimilarity(num_examples=40), saver], max_epochs=2, enable_checkpointing=True)
    resumed = RepresentationSimilarity(num_examples=40)
    pl.seed_everything(123)  # the reference must be the checkpoint's, not the resumed weights' features
    trainer = tiny_trainer(callbacks=[resumed], max_epochs=3)
    trainer.fit(TinyClassifier(num_samples=64, shuffle=False), ckpt_path=str(tmp_path / "last.ckpt"))
    assert len(resumed.history) == 3
    for entry, expected in zip(resumed.history, uninterrupted.history):
        assert entry == pytest.approx(expected)


class NaNInEval(nn.Module):
    def forward(self, inputs):
        return inputs if self.training else inputs * float("nan")


def test_non_finite_measurements_are_skipped_with_one_warning():
    module = TinyClassifier(num_samples=64)
    module.net.insert(3, NaNInEval())
    monitor = RepresentationSimilarity(num_examples=32, layers={"net.3": "tanh"})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, trainer = _fit([monitor], module=module, max_epochs=2)
    assert monitor.history == []
    assert sum("not finite" in str(w.message) for w in caught) == 1
    assert trainer.global_step == 8


class SharedActivation(TinyClassifier):
    """One ReLU module applied twice, and a convolution whose units are channels."""

    def __init__(self):
        super().__init__(num_samples=64, shuffle=False)
        self.net = nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 3))
        self.conv = nn.Conv1d(1, 4, 3, padding=1)
        self.act = nn.ReLU()

    def forward(self, inputs):
        hidden = self.act(self.net[1](self.act(self.net[0](inputs))))
        return self.net[2](hidden) + self.conv(inputs.unsqueeze(1)).mean(dim=(1, 2)).unsqueeze(1)


def test_a_module_run_twice_gives_a_layer_per_call_and_explicit_layers_name_their_group():
    monitor = RepresentationSimilarity(num_examples=40, layers={"act": "relu", "conv": "identity"}, max_rows=100)
    initial = {}

    class Initial(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            initial["conv"] = _conv_rows(pl_module)

    module, _ = _fit([Initial(), monitor], module=SharedActivation, max_epochs=1)
    assert {tag.split("/")[-1] for tag in monitor.history[0] if "/" in tag} == {"act#0", "act#1", "conv"}
    assert monitor.layer_cka.shape == (3, 3)
    torch.testing.assert_close(monitor.layer_cka.diagonal(), torch.ones(3))
    assert monitor.layer_cka[0, 1] == pytest.approx(float(cka_matrix([_act(module, 1), _act(module, 2)])[0, 1]))
    expected = similarities(_conv_rows(module), initial["conv"], ("cka", "intertwiner"), "identity")
    assert monitor.history[0]["similarity/cka/conv"] == pytest.approx(expected["cka"], abs=1e-6)
    assert monitor.history[0]["similarity/intertwiner/conv"] == pytest.approx(expected["intertwiner"], abs=1e-6)


class ChunkSizes(pl.Callback):
    """The batch size of every forward pass the module makes in eval mode (the callback's probe passes)."""

    def __init__(self):
        self.sizes = []

    def on_train_start(self, trainer, pl_module):
        pl_module.register_forward_pre_hook(
            lambda module, args: None if module.training else self.sizes.append(len(args[0]))
        )


def test_the_probe_runs_in_chunks_and_a_layer_run_twice_keeps_its_calls_apart():
    """Chunks of 16 of the 40 probe examples (16, 16, 8) give the features of one pass over all 40: every call of
    the shared ReLU and the convolution, in example order."""
    layers = {"act": "relu", "conv": "identity"}
    whole, chunked, sizes = (
        RecordedSimilarity(num_examples=40, layers=layers, chunk_size=None),
        RecordedSimilarity(num_examples=40, layers=layers, chunk_size=16),
        ChunkSizes(),
    )
    _fit([whole], module=SharedActivation, max_epochs=1)
    _fit([sizes, chunked], module=SharedActivation, max_epochs=1)
    assert sizes.sizes[:3] == [16, 16, 8]
    assert [sorted(outputs) for outputs in chunked.outputs] == [["act#0", "act#1", "conv"]] * 3
    for expected, got in zip(whole.outputs, chunked.outputs):
        for name in expected:
            torch.testing.assert_close(got[name], expected[name], rtol=1e-6, atol=1e-6)
    for metric_tag, value in whole.history[0].items():
        assert chunked.history[0][metric_tag] == pytest.approx(value, abs=1e-6)


class DataDependentCalls(TinyClassifier):
    """The (identity) normalisation runs a second time only on batches of more than 16 examples."""

    def forward(self, inputs):
        hidden = self.net[1](self.net[0](inputs))
        if len(inputs) > 16:
            hidden = self.net[1](hidden)
        return self.net[3](self.net[2](hidden))


def test_a_layer_called_a_different_number_of_times_per_chunk_is_refused():
    monitor = RepresentationSimilarity(num_examples=40, layers={"net.1": "relu"}, chunk_size=32)
    with pytest.raises(ValueError, match=r"`layers`: 'net\.1' ran a different number of times.*chunk_size=None"):
        _fit([monitor], module=lambda: DataDependentCalls(num_samples=64), max_epochs=1)


def _conv_rows(module):
    """The Conv1d output [40, 4, 8] as 320 (example, position) rows of 4 channels, the callback's 100 of them."""
    inputs = module.train_dataloader().dataset.tensors[0][:40]
    with torch.no_grad():
        rows = module.conv(inputs.unsqueeze(1)).permute(0, 2, 1).reshape(-1, 4)
    return rows[torch.randperm(320, generator=torch.Generator().manual_seed(0))[:100]]


def _act(module, depth):
    inputs = module.train_dataloader().dataset.tensors[0][:40]
    with torch.no_grad():
        hidden = module.act(module.net[0](inputs))
        return hidden if depth == 1 else module.act(module.net[1](hidden))


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"layers": "net.2"}, "layers"),
        ({"layers": []}, "layers"),
        ({"layers": {"net.2": "softplus"}}, "layers"),
        ({"layers": [2]}, "layers"),
        ({"reference": "last"}, "reference"),
        ({"reference": 3}, "reference"),
        ({"every_n_epochs": 0}, "every_n_epochs"),
        ({"every_n_epochs": 1.0}, "every_n_epochs"),
        ({"num_samples": 3}, "num_samples"),
        ({"num_samples": True}, "num_samples"),
        ({"metrics": ()}, "metrics"),
        ({"metrics": ("cka", "cka")}, "metrics"),
        ({"metrics": ("mse",)}, "metrics"),
        ({"metrics": "cka"}, "metrics"),
        ({"unit_dim": "1"}, "unit_dim"),
        ({"unit_dim": 0}, "unit_dim"),  # the examples' dimension: it gave a meaningless CKA silently
        ({"max_rows": 3}, "max_rows"),
        ({"loss_fn": 3}, "loss_fn"),
        ({"chunk_size": 0}, "chunk_size"),
        ({"chunk_size": 2.5}, "chunk_size"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, argument):
    with pytest.raises(ArgumentError, match=f"`{argument}`"):
        RepresentationSimilarity(**kwargs)


class Functional(TinyClassifier):
    """Calls torch.relu instead of its Tanh module (kept, or replaced by an Identity)."""

    def __init__(self, keep_tanh):
        super().__init__()
        if not keep_tanh:
            self.net[2] = nn.Identity()

    def forward(self, inputs):
        return self.net[3](torch.relu(self.net[0](inputs)))


@pytest.mark.parametrize(
    ("callback", "module", "argument"),
    [
        (RepresentationSimilarity(layers=["net.9"]), TinyClassifier(), "layers"),
        (RepresentationSimilarity(layers=["net.0"]), TinyClassifier(), "layers"),
        (RepresentationSimilarity(), Functional(keep_tanh=False), "layers"),
        (RepresentationSimilarity(), Functional(keep_tanh=True), "layers"),
        (RepresentationSimilarity(reference=TinyClassifier(hidden=8)), TinyClassifier(), "reference"),
    ],
)
def test_bad_layers_and_references_fail_before_training(callback, module, argument):
    with pytest.raises(ValueError, match=f"`{argument}`"):
        _fit([callback], module=module)
    assert module.net[0].weight.grad is None


class RecordedSimilarity(RepresentationSimilarity):
    """The callback, keeping a copy of the layer outputs of every forward pass it makes."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.outputs = []

    def _features(self, trainer, pl_module):
        features = super()._features(trainer, pl_module)
        self.outputs.append({name: value.clone() for name, value in features.items()})
        return features

    def _flattened_features(self, trainer, pl_module):  # the pass at the end, for the layer x layer CKA matrix
        features = super()._flattened_features(trainer, pl_module)
        self.outputs.append({name: value.clone() for name, value in features.items()})
        return features


@pytest.mark.parametrize("reference", ["init", "previous"])
def test_every_measurement_equals_the_core_on_the_documented_row_subset(reference):
    """The rows gathered without a full copy, and the reference prepared once (or taken from the last
    measurement), give exactly the values of the core on the rows the docs define, read independently."""
    monitor = RecordedSimilarity(
        num_samples=40, layers={"act": "relu", "conv": "identity"}, max_rows=100, reference=reference, metrics=METRICS
    )
    _fit([monitor], module=SharedActivation, max_epochs=3)
    assert len(monitor.history) == 3
    for index, entry in enumerate(monitor.history):
        current, against = monitor.outputs[index + 1], monitor.outputs[0 if reference == "init" else index]
        for name, activation in (("conv", "identity"), ("act#0", "relu"), ("act#1", "relu")):
            x, y = _documented_rows(current[name]), _documented_rows(against[name])
            expected = similarities(x, y, METRICS, activation)
            assert {metric: entry[f"similarity/{metric}/{name}"] for metric in METRICS} == expected, (index, name)


def _documented_rows(output):
    """``[n, units, ...]`` as ``[n * positions, units]`` rows, then the docs' ``max_rows`` (100) of them."""
    rows = output.movedim(1, -1).reshape(-1, output.shape[1])
    if len(rows) <= 100:
        return rows
    return rows[torch.randperm(len(rows), generator=torch.Generator().manual_seed(0))[:100]]


@pytest.mark.parametrize("reference", ["init", "previous"])
def test_the_reference_is_prepared_once_not_at_every_measurement(reference, monkeypatch):
    """Centring into float64 (and the Gram matrix after it) happens once per layer for the reference, once per
    measurement for the network, and once per layer for the final layer x layer CKA matrix."""
    import lightning_nt.similarity.core as core

    calls = []
    prepared = core._prepared
    monkeypatch.setattr(core, "_prepared", lambda *args: calls.append(1) or prepared(*args))
    monitor = RepresentationSimilarity(num_examples=40, reference=reference)
    _fit([monitor], max_epochs=4)
    assert len(monitor.history) == 4
    assert len(calls) == 4 + 1 + 1


@pytest.mark.parametrize("unit_dim", [7, -5])
def test_a_unit_dim_the_output_lacks_is_refused_before_training_naming_it(unit_dim):
    """It crashed mid-fit with a bare IndexError."""
    from tests.similarity.test_layer_outputs import ConvNet, _seeded

    trainer = tiny_trainer(None, callbacks=[RepresentationSimilarity(num_examples=8, unit_dim=unit_dim)])
    module = _seeded(ConvNet, 0)
    with pytest.raises(ValueError, match=rf"`unit_dim={unit_dim}`: the output of 'net.1' is \[8, 8, 12, 12\]"):
        trainer.fit(module)
    assert trainer.global_step == 0
