"""IterateAveraging under faults: non-finite iterates, exceptions while the average is swapped in, memory after fit."""

import gc
import warnings
import weakref

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import OnExceptionCheckpoint
from torch import nn

from lightning_nt import IterateAveraging
from lightning_nt.averaging import IterateAverage
from tests.helpers import TinyClassifier, read_tensorboard_scalars, tiny_trainer


def test_core_skips_and_counts_non_finite_iterates():
    net = nn.Linear(3, 2)
    average = IterateAverage(net)
    with torch.no_grad():
        net.weight.fill_(float("nan"))
        assert not average.update(net)  # the first iterate too: it would seed the average
        net.weight.fill_(1.0)
        assert average.update(net)
        net.bias[0] = float("inf")
        assert not average.update(net)
        net.bias.fill_(3.0)
        net.weight.fill_(3.0)
        assert average.update(net)
    assert (average.n_averaged, average.n_skipped) == (2, 2)
    assert torch.equal(average.state["weight"], torch.full((2, 3), 2.0))
    assert average.state_dict()["n_skipped"] == 2
    with torch.no_grad():
        net.weight.fill_(3e38)  # finite, though its norm overflows
    assert average.update(net) and average.n_averaged == 3


class PoisonOneStep(pl.Callback):
    """Makes one weight NaN after optimizer step ``step`` (seen by the callbacks after it) and repairs it after."""

    def __init__(self, step: int) -> None:
        self.step, self.saved = step, None
        self.iterates: dict[int, torch.Tensor] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        weight = pl_module.net[0].weight
        self.iterates[trainer.global_step] = weight.detach().clone()
        if trainer.global_step == self.step:
            self.saved = weight.detach().clone()
            with torch.no_grad():
                weight[0, 0] = float("nan")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.saved is not None:
            with torch.no_grad():
                pl_module.net[0].weight.copy_(self.saved)
            self.saved = None


def test_a_nan_iterate_is_skipped_with_one_warning_and_counted(tmp_path):
    pl.seed_everything(0)
    poison, averaging = PoisonOneStep(step=4), IterateAveraging()
    module = TinyClassifier(num_samples=96)
    with pytest.warns(UserWarning, match="step 4 are not finite") as caught:
        tiny_trainer(tmp_path, max_epochs=2, callbacks=[poison, averaging]).fit(module)
    assert sum("not finite" in str(w.message) for w in caught) == 1
    assert (averaging.n_averaged, averaging.n_skipped) == (11, 1)
    expected = torch.stack([poison.iterates[s] for s in range(1, 13) if s != 4]).mean(0)
    torch.testing.assert_close(averaging.averaged_state_dict()["net.0.weight"], expected, rtol=0, atol=1e-6)
    assert torch.isfinite(module.net[0].weight).all()  # apply_on_end copied a finite average
    logged = read_tensorboard_scalars(tmp_path)
    assert logged["averaging/skipped"][-1][1] == 1.0


class FailingValidation(TinyClassifier):
    """``validation_step`` raises ``error`` at the second validation (after the first updates)."""

    def __init__(self, error: BaseException, **kwargs) -> None:
        super().__init__(**kwargs)
        self.error, self.validations = error, 0

    def on_validation_start(self):
        self.validations += 1

    def validation_step(self, batch, batch_idx):
        if self.validations == 2:
            raise self.error
        return super().validation_step(batch, batch_idx)


class LastRawWeights(pl.Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.state = {name: tensor.clone() for name, tensor in pl_module.state_dict().items()}


@pytest.mark.parametrize("error", [RuntimeError("a bug in validation_step"), KeyboardInterrupt()])
def test_raw_weights_come_back_when_validation_raises(tmp_path, error):
    pl.seed_everything(0)
    module = FailingValidation(error, num_samples=96, norm="batch")
    averaging, last = IterateAveraging(apply_on_end=False), LastRawWeights()
    saver = OnExceptionCheckpoint(dirpath=tmp_path, filename="crash")
    trainer = tiny_trainer(None, max_epochs=3, callbacks=[averaging, last, saver], enable_checkpointing=True)
    with pytest.raises((type(error), SystemExit)):
        trainer.fit(module)
    assert averaging.n_averaged == 6
    for name, tensor in module.state_dict().items():
        assert torch.equal(tensor, last.state[name]), name  # the raw weights, not the average
    saved = torch.load(tmp_path / "crash.ckpt", weights_only=False)
    raw = saved["callbacks"][averaging.state_key]["raw_state_dict"]
    for name, tensor in raw.items():
        assert torch.equal(tensor, last.state[name]), name
    assert torch.equal(saved["state_dict"]["net.0.weight"], averaging.averaged_state_dict()["net.0.weight"])


@pytest.mark.parametrize("apply_on_end", [False, True])
def test_nothing_holds_the_module_after_fit(apply_on_end):
    pl.seed_everything(0)
    averaging = IterateAveraging(apply_on_end=apply_on_end, compare_raw=True)
    module = TinyClassifier(num_samples=96, norm="batch")
    trainer = tiny_trainer(None, max_epochs=2, callbacks=[averaging])
    trainer.fit(module)
    parameters = [weakref.ref(p) for p in module.parameters()]
    numel = sum(p.numel() for p in module.parameters())
    del module, trainer
    gc.collect()
    assert all(ref() is None for ref in parameters)
    average = averaging.averaged_state_dict()
    assert sum(t.numel() for t in average.values()) == numel and all(t.dtype == torch.float32 for t in average.values())


def test_no_warning_without_faults():
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        pl.seed_everything(0)
        tiny_trainer(None, max_epochs=1, callbacks=[IterateAveraging()]).fit(TinyClassifier(num_samples=32))
