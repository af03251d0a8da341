"""`glucast benchmark`: models x datasets x seeds x splits, GlucoBench-style tables.

For each dataset and each split — ``chronological`` (every subject's record cut by time:
in distribution) and ``subjects`` (a fixed set of held-out subjects: out of distribution) —
the frame is split and windowed ONCE (training.splits.build_splits, forecast.windows), and
every model is fitted on those training windows and scored on those test windows, so all
numbers of one table share one test dataset hash. Models:

- glucast's baselines (persistence, linear, ridge, physio) — deterministic, one run;
- glucast's deep models (lstm, transformer), one run per seed (training.pipeline.fit_module,
  interval conformally calibrated on the validation split as `glucast train` does; no ONNX
  export: the benchmark measures accuracy);
- ``lstm+sim`` / ``transformer+sim``: the same, started from weights pretrained on a
  simulated cohort (``pretrain_sim``, windowed like the dataset; one pretraining per seed and
  window layout, shared by the tables) and then trained on the dataset's training windows
  with the pretraining's input normalisation kept, as `glucast finetune` does;
- peers' models through adapters: ``glupredkit:<model>`` (training/peers/glupredkit.py,
  GluPredKit's own code in its own venv; point forecasts, so no interval coverage).

Scores: forecast.metrics.evaluate_forecast through training.evaluate.score (RMSE, MAE, MARD,
Clarke A+B, coverage of the 5-95 % interval at 30 and 60 min), reported as mean ± SD over
seeds (SD only where a model has several runs).

Tracking: one MLflow parent run per benchmark, one child run per dataset x split x model x
seed (tag ``mlflow.parentRunId``), each tagged with the test dataset hash and with
``glucast.benchmark.child_hash`` — the hash of everything that decides its numbers (dataset
test and training hashes, split, model, seed, training config, peer version). A child run
with that hash that finished (tag ``glucast.benchmark.complete``) is not redone: an
interrupted benchmark resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from forecast.schema import GlucastError

SPLITS = ("chronological", "subjects")
SPLIT_TITLES = {
    "chronological": "held-out days (chronological per subject, in distribution)",
    "subjects": "held-out subjects (out of distribution)",
}
BASELINES = ("persistence", "linear", "ridge", "physio")
DEEP = ("lstm", "transformer")
#: A deep model pretrained on a simulated cohort (BenchmarkConfig.pretrain_sim) and then
#: trained on the dataset's training windows from those weights (issue 15, item 6).
PRETRAIN_SUFFIX = "+sim"
PRETRAINED = tuple(m + PRETRAIN_SUFFIX for m in DEEP)
PEER_PREFIX = "glupredkit:"
DEFAULT_MODELS = (
    "persistence",
    "ridge",
    "physio",
    "lstm",
    "glupredkit:zero_order",
    "glupredkit:ridge",
    "glupredkit:loop",
)
TABLE_HORIZONS = (30, 60)
TAG_CHILD = "glucast.benchmark.child_hash"
TAG_PARENT = "glucast.benchmark.hash"
TAG_COMPLETE = "glucast.benchmark.complete"
#: (column title, MLflow metric stem, decimals) of the tables, at each of TABLE_HORIZONS
COLUMNS = (
    ("RMSE", "rmse", 2),
    ("MAE", "mae", 2),
    ("MARD %", "mard", 1),
    ("Clarke A+B %", "clarke_AB", 1),
    ("90 % cover %", "coverage", 1),
)


class BenchmarkError(GlucastError, ValueError):
    """A benchmark cannot run as asked (unknown model or dataset, too few subjects...)."""


# --------------------------------------------------------------------------- datasets


@dataclass
class Dataset:
    """A dataset by name: an ingested frame, a parquet file, files + reader format, or the
    simulator (``sim:PATIENTS:DAYS``)."""

    name: str
    path: str | None = None
    format: str | None = None
    frame: pd.DataFrame | None = field(default=None, repr=False)

    def load(self) -> pd.DataFrame:
        from forecast.schema import read_parquet

        if self.frame is not None:
            return self.frame
        if self.format == "sim":
            self.frame = _simulate(self.path or "adults:7")
        elif self.path and self.path.endswith(".parquet") and not self.format:
            self.frame = read_parquet(self.path)
        elif self.path:
            import forecast.io as fio

            frame, report = fio.read([self.path], self.format)
            self.frame = frame
        else:
            raise BenchmarkError(f"dataset {self.name!r} has neither a frame nor a path")
        return self.frame

    def describe(self) -> str:
        if self.format == "sim":
            return f"simulated ({self.path})"
        return f"{self.path} ({self.format or 'parquet'})" if self.path else "frame"


def parse_dataset(spec: str) -> Dataset:
    """``NAME=PATH[:FORMAT]``, ``PATH.parquet`` or ``sim[:PATIENTS:DAYS]`` (e.g. sim:adults:7)."""
    spec = spec.strip()
    if spec == "sim" or spec.startswith("sim:"):
        rest = spec[4:] or "adults:7"
        return Dataset(name="simulated", path=rest, format="sim")
    name, _, target = spec.partition("=")
    if not target:
        target, name = spec, Path(spec).stem
    path, fmt = target, None
    head, sep, tail = target.rpartition(":")
    if sep and tail and "/" not in tail and not Path(target).exists():
        path, fmt = head, tail
    if fmt == "sim":
        return Dataset(name=name, path=path, format="sim")
    if not Path(path).exists():
        raise BenchmarkError(f"dataset {name!r}: no such file or directory {path!r}")
    if fmt is None and not path.endswith(".parquet"):
        raise BenchmarkError(
            f"dataset {name!r}: {path!r} is not a .parquet frame; say its reader, e.g. "
            f"{name}={path}:shanghai (formats: see `glucast data ingest --help`)"
        )
    return Dataset(name=name, path=path, format=fmt)


def parse_peer_cap(text: str | None) -> int | dict[str, int] | None:
    """``--peer-max-train-rows``: ``N`` (every GluPredKit model) or ``NAME=N,...`` (those)."""
    from training.peers.glupredkit import MODELS as PEER_MODELS

    if not text:
        return None
    usage = f"--peer-max-train-rows {text!r}: an integer or NAME=N,... (e.g. random_forest=3000)"
    parts = [p.strip().partition("=") for p in text.split(",")] if "=" in text else None
    for name, _, _ in parts or ():
        if name.strip().removeprefix(PEER_PREFIX) not in PEER_MODELS:
            raise BenchmarkError(
                f"--peer-max-train-rows {text!r}: unknown GluPredKit model {name!r}; "
                f"known: {list(PEER_MODELS)}"
            )
    try:
        if parts is None:
            return int(text)
        return {n.strip().removeprefix(PEER_PREFIX): int(v) for n, _, v in parts}
    except ValueError:
        raise BenchmarkError(usage) from None


def _simulate(spec: str) -> pd.DataFrame:
    """A simulated cohort: ``PATIENTS:DAYS`` (PATIENTS as `glucast simulate --patients`)."""
    import warnings

    from forecast.sim import simulate_cohort
    from forecast.sim.errors import PhysiologyWarning

    patients, _, days = spec.partition(":")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PhysiologyWarning)
        return simulate_cohort(
            patients or "adults", days=float(days or 7), seed=1, policy="excitation"
        )


def held_out_subjects(frame: pd.DataFrame, fraction: float = 0.2) -> tuple[str, ...]:
    """A fixed, seed-independent set of held-out subjects (every k-th in sorted order), so
    that every seed and model of a table is scored on the same test windows."""
    ids = sorted(frame["subject_id"].astype(str).unique())
    if len(ids) < 3:
        raise BenchmarkError(
            f"a held-out-subject split needs at least 3 subjects (2 to train on), the frame "
            f"has {len(ids)}: {ids}"
        )
    n = min(len(ids) - 2, max(1, round(fraction * len(ids))))
    pick = np.unique(np.linspace(0, len(ids) - 1, n + 2)[1:-1].round().astype(int))
    return tuple(ids[i] for i in pick)


# --------------------------------------------------------------------------- config


@dataclass
class BenchmarkConfig:
    datasets: list[Dataset]
    models: tuple[str, ...] = DEFAULT_MODELS
    seeds: tuple[int, ...] = (0, 1, 2)
    splits: tuple[str, ...] = SPLITS
    held_out_fraction: float = 0.2
    config_path: str | None = None  # YAML training config (training/config.py) for every model
    overrides: dict[str, Any] = field(default_factory=dict)  # e.g. {"trainer": {"max_epochs": 3}}
    experiment: str = "glucast-benchmark"
    loop_samples: int = 100  # GluPredKit Loop's ISF/CR grid-search rows per subject
    # subsample GluPredKit's training rows: all its models (int) or some ({"random_forest": N})
    peer_max_train_rows: int | dict[str, int] | None = None
    #: frame columns added to every model's past inputs where the dataset has them (e.g.
    #: AZT1D's bolus_auto_u, basal_known); forecast.windows reads any numeric column
    extra_features: tuple[str, ...] = ()
    pretrain_sim: str = "adults:7"  # the cohort `<deep>+sim` models pretrain on (PATIENTS:DAYS)
    out_dir: str | None = None
    command: str = ""

    def validate(self) -> BenchmarkConfig:
        from training.peers.glupredkit import MODELS as PEER_MODELS

        for m in self.models:
            if m.startswith(PEER_PREFIX):
                if m[len(PEER_PREFIX) :] not in PEER_MODELS:
                    raise BenchmarkError(
                        f"unknown GluPredKit model {m!r}; known: "
                        f"{[PEER_PREFIX + k for k in PEER_MODELS]}"
                    )
            elif m not in BASELINES + DEEP + PRETRAINED:
                raise BenchmarkError(
                    f"unknown model {m!r}; choose from {list(BASELINES + DEEP + PRETRAINED)} or "
                    f"glupredkit:<model> ({', '.join(PEER_MODELS)})"
                )
        bad = [s for s in self.splits if s not in SPLITS]
        if bad:
            raise BenchmarkError(f"unknown split(s) {bad}; choose from {list(SPLITS)}")
        if not self.seeds:
            raise BenchmarkError("give at least one seed")
        if not self.datasets:
            raise BenchmarkError("give at least one dataset")
        return self


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _train_config(cfg: BenchmarkConfig, model: str, seed: int, split: str, held: tuple[str, ...]):
    from training.config import load_config

    over = json.loads(json.dumps(cfg.overrides))  # a deep copy
    base = model.removesuffix(PRETRAIN_SUFFIX) if model in PRETRAINED else model
    over["model"] = base if base in BASELINES + DEEP else "persistence"
    over.setdefault("trainer", {})["seed"] = int(seed)
    data = over.setdefault("data", {})
    data["split"] = split
    data["test_subjects"] = list(held)
    return load_config(cfg.config_path, over)


# --------------------------------------------------------------------------- tracking


class _Tracker:
    """The parent run and its children, through MLflow's client (no global active run, so a
    Lightning MLFlowLogger can write a child's training curves while the parent is open)."""

    def __init__(self, experiment: str, parent_hash: str, tags: dict[str, str]) -> None:
        import logging

        from mlflow.tracking import MlflowClient

        from training import tracking

        logging.getLogger("alembic").setLevel(logging.WARNING)
        logging.getLogger("mlflow").setLevel(logging.WARNING)
        self.uri = tracking.tracking_uri()
        self.client = MlflowClient(self.uri)
        exp = self.client.get_experiment_by_name(experiment)
        self.experiment_id = (
            exp.experiment_id if exp is not None else self.client.create_experiment(experiment)
        )
        self.experiment = experiment
        commit = tracking.git_commit()
        self.base_tags = {"mlflow.source.git.commit": commit} if commit else {}
        found = self._search(f"tags.`{TAG_PARENT}` = '{parent_hash}'")
        if found:  # the same benchmark again: resume under its parent
            self.parent_id = found[0].info.run_id
            self.client.update_run(self.parent_id, status="RUNNING")
            self.resumed = True
        else:
            run = self.client.create_run(
                self.experiment_id,
                run_name="benchmark",
                tags={**self.base_tags, **tags, TAG_PARENT: parent_hash},
            )
            self.parent_id = run.info.run_id
            self.resumed = False

    def _search(self, filt: str) -> list[Any]:
        return self.client.search_runs(
            [self.experiment_id], filter_string=filt, order_by=["attributes.start_time DESC"]
        )

    def finished(self, child_hash: str) -> Any | None:
        runs = self._search(
            f"tags.`{TAG_CHILD}` = '{child_hash}' and tags.`{TAG_COMPLETE}` = 'true'"
        )
        return runs[0] if runs else None

    def start_child(self, name: str, tags: dict[str, str], params: dict[str, Any]) -> str:
        run = self.client.create_run(
            self.experiment_id,
            run_name=name,
            tags={**self.base_tags, **tags, "mlflow.parentRunId": self.parent_id},
        )
        rid = run.info.run_id
        self.log_params(rid, params)
        return rid

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 90):
            self.client.log_batch(run_id, params=items[i : i + 90])

    def log_metrics(self, run_id: str, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, 0) for k, v in metrics.items() if np.isfinite(v)]
        for i in range(0, len(items), 900):
            self.client.log_batch(run_id, metrics=items[i : i + 900])

    def finish_child(
        self, run_id: str, report: dict[str, Any], metrics: dict[str, float], extra: dict[str, Any]
    ) -> None:
        from mlflow.entities import Metric

        from training import tracking

        self.log_metrics(run_id, metrics)
        # Per-horizon curves (step = minutes ahead), as `glucast train` logs them.
        now = int(time.time() * 1000)
        curves = [
            Metric(k, v, now, int(step))
            for k, c in tracking.horizon_curves(report).items()
            for step, v in c.items()
        ]
        for i in range(0, len(curves), 900):
            self.client.log_batch(run_id, metrics=curves[i : i + 900])
        self.client.log_dict(run_id, extra, "benchmark_child.json")
        self.client.set_tag(run_id, TAG_COMPLETE, "true")
        self.client.set_terminated(run_id, "FINISHED")

    def fail_child(self, run_id: str, error: str) -> None:
        self.client.set_tag(run_id, "glucast.benchmark.error", error[:4900])
        self.client.set_terminated(run_id, "FAILED")

    def finish(self, artifacts: Sequence[Path], status: str = "FINISHED") -> None:
        for p in artifacts:
            self.client.log_artifact(self.parent_id, str(p))
        self.client.set_terminated(self.parent_id, status)


