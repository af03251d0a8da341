"""MLflow: where runs live, what a run records, and the researcher's comparison view.

Tracking URI: ``MLFLOW_TRACKING_URI`` if set, else ``sqlite:///mlflow.db`` in the working
directory (MLflow 3's own default; never the deprecated file store). A run records

- params: the flattened training config (``trainer.lr`` …) and the window config;
- tags: ``glucast.dataset_hash`` (the TEST split's forecast.schema.dataset_hash — runs are
  only compared on equal hashes), ``glucast.training_data_hash``, ``glucast.model``,
  ``glucast.data``, ``mlflow.source.git.commit``;
- metrics: Lightning's training curves, then ``test_<metric>_<minutes>`` per horizon
  (rmse at every horizon; mae, mard, coverage, width, lag, Clarke/Parkes A and A+B at
  30 and 60 min) and ``val_*`` from the final model;
- artifacts: ``evaluation.json``, plots, the model directory (model.onnx + manifest.json)
  or a baseline's JSON; the ONNX model is also logged as an MLflow model and registered
  (name ``glucast-<model>``).
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from forecast.schema import GlucastError

DEFAULT_URI = "sqlite:///mlflow.db"
TAG_HASH = "glucast.dataset_hash"
TAG_TRAIN_HASH = "glucast.training_data_hash"
TAG_MODEL = "glucast.model"
TAG_DATA = "glucast.data"
SUMMARY_HORIZONS = (30, 60)


class TrackingError(GlucastError, RuntimeError):
    """The MLflow store cannot be used as asked (unknown experiment, mixed hashes...)."""


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI


def git_commit(path: str | Path | None = None) -> str | None:
    """The checkout's HEAD commit (with a '-dirty' suffix if it has changes), or None."""
    cwd = Path(path) if path else Path(__file__).resolve().parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10
        )
        if sha.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=10,
        )
        return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def _mlflow():
    import logging

    import mlflow

    # MLflow's alembic migrations log at INFO on every new sqlite store; keep stderr useful.
    logging.getLogger("alembic").setLevel(logging.WARNING)
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    mlflow.set_tracking_uri(tracking_uri())
    return mlflow


def metrics_from_evaluation(report: dict[str, Any], prefix: str = "test") -> dict[str, float]:
    """Flatten forecast.metrics.evaluate_forecast's report into MLflow metric names."""
    out: dict[str, float] = {}
    for key, m in report.get("horizons", {}).items():
        minutes = int(key)

        def put(name: str, v: Any, minutes: int = minutes) -> None:
            if isinstance(v, (int, float)) and v == v:  # skip None and NaN
                out[f"{prefix}_{name}_{minutes}"] = float(v)

        put("rmse", m.get("rmse"))
        if minutes in SUMMARY_HORIZONS:
            for name in ("mae", "mard", "bias", "coverage", "width", "lag_min"):
                put(name, m.get(name))
            for grid in ("clarke", "parkes"):
                z = m.get(grid) or {}
                put(f"{grid}_A", z.get("A"))
                if z.get("A") is not None and z.get("B") is not None:
                    put(f"{grid}_AB", z["A"] + z["B"])
    return out


@contextmanager
def run(
    experiment: str, run_name: str | None = None, tags: dict[str, str] | None = None
) -> Iterator[Any]:
    """Start (and end) an MLflow run in `experiment`; yields the mlflow.ActiveRun."""
    mlflow = _mlflow()
    mlflow.set_experiment(experiment)
    all_tags = dict(tags or {})
    commit = git_commit()
    if commit:
        all_tags.setdefault("mlflow.source.git.commit", commit)
    with mlflow.start_run(run_name=run_name, tags=all_tags) as active:
        yield active


def log_params(params: dict[str, Any]) -> None:
    mlflow = _mlflow()
    clean = {
        k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in params.items()
    }
    items = list(clean.items())
    for i in range(0, len(items), 90):  # MLflow caps a batch at 100 params
        mlflow.log_params(dict(items[i : i + 90]))


def log_metrics(metrics: dict[str, float]) -> None:
    _mlflow().log_metrics({k: float(v) for k, v in metrics.items()})


def log_artifact(path: str | Path, artifact_path: str | None = None) -> None:
    mlflow = _mlflow()
    p = Path(path)
    if p.is_dir():
        mlflow.log_artifacts(str(p), artifact_path=artifact_path or p.name)
    else:
        mlflow.log_artifact(str(p), artifact_path=artifact_path)


def log_onnx_model(model_dir: str | Path, registered_name: str) -> str | None:
    """Log model.onnx as an MLflow ONNX model and register it; returns the model version."""
    import onnx

    mlflow = _mlflow()
    model = onnx.load(str(Path(model_dir) / "model.onnx"))
    # save_as_external_data=False: the flavour would otherwise move the weights out of the
    # graph (and mutate `model`); the contract is one self-contained file.
    info = mlflow.onnx.log_model(
        model,
        name="onnx-model",
        registered_model_name=registered_name,
        save_as_external_data=False,
        pip_requirements=["onnxruntime"],
        extra_files=[str(Path(model_dir) / "manifest.json")],
    )
    version = getattr(info, "registered_model_version", None)
    return None if version is None else str(version)


# --------------------------------------------------------------------------- comparison


def find_runs(experiment: str) -> list[dict[str, Any]]:
    """Finished runs of `experiment` that carry a dataset hash, newest first."""
    mlflow = _mlflow()
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri())
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        names = [e.name for e in client.search_experiments()]
        raise TrackingError(
            f"no MLflow experiment named {experiment!r} at {tracking_uri()}; it has {names}"
        )
    runs = mlflow.search_runs(
        experiment_ids=[exp.experiment_id],
        filter_string="attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        output_format="list",
    )
    out = []
    for r in runs:
        tags = r.data.tags
        if TAG_HASH not in tags:
            continue
        out.append(
            {
                "run_id": r.info.run_id,
                "run_name": r.info.run_name,
                "model": tags.get(TAG_MODEL, "?"),
                "dataset_hash": tags[TAG_HASH],
                "data": tags.get(TAG_DATA),
                "start_time": r.info.start_time,
                "metrics": dict(r.data.metrics),
            }
        )
    return out


def group_by_hash(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Runs grouped by test dataset hash: the only sets within which numbers compare.

    Groups are ordered by their newest run (so the first group is the latest experiment)."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault(r["dataset_hash"], []).append(r)
    ordered = sorted(groups.items(), key=lambda kv: -max(r["start_time"] or 0 for r in kv[1]))
    return [{"dataset_hash": h, "runs": rs} for h, rs in ordered]


def rmse_by_horizon(metrics: dict[str, float]) -> dict[int, float]:
    out = {}
    for k, v in metrics.items():
        if k.startswith("test_rmse_"):
            try:
                out[int(k.rsplit("_", 1)[1])] = v
            except ValueError:
                continue
    return dict(sorted(out.items()))
