"""MLflow: where runs live, what each kind of glucast run records, and the comparison view.

Tracking URI: ``MLFLOW_TRACKING_URI`` if set, else ``sqlite:///mlflow.db`` in the working
directory (MLflow 3's own default; never the deprecated file store). docs/metrics.md is the
table of every metric name, its unit and its step; this module is the only place that names
them. Every run glucast writes has

- params: only those that apply to the run's model or controller (a baseline run carries its
  own constructor arguments and the data/window settings, never ``lstm.*`` or ``trainer.*``);
- metrics: results in consistent units (percent where a share, mg/dL, minutes, seconds);
  per-horizon curves are one metric with ``step`` = horizon in minutes (``test_rmse`` at
  step 5, 10, ... 60), plus scalar headlines at 30 and 60 min (``test_rmse_30``) for the
  runs table;
- inputs: the data as an MLflow dataset (``mlflow.log_input``), digest = the split frame's
  forecast.schema.dataset_hash (its first 36 hex digits: MLflow's digest limit; the full hash
  is the ``dataset_hash`` tag), source = the Parquet file, context = the split;
- tags for lineage: ``dataset_hash``/``training_data_hash``; ``model_sha256`` of the ONNX file
  on the training run, on its registered model version and on every run that used it
  (evaluations, trials, alert replays), which also carry ``training_run_id`` and
  ``registered_model`` (``name/version``); ``glucast.run_kind``; the git commit;
- a description (``mlflow.note.content``).

Experiments glucast creates are tagged ``mlflow.experimentKind = custom_model_development`` so
MLflow 3's UI opens them on their runs instead of its GenAI "send your first trace" page.
Evaluations and alert replays of an exported model are child runs of its training run (in the
training run's experiment), so everything measured about a model is found from the model.
"""

from __future__ import annotations

import json
import os
import subprocess
import urllib.parse
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from forecast.schema import GlucastError

DEFAULT_URI = "sqlite:///mlflow.db"
DEFAULT_UI = "http://127.0.0.1:5000"  # where `mlflow ui` serves a local store
UI_ENV = "GLUCAST_MLFLOW_UI"

TAG_HASH = "dataset_hash"
TAG_TRAIN_HASH = "training_data_hash"
LEGACY_TAG_HASH = "glucast.dataset_hash"  # runs written before the plain tag; still read
TAG_MODEL = "glucast.model"
TAG_DATA = "glucast.data"
TAG_KIND = "glucast.run_kind"  # train | finetune | evaluate | trial | alerts
TAG_SHA = "model_sha256"
TAG_TRAINING_RUN = "training_run_id"
TAG_REGISTERED = "registered_model"  # "glucast-lstm/3"
TAG_NOTE = "mlflow.note.content"  # MLflow's run / experiment description
TAG_EXPERIMENT_KIND = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
DIGEST_CHARS = 36  # MLflow's limit on a dataset digest
SUMMARY_HORIZONS = (30, 60)
# per-horizon quantities of forecast.metrics.evaluate_forecast logged as curves (step = min)
CURVES = ("rmse", "mae", "mard", "bias", "coverage", "width", "lag_min")


class TrackingError(GlucastError, RuntimeError):
    """The MLflow store cannot be used as asked (unknown experiment, mixed hashes...)."""


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI


def ui_base() -> str:
    """Where a browser finds the MLflow UI of this store: ``$GLUCAST_MLFLOW_UI``, the tracking
    URI itself when it is an MLflow server, else `mlflow ui`'s default address."""
    if os.environ.get(UI_ENV):
        return os.environ[UI_ENV].rstrip("/")
    uri = tracking_uri()
    if uri.startswith(("http://", "https://")):
        return uri.rstrip("/")
    return DEFAULT_UI


# MLflow 3.18's UI opens every experiment in its GenAI view (traces) unless the link or the
# browser's saved choice says "Model training"; the experiment tag alone does not do it
# (checked in headless Chromium against `mlflow server`, docs/mlflow_experiment.png).
UI_VIEW = "workflowType=machine_learning"


def experiment_url(experiment_id: str) -> str:
    return f"{ui_base()}/#/experiments/{experiment_id}?{UI_VIEW}"


def run_url(experiment_id: str, run_id: str) -> str:
    return f"{ui_base()}/#/experiments/{experiment_id}/runs/{run_id}?{UI_VIEW}"


