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


def documented_forms() -> list[str]:
    """The command forms of the README's command table (``glucast X ... `` in column one)."""
    forms = []
    for line in README.read_text().splitlines():
        m = re.match(r"\| `(glucast [^`]*)`", line)
        if m:
            forms.append(m.group(1).replace("\\|", "|"))
    return forms


def subcommand(cmd: str) -> str:
    """'glucast data ingest PATH --format ..' -> 'data ingest' (words before the first
    argument that is an option, a placeholder or a choice)."""
    words = []
    for w in cmd.split()[1:]:
        if w.startswith("-") or not re.fullmatch(r"[a-z][a-z-]*", w):
            break
        words.append(w)
    return " ".join(words)


#: forms whose run is a long-running process (real time) or an interactive tool: the tour
#: shows their --help, which parses their arguments and loads their module
HELP_ONLY = {"loop", "journal", "faults", "peers"}  # peers: installs software (npm, pip)


def test_every_documented_form_is_run_by_the_tour():
    """Each row of the command table is exercised by a command of the tour, and where a
    row takes ``--model DIR|BASELINE`` both an exported model and a baseline are run (a
    baseline crashed `glucast evaluate` while only the DIR form was in the tour)."""
    from training.config import BASELINE_MODELS

    cmds = readme_commands()
    forms = documented_forms()
    assert len(forms) >= 10
    for form in forms:
        sub = subcommand(form)
        runs = [c for c in cmds if subcommand(c) == sub]
        assert runs, f"README documents `{form}` but the tour never runs `glucast {sub}`"
        if sub.split()[0] not in HELP_ONLY:
            assert any("--help" not in c for c in runs), f"only --help of `glucast {sub}` runs"
        if "--model DIR|BASELINE" in form:
            models = [shlex.split(c)[shlex.split(c).index("--model") + 1] for c in runs]
            assert any(m in BASELINE_MODELS for m in models), f"no baseline for `{sub}`"
            assert any(m not in BASELINE_MODELS for m in models), f"no model DIR for `{sub}`"


@pytest.mark.parametrize("baseline", ["persistence", "linear", "ridge", "physio"])
def test_evaluate_every_baseline(baseline, tmp_path, capsys):
    """`glucast evaluate --model BASELINE` (the crash: resolve returned five values)."""
    import json

    pytest.importorskip("torch")
    from forecast.cli import main
    from forecast.schema import write_parquet
    from training.synthetic import replay_cohort

    path = write_parquet(replay_cohort("adult#001", days=2.5, seed=2), tmp_path / "f.parquet")
    rc = main(["evaluate", "--model", baseline, "--data", str(path), "--json"])
    out, err = capsys.readouterr()
    assert rc == 0, err[-2000:]
    res = json.loads(out)
    assert res["model"] == baseline and res["horizons"]["30"]["rmse"] > 0


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
