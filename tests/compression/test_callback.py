import json
import warnings

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import BackboneFinetuning
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from lightning_nt import CompressionBoundReporter, SubspaceTraining
from lightning_nt.compression.bounds import occam_kl_bound
from lightning_nt.compression.callback import class_scores
from lightning_nt.compression.subspace import find_subspace, subspace_mismatches
from tests.compression.models import (
    AttentionClassifier,
    FrozenFirstLayer,
    LSTMClassifier,
    OneLogitClassifier,
    Regressor,
    SoftLabelClassifier,
    TiedClassifier,
    separable_data,
)
from tests.contract.capabilities import Capability, _compression, _compression_refusals
from tests.contract.test_contract import fit
from tests.helpers import TinyClassifier, read_tensorboard_scalars, read_tensorboard_tags, tiny_trainer
from tests.helpers.zoo import ZOO

FAST = {"levels": (3, 8), "prune": (0.0, 0.5), "stability_samples": 32}


def _fit(root=None, callbacks=(), module=None, **trainer_args):
    pl.seed_everything(0)
    module = module or TinyClassifier(num_samples=96)
    trainer = tiny_trainer(root, callbacks=list(callbacks), **{"max_epochs": 3, **trainer_args})
    trainer.fit(module)
    return trainer, module


def _error(module, dataloader):
    wrong = total = 0
    with torch.no_grad():
        for inputs, labels in dataloader:
            wrong += int((module(inputs).argmax(dim=1) != labels).sum())
            total += len(labels)
    return wrong / total


def test_report_reaches_every_logger_the_callback_metrics_and_a_json_file(tmp_path):
    reporter = CompressionBoundReporter(**FAST)
    trainer, _ = _fit(tmp_path, [reporter])
    scalars = read_tensorboard_scalars(tmp_path)
    for tag in ("error_bound", "train_error", "code_bits", "test_error", "hoeffding_bound", "num_examples"):
        assert f"compression/{tag}" in scalars and f"compression/{tag}" in trainer.callback_metrics
    assert any(tag.startswith("arora/layer_cushion/") for tag in scalars)
    assert "capacity/num_params" in scalars and "capacity/margin" in scalars
    assert reporter.report["compression/error_bound"] == pytest.approx(scalars["compression/error_bound"][-1][1])
    saved = json.loads((tmp_path / "compression_report.json").read_text())
    assert saved["report"] == reporter.report and saved["code"]["bits"] == reporter.certificate.code_bits
    assert "compression/report/text_summary" in read_tensorboard_tags(tmp_path)["tensors"]
    assert "searched 8 configurations" in reporter.table()


def test_bound_is_about_the_decoded_model_on_the_whole_training_set():
    reporter = CompressionBoundReporter(arora=False, capacity=False, **FAST)
    _, module = _fit(callbacks=[reporter])
    certificate = reporter.certificate
    decoded = TinyClassifier(num_samples=96)
    names = [name for name, _ in module.named_parameters()]
    decoded.load_state_dict(dict(zip(names, certificate.decoded)), strict=False)
    train_error = _error(decoded, DataLoader(module.train_dataloader().dataset, batch_size=1000))
    assert certificate.num_examples == 96 and certificate.train_error == train_error
    assert reporter.report["compression/test_error"] == _error(decoded, module.val_dataloader())
    assert certificate.error_bound == occam_kl_bound(train_error, certificate.code_bits, 96, 0.05)


def test_report_leaves_the_module_as_it_found_it():
    reporter = CompressionBoundReporter(**FAST)
    trainer, module = _fit(module=TinyClassifier(num_samples=96, norm="batch"), max_epochs=1)
    module.train()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    rng = torch.get_rng_state()
    reporter.compute(trainer, module)
    assert module.training and all(m.training for m in module.modules())
    assert torch.equal(rng, torch.get_rng_state())
    for key, value in module.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_a_declared_subset_sets_m():
    reporter = CompressionBoundReporter(num_examples=50, arora=False, capacity=False, **FAST)
    _fit(callbacks=[reporter], max_epochs=1)
    assert reporter.report["compression/num_examples"] == 50


def test_epoch_reports(tmp_path):
    reporter = CompressionBoundReporter(when="epoch", every_n_epochs=2, arora=False, capacity=False, **FAST)
    _fit(tmp_path, [reporter], max_epochs=4)
    assert len(read_tensorboard_scalars(tmp_path)["compression/error_bound"]) == 2


