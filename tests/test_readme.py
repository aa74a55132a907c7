"""CI must run exactly the README's test command (the command a new user types)."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _command_after(lines: list[str], marker: str) -> str:
    index = next(i for i, line in enumerate(lines) if marker in line)
    return lines[index + 1].strip()


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text().splitlines()
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    readme_command = _command_after(readme, "# 2. install the test extras and run the full test suite")
    assert readme_command.endswith("python -m pytest")
    assert _command_after(ci, "# README test command:") == readme_command
