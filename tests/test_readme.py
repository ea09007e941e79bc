"""The README stays true: its first lines are the two commands, and its spec reference is the generated one."""

from __future__ import annotations

from pathlib import Path

from alignfake.specdoc import END, START, reference

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_opens_with_the_demo_and_test_commands() -> None:
    lines = [ln for ln in README.read_text().splitlines() if ln.strip()][:4]
    assert lines[0] == "# alignfake"
    assert lines[2].startswith("make demo") and lines[3].startswith("make test")


def test_readme_spec_reference_is_generated_from_spec_docstrings() -> None:
    text = README.read_text()
    block = text.split(START, 1)[1].split(END, 1)[0]
    assert block.strip() == reference().strip(), "run: python -m alignfake.specdoc --write README.md"


def test_ci_runs_the_readme_test_command() -> None:
    ci = (README.parent / ".ci" / "run").read_text()
    assert "make test" in ci
