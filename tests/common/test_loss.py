import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from lightning_nt.common import captured_logging, example_losses, training_loss
from tests.helpers import (
    BoringModel,
    DictLossClassifier,
    ManualOptimizationModule,
    TinyClassifier,
    TinyTransformer,
    read_tensorboard_scalars,
    tiny_trainer,
)


def _batch(module: TinyClassifier) -> tuple[torch.Tensor, torch.Tensor]:
    return next(iter(module.train_dataloader()))


@pytest.mark.parametrize("module_class", [TinyClassifier, DictLossClassifier])
def test_loss_equals_the_modules_own_loss(module_class):
    module = module_class()
    inputs, labels = _batch(module)
    expected = F.cross_entropy(module(inputs), labels)
    assert torch.equal(training_loss(module, (inputs, labels)), expected)


def test_metric_state_and_log_are_untouched():
    module = TinyClassifier()
    batch = _batch(module)
    module.accuracy(module(batch[0]), batch[1])
    counts_before = (module.accuracy._update_count, module.accuracy.tp.clone(), module.accuracy.fp.clone())
    calls = []
    pl.LightningModule.log, original = (lambda self, *a, **k: calls.append(a)), pl.LightningModule.log
    try:
        training_loss(module, batch)
    finally:
        pl.LightningModule.log = original
    assert calls == []
    assert module.accuracy._update_count == counts_before[0]
    assert torch.equal(module.accuracy.tp, counts_before[1]) and torch.equal(module.accuracy.fp, counts_before[2])
    assert "log" not in module.__dict__ and "log_dict" not in module.__dict__


class LossEveryStep(pl.Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        with torch.no_grad():
            training_loss(pl_module, batch, batch_idx)


def test_no_double_logging_or_counting_inside_a_real_run(tmp_path):
    def run(callbacks, root):
        pl.seed_everything(0)
        module = TinyClassifier()
        trainer = tiny_trainer(root, max_epochs=2, callbacks=callbacks)
        trainer.fit(module)
        return read_tensorboard_scalars(root), {k: v.clone() for k, v in trainer.callback_metrics.items()}

    plain_scalars, plain_metrics = run([], tmp_path / "plain")
    probed_scalars, probed_metrics = run([LossEveryStep()], tmp_path / "probed")
    assert plain_scalars.keys() == probed_scalars.keys()
    for tag, events in plain_scalars.items():
        assert probed_scalars[tag] == events, tag
    assert plain_metrics.keys() == probed_metrics.keys()
    for tag, value in plain_metrics.items():
        assert torch.equal(probed_metrics[tag], value), tag


def test_boring_model_and_transformer():
    boring = BoringModel()
    assert training_loss(boring, torch.randn(4, 32)).ndim == 0
    transformer = TinyTransformer()
    loss = training_loss(transformer, next(iter(transformer.train_dataloader())))
    assert loss.ndim == 0 and loss.requires_grad


def test_user_loss_fn_takes_precedence():
    module = TinyClassifier()
    batch = _batch(module)
    loss = training_loss(module, batch, loss_fn=lambda m, b: (m(b[0]) ** 2).mean())
    assert torch.equal(loss, (module(batch[0]) ** 2).mean())


def test_manual_optimization_needs_loss_fn():
    module = ManualOptimizationModule()
    with pytest.raises(RuntimeError, match=r"manual optimization.*loss_fn"):
        training_loss(module, _batch(module))
    assert training_loss(module, _batch(module), loss_fn=lambda m, b: m(b[0]).sum()).ndim == 0


def test_unusable_outputs_are_named():
    module = TinyClassifier()
    batch = _batch(module)
    with pytest.raises(TypeError, match="loss_fn returned NoneType"):
        training_loss(module, batch, loss_fn=lambda m, b: None)
    with pytest.raises(TypeError, match="'loss'"):
        training_loss(module, batch, loss_fn=lambda m, b: {"total": m(b[0]).sum()})
    with pytest.raises(ValueError, match="shape"):
        training_loss(module, batch, loss_fn=lambda m, b: m(b[0]))
    per_example = training_loss(module, batch, loss_fn=lambda m, b: F.cross_entropy(m(b[0]), b[1], reduction="none"))
    assert torch.allclose(per_example, F.cross_entropy(module(batch[0]), batch[1]))


def test_example_losses_are_the_users_own_vector_or_none():
    module = TinyClassifier()
    inputs, labels = _batch(module)
    vector = F.cross_entropy(module(inputs), labels, reduction="none")
    assert example_losses(module, (inputs, labels), lambda m, b: vector) is vector
    assert example_losses(module, (inputs, labels), lambda m, b: vector.mean()) is None  # a mean: vectorise it
    assert example_losses(module, (inputs, labels), lambda m, b: vector[:-1]) is None  # not one per example
    assert example_losses(module, (inputs, labels), None) is None


def test_captured_logging_reads_positional_options_as_lightning_does():
    module = TinyClassifier()
    seen = {}
    with captured_logging(module, lambda name, value, options: seen.update({name: options})):
        module.log("a", 1.0, False, False)  # prog_bar=False, logger=False
        module.log_dict({"b": 2.0}, True, False, on_epoch=True)  # prog_bar=True, logger=False
    assert seen["a"] == {"prog_bar": False, "logger": False}
    assert seen["b"] == {"prog_bar": True, "logger": False, "on_epoch": True}
