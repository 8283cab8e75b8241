"""How RepresentationSimilarity reads a layer's output: a copy of the rows it uses (in-place ops after the layer don't
reach it), the units where the layer that made them put them, a 1-D output as one unit, and only the kept rows held
and checkpointed. Each against values recomputed independently of the callback."""

import copy
import math
import warnings

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_nt.similarity import RepresentationSimilarity, cka_matrix, similarities
from lightning_nt.similarity.callback import _in_place, _RowPlan
from tests.helpers import tiny_trainer

METRICS = ("cka", "cka_debiased", "intertwiner", "orthogonal_procrustes")


class _Regression(pl.LightningModule):
    """A regression on fixed random inputs ``[64, *shape]`` (the probe set: all of them, in order)."""

    def __init__(self, shape, lr=0.05, examples=64):
        super().__init__()
        generator = torch.Generator().manual_seed(7)
        self.inputs = torch.randn(examples, *shape, generator=generator)
        self.targets = torch.randn(examples, generator=generator)
        self.lr = lr

    def training_step(self, batch, batch_idx):
        inputs, targets = batch
        return (self(inputs) - targets).square().mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)

    def train_dataloader(self):
        return DataLoader(TensorDataset(self.inputs, self.targets), batch_size=16)


class ResidualGELU(_Regression):
    """``h = gelu(fc1(x)); h += x``: the residual adds in place into the GELU's output."""

    def __init__(self):
        super().__init__((16,))
        self.fc1, self.act, self.fc2 = nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 1)

    def forward(self, inputs):
        hidden = self.act(self.fc1(inputs))
        hidden += inputs
        return self.fc2(hidden).squeeze(-1)


class InPlaceReLU(_Regression):
    """A named Linear followed by ``nn.ReLU(inplace=True)``, as in torchvision's VGG and ResNet."""

    def __init__(self):
        super().__init__((16,))
        self.net = nn.Sequential(nn.Linear(16, 16), nn.ReLU(inplace=True), nn.Linear(16, 1))

    def forward(self, inputs):
        return self.net(inputs).squeeze(-1)


class TokenMLP(_Regression):
    """``[batch, tokens, features]`` through a Linear, a GELU and a Linear, as a transformer's MLP block."""

    def __init__(self, norm=False):
        super().__init__((6, 8))
        self.net = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16) if norm else nn.Identity(), nn.GELU())
        self.head = nn.Linear(16, 1)

    def forward(self, inputs):
        return self.head(self.net(inputs)).mean(dim=(1, 2))


class TokenReLU(_Regression):
    """A ReLU straight on ``[batch, tokens, features]`` inputs: nothing says which dimension holds the units."""

    def __init__(self):
        super().__init__((6, 8))
        self.act, self.head = nn.ReLU(), nn.Linear(8, 1)

    def forward(self, inputs):
        return self.head(self.act(inputs)).mean(dim=(1, 2))


class BinaryClassifier(_Regression):
    """A sigmoid on ``[n]`` logits: a 1-D activation output."""

    def __init__(self):
        super().__init__((8,))
        self.body = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1), nn.Flatten(0))
        self.prob = nn.Sigmoid()

    def forward(self, inputs):
        return self.prob(self.body(inputs))


class ConvNet(_Regression):
    """Two convolutions on ``[3, 12, 12]`` images (64 x 144 = 9216 rows of 8 channels per layer)."""

    def __init__(self):
        super().__init__((3, 12, 12))
        self.net = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.Tanh(), nn.AdaptiveAvgPool2d(1)
        )
        self.head = nn.Linear(8, 1)

    def forward(self, inputs):
        return self.head(self.net(inputs).flatten(1)).squeeze(-1)


def _fit(module, callbacks, max_epochs=1, **kwargs):
    tiny_trainer(callbacks=callbacks, max_epochs=max_epochs, **kwargs).fit(module)
    return module


def _output_of(module, layer):
    """``layer``'s true output on the probe set: a clone taken in its own forward hook, in eval mode."""
    got = {}
    handle = layer.register_forward_hook(lambda _, __, output: got.__setitem__("output", output.detach().clone()))
    was_training = module.training
    with torch.no_grad():
        module.eval()(module.inputs)
    module.train(was_training)
    handle.remove()
    return got["output"]