def compare_url(experiment_ids: list[str], run_ids: list[str]) -> str:
    """MLflow's compare-runs page for these runs (the route its own UI builds)."""
    runs = urllib.parse.quote(json.dumps(list(run_ids), separators=(",", ":")))
    exps = urllib.parse.quote(json.dumps(sorted(set(experiment_ids)), separators=(",", ":")))
    return f"{ui_base()}/#/compare-runs?runs={runs}&experiments={exps}&{UI_VIEW}"


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


def _client():
    from mlflow.tracking import MlflowClient

    _mlflow()
    return MlflowClient(tracking_uri())


def experiment_id(name: str) -> str:
    """The id of experiment `name`, created if needed and tagged so MLflow 3's UI opens it on
    its runs (an experiment without a kind opens on the GenAI traces page)."""
    client = _client()
    exp = client.get_experiment_by_name(name)
    if exp is None:
        eid = client.create_experiment(name, tags={TAG_EXPERIMENT_KIND: EXPERIMENT_KIND})
        return str(eid)
    if exp.tags.get(TAG_EXPERIMENT_KIND) != EXPERIMENT_KIND:
        client.set_experiment_tag(exp.experiment_id, TAG_EXPERIMENT_KIND, EXPERIMENT_KIND)
    return str(exp.experiment_id)


# --------------------------------------------------------------------------- metric names


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v


def metrics_from_evaluation(report: dict[str, Any], prefix: str = "test") -> dict[str, float]:
    """Headline scalars of forecast.metrics.evaluate_forecast's report at 30 and 60 min
    (``<prefix>_rmse_30`` ...: RMSE, MAE, MARD, bias, coverage, width, lag, Clarke/Parkes A
    and A+B), for the runs table. Every horizon: the curves of `horizon_curves`."""
    out: dict[str, float] = {}
    for key, m in report.get("horizons", {}).items():
        minutes = int(key)

        def put(name: str, v: Any, minutes: int = minutes) -> None:
            if _finite(v):
                out[f"{prefix}_{name}_{minutes}"] = float(v)

        if minutes in SUMMARY_HORIZONS:
            put("rmse", m.get("rmse"))
            for name in ("mae", "mard", "bias", "coverage", "width", "lag_min"):
                put(name, m.get(name))
            for grid in ("clarke", "parkes"):
                z = m.get(grid) or {}
                put(f"{grid}_A", z.get("A"))
                if z.get("A") is not None and z.get("B") is not None:
                    put(f"{grid}_AB", z["A"] + z["B"])
    return out


def horizon_curves(report: dict[str, Any], prefix: str = "test") -> dict[str, dict[int, float]]:
    """``{"<prefix>_rmse": {5: 6.1, 10: 9.0, ...}, ...}``: one curve per quantity, keyed by the
    horizon in minutes (the MLflow step), so the UI draws RMSE against horizon."""
    out: dict[str, dict[int, float]] = {}
    for key, m in report.get("horizons", {}).items():
        minutes = int(key)
        for name in CURVES:
            if _finite(m.get(name)):
                out.setdefault(f"{prefix}_{name}", {})[minutes] = float(m[name])
        for grid in ("clarke", "parkes"):
            a = (m.get(grid) or {}).get("A")
            if _finite(a):
                out.setdefault(f"{prefix}_{grid}_A", {})[minutes] = float(a)
    return {k: dict(sorted(v.items())) for k, v in out.items()}


def log_evaluation(report: dict[str, Any], prefix: str = "test") -> None:
    """Headline scalars and per-horizon curves of one evaluation report."""
    log_metrics(metrics_from_evaluation(report, prefix))
    log_curves(horizon_curves(report, prefix))


def interventional_metrics(iv: Mapping[str, Any]) -> dict[str, float]:
    """The scalars of training.interventional.interventional_accuracy (windows, subjects,
    reconstruction RMSE, violation shares in %, the 60-min relative error of the +1 U bolus
    in %). Its per-horizon changes: `interventional_curves`."""
    out: dict[str, float] = {}
    for k in ("windows", "subjects", "reconstruction_rmse_mgdl", "monotonicity_violation_pct"):
        if _finite(iv.get(k)):
            out[f"interventional_{k}"] = float(iv[k])
    if _finite(iv.get("relative_error_60")):  # a fraction in the report
        out["interventional_relative_error_60"] = 100.0 * float(iv["relative_error_60"])
    for name, res in (iv.get("interventions") or {}).items():
        for k in ("monotonicity_violation_pct", "any_quantile_violation_pct"):
            if _finite(res.get(k)):
                out[f"interventional_{name}_{k}"] = float(res[k])
    return out


