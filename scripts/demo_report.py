"""Assemble reports/demo/index.html from what the demo's steps wrote.

Every step of scripts/demo.sh leaves a JSON summary (its `--json` output) and, where people
would rather look than read, PNGs. This page puts them side by side: forecast accuracy of
every model on the same held-out windows, every model's error grids and overlay, the
interventional check, MPC against basal-bolus in closed loop, and the alert evaluation, with
links to each trial's own report and to every run in the MLflow UI. One self-contained file
(images embedded; links are followed, never loaded).

    python scripts/demo_report.py reports/demo
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from forecast.htmlreport import HtmlReport

MODELS = ("persistence", "linear", "ridge", "physio", "lstm", "transformer")
TRIALS = ("basal-bolus", "mpc", "mpc-unannounced", "physio-mpc", "pid")
TRIAL_COLUMNS = {
    "tir": "TIR 70–180 %",
    "tbr70": "TBR <70 %",
    "tbr54": "TBR <54 %",
    "tar180": "TAR >180 %",
    "tar250": "TAR >250 %",
    "mean": "mean mg/dL",
    "cv": "CV %",
    "lbgi": "LBGI",
    "hbgi": "HBGI",
    "tdi_u": "insulin U/day",
    "tbr70_median": "median TBR <70 %",
    "patients_with_tbr54": "patients with any <54",
    "interventions_per_day": "supervisor interventions/day",
    "limit_violations": "limit violations",
}
TRIAL_COUNTS = ("patients with any <54", "limit violations")
# what each plot `training.evaluate.save_plots` writes shows (file stem -> caption)
PLOT_CAPTIONS = {
    "clarke_30min": "Clarke error grid, 30-min forecasts of every held-out window",
    "clarke_60min": "Clarke error grid, 60-min forecasts of every held-out window",
    "parkes_30min": "Parkes (consensus) error grid, 30-min forecasts",
    "parkes_60min": "Parkes (consensus) error grid, 60-min forecasts",
    "overlay_30min": "30-min forecast (median and 90 % interval) against the CGM, first test "
    "patient's first two held-out days; breaks where there were no readings",
}
MODEL_NAMES = {
    "persistence": "Persistence",
    "linear": "Linear trend",
    "ridge": "Ridge (exogenous inputs)",
    "physio": "Physiological",
    "lstm": "LSTM",
    "transformer": "Transformer",
}


def _load(path: Path) -> dict | None:
    if not path.exists() or path.stat().st_size == 0:
        return None
    return json.loads(path.read_text())


def _fmt(v: object) -> object:
    return round(v, 2) if isinstance(v, float) else v


def accuracy_table(out: Path) -> pd.DataFrame:
    """RMSE/MAE/MARD/Clarke A/coverage at 30 and 60 min for every trained model."""
    rows = {}
    hashes = set()
    for m in MODELS:
        res = _load(out / f"train_{m}.json")
        if res is None:
            continue
        hashes.add(res.get("dataset_hash"))
        row = {}
        for h in ("30", "60"):
            hm = res.get("metrics", {}).get(h, {})
            row[f"RMSE {h}"] = hm.get("rmse")
            row[f"MAE {h}"] = hm.get("mae")
            row[f"MARD {h} %"] = hm.get("mard")
            row[f"Clarke A {h} %"] = hm.get("clarke_A", (hm.get("clarke") or {}).get("A"))
            row[f"coverage {h} %"] = hm.get("coverage")
            row[f"lag {h} min"] = hm.get("lag_min")
        rows[m] = row
    table = pd.DataFrame(rows).T
    if len(hashes) > 1:
        raise SystemExit(
            f"models were scored on different test sets ({sorted(map(str, hashes))}); "
            "re-run the demo from a clean reports/demo"
        )
    return table.astype(float).round(2)


CEILINGS = {"oracle_noise": "noise-state oracle", "oracle_filter": "filter oracle"}


def ceiling_table(out: Path, acc: pd.DataFrame) -> pd.DataFrame:
    """The two forecast ceilings' RMSE at 30/60 min and every model's ratio to them (same
    test windows: an oracle's evaluation refuses a frame other than its own simulation)."""
    oracles = {}
    for key, name in CEILINGS.items():
        hz = (_load(out / f"evaluate_{key}.json") or {}).get("horizons", {})
        if hz:
            oracles[name] = {h: float(hz[h]["rmse"]) for h in ("30", "60") if h in hz}
    if not oracles or not len(acc):
        return pd.DataFrame()
    rows = {}
    for label, rmse in [(n, o) for n, o in oracles.items()] + [
        (MODEL_NAMES.get(m, m), {h: float(acc.loc[m, f"RMSE {h}"]) for h in ("30", "60")})
        for m in acc.index
    ]:
        row = {f"RMSE {h}": rmse.get(h) for h in ("30", "60")}
        for name, o in oracles.items():
            for h in ("30", "60"):
                row[f"× {name} {h}"] = rmse[h] / o[h] if h in rmse and h in o else np.nan
        rows[label] = row
    return pd.DataFrame(rows).T.astype(float).round(2)


def trial_table(out: Path) -> pd.DataFrame:
    rows = {}
    for c in TRIALS:
        res = _load(out / f"trial_{c}.json")
        if res is None:
            continue
        cohort = res["cohort"]
        rows[c] = {label: cohort.get(k) for k, label in TRIAL_COLUMNS.items()}
    table = pd.DataFrame(rows).T.astype(float).round(2)
    table.index.name = "controller"
    return table


def alert_table(alerts: dict) -> pd.DataFrame:
    """Per alert rule: sensitivity (%), median lead, false alerts a day and the counts."""
    rows = {}
    for rule, v in alerts.items():
        if not isinstance(v, dict) or "sensitivity" not in v:
            continue
        sens = v.get("sensitivity")
        rows[rule.replace("_", " ")] = {
            "lows/highs warned %": None if sens is None else 100.0 * sens,
            "median lead min": v.get("lead_min"),
            "false alerts/day": v.get("false_per_day"),
            "episodes": v.get("episodes"),
            "warned": v.get("warned"),
            "alerts": v.get("alerts"),
        }
    table = pd.DataFrame(rows).T
    table.index.name = "alert"
    return table


def _mlflow_links(out: Path) -> tuple[str | None, list[tuple[str, str, str | None]]]:
    """(experiment URL, [(text, run URL, note)]) from the steps' JSON summaries."""
    from training.tracking import experiment_url

    runs: list[tuple[str, str, str | None]] = []
    experiment = None
    for m in MODELS:
        res = _load(out / f"train_{m}.json")
        if res and res.get("run_url"):
            experiment = experiment or res.get("experiment_id")
            runs.append((f"{MODEL_NAMES.get(m, m)} training run", res["run_url"],
                         f"run {res['run_id'][:8]}, params, per-horizon metrics, plots, model"))  # fmt: skip
    for name, what in (
        ("evaluate_lstm.json", "LSTM evaluation (ONNX) with the interventional check"),
        ("alerts.json", "LSTM alert replay"),
        ("alerts_sweep.json", "LSTM alert quantile sweep"),
        *((f"trial_{c}.json", f"{c} trial") for c in TRIALS),
    ):
        ref = (_load(out / name) or {}).get("mlflow")
        if ref:
            runs.append((what, ref["url"], f"run {ref['run_id'][:8]}"))
    return (experiment_url(experiment) if experiment else None), runs


def _model_plots(rep: HtmlReport, out: Path) -> None:
    """Each model's error grids and forecast overlay (what `glucast train` wrote)."""
    for m in MODELS:
        pngs = sorted((out / "models" / m / "plots").glob("*.png"))
        if not pngs:
            continue
        name = MODEL_NAMES.get(m, m)
        rep.add_heading(f"{name}: error grids and forecast overlay", level=3)
        grids = [p for p in pngs if not p.stem.startswith("overlay")]
        rep.add_image_grid([(p, f"{name}: {_caption(p)}") for p in grids], columns=2)
        for png in pngs:
            if png not in grids:
                rep.add_image(png, f"{name}: {_caption(png)}")


def _caption(png: Path) -> str:
    return PLOT_CAPTIONS.get(png.stem, png.stem.replace("_", " "))


def build(out: Path) -> Path:
    sim = _load(out / "simulate.json") or {}
    rep = HtmlReport(
        "glucast demo",
        subtitle="Simulate → train → export ONNX → evaluate → closed-loop trial. "
        "Research software, not a medical device.",
    )
    rep.add_heading("Data")
    rep.add_text(
        f"{sim.get('patients', '?')} UVA/Padova S2008 virtual patients, {sim.get('days', '?')} "
        f"days each, random meals, {sim.get('policy', '?')} dosing, {sim.get('sensor', '?')} "
        f"CGM (seed {sim.get('seed', '?')}). Splits are chronological per patient; every model "
        "below is scored on the same held-out windows (same test dataset hash)."
    )

    rep.add_heading("Forecast accuracy on held-out days")
    acc = accuracy_table(out)
    if len(acc):
        acc.index.name = "model"
        rep.add_table(acc, caption="mg/dL unless marked; coverage of the 90 % interval")
    ceil = ceiling_table(out, acc)
    if len(ceil):
        ceil.index.name = "forecaster"
        rep.add_text(
            "How close to the physical limit: no forecaster can know the sensor's future noise. "
            "The noise-state oracle knows the true future signal and the noise's state; the "
            "filter oracle knows each patient's model and inputs but sees only the CGM (an "
            "ensemble Kalman filter). Ratios are each model's RMSE over the oracle's."
        )
        rep.add_table(
            ceil, caption="Forecast ceilings on the same test windows (RMSE mg/dL; × oracle)"
        )
    if (out / "compare.png").exists():
        rep.add_image(out / "compare.png", "RMSE by horizon, all models, same test windows")
    _model_plots(rep, out)

    ev = _load(out / "evaluate_lstm.json")
    if ev and ev.get("interventional"):
        rep.add_heading("Does the LSTM answer insulin correctly?")
        rep.add_text(
            "Held-out windows are re-simulated with the planned insulin changed; the model's "
            "predicted change is compared with the true change, and more planned insulin must "
            "never raise the predicted median."
        )
        rows = {}
        for name, res in ev["interventional"].get("interventions", {}).items():
            for h, v in res.get("horizons", {}).items():
                rows[f"{name} @ {h} min"] = {
                    "true change mg/dL": v.get("mean_true_change"),
                    "predicted change mg/dL": v.get("mean_predicted_change"),
                    "relative error": v.get("relative_error_of_mean"),
                    "correlation": v.get("correlation"),
                    "median raised by more insulin %": res.get("monotonicity_violation_pct"),
                }
        table = pd.DataFrame(rows).T.astype(float).round(2)
        table.index.name = "intervention"
        rep.add_table(table)

    trials = trial_table(out)
    if len(trials):
        rep.add_heading("Closed loop: MPC (LSTM forecasts) vs basal–bolus")
        rep.add_table(
            trials,
            caption="cohort means on CGM readings; same patients, meals, seeds (mpc-unannounced: "
            "the same meals, never announced: the MPC finds them from the CGM)",
            integers=TRIAL_COUNTS,
        )
        rep.add_text(
            "Supervisor interventions/day: 5-minute cycles a day in which the safety "
            "supervisor changed what the controller proposed (capped a rate or a bolus at the "
            "max basal, max bolus or max IOB limit, suspended for a predicted low, or fell back "
            "to the scheduled basal on stale or implausible CGM), per patient. Limit "
            "violations: doses that broke a supervisor limit anyway (must be 0)."
        )
        links = []
        for c in TRIALS:
            d = out / f"trial-{c}"
            for png in ("agp.png", "cvga.png"):
                if (d / png).exists():
                    what = {"agp.png": "ambulatory glucose profile (AGP)",
                            "cvga.png": "control-variability grid (CVGA)"}[png]  # fmt: skip
                    rep.add_image(d / png, f"{c} trial: {what}")
            if (d / "index.html").exists():
                links.append((f"Full {c} trial report", f"{d.name}/index.html",
                              "per-patient outcomes, traces, supervisor record"))  # fmt: skip
        rep.add_links(links)

    alerts = _load(out / "alerts.json")
    if alerts:
        rep.add_heading("Alerts: warned before the low, not after")
        rep.add_table(alert_table(alerts), integers=("episodes", "warned", "alerts"))
    if (out / "alerts_tradeoff.png").exists():
        rep.add_image(
            out / "alerts_tradeoff.png",
            "Predicted lows by forecast quantile: lows warned and median lead against false "
            "alerts a day (same forecasts, same test days; green: the goal)",
        )

    rep.add_heading("Where the runs are")
    experiment, runs = _mlflow_links(out)
    rep.add_text(
        "Every run is in the local MLflow store. Start its UI with .venv/bin/mlflow ui "
        "--backend-store-uri sqlite:///mlflow.db (from the directory the demo ran in); the "
        "links below then open the experiment and each run. Metric names and units: "
        "docs/metrics.md."
    )
    if experiment:
        rep.add_link(experiment, "The demo experiment in MLflow", "all runs, side by side")
    rep.add_links(runs)
    return rep.write(out / "index.html")


def main(argv: list[str]) -> int:
    out = Path(argv[1] if len(argv) > 1 else "reports/demo")
    path = build(out)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
