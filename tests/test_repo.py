"""The README's two set-up commands and CI stay in step."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", text, re.S).group(1)
    return [line for line in block.splitlines() if line.strip()]


def test_readme_has_exactly_two_setup_commands_and_ci_runs_the_test_one():
    commands = readme_commands()
    assert len(commands) == 2
    main_job, tests = commands
    assert "ouro-lab" in main_job and "pip install" in main_job and "torch==2.13.0" in main_job
    assert tests.endswith("python -m pytest")
    ci = (ROOT / ".ci" / "run").read_text()
    assert tests in ci.splitlines()


def test_pyproject_accepts_a_torch_range():
    text = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'"torch>=[\d.]+,<\d+"', text)
