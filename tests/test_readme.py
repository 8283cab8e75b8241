"""The README's set-up commands are the ones CI runs."""

from pathlib import Path

ROOT = Path(__file__).parents[1]


def test_ci_runs_the_readme_test_command():
    ci_command = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if "pytest" in line][-1]
    assert ci_command.startswith("pip install torch==2.13.0")
    assert ci_command in (ROOT / "README.md").read_text()
