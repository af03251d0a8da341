"""serving stays light: every serving module imports without torch, lightning or mlflow."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "lightning", "pytorch_lightning", "mlflow")

PROBE = r"""
import importlib, json, pkgutil, sys
import serving
names, failed = [], {}
for m in pkgutil.walk_packages(serving.__path__, "serving."):
    if m.name.endswith("_driver"):  # a peer's driver script, run by the peer's own interpreter
        continue
    try:
        importlib.import_module(m.name)
        names.append(m.name)
    except Exception as e:  # reported, and the test fails on it
        failed[m.name] = f"{type(e).__name__}: {e}"
heavy = sorted(k for k in sys.modules if k.split(".")[0] in sys.argv[1].split(","))
print(json.dumps({"modules": names, "failed": failed, "heavy": heavy}))
"""


def test_every_serving_module_imports_without_torch_lightning_or_mlflow():
    out = subprocess.run(
        [sys.executable, "-c", PROBE, ",".join(HEAVY)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["failed"] == {}, got["failed"]
    for must in ("serving.safety", "serving.journal", "serving.loop", "serving.insilico.simulated",
                 "serving.insilico.faults", "serving.insilico.replay", "serving.commands.loop"):  # fmt: skip
        assert must in got["modules"]
    assert got["heavy"] == [], f"serving pulled in {got['heavy']}"
