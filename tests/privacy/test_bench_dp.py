"""benchmarks/bench_dp.py --smoke: every mode measured in one process, each against non-private and hooks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_bench_dp_smoke_prints_time_and_memory_of_every_mode(tmp_path: Path) -> None:
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_dp.py"), "--smoke"],  # modes hooks, ghost, bk
        capture_output=True,
        text=True,
        env=environment,
        cwd=tmp_path,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert any(line.startswith("  round 1/1: lightning ") for line in lines), result.stdout
    assert any(line.startswith("  non-private: Lightning ") and "MiB" in line for line in lines), result.stdout
    for mode in ("hooks", "bk"):
        (line,) = [line for line in lines if line.startswith(f"  {mode} ")]
        assert "failed" not in line and "x non-private, " in line and "x hooks" in line and "MiB" in line, line
    (hooks,) = [line for line in lines if line.startswith("  hooks ")]
    assert "raw Opacus" in hooks and "strategy adds" in hooks
    (ghost,) = [line for line in lines if line.startswith("  ghost ")]
    assert "failed" not in ghost and "x hooks" in ghost, ghost
