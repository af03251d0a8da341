"""Runs GluPredKit's own model classes inside GluPredKit's venv (never imported by glucast).

Started by training/peers/glupredkit.py as ``<peer venv>/bin/python glupredkit_driver.py DIR``.
It imports only the standard library, numpy, pandas and glupredkit, so glucast's
dependencies never meet GluPredKit's. Everything is exchanged as files in DIR:

- ``request.json``: glupredkit version expected, prediction horizon (min), number of lagged
  features, numerical and what-if features, the models to run (name, positional fit args);
- ``train.npz``: the training frame on the 5-minute grid (``time_ns``, ``id``, one array
  per numerical feature), which GluPredKit's own ``basic`` preprocessor and each model's
  ``process_data`` turn into its training rows (it interpolates CGM linearly and trains on
  interpolated targets: that is how GluPredKit trains);
- ``test.npz``: one row per glucast test window (``time_ns``, ``id``, ``past_<feature>``
  ``[N, L]``, ``future_<feature>`` ``[N, H]``), turned into exactly the columns the model's
  ``process_data`` produced for training;

and it writes ``response.json`` (per model: ok or failed and why, seconds, training rows,
best parameters) and ``response.npz`` (``pred_<model>`` ``[N, H]``, mg/dL). Arrays are read
with ``allow_pickle=False``; nothing is unpickled.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import pandas as pd


def _frame(train: dict, features: list[str]) -> pd.DataFrame:
    idx = pd.DatetimeIndex(pd.to_datetime(train["time_ns"], utc=True), name="date")
    df = pd.DataFrame({"id": train["id"].astype(np.int64)}, index=idx)
    for f in features:
        df[f] = train[f].astype(np.float64)
    df["is_test"] = False
    return df


def _config_manager(req: dict):
    """GluPredKit's own ModelConfigurationManager, reading the file it expects in ./data."""
    from glupredkit.helpers.model_config_manager import ModelConfigurationManager

    cfg = {
        "data": "glucast.csv",
        "subject_ids": [],
        "preprocessor": "basic",
        "prediction_horizon": int(req["prediction_horizon"]),
        "num_lagged_features": int(req["num_lagged_features"]),
        "num_features": list(req["num_features"]),
        "cat_features": [],
        "what_if_features": list(req["what_if_features"]),
    }
    d = Path("data") / "configurations"
    d.mkdir(parents=True, exist_ok=True)
    (d / "glucast.json").write_text(json.dumps(cfg))
    return ModelConfigurationManager("glucast")


