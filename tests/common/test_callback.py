"""The base of lightning_nt's callbacks: its state key is built once per run, not at every hook Lightning names."""

from typing import Any

import pytorch_lightning as pl

from lightning_nt.common.callback import Callback
from tests.helpers import TinyClassifier, tiny_trainer


class CountsKeys(Callback):
    def __init__(self, size: int) -> None:
        self.size, self.builds, self.keys = size, 0, []

    @property
    def state_key(self) -> str:
        """Built from the arguments, as every capability's."""
        self.builds += 1
        return self._generate_state_key(size=self.size)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self.keys.append(self.state_key)


def test_the_state_key_is_built_once_a_run_and_again_after_it():
    callback = CountsKeys(1)
    tiny_trainer(callbacks=[callback], max_epochs=2).fit(TinyClassifier(num_samples=64))
    assert callback.builds <= 2  # before setup (Lightning reads it once) and at setup
    assert set(callback.keys) == {"CountsKeys{'size': 1}"} and len(callback.keys) == 8
    callback.size = 2  # between runs the key follows the arguments
    assert callback.state_key == "CountsKeys{'size': 2}"
    assert CountsKeys.state_key.__doc__ == "Built from the arguments, as every capability's."
