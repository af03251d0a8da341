"""Predicted-low alerts: the LSTM's frontier against the oracle ceiling, reproducibly.

The README's alert numbers come from this script. It runs the pipeline a user would run:

1. `glucast simulate`: the cohort (G6 sensor model, excitation dosing, seed 1);
2. `glucast train --model lstm`: with the therapy profile as static inputs, and with
   ``--ablate-profile`` also without it (``data.profile: off``), on the same split;
3. with ``--personal``, `glucast finetune --subject all`: one personal model per patient;
4. every model's predicted-low rule at several quantiles on the held-out days
   (`serving.insilico.alert_sweep.sweep_quantiles`: the same forecasts and episodes for every rule);
5. `benchmarks/alert_ceiling.py`: what perfect glucose foresight would reach on the same days.

    python benchmarks/alert_frontier.py                      # demo cohort: 30 x 14 days
    python benchmarks/alert_frontier.py --days 56 --personal  # 8 weeks, personal models too
    python benchmarks/alert_frontier.py --patients adult#001,child#004 --days 6 --epochs 1

Prints a table (or one JSON object with ``--json``); the frames, models and per-step JSON
stay in ``--out``. On 2 CPU cores: 30 x 14 days with --ablate-profile about 3 minutes (+ 9
with --personal); 30 x 56 days with --personal about 16 minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

QUANTILES = (0.25, 0.3, 0.35, 0.4, 0.45, 0.5)
HERE = Path(__file__).resolve().parent


def glucast(*args: str, out: Path, name: str) -> dict:
    """Run one `glucast ... --json` command; its JSON (stdout) is kept as ``out/name.json``."""
    cmd = [sys.executable, "-m", "forecast.cli", *args, "--json"]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{res.stderr[-3000:]}")
    (out / f"{name}.json").write_text(res.stdout)
    return json.loads(res.stdout)


def sweep(test: pd.DataFrame, model_dir: str, personal_dir: Path | None) -> pd.DataFrame:
    """The quantile sweep of one model (and its personal models) on the test split."""
    from serving.insilico.alert_eval import find_subject_models, load_forecaster, replay_forecasts
    from serving.insilico.alert_sweep import sweep_quantiles

    model = load_forecaster(model_dir, None)
    personal = {}
    if personal_dir is not None:
        personal = {
            s: load_forecaster(str(d), None) for s, d in find_subject_models(personal_dir).items()
        }
    table = replay_forecasts(test, model, config=model.config, subject_models=personal)
    return sweep_quantiles(test, table, QUANTILES, past_slots=model.config.past_slots)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--patients", default="all")
    ap.add_argument("--days", type=float, default=14.0)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--epochs", type=int, default=None, help="override trainer.max_epochs")
    ap.add_argument("--personal", action="store_true", help="also fine-tune personal models")
    ap.add_argument(
        "--ablate-profile", action="store_true", help="also train without the therapy profile"
    )
    ap.add_argument("--samples", type=int, default=200, help="oracle noise continuations")
    ap.add_argument("--out", default=None, help="working directory (default: a temporary one)")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args(argv)
    start = time.perf_counter()
    out = Path(args.out or tempfile.mkdtemp(prefix="glucast-frontier-"))
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{out / 'mlflow.db'}")
    data = out / "cohort.parquet"
    glucast("simulate", "--patients", args.patients, "--days", str(args.days), "--policy",
            "excitation", "--seed", str(args.seed), "--out", str(data), out=out, name="simulate")  # fmt: skip
    from forecast.schema import read_parquet
    from forecast.windows import split_chronological

    test = split_chronological(read_parquet(data))["test"]  # one split for every model
    epochs = ["--max-epochs", str(args.epochs)] if args.epochs else []
    runs = [("lstm (profile)", "lstm", None)]
    if args.ablate_profile:
        cfg = out / "no_profile.yaml"
        cfg.write_text("data: {profile: 'off'}\n")
        runs.append(("lstm (no profile)", "lstm_noprofile", cfg))
    frames, models = [], {}
    for label, name, cfg in runs:
        extra = ["--config", str(cfg)] if cfg else []
        res = glucast("train", "--model", "lstm", "--data", str(data), "--out", str(out / name),
                      "--no-register", "--experiment", "frontier", *epochs, *extra, out=out,
                      name=f"train_{name}")  # fmt: skip
        models[label] = {k: round(v["rmse"], 2) for k, v in res["metrics"].items()}
        frames.append(sweep(test, res["model_dir"], None).assign(model=label))
        if args.personal and name == "lstm":
            ft = glucast("finetune", "--model", res["model_dir"], "--data", str(data),
                         "--subject", "all", "--out", str(out / "personal"), out=out,
                         name="finetune")  # fmt: skip
            models["personal"] = {h: round(v["median_rmse"], 2) for h, v in ft["summary"].items()}
            frames.append(
                sweep(test, res["model_dir"], out / "personal").assign(model="personal models")
            )
    ceiling = subprocess.run(
        [sys.executable, str(HERE / "alert_ceiling.py"), "--data", str(data), "--json",
         "--samples", str(args.samples)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    oracle = json.loads(ceiling.stdout)
    table = pd.concat(frames, ignore_index=True)
    result = {
        "patients": args.patients,
        "days": args.days,
        "seed": args.seed,
        "out": str(out),
        "rmse_30_60": models,
        "sweep": table.astype(object).where(table.notna(), None).to_dict(orient="records"),
        "oracle": oracle["oracle"],
        "test_days": oracle["days"],
        "seconds": round(time.perf_counter() - start, 1),
    }
    if args.json:
        print(json.dumps(result))
        return 0
    lows = int(table["episodes"].iloc[0])
    print(f"{args.patients} x {args.days:g} days, seed {args.seed}: {result['test_days']} test "
          f"days, {lows} CGM lows; RMSE 30/60 {models}")  # fmt: skip
    print(f"{'rule':<34}{'warned':>8}{'lead min':>10}{'false/day':>11}")
    for _, r in table.iterrows():
        rule = (
            "threshold alert"
            if r["rule"] == "threshold_low"
            else f"{r['model']}, q {r['quantile']:g}"
        )
        if r["rule"] == "threshold_low" and r["model"] != runs[0][0]:
            continue  # the same threshold alarm for every model: print it once
        print(f"{rule:<34}{r['sensitivity']:>8.1%}{r['lead_min']:>10}{r['false_per_day']:>11.2f}")
    for r in oracle["oracle"]:
        print(f"{'oracle, P > ' + str(r['p']):<34}{r['sensitivity']:>8.1%}{r['lead_min']:>10}"
              f"{r['false_per_day']:>11.2f}")  # fmt: skip
    print(f"({result['seconds']:.0f} s; everything is in {out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