def interventional_curves(iv: Mapping[str, Any]) -> dict[str, dict[int, float]]:
    """Per intervention, the mean true and predicted glucose change (mg/dL) and the relative
    error of the mean (%), step = horizon in minutes."""
    out: dict[str, dict[int, float]] = {}
    for name, res in (iv.get("interventions") or {}).items():
        for h, hm in (res.get("horizons") or {}).items():
            for q, metric, scale in (
                ("mean_true_change", "true_change", 1.0),
                ("mean_predicted_change", "predicted_change", 1.0),
                ("relative_error_of_mean", "relative_error", 100.0),
            ):
                if _finite(hm.get(q)):
                    out.setdefault(f"interventional_{name}_{metric}", {})[int(h)] = scale * float(
                        hm[q]
                    )
    return out


def alert_metrics(res: Mapping[str, Any]) -> dict[str, float]:
    """serving.insilico.alert_eval.evaluate_alerts' result as metrics: per rule, sensitivity (%),
    median lead (min), false alerts per day and counts; the replayed days."""
    out: dict[str, float] = {}
    for rule, r in res.items():
        if not isinstance(r, Mapping) or "sensitivity" not in r:
            continue
        if _finite(r.get("sensitivity")):
            out[f"alert_{rule}_sensitivity"] = 100.0 * float(r["sensitivity"])
        for key, name in (("lead_min", "lead_min"), ("false_per_day", "false_per_day")):
            if _finite(r.get(key)):
                out[f"alert_{rule}_{name}"] = float(r[key])
        for key in ("episodes", "warned", "alerts"):
            if _finite(r.get(key)):
                out[f"alert_{rule}_{key}"] = float(r[key])
    for key in ("days", "subjects"):
        if _finite(res.get(key)):
            out[f"alert_{key}"] = float(res[key])
    return out


# --------------------------------------------------------------------------- params

# window settings that data.* already states (in minutes)
_WINDOW_DUPLICATES = ("past_slots", "horizon_slots", "slot_minutes", "max_past_gap_slots")


