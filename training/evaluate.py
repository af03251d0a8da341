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
