"""Each demo shows its paper's point, through the Trainer, on the settings it ships with (issue 17).

Every demo runs as a user starts it (``examples/digits.py`` with one capability flag, or the CLI with a shipped
config) at one and at two threads: the scientific claim must hold at both, with margin, so that neither the
thread count nor the load of the machine decides it.
"""

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).parents[2] / "examples"
sys.path.insert(0, str(EXAMPLES))

import cli  # noqa: E402
import digits  # noqa: E402

from lightning_nt import SharpnessMonitor  # noqa: E402
from tests.helpers import read_tensorboard_scalars, read_tensorboard_tags  # noqa: E402

THREADS = pytest.mark.parametrize("threads", [1, 2])


@contextmanager
def num_threads(threads: int) -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def ratios_after_crossing(ratios: list[float]) -> list[float]:
    """The sharpness ratios after the first measurement at which the ratio rose through 1 (empty if never)."""
    crossings = [i for i in range(1, len(ratios)) if ratios[i - 1] < 1 <= ratios[i]]
    return ratios[crossings[0] + 1 :] if crossings else []


def test_ratios_after_crossing():
    # above the threshold before training (a catapult) is no crossing
    assert ratios_after_crossing([5.0, 0.3, 0.9, 1.3, 1.1, 0.95]) == [1.1, 0.95]
    assert ratios_after_crossing([0.1, 0.5, 0.7]) == []


@pytest.mark.slow
@THREADS
def test_sharpness_demo_hovers_at_the_edge_of_stability(tmp_path, capsys, threads):
    with num_threads(threads):
        digits.main(["--sharpness", "--log-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert "hovered at the edge of stability" in out
    log_dir = tmp_path / "digits" / "version_0"
    ratios = [value for _, value in read_tensorboard_scalars(log_dir)["sharpness/ratio"]]
    after = ratios_after_crossing(ratios)
    assert len(after) >= 10, ratios  # crossed early (step ~40 of 200) and stayed measured
    assert min(after) >= 0.8 and max(after) <= 1.3, ratios
    assert "sharpness/edge_of_stability" in read_tensorboard_tags(log_dir)["images"]


@pytest.mark.slow
def test_sharpness_config_hovers_at_the_edge_of_stability(tmp_path, capsys):
    run = cli.main(
        [
            "fit",
            "--config",
            str(EXAMPLES / "configs" / "sharpness.yaml"),
            f"--trainer.default_root_dir={tmp_path}",
            f"--trainer.logger.init_args.save_dir={tmp_path}",
        ]
    )
    monitor = next(c for c in run.trainer.callbacks if isinstance(c, SharpnessMonitor))
    after = ratios_after_crossing([entry["sharpness/ratio"] for entry in monitor.history])
    assert len(after) >= 10 and min(after) >= 0.8 and max(after) <= 1.3
    assert "hovered at the edge of stability" in capsys.readouterr().out