def train_params(
    cfg: Any, window: Any, model_params: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The parameters that apply to `cfg.model` (a training.config.TrainConfig): the data and
    window settings and the quantiles for every model; the head, trainer, export and the
    model's own section for deep models; for a baseline its constructor arguments
    (`model_params`, as ``<model>.<name>``), never another model's options."""
    from training.config import DEEP_MODELS

    d = cfg.to_dict()
    out: dict[str, Any] = {"model": cfg.model}
    out.update({f"data.{k}": v for k, v in d["data"].items()})
    out.update(
        {f"window.{k}": v for k, v in window.to_dict().items() if k not in _WINDOW_DUPLICATES}
    )
    out["head.quantiles"] = d["head"]["quantiles"]
    if cfg.model in DEEP_MODELS:
        for section in ("head", cfg.model, "trainer", "export"):
            out.update({f"{section}.{k}": v for k, v in d[section].items()})
    for k, v in (model_params or {}).items():
        if k != "quantiles":
            out[f"{cfg.model}.{k}"] = "fitted" if v is None else v
    return out


# --------------------------------------------------------------------------- runs


@contextmanager
def run(
    experiment: str | None,
    run_name: str | None = None,
    tags: dict[str, str] | None = None,
    *,
    kind: str | None = None,
    description: str | None = None,
    parent_run_id: str | None = None,
    started_s: float | None = None,
) -> Iterator[Any]:
    """Start (and end) an MLflow run; yields the mlflow.ActiveRun.

    With `parent_run_id` the run is a child of that run, in the parent's experiment (so MLflow
    nests it under the model it scores); `experiment` is then only the fallback when the
    parent is not in this store. `started_s` (a time.time()) dates the run's start back to
    when the work began, so its duration is the work's (a trial logged after it ran)."""
    mlflow = _mlflow()
    all_tags = {k: str(v) for k, v in (tags or {}).items() if v is not None}
    commit = git_commit()
    if commit:
        all_tags.setdefault("mlflow.source.git.commit", commit)
    if kind:
        all_tags[TAG_KIND] = kind
    parent = _find_run(parent_run_id) if parent_run_id else None
    if parent is not None:
        exp_id = parent.info.experiment_id
        experiment_id(_client().get_experiment(exp_id).name)  # tag it for the UI if needed
    else:
        exp_id = experiment_id(experiment or "glucast")
    if started_s is not None:
        if description:
            all_tags[TAG_NOTE] = description
        if parent is not None:
            all_tags["mlflow.parentRunId"] = parent.info.run_id
        from mlflow.tracking.context.registry import resolve_tags

        # what start_run adds itself (source, user), so the UI's Source column is filled
        created = _client().create_run(
            exp_id, start_time=int(started_s * 1000), tags=resolve_tags(all_tags),
            run_name=run_name,
        )  # fmt: skip
        with mlflow.start_run(run_id=created.info.run_id) as active:
            yield active
        return
    with mlflow.start_run(
        run_name=run_name,
        experiment_id=exp_id,
        tags=all_tags,
        description=description,
        parent_run_id=parent.info.run_id if parent is not None else None,
    ) as active:
        yield active


def _find_run(run_id: str | None) -> Any | None:
    """The run with this id in the current store, or None (a model trained elsewhere)."""
    if not run_id:
        return None
    from mlflow.exceptions import MlflowException

    try:
        return _client().get_run(str(run_id))
    except MlflowException:
        return None


def set_description(text: str) -> None:
    """The active run's description (shown on its page and in the runs table)."""
    _mlflow().set_tag(TAG_NOTE, text)


def set_tags(tags: Mapping[str, Any]) -> None:
    _mlflow().set_tags({k: str(v) for k, v in tags.items() if v is not None})


def log_params(params: dict[str, Any]) -> None:
    mlflow = _mlflow()
    clean = {
        k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in params.items()
    }
    items = list(clean.items())
    for i in range(0, len(items), 90):  # MLflow caps a batch at 100 params
        mlflow.log_params(dict(items[i : i + 90]))


def log_metrics(metrics: dict[str, float], step: int | None = None) -> None:
    clean = {k: float(v) for k, v in metrics.items() if _finite(v)}
    if clean:
        _mlflow().log_metrics(clean, step=step)


def log_curves(curves: Mapping[str, Mapping[int, float]]) -> None:
    """Each curve's points as one metric history, step = the key (horizon in minutes)."""
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    points = [
        Metric(name, float(v), now, int(step))
        for name, curve in curves.items()
        for step, v in curve.items()
        if _finite(v)
    ]
    mlflow = _mlflow()
    run_id = mlflow.active_run().info.run_id
    client = _client()
    for i in range(0, len(points), 900):  # MLflow caps a batch at 1000 metrics
        client.log_batch(run_id, metrics=points[i : i + 900])


def log_dataset(
    frame: Any, digest: str, *, context: str, source: str | Path | None, name: str
) -> None:
    """The frame as an MLflow dataset input of the active run: its schema and row count, the
    given digest (a forecast.schema.dataset_hash, cut to MLflow's 36 characters), where it
    came from and the split it is (`context`: training, validation, testing...)."""
    import warnings

    import mlflow.data
    from mlflow.data.code_dataset_source import CodeDatasetSource

    # a local path matches two of MLflow's registered source types (same class); it says so
    # in a warning on every run
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The specified dataset source can be")
        ds = mlflow.data.from_pandas(
            frame,
            source=str(Path(source).resolve()) if source else CodeDatasetSource(tags={}),
            name=name,
            digest=str(digest)[:DIGEST_CHARS],
        )
    _mlflow().log_input(ds, context=context, tags={TAG_HASH: str(digest)})


def log_artifact(path: str | Path, artifact_path: str | None = None) -> None:
    mlflow = _mlflow()
    p = Path(path)
    if p.is_dir():
        mlflow.log_artifacts(str(p), artifact_path=artifact_path or p.name)
    else:
        mlflow.log_artifact(str(p), artifact_path=artifact_path)


def log_onnx_model(
    model_dir: str | Path, registered_name: str, description: str | None = None
) -> str | None:
    """Log model.onnx as an MLflow ONNX model and register it; returns the model version.

    The version and the registered model get `description`; the version is tagged with the
    ONNX file's sha256 and the test dataset hash from the manifest (lineage on both ends)."""
    import onnx

    mlflow = _mlflow()
    model_dir = Path(model_dir)
    model = onnx.load(str(model_dir / "model.onnx"))
    # save_as_external_data=False: the flavour would otherwise move the weights out of the
    # graph (and mutate `model`); the contract is one self-contained file.
    info = mlflow.onnx.log_model(
        model,
        name="onnx-model",
        registered_model_name=registered_name,
        save_as_external_data=False,
        pip_requirements=["onnxruntime"],
        extra_files=[str(model_dir / "manifest.json")],
    )
    version = getattr(info, "registered_model_version", None)
    if version is None:
        return None
    version = str(version)
    manifest = read_manifest(model_dir)
    client = _client()
    for key, value in (
        (TAG_SHA, manifest.get("sha256")),
        (TAG_HASH, manifest.get("test_dataset_hash")),
        (TAG_TRAIN_HASH, manifest.get("training_data_hash")),
    ):
        if value:
            client.set_model_version_tag(registered_name, version, key, str(value))
    if description:
        client.update_model_version(registered_name, version, description=description)
        reg = client.get_registered_model(registered_name)
        if not reg.description:
            client.update_registered_model(
                registered_name,
                description=f"glucast {manifest.get('model', '')} glucose forecaster "
                "(ONNX, model contract glucast-forecaster/1); each version's description "
                "says what it was trained on and how it scored",
            )
    return version


# --------------------------------------------------------------------------- lineage


def read_manifest(model_dir: str | Path) -> dict[str, Any]:
    """manifest.json of an exported model directory ({} when there is none: a baseline)."""
    path = Path(model_dir) / "manifest.json"
    if not path.is_file():
        return {}
    try:
        d = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TrackingError(f"{path}: unreadable manifest ({e})") from e
    return d if isinstance(d, dict) else {}


def registered_version(run_id: str) -> str | None:
    """``name/version`` of the model version registered from training run `run_id`."""
    if not run_id:
        return None
    from mlflow.exceptions import MlflowException

    try:
        versions = _client().search_model_versions(f"run_id = '{run_id}'")
    except MlflowException:
        return None
    if not versions:
        return None
    v = max(versions, key=lambda mv: int(mv.version))
    return f"{v.name}/{v.version}"


def lineage_tags(model_dir: str | Path | None) -> dict[str, str]:
    """Tags that tie a run to the exported model it used: ``model_sha256``, ``training_run_id``
    and ``registered_model`` (when the training run is in this store), from the manifest."""
    if not model_dir:
        return {}
    m = read_manifest(model_dir)
    tags = {TAG_SHA: m.get("sha256"), TAG_TRAINING_RUN: m.get("mlflow_run_id")}
    if m.get("model"):
        tags[TAG_MODEL] = m["model"]
    if m.get("mlflow_run_id"):
        tags[TAG_REGISTERED] = registered_version(str(m["mlflow_run_id"]))
    return {k: str(v) for k, v in tags.items() if v}


def _run_ref(active: Any) -> dict[str, str]:
    info = active.info
    return {
        "run_id": info.run_id,
        "experiment_id": str(info.experiment_id),
        "url": run_url(str(info.experiment_id), info.run_id),
    }


# Controller settings that only mean something for some controllers or modes.
_TRIAL_ONLY = {
    "model_dir": ("mpc", "physio-mpc"),
}
_TRIAL_MODE_ONLY = {"accept_prob": "advisory", "accept_delay_min": "advisory"}
# What `TrialResult.run_info` measures about the run (results, not settings).
_TRIAL_RESULTS = {
    "wall_s": "trial_wall_s",
    "cycles": "trial_cycles",
    "decision_ms_p50": "decision_ms_p50",
    "decision_ms_p99": "decision_ms_p99",
    "forecaster_calls": "forecaster_calls",
}


def trial_params(run_info: Mapping[str, Any]) -> dict[str, Any]:
    """The trial settings that apply to its controller and mode (a basal-bolus trial has no
    model directory; only advisory trials have acceptance settings); results are metrics."""
    controller, mode = run_info.get("controller"), run_info.get("mode", "closed")
    out = {}
    for k, v in run_info.items():
        if k in _TRIAL_RESULTS or k in ("model_sha256", "glucose_source"):
            continue
        if k in _TRIAL_ONLY and controller not in _TRIAL_ONLY[k]:
            continue
        if k in _TRIAL_MODE_ONLY and mode != _TRIAL_MODE_ONLY[k]:
            continue
        if v is None or not isinstance(v, (str, int, float, bool)):
            continue
        out[k] = v
    return out


def log_trial_run(
    experiment: str, data: Mapping[str, Any], report: str | Path | None = None
) -> dict[str, str]:
    """One MLflow run of an in-silico trial (`TrialResult.to_json()`): settings as params,
    cohort outcomes and run measurements as metrics, lineage tags of the model it used, the
    report folder as artifacts. Returns ``{"run_id", "experiment_id", "url"}``."""
    info = data["run"]
    cohort = data["cohort"]
    model_dir = info.get("model_dir") if info.get("controller") in ("mpc",) else None
    tags = lineage_tags(model_dir)
    if info.get("model_sha256"):
        tags[TAG_SHA] = str(info["model_sha256"])
    mode = info.get("mode", "closed")
    name = f"trial-{info['controller']}" + ("" if mode == "closed" else f"-{mode}")
    days = info.get("days")
    desc = (
        f"In-silico trial of the {info['controller']} controller ({mode}) on virtual patients "
        f"{info.get('patients')}, {days:g} days, seed {info.get('seed')}, carb error "
        f"{info.get('carb_error')}, sensor {info.get('sensor')}. "
        + (
            f"Forecaster: training run {tags[TAG_TRAINING_RUN]} "
            f"({tags.get(TAG_REGISTERED) or 'not registered here'}), sha256 "
            f"{tags.get(TAG_SHA, '?')[:12]}. "
            if TAG_TRAINING_RUN in tags
            else ""
        )
        + _trial_headline(cohort)
    )
    import time

    wall = info.get("wall_s")
    started = time.time() - float(wall) if _finite(wall) else None
    with run(
        experiment, run_name=name, tags=tags, kind="trial", description=desc, started_s=started
    ) as active:
        log_params(trial_params(info))
        metrics = {f"cohort_{k}": v for k, v in cohort.items()}
        if _finite(cohort.get("sim_out_of_range")):  # a mean of 0/1 flags: a share, so %
            metrics["cohort_sim_out_of_range"] = 100.0 * float(cohort["sim_out_of_range"])
        log_metrics(metrics)
        log_metrics({m: info.get(k) for k, m in _TRIAL_RESULTS.items()})
        if report is not None:
            log_artifact(Path(report).parent, "trial_report")
        return _run_ref(active)


def _trial_headline(cohort: Mapping[str, Any]) -> str:
    def f(k: str) -> str:
        v = cohort.get(k)
        return "-" if not _finite(v) else f"{v:.1f}"

    return (
        f"Cohort mean TIR {f('tir')} %, TBR<70 {f('tbr70')} %, TBR<54 {f('tbr54')} %, "
        f"supervisor interventions {f('interventions_per_day')}/day."
    )


def log_alert_run(
    experiment: str,
    res: Mapping[str, Any],
    *,
    model: str,
    frame: Any = None,
    data_path: str | Path | None = None,
    params: Mapping[str, Any] | None = None,
    sweep: Any = None,
) -> dict[str, str]:
    """An alert replay (`glucast alerts evaluate`) as a child run of the scored model's
    training run (or a run in `experiment` for a baseline / a model trained elsewhere): the
    rule as params, scores as metrics, the replayed frame as a dataset input. A quantile
    sweep (a frame with one row per rule) is logged with step = quantile x 100."""
    tags = lineage_tags(model if Path(model).is_dir() else None)
    tags.setdefault(TAG_MODEL, Path(model).name if Path(model).is_dir() else model)
    split = str(res.get("split", "test"))
    parent = tags.get(TAG_TRAINING_RUN)
    desc = (
        f"Alert replay of {tags[TAG_MODEL]} on the {split} split of {data_path or 'a frame'}: "
        "predicted-low/high alerts against threshold alerts, one cycle per reading."
    )
    with run(
        experiment,
        run_name=f"alerts-{tags[TAG_MODEL]}" + ("-sweep" if sweep is not None else ""),
        tags=tags,
        kind="alerts",
        description=desc,
        parent_run_id=parent,
    ) as active:
        if params:
            log_params(dict(params))  # None stays visible: "None" = off / the default
        if frame is not None:
            from forecast.schema import dataset_hash

            h = dataset_hash(frame)
            set_tags({TAG_HASH: h})
            log_dataset(frame, h, context=split, source=data_path, name=f"alerts-{split}")
        if sweep is None:
            log_metrics(alert_metrics(res))
        else:
            _log_sweep(sweep)
        return _run_ref(active)


def _log_sweep(frame: Any) -> None:
    rows = frame[frame["rule"] == "predicted_low"]
    curves: dict[str, dict[int, float]] = {}
    for _, r in rows.iterrows():
        step = int(round(100 * float(r["quantile"])))
        for key, name, scale in (
            ("sensitivity", "alert_sweep_sensitivity", 100.0),
            ("lead_min", "alert_sweep_lead_min", 1.0),
            ("false_per_day", "alert_sweep_false_per_day", 1.0),
        ):
            if _finite(r.get(key)):
                curves.setdefault(name, {})[step] = scale * float(r[key])
    log_curves(curves)


def log_evaluation_run(
    experiment: str,
    out: Mapping[str, Any],
    *,
    model: str,
    frame: Any = None,
    data_path: str | Path | None = None,
) -> dict[str, str]:
    """`glucast evaluate`'s result as a child run of the model's training run (or a run in
    `experiment` for a baseline or a model trained elsewhere): accuracy curves and headlines,
    BGLP scores, the interventional check, the scored frame as a dataset input."""
    is_dir = Path(model).is_dir()
    tags = lineage_tags(model if is_dir else None)
    tags.setdefault(TAG_MODEL, str(out.get("model", model)))
    if out.get("dataset_hash"):
        tags[TAG_HASH] = str(out["dataset_hash"])
    parent = tags.get(TAG_TRAINING_RUN)
    iv = out.get("interventional")
    desc = (
        f"Evaluation of {tags[TAG_MODEL]} on the test split of {data_path or 'a frame'} "
        f"(test dataset hash {str(out.get('dataset_hash', '?'))[:12]})"
        + (", with the interventional check (re-simulated insulin changes)" if iv else "")
        + "."
    )
    with run(
        experiment,
        run_name=f"evaluate-{tags[TAG_MODEL]}",
        tags=tags,
        kind="evaluate",
        description=desc,
        parent_run_id=parent,
    ) as active:
        if not is_dir:
            log_params({"model": model})
        if frame is not None:
            log_dataset(
                frame,
                str(out.get("dataset_hash")),
                context="testing",
                source=data_path,
                name="test",
            )
        log_evaluation(dict(out))
        bglp = out.get("bglp") or {}
        for h in ("30", "60"):
            for k in ("rmse", "mae"):
                v = (bglp.get(h) or {}).get(k)
                if _finite(v):
                    log_metrics({f"bglp_{k}_{h}": v})
        if iv:
            log_metrics(interventional_metrics(iv))
            log_curves(interventional_curves(iv))
        return _run_ref(active)


# --------------------------------------------------------------------------- comparison


def find_runs(experiment: str) -> list[dict[str, Any]]:
    """Finished forecaster runs of `experiment` (those with a test dataset hash, not their
    child evaluation runs), newest first."""
    mlflow = _mlflow()
    client = _client()
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
        h = tags.get(TAG_HASH) or tags.get(LEGACY_TAG_HASH)
        if not h or tags.get(TAG_KIND) not in (None, "train", "finetune"):
            continue
        metrics = dict(r.data.metrics)
        if "test_rmse" in metrics:  # the curve, step = horizon (runs before it: scalars)
            for m in client.get_metric_history(r.info.run_id, "test_rmse"):
                metrics[f"test_rmse_{m.step}"] = m.value
        out.append(
            {
                "run_id": r.info.run_id,
                "run_name": r.info.run_name,
                "experiment_id": str(r.info.experiment_id),
                "model": tags.get(TAG_MODEL, "?"),
                "dataset_hash": h,
                "data": tags.get(TAG_DATA),
                "start_time": r.info.start_time,
                "metrics": metrics,
                "url": run_url(str(r.info.experiment_id), r.info.run_id),
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
