"""lightning_nt needs ``pytorch_lightning`` only: without the ``lightning`` package everything runs on it alone."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.helpers.scripts import ROOT

_WITHOUT_LIGHTNING = """
import sys
sys.modules["lightning"] = None  # `import lightning` raises ImportError, as where it is not installed
import pytorch_lightning as pl
import lightning_nt
from lightning_nt.common import Callback
from lightning_nt.common.flavours import lightning_classes, lightning_packages
from tests.helpers import TinyClassifier

def fit(**settings):
    trainer = pl.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, **settings)
    trainer.fit(TinyClassifier(num_samples=32, batch_size=8))
    return trainer

fit(callbacks=[lightning_nt.SharpnessMonitor(every_n_steps=1, num_examples=8)])
private = fit(strategy="dp_sgd")
print(",".join(p.__name__ for p in lightning_packages()), len(lightning_classes("callbacks.BaseFinetuning")),
      Callback.__bases__ == (pl.Callback,), private.strategy.strategy_name)
"""


def test_without_the_lightning_package_everything_runs_on_pytorch_lightning_alone(tmp_path: Path) -> None:
    """A fresh process in which ``import lightning`` fails fits a callback and DP-SGD, and only
    ``pytorch_lightning``'s classes are checked."""
    script = tmp_path / "without_lightning.py"
    script.write_text(_WITHOUT_LIGHTNING)
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run([sys.executable, script], capture_output=True, text=True, cwd=tmp_path, env=environment)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split()[-4:] == ["pytorch_lightning", "1", "True", "dp_sgd"], result.stdout
