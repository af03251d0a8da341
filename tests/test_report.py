"""The HTML reports a researcher reads: tables (counts as integers, no empty header row),
links (relative trial reports, MLflow runs; nothing but http(s) and relative paths), the
forecast overlay that does not bridge gaps, and the demo report assembled from the steps'
JSON summaries (every model's plots, working links, integer counts)."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
import pytest

matplotlib.use("Agg")

from forecast import plots  # noqa: E402
from forecast.htmlreport import HtmlReport, ReportError  # noqa: E402

ROOT = Path(__file__).parents[1]


def _demo_report():
    spec = importlib.util.spec_from_file_location("demo_report", ROOT / "scripts/demo_report.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_counts_print_as_integers_and_the_index_name_heads_its_column():
    rep = HtmlReport("t")
    df = pd.DataFrame({"TIR %": [71.234, 65.0], "episodes": [58.0, np.nan]}, index=["a", "b"])
    df.index.name = "controller"
    rep.add_table(df, integers=("episodes",))
    rep.add_table({"n_patients": 30.0, "tir": 70.5, "cycles": np.int64(288)},
                  integers=("n_patients",))  # fmt: skip
    page = rep.to_html()
    assert "<td>58</td>" in page and "58.00" not in page
    assert "<td>65.00</td>" in page  # a whole-number share is not a count
    assert "<td>30</td>" in page and "<td>70.50</td>" in page and "<td>288</td>" in page
    heads = re.findall(r"<thead>(.*?)</thead>", page, re.S)
    assert len(heads) == 2
    for head in heads:  # one header row, the index name in its corner
        assert head.count("<tr") == 1 and "<th></th>" not in head
    assert "<th>controller</th>" in heads[0] and "<th>metric</th>" in heads[1]


def test_links_are_escaped_and_only_relative_or_http():
    rep = HtmlReport("t")
    rep.add_links([("trial <mpc>", "trial-mpc/index.html", "per patient & more"),
                   ("run", "http://127.0.0.1:5000/#/experiments/1/runs/abc", None)])  # fmt: skip
    page = rep.to_html()
    assert '<a href="trial-mpc/index.html">trial &lt;mpc&gt;</a> — per patient &amp; more' in page
    assert 'href="http://127.0.0.1:5000/#/experiments/1/runs/abc"' in page
    for bad in ("javascript:alert(1)", "file:///etc/passwd", "data:text/html,x"):
        with pytest.raises(ReportError, match="only relative paths"):
            rep.add_link(bad, "x")


def test_overlay_stops_at_a_gap_in_the_readings():
    t = pd.date_range("2024-01-01", periods=48, freq="5min").to_numpy()
    t = np.concatenate([t[:24], t[24:] + np.timedelta64(4, "h")])  # 4 hours without readings
    ref = 120 + 10 * np.sin(np.arange(48) / 5)
    pred = np.stack([ref - 15, ref, ref + 15], axis=1)
    fig = plots.overlay_plot(t, ref, pred, (0.05, 0.5, 0.95))
    ax = fig.axes[0]
    median = next(line for line in ax.get_lines() if "q=0.5" in line.get_label())
    y = np.asarray(median.get_ydata(), dtype=float)
    assert np.isnan(y).sum() == 1 and np.isnan(y[24])  # one break, right at the gap
    band = next(c for c in ax.collections if "0.05" in c.get_label())
    assert len(band.get_paths()) == 2  # two separate polygons, nothing across the gap
    # time-zone aware times (the canonical frame's) break the same way
    aware = pd.DatetimeIndex(t).tz_localize("UTC")
    fig = plots.overlay_plot(aware, ref, pred, (0.05, 0.5, 0.95))
    line = next(x for x in fig.axes[0].get_lines() if "q=0.5" in x.get_label())
    assert np.isnan(np.asarray(line.get_ydata(), dtype=float)).sum() == 1
    # regular data stays one line
    fig = plots.overlay_plot(t[:24], ref[:24], pred[:24], (0.05, 0.5, 0.95))
    line = next(x for x in fig.axes[0].get_lines() if "q=0.5" in x.get_label())
    assert not np.isnan(np.asarray(line.get_ydata(), dtype=float)).any()


def _png(path: Path, title: str) -> None:
    rng = np.random.default_rng(0)
    ref = rng.uniform(60, 300, 200)
    path.parent.mkdir(parents=True, exist_ok=True)
    plots.clarke_plot(ref, ref + rng.normal(0, 15, 200), title=title).savefig(path, dpi=40)


def write_demo_outputs(out: Path) -> Path:
    """What scripts/demo.sh's steps leave in its output folder, small: two baselines' train
    summaries and plots, a real 1-patient trial with its report, an alert evaluation."""
    from serving.insilico.trial import TrialConfig, run_trial, write_report

    (out / "simulate.json").write_text(json.dumps(
        {"patients": 1, "days": 1, "policy": "excitation", "sensor": "dexcom", "seed": 1}))  # fmt: skip
    for m in ("persistence", "ridge"):
        run_id = f"{m[:4]}" + "0" * 28
        horizons = {h: {"rmse": 20.0 + int(h) / 3, "mae": 15.0, "mard": 10.0, "coverage": 90.0,
                        "lag_min": 10.0, "clarke_A": 80.0} for h in ("30", "60")}  # fmt: skip
        (out / f"train_{m}.json").write_text(json.dumps({
            "run_id": run_id, "experiment_id": "7", "dataset_hash": "ab" * 32,
            "run_url": f"http://127.0.0.1:5000/#/experiments/7/runs/{run_id}",
            "metrics": horizons,
        }))  # fmt: skip
        for stem in ("clarke_30min", "overlay_30min"):
            _png(out / "models" / m / "plots" / f"{stem}.png", f"{m} {stem}")
    result = run_trial(TrialConfig(controller="basal-bolus", patients="adult#001", days=0.1))
    write_report(result, out / "trial-basal-bolus")
    data = result.to_json()
    data["mlflow"] = {"run_id": "c" * 32, "experiment_id": "7",
                      "url": "http://127.0.0.1:5000/#/experiments/7/runs/" + "c" * 32}  # fmt: skip
    (out / "trial_basal-bolus.json").write_text(json.dumps(data))
    (out / "alerts.json").write_text(json.dumps({
        "predicted_low": {"sensitivity": 0.845, "false_per_day": 0.84, "lead_min": 15.0,
                          "episodes": 58, "warned": 49, "alerts": 120},
        "threshold_low": {"sensitivity": 0.1, "false_per_day": 0.0, "lead_min": 0.0,
                          "episodes": 58, "warned": 6, "alerts": 40},
    }))  # fmt: skip
    return _demo_report().build(out)


@pytest.fixture(scope="module")
def demo_page(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    return write_demo_outputs(out)


def test_demo_report_links_counts_and_every_models_plots(demo_page):
    page = demo_page.read_text()
    hrefs = re.findall(r'<a href="([^"#][^"]*)"', page)
    assert "trial-basal-bolus/index.html" in hrefs
    assert (demo_page.parent / "trial-basal-bolus/index.html").exists()
    # the experiment, in MLflow 3's runs view
    assert "http://127.0.0.1:5000/#/experiments/7?workflowType=machine_learning" in hrefs
    assert sum("/runs/" in h for h in hrefs) == 3  # two training runs and the trial
    # every model's plots, captioned by what they show, not by file name
    for name in ("Persistence", "Ridge (exogenous inputs)"):
        assert f"{name}: Clarke error grid, 30-min forecasts" in page
    assert "clarke 30min" not in page
    assert "<td>58</td>" in page and "58.00" not in page and "<td>84.50</td>" in page
    assert "Supervisor interventions/day: 5-minute cycles a day" in page
    assert "<th></th>" not in page.split("<nav>")[1]
