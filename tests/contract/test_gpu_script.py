"""The GPU run script and its WRN fit benchmark, checked on the CPU with tiny sizes (``--smoke``)."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

from tests.contract.capabilities import CAPABILITIES as CONTRACT_CAPABILITIES
from tests.helpers.scripts import ROOT, run_script

CAPABILITIES = {
    "GradInit",
    "IterateAveraging",
    "SharpnessMonitor",
    "CompressionBoundReporter",
    "RepresentationSimilarity",
    "LazinessMonitor",
    "GradientSignalTest",
    "DPStrategy",
    "DPStrategy (bk)",
}


def test_every_contract_capability_gets_a_gpu_fit() -> None:
    """A capability added to the contract suite must also get its real fit on the GPU (SubspaceTraining is a
    training method that the reporter's fit exercises on its own)."""
    names = {capability.name.split("-")[0].split("+")[0] for capability in CONTRACT_CAPABILITIES}
    assert names - {"SubspaceTraining"} <= CAPABILITIES


def test_gpu_fit_smoke_times_every_capability_in_both_precisions(tmp_path: Path) -> None:
    run_script("benchmarks/gpu_fit.py", "--smoke", "--out", str(tmp_path), cwd=tmp_path)
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