# --------------------------------------------------------------------------- running


@dataclass
class _Point:
    """A fixed point forecast [N, H] behind the `predict`/`quantiles` surface of score()."""

    pred: np.ndarray
    quantiles: tuple[float, ...] = (0.5,)

    def predict(self, past: np.ndarray, future: np.ndarray) -> np.ndarray:
        return self.pred[:, :, None]


def _fit_baseline(name: str, tcfg: Any, splits: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    from training.evaluate import build_baseline, score

    t0 = time.perf_counter()
    model = build_baseline(name, tuple(tcfg.head.quantiles))
    model.fit(splits.windows["train"])
    model.calibrate(splits.windows["val"])
    fit_s = time.perf_counter() - t0
    return score(model, splits.windows["test"]), {"fit_seconds": fit_s}


_PRETRAINED: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {}  # key -> (state, info)


def _pretrain(tcfg: Any, wc: Any, sim: str, work: Path, say: Callable[[str], None]):
    """Weights of `tcfg`'s model trained on the simulated cohort `sim`, windowed with the
    dataset's window layout `wc` (so a real dataset's feature set, without the simulator's
    therapy-profile columns when the dataset has none); cached per seed, config and layout."""
    import torch

    from training.pipeline import _spec, fit_module
    from training.splits import build_splits

    pcfg = tcfg.override({"data": {"split": "chronological", "test_subjects": []}})
    key = _hash({"sim": sim, "config": pcfg.to_dict(), "windows": wc.to_dict()})[:16]
    if key in _PRETRAINED:
        return _PRETRAINED[key]
    path = work / f"pretrain-{key}.pt"
    if path.exists():  # written by this benchmark before (resumed); weights only
        saved = torch.load(path, map_location="cpu", weights_only=True)
        _PRETRAINED[key] = (saved["state"], saved["info"])
        return _PRETRAINED[key]
    frame = _simulate(sim)
    splits = build_splits(frame, pcfg.data, wc, need=("train", "val"))
    say(f"pretraining {pcfg.model} on simulated {sim} ({len(splits.windows['train'])} windows)")
    module, info = fit_module(
        _spec(pcfg, wc), splits, pcfg, work / f"pretrain-{key}", run_id=None,
        experiment="", progress=False,
    )  # fmt: skip
    info = {k: v for k, v in info.items() if k != "global_zero"}
    info["sim"] = sim
    state = {k: v.detach().clone() for k, v in module.model.state_dict().items()}
    work.mkdir(parents=True, exist_ok=True)
    torch.save({"state": state, "info": info}, path)
    _PRETRAINED[key] = (state, info)
    return state, info


def _fit_deep(
    tcfg: Any,
    splits: Any,
    run_id: str,
    experiment: str,
    work: Path,
    pretrained: tuple[dict[str, Any], dict[str, Any]] | None = None,
):
    from training.calibration import conformal_calibrate
    from training.evaluate import TorchForecaster, score
    from training.pipeline import _spec, _threads, fit_module

    _threads(tcfg.trainer.threads)
    module, fit = fit_module(
        _spec(tcfg, splits.window_config), splits, tcfg, work, run_id=run_id,
        experiment=experiment, progress=False,
        init_state=pretrained[0] if pretrained else None,
        # the pretrained weights expect the pretraining's input scaling (as `glucast finetune`)
        fit_normalisation=pretrained is None,
    )  # fmt: skip
    fit.pop("global_zero", None)
    if pretrained:
        fit["pretrain"] = pretrained[1]
    val = splits.windows["val"]
    conformal_calibrate(module.model, val.past, val.future, val.target)
    return score(TorchForecaster(module.model), splits.windows["test"]), fit


def _headline(metrics: dict[str, float]) -> dict[str, float]:
    out = {}
    for _, stem, _ in COLUMNS:
        for h in TABLE_HORIZONS:
            k = f"test_{stem}_{h}"
            if k in metrics:
                out[k] = float(metrics[k])
    for h in TABLE_HORIZONS:
        if f"test_rmse_{h}" in metrics:
            out[f"test_rmse_{h}"] = float(metrics[f"test_rmse_{h}"])
    return out


def run_benchmark(
    cfg: BenchmarkConfig, progress: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """Run (or resume) the benchmark; returns the results dict the tables are made from."""
    from forecast.metrics import json_safe
    from training import tracking
    from training.peers import glupredkit as gpk
    from training.splits import DataError, build_splits

    cfg.validate()
    say = progress or (lambda m: print(f"[benchmark] {m}", file=sys.stderr, flush=True))
    t_start = time.perf_counter()
    out_dir = Path(cfg.out_dir or "reports/benchmark")
    out_dir.mkdir(parents=True, exist_ok=True)
    peers = [m for m in cfg.models if m.startswith(PEER_PREFIX)]
    peer_reason = gpk.unavailable_reason() if peers else None
    if peer_reason:
        say(f"GluPredKit models will not run: {peer_reason}")
    # Resolve every dataset's split first: its hashes identify the benchmark (parent run).
    plan: list[dict[str, Any]] = []
    for ds in cfg.datasets:
        say(f"{ds.name}: loading {ds.describe()}")
        frame = ds.load()
        for split in cfg.splits:
            held = held_out_subjects(frame, cfg.held_out_fraction) if split == "subjects" else ()
            tcfg = _train_config(cfg, "persistence", cfg.seeds[0], split, held)
            wc = tcfg.window_config(frame)
            extra = tuple(f for f in cfg.extra_features if f in frame.columns)
            if extra:
                wc = dataclasses.replace(wc, past_features=wc.past_features + extra)
            if len(extra) < len(cfg.extra_features):
                absent = [f for f in cfg.extra_features if f not in extra]
                say(f"{ds.name}: has no column(s) {absent}; the models go without them")
            try:
                splits = build_splits(frame, tcfg.data, wc)
            except DataError as e:
                raise BenchmarkError(f"{ds.name}, split {split}: {e}") from e
            plan.append({"dataset": ds, "split": split, "held": held, "splits": splits})
            say(
                f"{ds.name} / {split}: windows "
                + ", ".join(f"{k} {len(w)}" for k, w in splits.windows.items())
                + f"; test hash {splits.test_hash[:12]}"
                + (f"; held out {list(held)}" if held else "")
            )
    parent_hash = _hash(
        {
            "tests": [(p["dataset"].name, p["split"], p["splits"].test_hash) for p in plan],
            "models": list(cfg.models),
            "seeds": list(cfg.seeds),
            "overrides": cfg.overrides,
            "config": cfg.config_path and Path(cfg.config_path).read_text(),
        }
    )
    tracker = _Tracker(
        cfg.experiment,
        parent_hash,
        {"glucast.benchmark.command": cfg.command[:4900]} if cfg.command else {},
    )
    tracker.log_params(
        tracker.parent_id,
        {
            "models": ",".join(cfg.models),
            "seeds": ",".join(map(str, cfg.seeds)),
            "datasets": ",".join(d.name for d in cfg.datasets),
            "splits": ",".join(cfg.splits),
        },
    ) if not tracker.resumed else None
    say(
        f"MLflow parent run {tracker.parent_id} in {cfg.experiment!r} ({tracker.uri})"
        + (" — resuming" if tracker.resumed else "")
    )
    results: dict[str, Any] = {
        "command": cfg.command,
        "parent_run_id": tracker.parent_id,
        "experiment": cfg.experiment,
        "tracking_uri": tracker.uri,
        "tables": [],
        "peers": {},
    }
    n_children = 0
    try:
        for p in plan:
            ds, split, splits = p["dataset"], p["split"], p["splits"]
            table = {
                "dataset": ds.name,
                "source": ds.describe(),
                "split": split,
                "held_out": list(p["held"]),
                "test_hash": splits.test_hash,
                "past_features": list(splits.window_config.past_features),
                "windows": {k: len(w) for k, w in splits.windows.items()},
                "subjects": {k: int(f["subject_id"].nunique()) for k, f in splits.frames.items()},
                "runs": {},
            }
            results["tables"].append(table)
            base_tags = {
                tracking.TAG_HASH: splits.test_hash,
                tracking.TAG_TRAIN_HASH: splits.hashes["train"],
                tracking.TAG_DATA: ds.describe(),
                "glucast.benchmark.dataset": ds.name,
                "glucast.benchmark.split": split,
            }
            # Peers go first in one driver call per table (their preprocessing is shared).
            pending_peers = []
            for model in cfg.models:
                deep = model in DEEP + PRETRAINED
                seeds = cfg.seeds if deep else cfg.seeds[:1]
                for seed in seeds:
                    tcfg = _train_config(cfg, model, seed, split, p["held"])
                    key = {
                        "test_hash": splits.test_hash,
                        "train_hash": splits.hashes["train"],
                        "split": split,
                        "held": list(p["held"]),
                        "model": model,
                        "seed": seed if deep else None,
                        "config": tcfg.to_dict()
                        if model in BASELINES + DEEP + PRETRAINED
                        else None,
                        "peer": (gpk.VERSION, cfg.loop_samples, cfg.peer_max_train_rows)
                        if model.startswith(PEER_PREFIX)
                        else None,
                    }
                    if cfg.extra_features:  # only when set, so other benchmarks' hashes stay
                        key["extra_features"] = list(splits.window_config.past_features)
                    if model in PRETRAINED:  # only here, so other models' hashes stay put
                        key["pretrain_sim"] = cfg.pretrain_sim
                    h = _hash(key)
                    done = tracker.finished(h)
                    label = f"{ds.name}/{split}/{model}" + (f"/seed {seed}" if deep else "")
                    if done is not None:
                        say(f"{label}: done before (run {done.info.run_id}), skipped")
                        table["runs"].setdefault(model, []).append(
                            {"seed": seed, "run_id": done.info.run_id, "resumed": True,
                             "metrics": _headline(done.data.metrics)}
                        )  # fmt: skip
                        continue
                    job = {"model": model, "seed": seed, "hash": h, "tcfg": tcfg, "label": label}
                    if model.startswith(PEER_PREFIX):
                        pending_peers.append(job)
                    else:
                        n_children += 1
                        _run_child(tracker, cfg, table, splits, job, base_tags, out_dir, say)
            if pending_peers:
                n_children += _run_peers(tracker, cfg, table, splits, pending_peers, base_tags, peer_reason,
                           results["peers"], say)  # fmt: skip
        results["seconds"] = time.perf_counter() - t_start
        results["children_run"] = n_children
        paths = write_outputs(json_safe(results), out_dir)
        results["outputs"] = [str(x) for x in paths]
        tracker.finish(paths)
    except BaseException:
        tracker.finish([], status="FAILED")
        raise
    return json_safe(results)


def _run_child(tracker, cfg, table, splits, job, base_tags, out_dir, say) -> None:
    from forecast.metrics import json_safe
    from training import tracking

    model, seed, tcfg = job["model"], job["seed"], job["tcfg"]
    deep = model in DEEP + PRETRAINED
    say(f"{job['label']}: fitting")
    rid = tracker.start_child(
        f"{table['dataset']}-{table['split']}-{model}" + (f"-s{seed}" if deep else ""),
        {
            **base_tags,
            tracking.TAG_MODEL: model,
            TAG_CHILD: job["hash"],
            tracking.TAG_KIND: "benchmark",
        },
        {**tcfg.flat(), "benchmark.seed": seed},
    )
    t0 = time.perf_counter()
    try:
        if deep:
            work = out_dir / "work" / job["hash"][:16]
            pre = (
                _pretrain(tcfg, splits.window_config, cfg.pretrain_sim, out_dir / "work", say)
                if model in PRETRAINED
                else None
            )
            report, fit = _fit_deep(tcfg, splits, rid, tracker.experiment, work, pre)
        else:
            report, fit = _fit_baseline(model, tcfg, splits)
    except Exception as e:
        tracker.fail_child(rid, f"{type(e).__name__}: {e}")
        raise
    report.pop("_pred", None)
    metrics = tracking.metrics_from_evaluation(report)
    metrics["fit_seconds"] = float(fit.get("fit_seconds", 0.0))
    tracker.finish_child(
        rid, report, metrics, json_safe({"fit": fit, "windows": report["windows"]})
    )
    head = _headline(metrics)
    table["runs"].setdefault(model, []).append(
        {"seed": seed, "run_id": rid, "resumed": False, "metrics": head,
         "seconds": time.perf_counter() - t0}
    )  # fmt: skip
    say(
        f"{job['label']}: RMSE 30/60 {head.get('test_rmse_30', float('nan')):.2f}/"
        f"{head.get('test_rmse_60', float('nan')):.2f} ({time.perf_counter() - t0:.0f} s)"
    )


def _run_peers(tracker, cfg, table, splits, jobs, base_tags, reason, peers_out, say) -> int:
    """GluPredKit's models of one table in one driver call; each that ran gets its child run
    (returns how many)."""
    from forecast.metrics import json_safe
    from training import tracking
    from training.evaluate import score
    from training.peers import glupredkit as gpk

    key = f"{table['dataset']}/{table['split']}"
    names = [j["model"][len(PEER_PREFIX) :] for j in jobs]
    status: dict[str, Any] = {}
    preds: dict[str, np.ndarray] = {}
    if reason:
        status = {n: {"status": "not run", "error": reason} for n in names}
    else:
        say(f"{key}: GluPredKit {gpk.VERSION} fitting {', '.join(names)} in its own venv")
        all_subjects = list(splits.frames["train"]["subject_id"].astype(str).unique()) + list(
            splits.frames["test"]["subject_id"].astype(str).unique()
        )
        try:
            preds, resp = gpk.run_models(
                splits.frames["train"], splits.windows["test"], names, subjects=all_subjects,
                max_train_rows=cfg.peer_max_train_rows, loop_samples=cfg.loop_samples,
            )  # fmt: skip
            status = resp["models"]
        except gpk.PeerError as e:
            status = {n: {"status": "failed", "error": str(e)[-2000:]} for n in names}
    peers_out[key] = {
        n: {k: v for k, v in s.items() if k != "traceback"} for n, s in status.items()
    }
    ran = 0
    for job in jobs:
        name = job["model"][len(PEER_PREFIX) :]
        st = status.get(name, {"status": "failed", "error": "no answer from the driver"})
        if name not in preds:
            say(f"{job['label']}: could not run — {st.get('error')}")
            continue  # no child run: nothing was measured (the reason is in the tables)
        rid = tracker.start_child(
            f"{table['dataset']}-{table['split']}-{job['model']}",
            {**base_tags, tracking.TAG_MODEL: job["model"], TAG_CHILD: job["hash"],
             tracking.TAG_KIND: "benchmark"},
            {"peer": "glupredkit", "peer.version": gpk.VERSION, "peer.model": name,
             "peer.loop_samples": cfg.loop_samples,
             "peer.max_train_rows": cfg.peer_max_train_rows},
        )  # fmt: skip
        report = score(_Point(preds[name]), splits.windows["test"])
        report.pop("_pred", None)
        metrics = tracking.metrics_from_evaluation(report)
        for k in ("fit_seconds", "predict_seconds"):
            if isinstance(st.get(k), (int, float)):
                metrics[k] = float(st[k])
        tracker.finish_child(rid, report, metrics, json_safe({k: v for k, v in st.items()}))
        head = _headline(metrics)
        table["runs"].setdefault(job["model"], []).append(
            {"seed": None, "run_id": rid, "resumed": False, "metrics": head}
        )
        say(
            f"{job['label']}: RMSE 30/60 {head.get('test_rmse_30', float('nan')):.2f}/"
            f"{head.get('test_rmse_60', float('nan')):.2f} (fit {st.get('fit_seconds', 0):.0f} s)"
        )
        ran += 1
    return ran


# --------------------------------------------------------------------------- tables


def _cell(values: list[float], decimals: int) -> str:
    v = [x for x in values if x is not None and np.isfinite(x)]
    if not v:
        return "–"
    if len(v) == 1:
        return f"{v[0]:.{decimals}f}"
    return f"{np.mean(v):.{decimals}f} ± {np.std(v, ddof=1):.{decimals}f}"


def table_frame(table: dict[str, Any], models: Sequence[str] | None = None) -> pd.DataFrame:
    """One GlucoBench-style table: a row per model, mean ± SD over its runs."""
    rows = {}
    zoh = {}
    for ref in ("persistence", "glupredkit:zero_order"):
        if ref in table["runs"]:
            for h in TABLE_HORIZONS:
                zoh[h] = np.mean(
                    [r["metrics"].get(f"test_rmse_{h}", np.nan) for r in table["runs"][ref]]
                )
            break
    for model in models or list(table["runs"]):
        runs = table["runs"].get(model)
        if not runs:
            continue
        row: dict[str, str] = {}
        for title, stem, d in COLUMNS:
            for h in TABLE_HORIZONS:
                row[f"{title} {h}"] = _cell([r["metrics"].get(f"test_{stem}_{h}") for r in runs], d)
        for h in TABLE_HORIZONS:
            if zoh.get(h):
                m = np.mean([r["metrics"].get(f"test_rmse_{h}", np.nan) for r in runs])
                row[f"× ZOH {h}"] = f"{m / zoh[h]:.2f}"
        row["runs"] = str(len(runs))
        rows[model] = row
    return pd.DataFrame.from_dict(rows, orient="index")


def _caption(table: dict[str, Any]) -> str:
    w = table["windows"]
    s = table["subjects"]
    held = f"; held out: {', '.join(table['held_out'])}" if table["held_out"] else ""
    return (
        f"{table['dataset']} — {SPLIT_TITLES[table['split']]}: {s['test']} test subjects, "
        f"{w['test']} test windows (test dataset hash {table['test_hash'][:12]}), "
        f"{w['train']} training windows{held}"
    )


def markdown(results: dict[str, Any]) -> str:
    lines = ["# glucast benchmark", ""]
    if results.get("command"):
        lines += [f"Command: `{results['command']}`", ""]
    lines += [
        "RMSE, MAE (mg/dL), MARD, Clarke A+B and 90 % interval coverage at 30 and 60 min on "
        "real readings only; mean ± SD over seeds where a model has several runs; "
        "× ZOH: RMSE relative to holding the last reading (persistence).",
        "",
    ]
    for table in results["tables"]:
        df = table_frame(table)
        lines += [f"## {_caption(table)}", ""]
        if df.empty:
            lines += ["(no model ran)", ""]
            continue
        cols = ["model", *df.columns]
        lines.append("| " + " | ".join(cols) + " |")
        lines.append("|" + "|".join("---" for _ in cols) + "|")
        for model, row in df.iterrows():
            lines.append("| " + " | ".join([str(model), *map(str, row.tolist())]) + " |")
        lines.append("")
    notes = _peer_notes(results)
    if notes:
        lines += ["## GluPredKit models that did not run", "", *notes, ""]
    if results.get("seconds") is not None:
        lines += [f"Wall time {results['seconds'] / 60:.1f} min; MLflow parent run "
                  f"{results['parent_run_id']} ({results['tracking_uri']}).", ""]  # fmt: skip
    return "\n".join(lines)


def _peer_notes(results: dict[str, Any]) -> list[str]:
    notes = []
    for key, models in results.get("peers", {}).items():
        for name, st in models.items():
            if st.get("status") != "ok":
                err = str(st.get("error", "")).strip().splitlines()
                notes.append(f"- {key}: `{name}` — {err[-1] if err else st.get('status')}")
    return notes


def html(results: dict[str, Any]) -> str:
    from forecast.htmlreport import HtmlReport

    rep = HtmlReport("glucast benchmark", subtitle=results.get("command") or None)
    rep.add_text(
        "RMSE, MAE (mg/dL), MARD, Clarke A+B and 90 % interval coverage at 30 and 60 min on "
        "real readings only; mean ± SD over seeds where a model has several runs."
    )
    for table in results["tables"]:
        rep.add_heading(f"{table['dataset']} — {SPLIT_TITLES[table['split']]}")
        rep.add_table(table_frame(table), caption=_caption(table))
    notes = _peer_notes(results)
    if notes:
        rep.add_heading("GluPredKit models that did not run")
        rep.add_text("\n\n".join(n.lstrip("- ") for n in notes))
    return rep.to_html()


def write_outputs(results: dict[str, Any], out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "benchmark.md", out_dir / "benchmark.html", out_dir / "benchmark.json"]
    paths[0].write_text(markdown(results))
    paths[1].write_text(html(results))
    paths[2].write_text(json.dumps(results, indent=1, default=str) + "\n")
    return paths


def quick_config(out_dir: str | None = None, command: str = "") -> BenchmarkConfig:
    """The CI form: the ShanghaiT1DM fixture and a tiny simulated cohort, small models."""
    root = Path(__file__).resolve().parents[1]
    return BenchmarkConfig(
        datasets=[
            Dataset("shanghai-fixture", str(root / "tests" / "fixtures" / "shanghai"), "shanghai"),
            Dataset("simulated", "adult#001,adult#002,adult#003:2", "sim"),
        ],
        models=("persistence", "ridge", "lstm", "glupredkit:zero_order", "glupredkit:ridge"),
        seeds=(0, 1),
        overrides={
            "trainer": {"max_epochs": 1, "max_train_windows": 512, "twins": 0, "patience": 1},
            "lstm": {"hidden": 16},
        },
        experiment="glucast-benchmark-quick",
        peer_max_train_rows=2000,
        out_dir=out_dir,
        command=command,
    )


__all__ = [
    "BenchmarkConfig",
    "BenchmarkError",
    "Dataset",
    "held_out_subjects",
    "markdown",
    "parse_dataset",
    "parse_peer_cap",
    "quick_config",
    "run_benchmark",
    "table_frame",
]
