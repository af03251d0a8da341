"""Scoring a forecaster on held-out windows: the report, BGLP scores, plots, and the
forecaster resolver shared by `glucast train`, `evaluate` and `finetune`.

A "forecaster" here is anything with ``predict(past, future) -> [B, H, Q]`` and
``quantiles``: a baseline from forecast.baselines, an exported model directory
(training.export.OnnxForecaster), or a torch ForecastHead wrapped by `TorchForecaster`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from forecast.schema import GlucastError

PLOT_HORIZONS = (30, 60)
# `glucast evaluate --model NAME` for the forecast ceilings of simulated frames
# (forecast.sim.oracle); "oracle" is the filter oracle, the fair limit, reported with both.
ORACLE_MODELS = {"oracle": "oracle-filter", "oracle-filter": "oracle-filter",
                 "oracle-noise": "oracle-noise"}  # fmt: skip


class EvaluationError(GlucastError, ValueError):
    """A model cannot be evaluated as asked (unknown name, horizon not forecast...)."""


@dataclass
class TorchForecaster:
    """A torch ForecastHead behind the `predict(past, future)` surface."""

    model: Any

    @property
    def quantiles(self) -> tuple[float, ...]:
        return tuple(self.model.layout.quantiles)

    def predict(self, past: np.ndarray, future: np.ndarray) -> np.ndarray:
        from training.calibration import predict_numpy

        return predict_numpy(self.model, past, future)


def score(forecaster: Any, windows: Any) -> dict[str, Any]:
    """forecast.metrics.evaluate_forecast of `forecaster` on `windows`."""
    from forecast.metrics import evaluate_forecast

    cfg = windows.config
    if hasattr(forecaster, "predict_windows"):  # the oracles: they know the windows' origins
        pred = np.asarray(forecaster.predict_windows(windows), dtype=np.float64)
    else:
        pred = np.asarray(forecaster.predict(windows.past, windows.future), dtype=np.float64)
    q = tuple(forecaster.quantiles)
    report = evaluate_forecast(
        windows.target,
        pred,
        q,
        slot_minutes=cfg.slot_minutes,
        origins=windows.origin,
        subject_ids=windows.subject_id,
    )
    report["windows"] = len(windows)
    report["subjects"] = int(len(set(map(str, windows.subject_id))))
    report["_pred"] = pred  # for plots; removed before printing
    return report


def bglp(forecaster: Any, test_frame: Any, window_config: Any) -> dict[str, Any]:
    """OhioT1DM BGLP challenge scores (forecast.metrics.bglp_scores) on a test frame.

    The challenge scores every test reading, so windows are cut with the past-gap rule
    relaxed (a forecast is made after any gap, from the carried-forward value); the report
    says how many test readings still got no forecast (no reading at the origin, or not
    enough history at the start of the record).
    """
    import dataclasses

    from forecast.metrics import bglp_scores
    from forecast.windows import make_windows

    wc = dataclasses.replace(window_config, max_past_gap_slots=window_config.past_slots)
    have = [m for m in (30, 60) if m <= wc.horizon_slots * wc.slot_minutes]
    if not have:
        raise EvaluationError("BGLP scores need a horizon of at least 30 minutes")
    w = make_windows(test_frame, wc)
    pred = np.asarray(forecaster.predict(w.past, w.future), dtype=np.float64)
    out = bglp_scores(
        w.target,
        pred,
        tuple(forecaster.quantiles),
        subject_ids=w.subject_id,
        slot_minutes=wc.slot_minutes,
        horizons_min=have,
    )
    for m in have:
        h = m // wc.slot_minutes  # slots ahead
        eligible = 0
        for _, g in test_frame.groupby("subject_id", observed=True):
            eligible += int(
                np.isfinite(g["glucose"].to_numpy(float))[wc.past_slots - 1 + h :].sum()
            )
        out[str(m)]["readings_in_test"] = eligible
        out[str(m)]["readings_without_forecast"] = eligible - int(out[str(m)]["n"])
    return out


def public(report: dict[str, Any]) -> dict[str, Any]:
    """The report without private arrays (what JSON and MLflow get)."""
    return {k: v for k, v in report.items() if not k.startswith("_")}


def save_plots(
    windows: Any, pred: np.ndarray, quantiles: tuple[float, ...], out_dir: str | Path, label: str
) -> list[Path]:
    """Clarke and Parkes grids at 30/60 min and a forecast overlay; PNG paths."""
    import matplotlib

    matplotlib.use("Agg")
    from forecast import plots

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = windows.config
    mi = quantiles.index(0.5) if 0.5 in quantiles else len(quantiles) // 2
    paths = []
    for minutes in PLOT_HORIZONS:
        h = minutes // cfg.slot_minutes - 1
        if h >= cfg.horizon_slots:
            continue
        ref, p = windows.target[:, h], pred[:, h, mi]
        for name, fn in (("clarke", plots.clarke_plot), ("parkes", plots.parkes_plot)):
            fig = fn(ref, p, title=f"{label}: {name.title()} grid, {minutes} min")
            path = out / f"{name}_{minutes}min.png"
            fig.savefig(path, dpi=90, bbox_inches="tight")
            paths.append(path)
    # Overlay: the first test subject's first 2 days at 30 min (or the last horizon).
    h = min(30 // cfg.slot_minutes, cfg.horizon_slots) - 1
    if len(windows):
        first = windows.subject_id[0]
        m = np.flatnonzero(windows.subject_id == first)
        t = windows.origin[m] + np.timedelta64((h + 1) * cfg.slot_minutes, "m")
        keep = t <= t[0] + np.timedelta64(2, "D")
        fig = plots.overlay_plot(
            t[keep],
            windows.target[m][keep, h],
            pred[m][keep, h, :],
            list(quantiles),
            label=label,
            title=f"{label}: {(h + 1) * cfg.slot_minutes}-min forecast, {first}",
        )
        path = out / f"overlay_{(h + 1) * cfg.slot_minutes}min.png"
        fig.savefig(path, dpi=90, bbox_inches="tight")
        paths.append(path)
    return paths


def build_baseline(name: str, quantiles: tuple[float, ...]) -> Any:
    """An unfitted forecast.baselines forecaster by name (fit it on training windows)."""
    from forecast import baselines

    cls = baselines.BASELINES.get(name)
    if cls is None:
        raise EvaluationError(
            f"unknown baseline {name!r}; choose from {sorted(baselines.BASELINES)}"
        )
    return cls(quantiles=tuple(quantiles))


def resolve(
    model: str, frame: Any, *, config_path: str | None = None, split: str = "auto"
) -> tuple[Any, Any, dict[str, Any], Any]:
    """(forecaster, test windows, info, test frame) for `glucast evaluate --model MODEL`.

    MODEL is an exported model directory (its manifest says how the frame was split, so the
    same test split is rebuilt) or a baseline name (fitted on the frame's train split with
    the config's split, calibrated on its validation split). ``split="all"`` scores every
    window of the frame (e.g. a separate test file), for exported models only.
    """
    from pathlib import Path

    from forecast.schema import dataset_hash
    from training.config import BASELINE_MODELS, DataConfig, load_config
    from training.export import OnnxForecaster
    from training.splits import build_splits

    if split not in ("auto", "all"):
        raise EvaluationError(f"split {split!r} must be 'auto' or 'all'")
    if model in ORACLE_MODELS:
        if split == "all":
            raise EvaluationError("an oracle forecasts its simulated frame's test split only")
        from forecast.sim.oracle import make_oracle

        cfg = load_config(config_path)
        wc = cfg.window_config(frame)
        splits = build_splits(frame, cfg.data, wc, need=("test",))
        name = ORACLE_MODELS[model]
        fc = make_oracle(name, frame, tuple(cfg.head.quantiles))
        info = {"model": name, "dataset_hash": splits.test_hash}
        return fc, splits.windows["test"], info, splits.frames["test"]
    if model in BASELINE_MODELS:
        if split == "all":
            raise EvaluationError(
                "a baseline is fitted on the frame's train split; --split all needs an exported model"
            )
        cfg = load_config(config_path, {"model": model})
        wc = cfg.window_config(frame)
        splits = build_splits(frame, cfg.data, wc)
        fc = build_baseline(model, tuple(cfg.head.quantiles))
        fc.fit(splits.windows["train"])
        fc.calibrate(splits.windows["val"])
        info = {"model": model, "dataset_hash": splits.test_hash}
        return fc, splits.windows["test"], info, splits.frames["test"]
    path = Path(model)
    if not path.exists():
        raise EvaluationError(
            f"--model {model!r} is neither a model directory nor a baseline "
            f"({', '.join(BASELINE_MODELS)})"
        )
    fc = OnnxForecaster.load(path)
    wc = fc.window_config
    info = {"model": fc.manifest.get("model", "onnx"), "model_dir": str(path.resolve())}
    if split == "all":
        from forecast.windows import make_windows

        windows = make_windows(frame, wc)
        if len(windows) == 0:
            raise EvaluationError("the frame gives no windows for this model's window config")
        info["dataset_hash"] = dataset_hash(frame)
        return fc, windows, info, frame
    s = fc.manifest.get("split") or {}
    data = DataConfig(
        split=s.get("split", "chronological"),
        fractions=tuple(s.get("fractions", (0.7, 0.15, 0.15))),
        test_subjects=tuple(s.get("test_subjects", ())),
    )
    splits = build_splits(frame, data, wc, need=("test",))
    info["dataset_hash"] = splits.test_hash
    return fc, splits.windows["test"], info, splits.frames["test"]


# --------------------------------------------------------------------------- ceilings


def ceiling(
    frame: Any,
    windows: Any,
    report: dict[str, Any],
    quantiles: tuple[float, ...],
    known: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Both oracles (forecast.sim.oracle) scored on `windows` of the simulated `frame`, and
    the ratio of `report`'s RMSE to each, per horizon: ``{"rmse": {oracle: {min: v}},
    "ratio": {oracle: {min: model/oracle}}}``. `known` holds oracle reports already
    computed (by name), so `--model oracle` does not run the filter twice."""
    from forecast.sim.oracle import ORACLES, make_oracle

    rmse: dict[str, dict[str, float]] = {}
    seconds: dict[str, float] = {}
    for name in ORACLES:
        rep = (known or {}).get(name)
        if rep is None:
            import time

            t0 = time.perf_counter()
            rep = score(make_oracle(name, frame, tuple(quantiles)), windows)
            seconds[name] = round(time.perf_counter() - t0, 1)
        rmse[name] = {h: m["rmse"] for h, m in rep["horizons"].items()}
    return {
        "rmse": rmse,
        "ratio": {name: ratios(report, r) for name, r in rmse.items()},
        "seconds": seconds,
    }


def ratios(report: dict[str, Any], oracle_rmse: dict[str, float]) -> dict[str, float | None]:
    """Per horizon (minutes as str): the report's RMSE over the oracle's."""
    out: dict[str, float | None] = {}
    for h, m in report["horizons"].items():
        o = oracle_rmse.get(str(h))
        v = m.get("rmse")
        out[str(h)] = None if not o or v is None else round(float(v) / float(o), 3)
    return out


def ceiling_runs(experiment: str, exclude: set[str] | frozenset[str] = frozenset()) -> list:
    """The oracles' evaluation runs in `experiment` (`glucast evaluate --model oracle-* --mlflow`),
    shaped like training.tracking.find_runs' entries, newest first: an oracle is never trained,
    so its only runs are evaluations."""
    from mlflow.tracking import MlflowClient

    from training import tracking

    tracking._mlflow()  # the store's URI set up as everywhere else
    client = MlflowClient(tracking.tracking_uri())
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    found = []
    for name in sorted(set(ORACLE_MODELS.values())):  # MLflow has no IN for tags
        found += client.search_runs(
            [exp.experiment_id],
            filter_string=f"tags.`{tracking.TAG_MODEL}` = '{name}' AND attributes.status = 'FINISHED'",
        )
    found.sort(key=lambda r: r.info.start_time, reverse=True)
    out = []
    for r in found:
        tags = r.data.tags
        h = tags.get(tracking.TAG_HASH) or tags.get(getattr(tracking, "LEGACY_TAG_HASH", ""))
        if not h or r.info.run_id in exclude:
            continue
        out.append(
            {
                "run_id": r.info.run_id,
                "run_name": r.info.run_name,
                "experiment_id": str(r.info.experiment_id),
                "model": tags[tracking.TAG_MODEL],
                "dataset_hash": h,
                "data": tags.get(tracking.TAG_DATA),
                "start_time": r.info.start_time,
                "metrics": dict(r.data.metrics),
                "url": tracking.run_url(str(r.info.experiment_id), r.info.run_id)
                if hasattr(tracking, "run_url")
                else None,
            }
        )
    return out


def ceiling_ratios(runs: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, float | None]]]:
    """For one dataset-hash group of compare's runs: run_id -> {oracle: {min: RMSE ratio}},
    against the newest run of each oracle in the group (empty when no oracle was scored)."""
    from training.tracking import rmse_by_horizon

    newest: dict[str, dict[int, float]] = {}
    for r in sorted(runs, key=lambda r: r.get("start_time") or 0, reverse=True):
        if r["model"] in ORACLE_MODELS.values() and r["model"] not in newest:
            newest[r["model"]] = rmse_by_horizon(r["metrics"])
    out: dict[str, dict[str, dict[str, float | None]]] = {}
    for r in runs:
        mine = rmse_by_horizon(r["metrics"])
        out[r["run_id"]] = {
            name: {
                str(h): (round(v / o[h], 3) if o.get(h) else None)
                for h, v in mine.items()
                if h in o
            }
            for name, o in sorted(newest.items())
        }
    return out