def _documented_rows(output, unit_dim=1, max_rows=4096):
    """The docs' rows: ``[n, ...]`` with the units along ``unit_dim`` moved last, every other position a row, the
    ``max_rows`` that ``randperm(rows, seed 0)`` picks."""
    rows = output.reshape(len(output), -1) if output.ndim <= 2 else output.movedim(unit_dim, -1)
    rows = rows.reshape(-1, rows.shape[-1])
    if len(rows) <= max_rows:
        return rows
    return rows[torch.randperm(len(rows), generator=torch.Generator().manual_seed(0))[:max_rows]]


def _measured(monitor, layer):
    return {metric: monitor.history[-1][f"similarity/{metric}/{layer}"] for metric in METRICS}


def _seeded(cls, seed):
    torch.manual_seed(seed)
    return cls()


def test_an_in_place_residual_after_the_layer_does_not_change_what_was_read():
    """Found: the hooks kept the GELU's output tensor itself, so ``h += x`` changed it (CKA 0.82 for a true 0.43)."""
    model, other = _seeded(ResidualGELU, 0), _seeded(ResidualGELU, 1)
    monitor = RepresentationSimilarity(reference=other, num_examples=64, metrics=METRICS)
    _fit(model, [monitor])
    expected = similarities(_output_of(model, model.act), _output_of(other, other.act), METRICS, "gelu")
    assert _measured(monitor, "act") == pytest.approx(expected, abs=1e-6)
    assert expected["cka"] < 0.6  # the value read after the residual was 0.82


def test_a_named_layer_followed_by_an_in_place_relu_is_read_before_the_relu():
    """Found: ``net.0`` (a Linear, compared up to every invertible map) was measured after the in-place ReLU."""
    model, other = _seeded(InPlaceReLU, 0), _seeded(InPlaceReLU, 1)
    monitor = RepresentationSimilarity(layers={"net.0": "identity"}, reference=other, num_examples=64, metrics=METRICS)
    _fit(model, [monitor])
    with torch.no_grad():
        expected = similarities(model.net[0](model.inputs), other.net[0](other.inputs), METRICS, "identity")
    assert _measured(monitor, "net.0") == pytest.approx(expected, abs=1e-6)
    assert expected["intertwiner"] == pytest.approx(1.0, abs=1e-6)  # two affine maps of the same inputs


def _unit_permuted(model):
    """``model`` with its hidden units permuted: the same function, an element of the GELU's intertwiner group."""
    permuted, order = copy.deepcopy(model), torch.randperm(16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        first = permuted.net[0]
        first.weight.copy_(first.weight[order])
        first.bias.copy_(first.bias[order])
        if isinstance(permuted.net[1], nn.LayerNorm):
            permuted.net[1].weight.copy_(permuted.net[1].weight[order])
            permuted.net[1].bias.copy_(permuted.net[1].bias[order])
        permuted.head.weight.copy_(permuted.head.weight[:, order])
    torch.testing.assert_close(permuted(model.inputs), model(model.inputs))
    return permuted


@pytest.mark.parametrize("norm", [False, True])
def test_token_outputs_have_their_units_last_and_a_unit_permuted_copy_is_the_same_representation(norm):
    """Found: with the default ``unit_dim=1`` the 6 token positions of ``[64, 6, 16]`` were taken for units: CKA
    0.008 for a copy with its units permuted. The units are where the last Linear (or LayerNorm) put them."""
    model = _seeded(lambda: TokenMLP(norm), 0)
    reference = _unit_permuted(model)
    model.lr = 0.0  # the measured network stays the one the reference is a permutation of
    monitor = RepresentationSimilarity(reference=reference, num_examples=64, metrics=METRICS)
    _fit(model, [monitor])
    for metric in ("cka", "intertwiner", "orthogonal_procrustes"):
        assert monitor.history[-1][f"similarity/{metric}/net.2"] == pytest.approx(1.0, abs=1e-6)
    rows = _documented_rows(_output_of(model, model.net[2]), unit_dim=-1)
    assert rows.shape == (64 * 6, 16)


def test_token_outputs_read_with_an_explicit_unit_dim_as_before():
    """``unit_dim=1`` given: the old reading (dimension 1 as units), against the core on those rows."""
    model = _seeded(TokenMLP, 0)
    reference = _unit_permuted(model)
    model.lr = 0.0
    monitor = RepresentationSimilarity(reference=reference, num_examples=64, metrics=METRICS, unit_dim=1)
    _fit(model, [monitor])
    x, y = (_documented_rows(_output_of(net, net.net[2]), unit_dim=1) for net in (model, reference))
    assert _measured(monitor, "net.2") == pytest.approx(similarities(x, y, METRICS, "gelu"), abs=1e-6)
    assert monitor.history[-1]["similarity/cka/net.2"] < 0.5


def test_a_three_dimensional_output_with_no_layer_to_place_its_units_is_refused_before_training():
    model = _seeded(TokenReLU, 0)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"`unit_dim`: the output of 'act' is \[64, 6, 8\].*unit_dim=-1"):
        _fit(model, [RepresentationSimilarity(num_examples=64)])
    assert all(torch.equal(value, before[name]) for name, value in model.state_dict().items())
    monitor = RepresentationSimilarity(num_examples=64, unit_dim=-1)
    _fit(model, [monitor])
    assert 0 < monitor.history[-1]["similarity/cka/act"] <= 1 + 1e-9