def test_subspace_training_encodes_only_w_and_the_seed():
    posthoc = CompressionBoundReporter(arora=False, capacity=False, **FAST)
    _fit(callbacks=[posthoc], module=TinyClassifier(num_samples=96, hidden=64))
    reporter = CompressionBoundReporter(arora=False, capacity=False, **FAST)
    _, module = _fit(
        callbacks=[SubspaceTraining(dimension=16), reporter], module=TinyClassifier(num_samples=96, hidden=64)
    )
    trainable = [name for name, p in module.named_parameters() if p.requires_grad]
    assert trainable == ["net.0.parametrizations.weight.0.subspace.weight"]
    assert [t.shape for t in reporter.certificate.decoded] == [torch.Size([16])]
    assert reporter.certificate.code_bits < 32 + 3 + 16 * 2 + 16 * 4  # seed, index, codebook, <= 4 bits a coordinate
    assert reporter.certificate.code_bits < posthoc.certificate.code_bits / 10


class _DictBatches(TinyClassifier):
    def train_dataloader(self):
        data = super().train_dataloader().dataset
        return DataLoader(
            data,
            batch_size=16,
            collate_fn=lambda rows: {"x": torch.stack([r[0] for r in rows]), "y": torch.stack([r[1] for r in rows])},
        )

    def training_step(self, batch, batch_idx):
        return super().training_step((batch["x"], batch["y"]), batch_idx)

    def val_dataloader(self):
        return []


def test_batches_it_cannot_read_fail_clearly_and_custom_functions_work():
    with pytest.raises(ValueError, match="predict_fn"):
        _fit(callbacks=[CompressionBoundReporter(**FAST)], module=_DictBatches(num_samples=96), max_epochs=1)
    reporter = CompressionBoundReporter(
        predict_fn=lambda module, batch: module(batch["x"]), target_fn=lambda batch: batch["y"], **FAST
    )
    _fit(callbacks=[reporter], module=_DictBatches(num_samples=96), max_epochs=1)
    assert 0 < reporter.report["compression/error_bound"] <= 1 and "compression/test_error" not in reporter.report


class _Stream(IterableDataset):
    def __iter__(self):
        data = TinyClassifier(num_samples=32).train_dataloader().dataset
        return iter(data)


class _Iterable(TinyClassifier):
    def train_dataloader(self):
        return DataLoader(_Stream(), batch_size=16)


def test_an_iterable_dataset_is_skipped_with_a_warning():
    reporter = CompressionBoundReporter(**FAST)
    with pytest.warns(UserWarning, match="map-style"):
        _fit(callbacks=[reporter], module=_Iterable(), max_epochs=1)
    assert reporter.report == {}


def test_state_survives_a_checkpoint():
    reporter = CompressionBoundReporter(arora=False, **FAST)
    _fit(callbacks=[reporter], max_epochs=1)
    restored = CompressionBoundReporter(arora=False, **FAST)
    restored.load_state_dict(reporter.state_dict())
    assert restored.report == reporter.report
    assert restored.state_key == reporter.state_key


@pytest.mark.parametrize(
    ("arguments", "name"),
    [
        ({"delta": 0.0}, "delta"),
        ({"delta": 1.0}, "delta"),
        ({"when": "step"}, "when"),
        ({"every_n_epochs": 0}, "every_n_epochs"),
        ({"num_samples": 0}, "num_samples"),
        ({"stability_samples": 0}, "stability_samples"),
        ({"screening_samples": 0}, "screening_samples"),
        ({"levels": (1,)}, "levels"),
        ({"prune": (1.0,)}, "prune"),
        ({"methods": ("lloyd",)}, "method"),
        ({"levels": ()}, "levels"),
    ],
)
def test_bad_arguments_name_themselves(arguments, name):
    with pytest.raises(ValueError, match=name):
        CompressionBoundReporter(**arguments)


def test_subspace_arguments():
    with pytest.raises(ValueError, match="dimension"):
        SubspaceTraining(dimension=0)
    with pytest.raises(ValueError, match="seed"):
        SubspaceTraining(dimension=3, seed=-1)


def test_val_set_is_the_test_set(tmp_path):
    reporter = CompressionBoundReporter(arora=False, capacity=False, **FAST)
    data = TensorDataset(torch.randn(10, 8), torch.randint(3, (10,)))
    module = TinyClassifier(num_samples=96)
    module.val_dataloader = lambda: DataLoader(data, batch_size=4)
    _fit(callbacks=[reporter], module=module, max_epochs=1)
    assert reporter.report["compression/test_error"] in {i / 10 for i in range(11)}


