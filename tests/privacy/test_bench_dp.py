"""benchmarks/bench_dp.py --smoke: every mode measured in one process, each against non-private and hooks."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.helpers.scripts import run_script


@pytest.mark.slow
def test_bench_dp_smoke_prints_time_and_memory_of_every_mode(tmp_path: Path) -> None:
    result = run_script("benchmarks/bench_dp.py", "--smoke", cwd=tmp_path)  # modes hooks, ghost, bk
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


@pytest.mark.slow
def test_bench_dp_profile_says_how_busy_the_device_is_and_what_costs_most(tmp_path: Path) -> None:
    result = run_script("benchmarks/bench_dp.py", "--smoke", "--modes", "bk", "--no-raw", "--profile", cwd=tmp_path)
    lines = result.stdout.splitlines()
    summary = re.compile(r"  profile (\S+): \d+ operators a step; device busy [\d.]+ ms of a [\d.]+ ms step \(\d+%\)$")
    costliest = re.compile(r"    +[\d.]+ ms +[\d.]+x  \S")
    found = [index for index, line in enumerate(lines) if summary.match(line)]
    assert [summary.match(lines[index]).group(1) for index in found] == ["non-private", "bk"], result.stdout
    for index in found:
        assert all(costliest.match(line) for line in lines[index + 1 : index + 7]), lines[index : index + 7]
