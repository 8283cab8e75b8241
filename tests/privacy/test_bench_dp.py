"""benchmarks/bench_dp.py --smoke: every mode measured in one process, each against non-private and hooks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from lightning_nt import DPStrategy
from tests.privacy.test_strategy import PerExample, _fit

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
    # a mode that fails is reported on its line and the others still measured (ghost, until the xfail below passes)
    assert len([line for line in lines if line.startswith("  ghost ")]) == 1, result.stdout


@pytest.mark.xfail(
    strict=True,
    raises=AttributeError,
    reason="DPStrategy._forget_private_state deletes `grad_sample` after a step; Opacus's ghost-clipping hook for a "
    "layer without a norm sampler (GroupNorm, Conv2d) reads it on the next step. `bench_dp.py --modes ghost` on the "
    "WRN hits it.",
)
def test_ghost_clipping_takes_a_second_step_with_a_layer_without_a_norm_sampler() -> None:
    _, trainer = _fit(
        DPStrategy(grad_sample_mode="ghost"),
        module=lambda: PerExample(num_samples=64, batch_size=16, norm="group"),
        max_steps=2,
    )
    assert trainer.global_step == 2
