"""Assemble reports/demo/index.html from what the demo's steps wrote.

Every step of scripts/demo.sh leaves a JSON summary (its `--json` output) and, where people
would rather look than read, PNGs. This page puts them side by side: forecast accuracy of
every model on the same held-out windows, the error grids, the interventional check, MPC
against basal-bolus in closed loop, and the alert evaluation. One self-contained file.

    python scripts/demo_report.py reports/demo
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pandas as pd

from forecast.htmlreport import HtmlReport

MODELS = ("persistence", "linear", "ridge", "physio", "lstm", "transformer")
TRIALS = ("basal-bolus", "mpc", "physio-mpc", "pid")
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


def trial_table(out: Path) -> pd.DataFrame:
    rows = {}
    for c in TRIALS:
        res = _load(out / f"trial_{c}.json")
        if res is None:
            continue
        cohort = res["cohort"]
        rows[c] = {label: cohort.get(k) for k, label in TRIAL_COLUMNS.items()}
    return pd.DataFrame(rows).T.astype(float).round(2)


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
        rep.add_table(acc, caption="mg/dL unless marked; coverage of the 90 % interval")
    if (out / "compare.png").exists():
        rep.add_image(out / "compare.png", "RMSE by horizon, all models, same test windows")
    for name in sorted((out / "forecast").glob("*.png")):
        rep.add_image(name, name.stem.replace("_", " "))

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
        rep.add_table(pd.DataFrame(rows).T.astype(float).round(2))

    trials = trial_table(out)
    if len(trials):
        rep.add_heading("Closed loop: MPC (LSTM forecasts) vs basal–bolus")
        rep.add_table(trials, caption="cohort means on CGM readings; same patients, meals, seeds")
        for c in TRIALS:
            d = out / f"trial-{c}"
            for png in ("agp.png", "cvga.png"):
                if (d / png).exists():
                    rep.add_image(d / png, f"{c}: {png[:-4].upper()}")
            if (d / "index.html").exists():
                rep.add_text(f"Full {c} trial report: {d.name}/index.html")

    alerts = _load(out / "alerts.json")
    if alerts:
        rep.add_heading("Alerts: warned before the low, not after")
        keep = ("sensitivity", "false_per_day", "lead_min", "episodes", "warned", "alerts")
        rows = {
            k: {kk: _fmt(v.get(kk)) for kk in keep}
            for k, v in alerts.items()
            if isinstance(v, dict) and "sensitivity" in v
        }
        rep.add_table(pd.DataFrame(rows).T)
    if (out / "alerts_tradeoff.png").exists():
        rep.add_image(
            out / "alerts_tradeoff.png",
            "Predicted lows by forecast quantile: lows warned and median lead against false "
            "alerts a day (same forecasts, same test days; green: the goal)",
        )

    rep.add_heading("Where the runs are")
    rep.add_text(
        "Every run is in the local MLflow store: .venv/bin/mlflow ui --backend-store-uri "
        "sqlite:///mlflow.db, then http://127.0.0.1:5000."
    )
    return rep.write(out / "index.html")


def main(argv: list[str]) -> int:
    out = Path(argv[1] if len(argv) > 1 else "reports/demo")
    path = build(out)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