class _ExtraParameter(TinyClassifier):
    """A parameter created after `setup` (as in `configure_model`): outside any subspace, trained freely."""

    def configure_model(self):
        if not hasattr(self, "offset"):
            self.offset = torch.nn.Parameter(torch.zeros(3))

    def forward(self, inputs):
        return super().forward(inputs) + self.offset


def test_parameters_outside_the_subspace_are_encoded():
    reporter = CompressionBoundReporter(arora=False, capacity=False, **FAST)
    _fit(callbacks=[SubspaceTraining(dimension=8), reporter], module=_ExtraParameter(num_samples=96), max_epochs=1)
    assert [t.shape for t in reporter.certificate.decoded] == [torch.Size([8]), torch.Size([3])]


def test_a_model_the_seed_does_not_rebuild_is_not_certified():
    class LoadsAnotherSeed(pl.Callback):
        def on_train_end(self, trainer, pl_module):
            with torch.no_grad():
                pl_module.net[0].parametrizations.weight.original.add_(1e-3)

    reporter = CompressionBoundReporter(**FAST)
    with pytest.warns(UserWarning, match="differ from what the subspace seed draws"):
        _fit(callbacks=[SubspaceTraining(dimension=8), LoadsAnotherSeed(), reporter], max_epochs=1)
    assert reporter.report == {} and reporter.certificate is None


def test_integer_state_the_code_does_not_describe_is_refused():
    module = TinyClassifier(num_samples=96)
    module.register_buffer("memory", torch.zeros(96, dtype=torch.long))
    reporter = CompressionBoundReporter(**FAST)
    with pytest.warns(UserWarning, match="integer buffers"):
        _fit(callbacks=[reporter], module=module, max_epochs=1)
    assert reporter.report == {}


def test_one_prediction_per_example_is_required():
    reporter = CompressionBoundReporter(
        predict_fn=lambda module, batch: module(batch[0]).repeat(2, 1),
        target_fn=lambda batch: batch[1].repeat(2),
        **FAST,
    )
    with pytest.raises(ValueError, match="one prediction per example"):
        _fit(callbacks=[reporter], max_epochs=1)


def test_epoch_mode_also_reports_the_end_of_training(tmp_path):
    reporter = CompressionBoundReporter(when="epoch", every_n_epochs=2, arora=False, capacity=False, **FAST)
    _fit(tmp_path, [reporter], max_epochs=3)
    assert [step for step, _ in read_tensorboard_scalars(tmp_path)["compression/error_bound"]] == [12, 18]


def test_subspace_callback_must_match_the_subspace_it_finds():
    module = TinyClassifier(num_samples=96)
    _fit(callbacks=[SubspaceTraining(dimension=8)], module=module, max_epochs=1)
    with pytest.raises(ValueError, match="dimension 8 with seed 0"):
        _fit(callbacks=[SubspaceTraining(dimension=9)], module=module, max_epochs=1)


def test_loss_fn_drives_the_sharpness_measure():
    reporter = CompressionBoundReporter(arora=False, loss_fn=lambda module, batch: torch.zeros(()), **FAST)
    _fit(callbacks=[reporter], max_epochs=1)
    assert reporter.report["capacity/pacbayes_sigma"] == 10.0  # a flat loss: the search's upper limit


def test_tied_weights_train_together_in_a_subspace_and_are_certified():
    reporter = CompressionBoundReporter(arora=False, capacity=False, **FAST)
    _, module = _fit(callbacks=[SubspaceTraining(dimension=8), reporter], module=TiedClassifier(num_samples=96))
    theta0 = module.head.parametrizations.weight.original
    assert module.embedding.parametrizations.weight.original is theta0
    assert torch.equal(module.head.weight, module.embedding.weight) and not torch.equal(module.head.weight, theta0)
    assert 0 < reporter.report["compression/error_bound"] <= 1


def test_frozen_parameters_keep_their_values_and_are_encoded():
    reporter = CompressionBoundReporter(arora=False, capacity=False, **FAST)
    module = FrozenFirstLayer(num_samples=96)
    pretrained = module.net[0].weight.detach().clone()
    _fit(callbacks=[SubspaceTraining(dimension=8), reporter], module=module, max_epochs=1)
    assert torch.equal(module.net[0].weight, pretrained)
    assert [t.shape for t in reporter.certificate.decoded] == [torch.Size([8]), torch.Size([16, 8]), torch.Size([16])]


