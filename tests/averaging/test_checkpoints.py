"""Checkpoints follow Lightning's weight-averaging convention.

The checkpoint's ``state_dict`` holds the weights validation evaluated (the average, with the BatchNorm
statistics it was validated with), the raw weights travel beside it in the callback state, and a resumed run
continues from the raw weights as if it had not stopped.
"""

import re

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint

from lightning_nt import IterateAveraging
from tests.helpers import TinyClassifier, tiny_trainer


def _module():  # Lightning does not restore the global RNG, so the data order must not depend on it
    return TinyClassifier(num_samples=96, norm="batch", shuffle=False)


def _fit(callbacks, max_epochs, ckpt_path=None, **trainer_kwargs):
    pl.seed_everything(0)
    module = _module()
    trainer = tiny_trainer(None, callbacks=callbacks, max_epochs=max_epochs, **trainer_kwargs)
    trainer.fit(module, ckpt_path=ckpt_path)
    return module, trainer


def _validated_loss(state_dict):
    """val_loss of a fresh module holding ``state_dict``, validated by a Trainer without averaging."""
    module = _module()
    module.load_state_dict(state_dict)
    return tiny_trainer(None).validate(module, verbose=False)[0]["val_loss"]


def test_test_from_best_and_last_checkpoint_uses_the_validated_weights(tmp_path):
    checkpoint = ModelCheckpoint(
        dirpath=tmp_path, monitor="val_loss", save_top_k=-1, save_last=True, filename="{epoch}-{val_loss:.7f}"
    )
    averaging = IterateAveraging(apply_on_end=False, start_epoch=1)
    losses = []

    class RecordValLoss(pl.Callback):
        def on_validation_end(self, trainer, pl_module):
            if not trainer.sanity_checking:
                losses.append(trainer.callback_metrics["val_loss"].item())

    _, trainer = _fit([averaging, RecordValLoss(), checkpoint], max_epochs=4, enable_checkpointing=True)
    assert averaging.n_averaged == 18
    # ModelCheckpoint ranks by the average's val_loss and saves the weights that have that val_loss
    for path in tmp_path.glob("epoch=*.ckpt"):
        score = float(re.search(r"val_loss=([0-9.]+)\.ckpt", path.name).group(1))
        state_dict = torch.load(path, weights_only=False)["state_dict"]
        assert _validated_loss(state_dict) == pytest.approx(score, abs=1e-6), path.name
    best = trainer.test(ckpt_path="best", verbose=False)[0]["test_loss"]  # the test set is the validation set
    assert best == pytest.approx(min(losses), abs=1e-6)
    assert best == pytest.approx(checkpoint.best_model_score.item(), abs=1e-6)
    last = trainer.test(ckpt_path="last", verbose=False)[0]["test_loss"]
    assert last == pytest.approx(losses[-1], abs=1e-6)


def _run_state(module, trainer, averaging):
    return (
        {name: tensor.clone() for name, tensor in module.state_dict().items()},
        averaging.averaged_state_dict(),
        trainer.optimizers[0].state_dict()["state"],
    )


def _assert_same_run(left, right):
    for one, other in zip(left, right):
        assert one.keys() == other.keys()
        for key in one:
            a, b = one[key], other[key]
            pairs = [(a[f], b[f]) for f in a] if isinstance(a, dict) else [(a, b)]
            for x, y in pairs:
                assert torch.equal(torch.as_tensor(x), torch.as_tensor(y)), key


def test_resume_from_a_checkpoint_of_the_average_continues_the_raw_run(tmp_path):
    def averaging():
        return IterateAveraging(mode="ema", decay=0.8, apply_on_end=False, start_step=2)

    straight = averaging()
    module, trainer = _fit([straight], max_epochs=4)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1)
    first = averaging()
    _fit([first, checkpoint], max_epochs=2, enable_checkpointing=True)
    saved = torch.load(tmp_path / "epoch=1-step=12.ckpt", weights_only=False)
    raw = saved["callbacks"][first.state_key]["raw_state_dict"]
    assert torch.equal(saved["state_dict"]["net.0.weight"], first.averaged_state_dict()["net.0.weight"])
    assert not torch.equal(raw["net.0.weight"], saved["state_dict"]["net.0.weight"])
    resumed = averaging()
    again, trainer_again = _fit([resumed], max_epochs=4, ckpt_path=str(tmp_path / "epoch=1-step=12.ckpt"))
    _assert_same_run(_run_state(module, trainer, straight), _run_state(again, trainer_again, resumed))


def test_save_checkpoint_after_apply_on_end_resumes_the_run(tmp_path):
    straight = IterateAveraging(start_step=2)
    module, trainer = _fit([straight], max_epochs=4)
    first = IterateAveraging(start_step=2)
    applied, first_trainer = _fit([first], max_epochs=2)
    for name, average in first.averaged_state_dict().items():
        assert torch.equal(applied.state_dict()[name], average)  # the module holds the average after fit
    first_trainer.save_checkpoint(tmp_path / "after_fit.ckpt")
    saved = torch.load(tmp_path / "after_fit.ckpt", weights_only=False)
    assert torch.equal(saved["state_dict"]["net.0.weight"], first.averaged_state_dict()["net.0.weight"])
    resumed = IterateAveraging(start_step=2)
    again, trainer_again = _fit([resumed], max_epochs=4, ckpt_path=str(tmp_path / "after_fit.ckpt"))
    _assert_same_run(_run_state(module, trainer, straight), _run_state(again, trainer_again, resumed))


def test_weights_only_checkpoints_are_flagged(tmp_path):
    """Lightning calls no callback when it saves weights only: such checkpoints can't follow the convention."""
    with pytest.warns(UserWarning, match="weights-only"):
        _fit(
            [IterateAveraging(), ModelCheckpoint(dirpath=tmp_path, save_weights_only=True)],
            max_epochs=1,
            enable_checkpointing=True,
            limit_train_batches=1,
        )


def test_a_checkpoint_saved_during_validation_follows_the_convention(tmp_path):
    class SaveDuringValidation(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.raw = {name: tensor.clone() for name, tensor in pl_module.state_dict().items()}

        def on_validation_epoch_end(self, trainer, pl_module):
            if trainer.current_epoch == 1:
                trainer.save_checkpoint(tmp_path / "during.ckpt")

    averaging, saver = IterateAveraging(apply_on_end=False, bn="average"), SaveDuringValidation()
    module, _ = _fit([averaging, saver], max_epochs=2, num_sanity_val_steps=0)
    saved = torch.load(tmp_path / "during.ckpt", weights_only=False)
    raw = saved["callbacks"][averaging.state_key]["raw_state_dict"]
    for name, tensor in module.state_dict().items():
        assert torch.equal(tensor, saver.raw[name]) and torch.equal(raw[name], saver.raw[name]), name
        assert torch.equal(saved["state_dict"][name], averaging.averaged_state_dict()[name].to(tensor.dtype)), name


def test_resuming_with_another_configuration_is_flagged(tmp_path):
    checkpoint = ModelCheckpoint(dirpath=tmp_path, every_n_epochs=1)
    _fit([IterateAveraging(apply_on_end=False), checkpoint], max_epochs=1, enable_checkpointing=True)
    with pytest.warns(UserWarning, match="configured differently"):
        _fit([IterateAveraging(apply_on_end=False, bn="copy")], max_epochs=2, ckpt_path=checkpoint.best_model_path)
