"""The demo and the CLI run end to end, as a user would start them."""

import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).parents[2] / "examples"
sys.path.insert(0, str(EXAMPLES))

import cli  # noqa: E402
import digits  # noqa: E402

from tests.helpers import read_tensorboard_scalars  # noqa: E402


def test_digits_demo_learns_and_logs(tmp_path, capsys):
    results = digits.main(["--epochs", "15", "--log-dir", str(tmp_path)])
    assert results["val/acc"] > 0.8
    out = capsys.readouterr().out
    assert "validation accuracy" in out and "tensorboard --logdir" in out
    scalars = read_tensorboard_scalars(tmp_path / "digits" / "version_0")
    assert {"train/loss", "val/acc", "val/loss"} <= scalars.keys()


def test_digits_demo_with_averaging(tmp_path, capsys):
    digits.main(["--epochs", "4", "--train-size", "256", "--average", "--log-dir", str(tmp_path)])
    assert "--average: 8 iterates averaged" in capsys.readouterr().out
    scalars = read_tensorboard_scalars(tmp_path / "digits" / "version_0")
    assert {"averaging/n_averaged", "raw/val/loss", "raw/val/acc"} <= scalars.keys()


@pytest.mark.parametrize("config", sorted((EXAMPLES / "configs").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_yaml_config_runs(config, tmp_path):
    cli.main(
        [
            "fit",
            "--config",
            str(config),
            "--trainer.max_epochs=1",
            "--trainer.limit_train_batches=4",
            "--trainer.limit_val_batches=1",
            f"--trainer.default_root_dir={tmp_path}",
            f"--trainer.logger.init_args.save_dir={tmp_path}",
        ]
    )