@pytest.mark.parametrize("model", [AttentionClassifier, LSTMClassifier])
def test_attention_and_lstm_models_in_a_subspace_are_certified(model, monkeypatch):
    monkeypatch.delattr(torch.nn.MultiheadAttention, "reset_parameters", raising=False)  # Lightning's demo adds it
    reporter = CompressionBoundReporter(**FAST)
    module = model(num_samples=96)  # no validation: the last forward (an LSTM caches its weights) is with autograd
    _fit(callbacks=[SubspaceTraining(dimension=8), reporter], module=module, max_epochs=1, limit_val_batches=0)
    assert 0 < reporter.report["compression/error_bound"] <= 1
    assert [t.shape for t in reporter.certificate.decoded] == [torch.Size([8])]


def test_a_one_logit_classifier_is_measured_by_the_sign_of_its_logit():
    reporter = CompressionBoundReporter(**FAST)
    _, module = _fit(callbacks=[reporter], module=OneLogitClassifier(num_samples=96, lr=0.5), max_epochs=10)
    decoded = OneLogitClassifier(num_samples=96)
    names = [name for name, _ in module.named_parameters()]
    decoded.load_state_dict(dict(zip(names, reporter.certificate.decoded)), strict=False)
    inputs, labels = separable_data(96, seed=0).tensors
    with torch.no_grad():
        error = int(((decoded(inputs).squeeze(1) > 0).float() != labels).sum()) / len(labels)
    assert reporter.certificate.train_error == error < 0.15  # argmax over one column would count every label 1
    assert float(labels.mean()) > 0.3
    assert "capacity/margin" in reporter.report and "arora/min_layer_cushion" in reporter.report


def test_a_regressor_is_refused_before_training_naming_the_fix():
    module = Regressor(num_samples=96)
    with pytest.raises(ValueError, match=r"predict_fn.*target_fn"):
        _fit(callbacks=[CompressionBoundReporter(**FAST)], module=module, max_epochs=1)
    assert getattr(module, "steps_taken", 0) == 0


def test_predictions_that_are_not_one_tensor_are_refused_before_training_naming_predict_fn():
    # a model with two heads returning a dict: was "AttributeError: 'dict' object has no attribute 'device'"
    class TwoHeads(TinyClassifier):
        def forward(self, inputs):
            logits = super().forward(inputs)
            return {"head": logits, "aux": logits[:, :1]}

        def training_step(self, batch, batch_idx):
            self.steps_taken = getattr(self, "steps_taken", 0) + 1
            return torch.nn.functional.cross_entropy(self(batch[0])["head"], batch[1])

        def validation_step(self, batch, batch_idx):
            self.log("val_loss", torch.nn.functional.cross_entropy(self(batch[0])["head"], batch[1]))

    module = TwoHeads(num_samples=96)
    with pytest.raises(ValueError, match=r"are a dict .* Pass `predict_fn"):
        _fit(callbacks=[CompressionBoundReporter(**FAST)], module=module, max_epochs=1)
    assert getattr(module, "steps_taken", 0) == 0


def test_non_finite_weights_keep_the_previous_report_and_the_fit_goes_on():
    class Diverges(pl.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            if trainer.current_epoch == 1:
                with torch.no_grad():
                    pl_module.net[0].weight[0, 0] = float("nan")

    class Remember(pl.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            self.first = self.first if hasattr(self, "first") else dict(reporter.report)

    reporter = CompressionBoundReporter(when="epoch", arora=False, **FAST)
    remember = Remember()
    with pytest.warns(UserWarning, match=r"`net.0.weight` has NaN or infinite entries"):
        trainer, _ = _fit(callbacks=[Diverges(), reporter, remember], max_epochs=2)
    assert trainer.state.finished and remember.first and reporter.report == remember.first


def test_a_fine_tuning_schedule_is_refused_by_subspace_training_naming_the_fix():
    # BackboneFinetuning froze the backbone, and with it the `w` every layer shares: "optimizer got an empty
    # parameter list" from the module's own configure_optimizers
    class Backbone(TinyClassifier):
        def __init__(self):
            super().__init__(num_samples=32)
            self.backbone = self.net[0]

    trainer = tiny_trainer(None, callbacks=[BackboneFinetuning(), SubspaceTraining(dimension=8)], max_epochs=1)
    with pytest.raises(ValueError, match=r"BackboneFinetuning freezing part of the module would freeze `w`"):
        trainer.fit(Backbone())
    assert trainer.global_step == 0


def test_soft_labels_are_scored_against_their_argmax():
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 1.0, 2.0], [1.0, 0.0, 0.0], [0.0, 3.0, 1.0]])
    soft = torch.tensor([[0.7, 0.2, 0.1], [0.6, 0.3, 0.1], [0.1, 0.1, 0.8], [0.1, 0.8, 0.1]])
    scores, labels = class_scores(logits, soft)
    assert torch.equal(scores, logits) and torch.equal(labels, torch.tensor([0, 0, 2, 1]))  # argmax, by hand
    assert float((scores.argmax(dim=1) != labels).float().mean()) == 0.5  # rows 1 and 2 wrong


