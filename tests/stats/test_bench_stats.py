"""benchmarks/bench_stats.py, small: every figure it prints is there for both digits models (found by audit: no test
ran it, unlike the other benchmarks)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.helpers.scripts import run_script

LINE = re.compile(
    r"^(DigitsCNN|DigitsMLP) \([\d,]+ parameters\): training step [\d.]+ ms; one measurement in a run [\d.]+ ms with "
    r"a per-example loss_fn \([\d.]+ steps\), [\d.]+ ms through training_step under vmap \([\d.]+ steps\); the math "
    r"alone: JVP path [\d.]+ ms, explicit per-example gradients [\d.]+ ms \([\d.]+x the JVP time\); peak memory "
    r"added: JVP [\d.]+ MB, explicit [\d.]+ MB \(the gradients alone: [\d.]+ MB\)$"
)


@pytest.mark.slow
def test_bench_stats_prints_every_figure_for_both_models(tmp_path: Path) -> None:
    result = run_script("benchmarks/bench_stats.py", "--num-examples", "16", "--threads", "1", cwd=tmp_path)
    models = [match.group(1) for line in result.stdout.splitlines() if (match := LINE.match(line))]
    assert models == ["DigitsCNN", "DigitsMLP"], result.stdout[-2000:]
    assert list(tmp_path.iterdir()) == []  # nothing written