def _test_rows(test: dict, req: dict, columns: list[str]) -> pd.DataFrame:
    """The columns `process_data` makes (CGM, CGM_5 ... carbs_what_if_5 ...) from windows."""
    L = test["past_CGM"].shape[1]
    cols: dict[str, np.ndarray] = {"id": test["id"].astype(np.int64)}
    for f in req["num_features"]:
        past = test[f"past_{f}"]
        cols[f] = past[:, L - 1]
        for i in range(1, int(req["num_lagged_features"]) + 1):
            cols[f"{f}_{i * 5}"] = past[:, L - 1 - i]
    for f in req["what_if_features"]:
        fut = test[f"future_{f}"]
        for i in range(1, int(req["prediction_horizon"]) // 5 + 1):
            cols[f"{f}_what_if_{i * 5}"] = fut[:, i - 1]
    idx = pd.DatetimeIndex(pd.to_datetime(test["time_ns"], utc=True), name="date")
    df = pd.DataFrame(cols, index=idx)
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(f"the model trained on columns the windows cannot give: {missing[:5]}")
    return df[columns]


def run_model(
    name: str, fit_args: list, train_df: pd.DataFrame, test: dict, req: dict, mgr, max_rows=None
):
    from glupredkit.preprocessors.basic import Preprocessor

    ph = int(req["prediction_horizon"])
    n_out = ph // 5
    info: dict = {"status": "failed"}
    mod = importlib.import_module(f"glupredkit.models.{name}")
    model = mod.Model(ph)
    pre = Preprocessor(
        [],
        list(req["num_features"]),
        [],
        list(req["what_if_features"]),
        ph,
        int(req["num_lagged_features"]),
    )
    t0 = time.perf_counter()
    train_data, _ = pre(train_df.copy())
    processed = model.process_data(train_data, mgr, real_time=False)
    targets = [c for c in processed.columns if c.startswith("target")]
    x_train = processed.drop(targets, axis=1)
    y_train = processed[targets]
    info["train_rows"] = int(len(x_train))
    if max_rows and len(x_train) > int(max_rows):
        pick = np.sort(np.random.default_rng(0).choice(len(x_train), int(max_rows), replace=False))
        x_train, y_train = x_train.iloc[pick], y_train.iloc[pick]
        info["train_rows_used"] = int(max_rows)
    model.fit(x_train, y_train, *fit_args)
    info["fit_seconds"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    rows = _test_rows(test, req, list(x_train.columns))
    ids = rows["id"].to_numpy()
    pred = np.full((len(rows), n_out), np.nan)
    # Several models return rows grouped by subject in their own order: ask per subject.
    for sid in pd.unique(ids):
        m = ids == sid
        raw = model.predict(rows[m])
        # naive_linear_regressor answers a Series of per-row lists: make it [n, H]
        raw = raw.tolist() if isinstance(raw, pd.Series) else raw
        out = np.asarray(raw, dtype=np.float64)
        if out.ndim != 2 or out.shape != (int(m.sum()), n_out):
            raise ValueError(
                f"predict returned shape {getattr(out, 'shape', None)} for subject {sid} "
                f"({int(m.sum())} rows, {n_out} steps expected)"
            )
        pred[m] = out
    info["predict_seconds"] = time.perf_counter() - t1
    try:
        bp = model.best_params()
        info["best_params"] = json.loads(json.dumps(bp, default=str))
    except Exception:  # noqa: BLE001 - optional; several models do not implement it
        info["best_params"] = None
    info["status"] = "ok"
    return pred, info


def main(argv: list[str]) -> int:
    from importlib.metadata import version

    import glupredkit  # noqa: F401 - fail early when the env lacks it

    work = Path(argv[1]).resolve()
    req = json.loads((work / "request.json").read_text())
    have = version("glupredkit")
    if req.get("glupredkit_version") and have != req["glupredkit_version"]:
        print(
            f"glupredkit {have} installed, {req['glupredkit_version']} requested", file=sys.stderr
        )
        return 3
    with np.load(work / "train.npz", allow_pickle=False) as z:
        train = {k: z[k] for k in z.files}
    with np.load(work / "test.npz", allow_pickle=False) as z:
        test = {k: z[k] for k in z.files}
    os.chdir(work)  # GluPredKit reads its configuration from ./data/configurations
    mgr = _config_manager(req)
    train_df = _frame(train, list(req["num_features"]))
    preds: dict[str, np.ndarray] = {}
    resp: dict = {"glupredkit_version": have, "models": {}}
    for spec in req["models"]:
        name = spec["name"]
        print(f"[glupredkit] {name}: fitting", file=sys.stderr, flush=True)
        try:
            # a per-model cap (the request's models entry) wins over the request-wide one
            cap = spec.get("max_train_rows", req.get("max_train_rows"))
            pred, info = run_model(
                name, list(spec.get("fit_args", [])), train_df, test, req, mgr, max_rows=cap
            )
            preds[f"pred_{name}"] = pred
        except Exception as e:  # noqa: BLE001 - every failure is reported, per model
            info = {
                "status": "failed",
                "error": f"{type(e).__name__}: {e}",
                "traceback": traceback.format_exc(limit=6)[-2000:],
            }
        resp["models"][name] = info
        print(f"[glupredkit] {name}: {info['status']}", file=sys.stderr, flush=True)
    np.savez(work / "response.npz", **preds)
    (work / "response.json").write_text(json.dumps(resp, indent=1, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
