"""The GPU run script and its WRN fit benchmark, checked on the CPU with tiny sizes (``--smoke``)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CAPABILITIES = {"GradInit", "IterateAveraging", "SharpnessMonitor", "CompressionBoundReporter", "DPStrategy"}


def test_gpu_fit_smoke_times_every_capability_in_both_precisions(tmp_path: Path) -> None:
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_fit.py"), "--smoke", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        env=environment,
        cwd=tmp_path,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_fit.json").read_text())
    rows = {(row["precision"], row["capability"]): row for row in report["rows"]}
    for precision in ("32-true", "bf16-mixed"):
        for capability in CAPABILITIES | {"none", "none (GroupNorm)"}:
            row = rows[(precision, capability)]
            assert "error" not in row, row
            assert math.isfinite(row["median_step_ms_ratio"]) and row["median_step_ms"] > 0
    table = (tmp_path / "gpu_fit.md").read_text()
    assert all(capability in table for capability in CAPABILITIES)


def test_run_gpu_script_parses() -> None:
    subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / "run_gpu.sh")], check=True)
