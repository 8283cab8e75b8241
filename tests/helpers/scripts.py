"""Run a script of the repository (a benchmark, an example) in a fresh CPU-only process, as a user would."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_script(relative_path: str, *arguments: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python <relative_path> <arguments>`` from ``cwd`` with the repository importable and no GPU visible;
    fails the test with the end of stderr if the script fails."""
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(
        [sys.executable, str(ROOT / relative_path), *arguments],
        capture_output=True,
        text=True,
        env=environment,
        cwd=cwd,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result
