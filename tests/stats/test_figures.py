"""The scripts that regenerate the method card's figures run, small, and write their PNG where they are told."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers.scripts import run_script

SMALL = {
    "gradtest_digits": [],  # the digits run itself: about ten seconds
    "gradtest_calibration": ["--dimension", "10", "--repetitions", "200"],
    "gradtest_planted_null": ["--seeds", "4"],
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SMALL))
def test_a_figure_script_writes_its_png_and_says_what_it_drew(name: str, tmp_path: Path) -> None:
    out = tmp_path / f"{name}.png"
    result = run_script(f"docs/figures/{name}.py", "--out", str(out), *SMALL[name], cwd=tmp_path)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"written to {out}" in result.stdout
    assert sorted(path.name for path in tmp_path.iterdir()) == [out.name]  # nothing else left behind