def test_a_one_dimensional_output_is_one_unit():
    """Found: a sigmoid on ``[n]`` logits crashed the fit after the first epoch (`features` must be 2-D)."""
    model, initial = _seeded(BinaryClassifier, 0), None
    initial = copy.deepcopy(model)
    monitor = RepresentationSimilarity(num_examples=64, metrics=METRICS)
    _fit(model, [monitor], max_epochs=2)
    assert [entry["epoch"] for entry in monitor.history] == [0, 1]
    x, y = (_output_of(net, net.prob).unsqueeze(1) for net in (model, initial))
    assert _measured(monitor, "prob") == pytest.approx(similarities(x, y, METRICS, "sigmoid"), abs=1e-6)
    hidden = _output_of(model, model.body[1])
    expected = cka_matrix([hidden, _output_of(model, model.prob).unsqueeze(1)])
    torch.testing.assert_close(monitor.layer_cka, expected.float())


def test_cka_matrix_reads_a_one_dimensional_representation_as_one_feature():
    values = torch.randn(30, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(cka_matrix([values, values[:, None] * 3]), torch.ones(2, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"`features\[1\]`"):
        cka_matrix([values, torch.tensor(1.0)])


class _Recorded(pl.Callback):
    """Each layer's whole output on the probe set, recomputed independently at the start and after each epoch."""

    def __init__(self, layers):
        self.layers, self.outputs = layers, []

    def on_train_start(self, trainer, pl_module):
        self.outputs.append({name: _output_of(pl_module, layer) for name, layer in self.layers(pl_module).items()})

    def on_train_epoch_end(self, trainer, pl_module):
        self.on_train_start(trainer, pl_module)


def _conv_layers(module):
    return {"net.1": module.net[1], "net.3": module.net[3]}


@pytest.mark.parametrize(
    ("settings", "max_rows"),
    [({}, 4096), ({"max_rows": 500, "chunk_size": 20}, 500), ({"reference": "previous", "max_rows": 300}, 300)],
)
def test_only_the_kept_rows_are_held_and_the_values_are_those_of_the_whole_outputs(settings, max_rows):
    """The reference is held (and checkpointed) as its ``[max_rows, channels]`` rows, not each layer's whole
    ``[64, 8, 12, 12]`` output; every measurement is exactly (``==``) the core on the documented rows of the whole
    outputs read independently, as when the whole outputs were kept."""
    recorded = _Recorded(_conv_layers)
    monitor = RepresentationSimilarity(num_examples=64, metrics=METRICS, **settings)
    _fit(_seeded(ConvNet, 0), [recorded, monitor], max_epochs=3)
    assert {name: tuple(rows.shape) for name, rows in monitor._reference_features.items()} == {
        "net.1": (max_rows, 8),
        "net.3": (max_rows, 8),
    }
    for epoch, entry in enumerate(monitor.history):
        against = recorded.outputs[0 if "reference" not in settings else epoch]
        for name, group in (("net.1", "relu"), ("net.3", "tanh")):
            x = _documented_rows(recorded.outputs[epoch + 1][name], max_rows=max_rows)
            y = _documented_rows(against[name], max_rows=max_rows)
            expected = similarities(x, y, METRICS, group)
            assert {metric: entry[f"similarity/{metric}/{name}"] for metric in METRICS} == expected, (epoch, name)


def test_the_checkpoint_holds_the_kept_rows_not_the_whole_outputs(tmp_path):
    saver = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    monitor = RepresentationSimilarity(num_examples=64, max_rows=512)
    _fit(_seeded(ConvNet, 0), [monitor, saver], enable_checkpointing=True)
    state = torch.load(tmp_path / "last.ckpt", weights_only=False)["callbacks"][monitor.state_key]
    kept = sum(rows.numel() * rows.element_size() for rows in state["reference_features"].values())
    assert kept == 2 * 512 * 8 * 4  # two layers of 512 rows of 8 float32 channels
    assert kept * 18 == 2 * 64 * 8 * 144 * 4  # the whole outputs were 18 times as large
    assert state["reference_rows"] is True


def test_an_older_checkpoint_holding_whole_outputs_resumes_as_the_uninterrupted_run(tmp_path):
    """A checkpoint from before: the reference as each layer's whole output, no ``reference_rows``. The resumed run
    takes the same rows of it and measures what the uninterrupted run does."""
    uninterrupted = RepresentationSimilarity(num_examples=64, max_rows=500)
    _fit(_seeded(ConvNet, 0), [uninterrupted], max_epochs=3)
    saver, recorded = ModelCheckpoint(dirpath=tmp_path, save_last=True), _Recorded(_conv_layers)
    first = RepresentationSimilarity(num_examples=64, max_rows=500)
    _fit(_seeded(ConvNet, 0), [recorded, first, saver], max_epochs=2, enable_checkpointing=True)
    saved = torch.load(tmp_path / "last.ckpt", weights_only=False)
    state = saved["callbacks"][first.state_key]
    del state["reference_rows"]
    state["reference_features"] = recorded.outputs[0]  # as the older version saved it: [64, 8, 12, 12] per layer
    torch.save(saved, tmp_path / "older.ckpt")
    resumed = RepresentationSimilarity(num_examples=64, max_rows=500)
    tiny_trainer(callbacks=[resumed], max_epochs=3).fit(_seeded(ConvNet, 5), ckpt_path=str(tmp_path / "older.ckpt"))
    assert len(resumed.history) == 3
    assert resumed.history == uninterrupted.history
    assert {tuple(rows.shape) for rows in resumed.state_dict()["reference_features"].values()} == {(500, 8)}


def test_the_rows_kept_chunk_by_chunk_on_each_rank_are_the_documented_rows_of_the_whole_output():
    """Rows picked per chunk of examples on each of 3 ranks (as gathered, each in its place) are exactly the rows the
    docs pick from the whole ``[n * positions, units]`` matrix, in the same order."""
    output = torch.randn(30, 5, 4, 3, generator=torch.Generator().manual_seed(0))
    view = output.movedim(1, -1)
    for max_rows in (None, 50, 359, 360, 1000):
        plan, values, slots = _RowPlan(max_rows), [], []
        for start, stop in ((0, 4), (4, 10), (10, 10), (10, 17), (17, 30)):  # chunks across 3 ranks of 10
            rows = plan.rows(view[start:stop], start, 30)
            values.append(rows.values)
            slots.append(rows.slots)
        expected = _documented_rows(output, max_rows=max_rows or 10**9)
        assert torch.equal(_in_place(values, slots, rows.total), expected), max_rows


def test_no_measurement_in_the_run_is_warned_about_at_its_end():
    monitor = RepresentationSimilarity(num_examples=32, every_n_epochs=5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _fit(_seeded(InPlaceReLU, 0), [monitor], max_epochs=3)
    assert monitor.history == []
    messages = [str(w.message) for w in caught if "no measurement was taken" in str(w.message)]
    assert len(messages) == 1 and "every_n_epochs=5" in messages[0]


def test_the_figure_shows_a_negative_intertwiner_similarity():
    """The intertwiner similarity lies in [-1, 1] (-1 for one unit and y = -x): the bars' axis goes below 0."""
    monitor = RepresentationSimilarity()
    monitor.history = [{"step": 0, "epoch": 0, "similarity/cka/a": 0.5, "similarity/intertwiner/a": -0.8}]
    bottom, top = monitor.figure().axes[-1].get_ylim()
    assert bottom <= -0.8 and top >= 1
    x = torch.randn(50, 1, generator=torch.Generator().manual_seed(0))
    assert similarities(x, -x, ("intertwiner",), "relu")["intertwiner"] == pytest.approx(-1.0)
    assert not math.isnan(similarities(x, -x, ("intertwiner",), "gelu")["intertwiner"])
