"""Docs check: every `glucast` command in the README's bash blocks runs, in order.

The README's tour is written on small sizes so this stays inside the CI budget; a command
that changes or disappears breaks this test before it breaks a newcomer's first ten minutes.
"""

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
README = ROOT / "README.md"


def readme_commands() -> list[str]:
    text = README.read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    cmds = []
    for block in blocks:
        for line in block.splitlines():
            line = line.split("  #")[0].strip()
            if line.startswith("glucast "):
                cmds.append(line)
    return cmds


def test_readme_opens_with_the_two_commands():
    head = "\n".join(README.read_text().splitlines()[:10])
    assert "make demo" in head and "make test" in head


def test_readme_lists_commands():
    assert len(readme_commands()) >= 8


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_every_readme_command_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    (tmp_path / "tests").symlink_to(ROOT / "tests")
    glucast = [sys.executable, "-m", "forecast.cli"]
    for cmd in readme_commands():
        args = shlex.split(cmd)[1:]
        res = subprocess.run(
            glucast + args, cwd=tmp_path, capture_output=True, text=True, timeout=900
        )
        assert res.returncode == 0, f"`{cmd}` failed ({res.returncode}):\n{res.stderr[-3000:]}"