@pytest.mark.parametrize(
    "targets",
    [[[1.0, 1.0, 0.0], [0.0, 1.0, 0.0]], [[0.5, -0.2, 0.7], [0.3, 0.3, 0.4]], [[2.0, 0.1, 0.0], [0.0, 0.0, 1.0]]],
    ids=["multi-label", "regression", "unnormalised"],
)
def test_float_targets_that_are_not_distributions_are_refused_naming_target_fn(targets):
    """Before (in this change): any (batch, classes) target was scored against its argmax, so multi-label and
    regression targets got a 'certified' 0-1 error."""
    with pytest.raises(ValueError, match=r"one-hot or soft labels.*`target_fn"):
        class_scores(torch.zeros(2, 3), torch.tensor(targets))


@pytest.mark.parametrize("smoothing", [0.0, 0.1], ids=["one-hot", "label-smoothing"])
def test_a_classifier_trained_on_float_labels_is_certified_against_their_argmax(smoothing):
    # float (n, classes) targets were refused: "labels of shape (batch,)"
    reporter = CompressionBoundReporter(**FAST)
    module = SoftLabelClassifier(smoothing=smoothing, num_samples=96)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _fit(callbacks=[reporter], module=module, max_epochs=5)
    soft = [w for w in caught if "soft labels" in str(w.message)]
    assert len(soft) == (1 if smoothing else 0)  # once, however many batches and candidates were scored
    decoded = SoftLabelClassifier(num_samples=96)
    names = [name for name, _ in module.named_parameters()]
    decoded.load_state_dict(dict(zip(names, reporter.certificate.decoded)), strict=False)
    inputs, targets = module.soft_data().tensors
    with torch.no_grad():
        error = int((decoded(inputs).argmax(dim=1) != targets.argmax(dim=1)).sum()) / len(targets)
    assert reporter.certificate.train_error == error < 0.3
    assert "capacity/margin" in reporter.report and "arora/min_layer_cushion" in reporter.report


def test_float_labels_of_another_width_are_refused_before_training_naming_target_fn():
    module = SoftLabelClassifier(label_classes=4, num_samples=96)  # 4 label columns, 3 logits
    with pytest.raises(ValueError, match=r"got \(\d+, 3\) and \(\d+, 4\).*`target_fn"):
        _fit(callbacks=[CompressionBoundReporter(**FAST)], module=module, max_epochs=1)
    assert getattr(module, "steps_taken", 0) == 0


def _reset_or_gpt2_init(module: torch.nn.Module) -> None:
    """A user's initializer: the module's own ``reset_parameters``, else GPT-2's normal(0, 0.02) for each of its own
    parameters (``transformers``' ``Conv1D``, a bare parameter, ``ParameterList``/``ParameterDict`` entries)."""
    if hasattr(module, "reset_parameters"):
        module.reset_parameters()
    else:
        for parameter in module.parameters(recurse=False):
            parameter.data.normal_(0.0, 0.02)


@pytest.mark.parametrize(
    "entry",
    [entry for entry in ZOO.values() if entry.bare_parameters and _compression_refusals(entry) is None],
    ids=str,
)
def test_zoo_models_refused_for_bare_parameters_train_in_a_subspace_given_an_initializer(entry, tmp_path):
    """The zoo's entries whose parameters no ``reset_parameters`` draws (a bare logit scale, parameter containers, a
    GPT-2 block with ``Conv1D``): with ``initializer`` they train in the subspace, the report's decoder rebuilds
    theta0 from the seed (no mismatch) and a bound is certified."""
    capability = Capability(
        "subspace", lambda entry: [SubspaceTraining(dimension=12, initializer=_reset_or_gpt2_init), _compression(entry)]
    )
    run = fit(capability, entry, tmp_path)
    assert run.error is None, run.error
    subspace = find_subspace(run.module)
    assert subspace is not None and bool(subspace.weight.ne(0).any())  # w trained
    assert subspace_mismatches(run.module) == []
    assert 0.0 < run.capability[1].report["compression/error_bound"] <= 1.0
