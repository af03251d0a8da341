"""`make demo`'s script runs end to end (on a tiny cohort) and writes its report."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_demo_script_runs_small_and_writes_the_report(tmp_path):
    (tmp_path / "scripts").symlink_to(ROOT / "scripts")
    env = dict(
        os.environ,
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        GLUCAST_DEMO_PATIENTS="adult#001,adult#002,adolescent#001",
        GLUCAST_DEMO_DAYS="3",
        GLUCAST_DEMO_TRIAL_DAYS="0.5",
        GLUCAST_DEMO_EPOCHS="1",
        MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}",
    )
    res = subprocess.run(
        ["bash", "scripts/demo.sh"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert res.returncode == 0, res.stderr[-4000:]
    index = tmp_path / "reports" / "demo" / "index.html"
    html = index.read_text()
    assert html.count("data:image/png;base64,") >= 5  # error grids, comparison, AGP, CVGA
    for section in ("Forecast accuracy", "Closed loop", "Alerts", "mpc-unannounced"):
        assert section in html
    assert (index.parent / "alerts_tradeoff.png").exists()
    assert "Predicted lows by forecast quantile" in html
    assert "reports/demo/index.html" in res.stderr and "mlflow ui" in res.stderr
