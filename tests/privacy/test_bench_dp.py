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


def _profile(steps: int, cwd: Path) -> dict[str, tuple[int, float, float]]:
    """``--profile`` of ``steps`` steps: per label, operators a step, device-busy and wall milliseconds a step."""
    arguments = ("--smoke", "--modes", "bk", "--no-raw", "--profile", "--steps", str(steps))
    result = run_script("benchmarks/bench_dp.py", *arguments, cwd=cwd)
    lines = result.stdout.splitlines()
    summary = re.compile(
        r"  profile (\S+): (\d+) operators a step; device busy ([\d.]+) ms of a ([\d.]+) ms step \(\d+%\)$"
    )
    costliest = re.compile(r"    +[\d.]+ ms +[\d.]+x  aten::\S")
    found = {}
    for index, line in enumerate(lines):
        if match := summary.match(line):
            assert all(costliest.match(entry) for entry in lines[index + 1 : index + 7]), lines[index : index + 7]
            found[match.group(1)] = (int(match.group(2)), float(match.group(3)), float(match.group(4)))
    return found


@pytest.mark.slow
def test_bench_dp_profile_counts_the_same_operators_a_step_whatever_the_window(tmp_path: Path) -> None:
    """Operators only (no annotation ranges, which would count work twice and make the CPU look always busy), divided
    by the steps profiled: a window of 2 steps and one of 4 give the same count a step, and busy time below the wall."""
    two, four = _profile(2, tmp_path), _profile(4, tmp_path)
    assert list(two) == list(four) == ["non-private", "bk"], (two, four)
    for label in two:
        assert two[label][0] == four[label][0] > 0, (label, two[label], four[label])
        assert all(0 < busy < wall for _, busy, wall in (two[label], four[label])), (label, two[label], four[label])
