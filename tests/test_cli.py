"""The CLI answers fast, lists its subcommands, and never loads torch for --help."""

import json
import subprocess
import sys

import pytest


def _run(code: str) -> str:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    ).stdout


def test_help_loads_no_heavy_modules():
    out = _run(
        "import sys, contextlib, io\n"
        "from forecast.cli import main\n"
        "buf = io.StringIO()\n"
        "with contextlib.redirect_stdout(buf):\n"
        "    try:\n"
        "        main(['--help'])\n"
        "    except SystemExit:\n"
        "        pass\n"
        "import json\n"
        "print(json.dumps({'help': buf.getvalue(), 'heavy': [m for m in ('torch', 'lightning', 'mlflow', 'onnxruntime') if m in sys.modules]}))\n"
    )
    res = json.loads(out.strip().splitlines()[-1])
    assert res["heavy"] == []
    assert "usage: glucast" in res["help"]


@pytest.mark.parametrize("cmd", ["data", "simulate", "train", "evaluate", "trial", "loop"])
def test_each_subcommand_has_help(cmd):
    from forecast.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert cmd in sub.choices, f"glucast {cmd} is not registered"
    assert sub.choices[cmd].format_help()
