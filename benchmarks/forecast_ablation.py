"""Forecasters against the ceiling on *common* test windows: the ablation table of issue 16.

    .venv/bin/python benchmarks/forecast_ablation.py --data cohort.parquet \
        NAME=MODEL_DIR [NAME=MODEL_DIR ...] [--ensemble NAME=A+B] [--json]

Each MODEL_DIR is an exported model (`glucast train --out DIR`, its `model/` folder). Models
with a longer past window (data.past_min) have fewer test windows — a window never reaches
back across the train/val/test cut — so every model, and both oracles of
forecast/sim/oracle.py, are scored here on the windows all of them have (same subject and
origin), next to each model's RMSE on its own full test split. `--ensemble NAME=A+B` adds
the mean of the named models' quantile forecasts (same windows).

Prints per model: RMSE at 30 and 60 min on the common windows, the ratio to the noise-state
and the filter oracle there, and the RMSE on the model's own windows.

Measured (issue 16) on the demo cohort (30 x 14 days, excitation, seed 1; 16,614 test
windows, hash e980f88a; oracles 7.57/7.83 noise-state, 9.30/10.58 filter), LSTM seed 0
unless said, RMSE 30/60 min (x filter oracle):

    base (hidden 64, 2 h past, 12 epochs)      14.36/20.43 (1.54/1.93)
    past 4 h / 6 h  (own windows: 15,679/14,792) 14.49/20.74, 14.74/21.61
    + kinetics (compartmental term)           14.45/20.66   interventional 60 min 7.1 % (8.1)
    + kinetics + static_state                 14.18/20.29
    hidden 96, 24 epochs (early stop at 14)   14.45/20.56   (train loss 0.083, val 0.100)
    36 epochs, patience 6 (now the default)   14.17/19.66; seed 1: 14.01/19.20 (1.51/1.82)
    + kinetics + static_state, seeds 0/1      14.38/19.88, 14.60/20.44
    mean of 3 (36-epoch runs)                 13.84/18.82 (1.49/1.78)
    mean of all 7 2-h models above            13.65/18.67 (1.47/1.76)

With a 4 h past the common windows' filter oracle is 9.09/9.70 (the first hours of each
test split are the filter's hardest).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="the simulated frame the models were trained on")
    ap.add_argument("models", nargs="+", help="NAME=MODEL_DIR")
    ap.add_argument("--ensemble", action="append", default=[], help="NAME=A+B (mean forecast)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    import numpy as np

    from forecast.schema import read_parquet
    from forecast.sim.oracle import ORACLES, make_oracle
    from training.evaluate import resolve

    frame = read_parquet(args.data)
    preds, windows, own = {}, {}, {}
    for spec in args.models:
        name, _, path = spec.partition("=")
        fc, w, _, _ = resolve(path, frame)
        p = np.asarray(fc.predict(w.past, w.future), dtype=np.float64)  # [N, H, Q]
        mi = tuple(fc.quantiles).index(0.5)
        preds[name], windows[name] = p[..., mi], w  # [N, H]
        own[name] = _rmse(p[..., mi], w.target, w.config.slot_minutes)
    # the common windows: (subject, origin) present for every model
    keys = {n: list(zip(map(str, w.subject_id), w.origin.tolist())) for n, w in windows.items()}
    common = set.intersection(*(set(k) for k in keys.values()))
    ref = min(windows, key=lambda n: len(windows[n]))  # the model with the fewest windows
    order = [k for k in keys[ref] if k in common]  # [M] in that model's order
    pos = {n: {k: i for i, k in enumerate(keys[n])} for n in windows}
    sel = {n: np.array([pos[n][k] for k in order]) for n in windows}
    sub = windows[ref].subset(sel[ref])  # the common windows, in that order
    target = sub.target  # [M, H]
    slot = windows[ref].config.slot_minutes
    on_common = {n: preds[n][sel[n]] for n in preds}  # [M, H] each
    for spec in args.ensemble:
        name, _, members = spec.partition("=")
        on_common[name] = np.mean([on_common[m] for m in members.split("+")], axis=0)
    oracle = {}
    for o in ORACLES:
        fc = make_oracle(o, frame, (0.05, 0.5, 0.95))
        p = np.asarray(fc.predict_windows(sub), dtype=np.float64)[..., 1]  # [M, H] medians
        oracle[o] = _rmse(p, target, slot)
    res = {
        "data": args.data,
        "common_windows": len(order),
        "windows": {n: len(w) for n, w in windows.items()},
        "oracle_rmse": oracle,
        "models": {},
    }
    for n, p in on_common.items():
        r = _rmse(p, target, slot)
        res["models"][n] = {
            "rmse": r,
            "own_windows_rmse": own.get(n),
            "ratio": {o: {m: round(r[m] / oracle[o][m], 3) for m in r} for o in oracle},
        }
    if args.json:
        json.dump(res, sys.stdout, indent=1)
        print()
        return 0
    print(f"common test windows: {len(order)} (per model: {res['windows']})")
    print(f"{'model':<18}{'30':>7}{'60':>7}{'xnoise30':>9}{'xnoise60':>9}{'xfilt30':>8}"
          f"{'xfilt60':>8}   own-windows 30/60")  # fmt: skip
    rows = [(o, {"rmse": oracle[o], "ratio": None, "own_windows_rmse": None}) for o in oracle]
    for n, m in [*rows, *res["models"].items()]:
        r = m["rmse"]
        line = f"{n:<18}{r['30']:>7.2f}{r['60']:>7.2f}"
        if m["ratio"]:
            rn, rf = m["ratio"]["oracle-noise"], m["ratio"]["oracle-filter"]
            line += f"{rn['30']:>9.2f}{rn['60']:>9.2f}{rf['30']:>8.2f}{rf['60']:>8.2f}"
        if m["own_windows_rmse"]:
            line += f"   {m['own_windows_rmse']['30']:.2f}/{m['own_windows_rmse']['60']:.2f}"
        print(line)
    return 0


def _rmse(pred, target, slot_minutes: int) -> dict[str, float]:
    """RMSE over real readings at 30 and 60 min (pred, target [N, H])."""
    import numpy as np

    out = {}
    for m in (30, 60):
        h = m // slot_minutes - 1
        if h < target.shape[1]:
            e = pred[:, h] - target[:, h]
            out[str(m)] = round(float(np.sqrt(np.nanmean(e**2))), 3)
    return out


if __name__ == "__main__":
    raise SystemExit(main())
