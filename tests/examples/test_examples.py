"""The demo and the CLI run end to end, as a user would start them."""

import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).parents[2] / "examples"
sys.path.insert(0, str(EXAMPLES))

import cli  # noqa: E402
import digits  # noqa: E402
import edge_of_stability  # noqa: E402
import tight_bound  # noqa: E402

from tests.helpers import read_tensorboard_scalars  # noqa: E402


def test_digits_demo_learns_and_logs(tmp_path, capsys):
    results = digits.main(["--epochs", "15", "--log-dir", str(tmp_path)])
    assert results["val/acc"] > 0.8
    out = capsys.readouterr().out
    assert "validation accuracy" in out and "tensorboard --logdir" in out
    scalars = read_tensorboard_scalars(tmp_path / "digits" / "version_0")
    assert {"train/loss", "val/acc", "val/loss"} <= scalars.keys()


def test_digits_demo_with_sharpness(tmp_path, capsys):
    arguments = ["--epochs", "3", "--train-size", "256", "--batch-size", "64"]  # mini-batches: batch sharpness too
    digits.main([*arguments, "--sharpness", "--log-dir", str(tmp_path)])
    assert "SharpnessMonitor: 2 measurements; last lambda_max" in capsys.readouterr().out
    scalars = read_tensorboard_scalars(tmp_path / "digits" / "version_0")
    assert {
        "sharpness/lambda_max",
        "sharpness/threshold",
        "sharpness/ratio",
        "sharpness/batch_sharpness",
    } <= scalars.keys()


def test_digits_demo_with_gradinit(tmp_path, capsys):
    digits.main(["--epochs", "1", "--train-size", "256", "--depth", "6", "--gradinit", "--log-dir", str(tmp_path)])
    assert "GradInit: 300 iterations" in capsys.readouterr().out
    scalars = read_tensorboard_scalars(tmp_path / "digits" / "version_0")
    assert {"gradinit/lookahead_loss_start", "gradinit/grad_norm"} <= scalars.keys()


def test_digits_demo_with_differential_privacy(tmp_path, capsys):
    results = digits.main(["--epochs", "2", "--train-size", "512", "--dp", "--log-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert "-DP: noise multiplier" in out and "validation accuracy" in out
    epsilon = float(out.split("(epsilon=")[1].split(",")[0])
    assert 0 < epsilon <= 8.0 and 0 <= results["val/acc"] <= 1
    scalars = read_tensorboard_scalars(tmp_path / "digits" / "version_0")
    assert {
        "dp/epsilon",
        "dp/noise_multiplier",
        "dp/sample_rate",
    } <= scalars.keys() and "dp/clip_fraction" not in scalars


def test_edge_of_stability_example_saves_its_picture(tmp_path):
    png = tmp_path / "eos.png"
    monitor = edge_of_stability.main(["--steps", "60", "--png", str(png), "--log-dir", str(tmp_path)])
    assert png.stat().st_size > 10_000 and [e["step"] for e in monitor.history] == [0, 20, 40, 60]


def test_digits_demo_with_averaging(tmp_path, capsys):
    digits.main(["--epochs", "4", "--train-size", "256", "--average", "--log-dir", str(tmp_path)])
    assert "IterateAveraging: 8 iterates averaged" in capsys.readouterr().out
    scalars = read_tensorboard_scalars(tmp_path / "digits" / "version_0")
    assert {"averaging/n_averaged", "raw/val/loss", "raw/val/acc"} <= scalars.keys()


def test_digits_demo_with_a_certified_bound(tmp_path, capsys):
    arguments = ["--epochs", "10", "--model", "mlp", "--subspace", "120", "--optimizer", "adam", "--lr", "0.05"]
    digits.main([*arguments, "--bound", "--log-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert "Digits MLP (120 trained parameters)" in out and "CompressionBoundReporter: certified error <= 0." in out
    scalars = read_tensorboard_scalars(tmp_path / "digits" / "version_0")
    assert {
        "compression/error_bound",
        "compression/test_error",
        "arora/min_layer_cushion",
        "capacity/r_norm",
    } <= scalars.keys()
    assert (tmp_path / "digits" / "version_0" / "compression_report.json").exists()


@pytest.mark.slow
def test_tight_bound_recipe(capsys):
    import torch

    threads, certificates = torch.get_num_threads(), []
    try:  # the figure must not depend on the machine: the same code with 1 and with 2 threads
        for count in (1, 2):
            torch.set_num_threads(count)
            certificates.append(tight_bound.main(["--seeds", "0"]))
    finally:
        torch.set_num_threads(threads)
    certificate = certificates[0]
    assert certificate.error_bound < 0.37 and certificate.num_examples == 1438  # 0.3488 (float64: on any machine)
    assert certificates[1].bitstream == certificate.bitstream
    assert "decoded validation error" in capsys.readouterr().out


@pytest.mark.parametrize("config", sorted((EXAMPLES / "configs").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_yaml_config_runs(config, tmp_path, capsys):
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
    assert "TensorBoard: tensorboard --logdir" in capsys.readouterr().out  # the CLI says what the run did


def test_cli_summarises_each_capability(tmp_path, capsys):
    config = EXAMPLES / "configs" / "bound.yaml"
    cli.main(
        [
            "fit",
            "--config",
            str(config),
            "--trainer.max_epochs=2",
            f"--trainer.default_root_dir={tmp_path}",
            f"--trainer.logger.init_args.save_dir={tmp_path}",
        ]
    )
    assert "CompressionBoundReporter: certified error <= " in capsys.readouterr().out


def test_digits_demo_with_similarity_and_the_gradient_test(tmp_path, capsys):
    arguments = ["--epochs", "2", "--train-size", "256", "--similarity", "--gradtest", "--log-dir", str(tmp_path)]
    digits.main(arguments)
    out = capsys.readouterr().out
    assert "RepresentationSimilarity: CKA/intertwiner similarity per layer to the reference: features.2" in out
    assert "GradientSignalTest: " in out and "'no gradient signal' rejected in" in out


@pytest.mark.slow
def test_the_gradinit_demo_trains_a_network_the_default_initialisation_cannot(tmp_path, capsys):
    arguments = ["--model", "deep", "--epochs", "5", "--batch-size", "32", "--lr", "0.02", "--log-dir", str(tmp_path)]
    without = digits.main(arguments)
    with_gradinit = digits.main([*arguments, "--gradinit"])
    assert without["val/acc"] < 0.2 < 0.4 < with_gradinit["val/acc"]
    assert "The search lowered the look-ahead loss" in capsys.readouterr().out
