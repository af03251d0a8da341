"""`glucast train` and `glucast finetune` as functions: split → fit → calibrate → score →
export → track. The command modules only parse arguments and print.

Deep models (lstm, transformer) are trained with Lightning (early stopping on validation
pinball loss, best-checkpoint restore, seeds, one CPU thread by default), conformally
calibrated on the validation split, scored on the test split, exported to ONNX with a parity
check on real test windows, and logged to MLflow with the model registered. Baselines go
through the same split, scoring and tracking; their artifact is their JSON `to_dict`.

Output layout of ``--out DIR``::

    DIR/model/model.onnx, manifest.json, weights.pt   (deep models; weights for finetune)
    DIR/model/baseline.json                           (baselines)
    DIR/checkpoints/                                  Lightning checkpoints
    DIR/plots/*.png, DIR/evaluation.json
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from training import tracking
from training.config import DEEP_MODELS, TrainConfig
from training.evaluate import TorchForecaster, build_baseline, public, save_plots, score
from training.splits import Splits, build_splits, split_info, subject_frame

WEIGHTS = "weights.pt"
PARITY_WINDOWS = 512


def _threads(n: int) -> None:
    import torch

    torch.set_num_threads(max(1, int(n)))
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set in this process
        pass


def _layout(cfg: TrainConfig, wc: Any):
    from training.models import Layout

    return Layout(
        past_features=tuple(wc.past_features),
        future_features=tuple(wc.future_features),
        past_slots=wc.past_slots,
        horizon_slots=wc.horizon_slots,
        quantiles=tuple(cfg.head.quantiles),
        carb_head=cfg.head.carb_head,
    )


def _spec(cfg: TrainConfig, wc: Any) -> dict[str, Any]:
    from training.models import model_spec

    options = dict(vars(getattr(cfg, cfg.model)))
    head = {
        "quantiles": list(cfg.head.quantiles),
        "isf_prior": cfg.head.isf_prior,
        "insulin_gain": cfg.head.insulin_gain,
        "csf_prior": cfg.head.csf_prior,
        "dose_scaling": cfg.head.dose_scaling,
        "center": cfg.head.center,
        "gain_context": cfg.head.gain_context,
        "dose_feature": cfg.head.dose_feature,
        "insulin_peak_min": wc.insulin_peak_min,
        "insulin_dia_min": wc.insulin_dia_min,
    }
    return model_spec(cfg.model, _layout(cfg, wc), options, head, wc.slot_minutes)


def default_out(model: str) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("artifacts") / f"{model}-{stamp}"


def ddp_worker() -> bool:
    """True in the extra processes a Lightning DDP launcher starts (global rank > 0)."""
    return any(int(os.environ.get(k, "0") or 0) > 0 for k in ("LOCAL_RANK", "NODE_RANK", "RANK"))


def _progress(msg: str) -> None:
    print(f"[glucast] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- fitting


def fit_module(
    spec: dict[str, Any],
    splits: Splits,
    cfg: TrainConfig,
    out_dir: Path,
    *,
    run_id: str | None,
    experiment: str,
    init_state: dict[str, Any] | None = None,
    fit_normalisation: bool = True,
    lr: float | None = None,
    progress: bool = True,
) -> tuple[Any, dict[str, Any]]:
    """Train a ForecastModule with Lightning; returns (best module, fit info)."""
    import lightning as L
    import torch
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
    from lightning.pytorch.loggers import MLFlowLogger

    from training.data import GlucoseDataModule, training_targets
    from training.module import ForecastModule

    t = cfg.trainer
    L.seed_everything(t.seed, workers=True, verbose=False)
    module = ForecastModule(
        spec,
        lr=lr or t.lr,
        weight_decay=t.weight_decay,
        max_epochs=t.max_epochs,
        freeze_insulin_epochs=0 if init_state is not None else t.freeze_insulin_epochs,
        twin_weight=t.twin_weight,
    )
    if init_state is not None:
        module.model.load_state_dict(init_state)
    if fit_normalisation:
        w = splits.windows["train"]
        module.model.fit_normalisation(w.past, w.future, training_targets(w))
    n_twins = _attach_twins(module, splits, t, progress) if t.twins else 0
    dm = GlucoseDataModule(splits, t.batch_size, t.max_train_windows, t.seed)
    ckpt = ModelCheckpoint(
        dirpath=out_dir / "checkpoints", filename="best", monitor="val_loss", mode="min"
    )
    callbacks: list[Any] = [
        ckpt,
        EarlyStopping(monitor="val_loss", mode="min", patience=t.patience),
    ]
    if progress:
        from lightning.pytorch.callbacks import RichProgressBar

        # stderr: stdout belongs to `--json`.
        callbacks.append(RichProgressBar(console_kwargs={"stderr": True}))
    logger = (
        MLFlowLogger(
            experiment_name=experiment, tracking_uri=tracking.tracking_uri(), run_id=run_id
        )
        if run_id
        else False
    )
    devices: Any = int(t.devices) if str(t.devices).isdigit() else t.devices
    trainer = L.Trainer(
        max_epochs=t.max_epochs,
        accelerator=t.accelerator,
        devices=devices,
        strategy=t.strategy,
        num_nodes=t.num_nodes,
        callbacks=callbacks,
        logger=logger,
        gradient_clip_val=t.gradient_clip or None,
        enable_progress_bar=progress,
        enable_model_summary=False,
        log_every_n_steps=20,
        num_sanity_val_steps=0,
        default_root_dir=str(out_dir),
    )
    start = time.perf_counter()
    trainer.fit(module, datamodule=dm)
    seconds = time.perf_counter() - start
    info = {
        "epochs": int(trainer.current_epoch),
        "fit_seconds": seconds,
        "train_windows": len(dm.train),
        "val_windows": len(dm.val),
        "best_val_loss": float(ckpt.best_model_score)
        if ckpt.best_model_score is not None
        else None,
        "global_zero": trainer.is_global_zero,
        "twins": n_twins,
    }
    info["windows_per_second"] = (
        (info["train_windows"] if not t.max_train_windows else t.max_train_windows)
        * max(1, info["epochs"])
        / max(seconds, 1e-9)
    )
    if ckpt.best_model_path and Path(ckpt.best_model_path).exists():
        # We wrote this checkpoint ourselves a moment ago; weights only, nothing executable.
        state = torch.load(ckpt.best_model_path, map_location="cpu", weights_only=True)
        module.load_state_dict(state["state_dict"])
    module = module.cpu().eval()
    return module, info


def _attach_twins(module: Any, splits: Splits, t: Any, progress: bool) -> int:
    """Counterfactual twins of training windows (simulator data only; training/twins.py)."""
    from training.interventional import InterventionalError
    from training.twins import make_twins

    start = time.perf_counter()
    try:
        twins = make_twins(splits.frames["train"], splits.windows["train"], n=t.twins, seed=t.seed)
    except InterventionalError as e:
        if progress:
            _progress(f"no counterfactual twins ({e}); the insulin effect is learned from the data")
        return 0
    module.set_twins(twins)
    if progress:
        _progress(
            f"{len(twins)} counterfactual twins of training windows re-simulated in "
            f"{time.perf_counter() - start:.1f} s: they teach the insulin effect"
        )
    return len(twins)


# --------------------------------------------------------------------------- train


def train(
    frame: pd.DataFrame,
    cfg: TrainConfig,
    *,
    experiment: str = "glucast",
    out_dir: str | Path | None = None,
    data_path: str | None = None,
    register: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """Train (or fit) `cfg.model` on `frame`, score it on the test split, log everything."""
    cfg.validate()
    _threads(cfg.trainer.threads)
    wc = cfg.window_config(frame)
    t0 = time.perf_counter()
    splits = build_splits(frame, cfg.data, wc)  # fails early, before anything is written
    out = Path(out_dir) if out_dir else default_out(cfg.model)
    out.mkdir(parents=True, exist_ok=True)
    _progress(
        "windows: "
        + ", ".join(f"{k} {len(w)}" for k, w in splits.windows.items())
        + f"; test dataset hash {splits.test_hash[:12]}"
    )
    tags = {
        tracking.TAG_HASH: splits.test_hash,
        tracking.TAG_TRAIN_HASH: splits.hashes["train"],
        tracking.TAG_MODEL: cfg.model,
    }
    if data_path:
        tags[tracking.TAG_DATA] = str(data_path)
    if cfg.model in DEEP_MODELS and ddp_worker():
        # Lightning's DDP launcher re-runs this command in one process per extra device;
        # those only train (gradients are synchronised), rank 0 tracks and exports.
        fit_module(
            _spec(cfg, wc), splits, cfg, out, run_id=None, experiment=experiment, progress=False
        )
        return {}
    with tracking.run(experiment, run_name=f"{cfg.model}", tags=tags, kind="train") as active:
        run_id = active.info.run_id
        tracking.log_params({f"data.{k}.windows": len(w) for k, w in splits.windows.items()})
        _log_splits(splits, data_path)
        if cfg.model in DEEP_MODELS:
            tracking.log_params(tracking.train_params(cfg, wc))
            result = _train_deep(cfg, splits, out, run_id, experiment, register, progress)
        else:
            result = _fit_baseline(cfg, splits, out)
            tracking.log_params(tracking.train_params(cfg, wc, result["params"]))
        if result is None:  # a non-zero DDP rank: rank 0 does the rest
            return {}
        report = result["report"]
        pred = report.pop("_pred")
        plots = save_plots(
            splits.windows["test"], pred, tuple(cfg.head.quantiles), out / "plots", cfg.model
        )
        report["dataset_hash"] = splits.test_hash
        report["model"] = cfg.model
        (out / "evaluation.json").write_text(json.dumps(public(report), indent=2) + "\n")
        tracking.log_evaluation(report)
        tracking.log_metrics(result.get("extra_metrics", {}))
        tracking.log_artifact(out / "evaluation.json")
        tracking.log_artifact(out / "plots", "plots")
        tracking.log_artifact(result["model_dir"], "model")
        description = _description(cfg.model, "trained", data_path, cfg.data.split, report)
        version = _track_model(result["model_dir"], f"glucast-{cfg.model}", description,
                               register=cfg.model in DEEP_MODELS and register)  # fmt: skip
        tracking.set_description(description)
        experiment_id = str(active.info.experiment_id)
    summary = {
        "run_id": run_id,
        "experiment": experiment,
        "experiment_id": experiment_id,
        "run_url": tracking.run_url(experiment_id, run_id),
        "model": cfg.model,
        "model_dir": str(Path(result["model_dir"]).resolve()),
        "out_dir": str(out.resolve()),
        "dataset_hash": splits.test_hash,
        "training_data_hash": splits.hashes["train"],
        "registered_model": f"glucast-{cfg.model}" if version else None,
        "registered_version": version,
        "splits": splits.describe(),
        "metrics": _headline(report),
        "validation": result.get("validation"),
        "fit": result.get("fit"),
        "plots": [str(p) for p in plots],
        "seconds": time.perf_counter() - t0,
        "tracking_uri": tracking.tracking_uri(),
    }
    return summary


def _log_splits(splits: Splits, data_path: str | None) -> None:
    """Each split frame as an MLflow dataset input (digest: its dataset hash)."""
    stem = Path(data_path).stem if data_path else "frame"
    for split, context in (("train", "training"), ("val", "validation"), ("test", "testing")):
        if split in splits.frames:
            tracking.log_dataset(
                splits.frames[split],
                splits.hashes[split],
                context=context,
                source=data_path,
                name=f"{stem}-{split}",
            )


def _description(
    model: str, verb: str, data_path: str | None, split: str, report: dict[str, Any]
) -> str:
    """One sentence for the MLflow run and model version: what, on what, how well."""
    h = report.get("horizons", {})

    def rmse(k: str) -> str:
        v = (h.get(k) or {}).get("rmse")
        return "-" if v is None else f"{v:.1f}"

    return (
        f"{model} forecaster {verb} on {data_path or 'a frame'} ({split} split); scored on "
        f"{report.get('windows', '?')} held-out windows (test dataset hash "
        f"{str(report.get('dataset_hash', '?'))[:12]}): RMSE {rmse('30')} / {rmse('60')} "
        "mg/dL at 30 / 60 min."
    )


def _track_model(
    model_dir: str | Path, registered_name: str, description: str, *, register: bool
) -> str | None:
    """Lineage of an exported model on its training run: the ONNX sha256 and, registered,
    the model version (tagged with the same sha256 on the registry side)."""
    manifest = tracking.read_manifest(model_dir)
    if manifest.get("sha256"):
        tracking.set_tags({tracking.TAG_SHA: manifest["sha256"]})
    if not register or not manifest:
        return None
    version = tracking.log_onnx_model(model_dir, registered_name, description)
    if version:
        tracking.set_tags({tracking.TAG_REGISTERED: f"{registered_name}/{version}"})
    return version


def _headline(report: dict[str, Any]) -> dict[str, Any]:
    """Per-horizon headline numbers at 30 and 60 min (plus the full report's horizons)."""
    out = {}
    for key, m in report["horizons"].items():
        if int(key) in tracking.SUMMARY_HORIZONS:
            out[key] = {
                k: m.get(k) for k in ("rmse", "mae", "mard", "coverage", "width", "lag_min", "n")
            }
            out[key]["clarke_A"] = (m.get("clarke") or {}).get("A")
            out[key]["parkes_A"] = (m.get("parkes") or {}).get("A")
    return out


def _train_deep(
    cfg: TrainConfig,
    splits: Splits,
    out: Path,
    run_id: str,
    experiment: str,
    register: bool,
    progress: bool,
    *,
    init_state: dict[str, Any] | None = None,
    lr: float | None = None,
    extra_info: dict[str, Any] | None = None,
) -> dict[str, Any] | None:
    import torch

    from forecast.metrics import evaluate_forecast
    from training.calibration import conformal_calibrate, predict_numpy
    from training.export import export_model_dir, sha256_file

    wc = splits.window_config
    spec = _spec(cfg, wc)
    module, fit = fit_module(
        spec,
        splits,
        cfg,
        out,
        run_id=run_id,
        experiment=experiment,
        init_state=init_state,
        fit_normalisation=init_state is None,
        lr=lr,
        progress=progress,
    )
    if not fit.pop("global_zero"):
        return None
    model = module.model
    val = splits.windows["val"]
    calib = conformal_calibrate(model, val.past, val.future, val.target)
    val_report = evaluate_forecast(
        val.target, predict_numpy(model, val.past, val.future), cfg.head.quantiles, wc.slot_minutes
    )
    validation = {
        k: {"rmse": m["rmse"], "mae": m["mae"], "coverage": m["coverage"]}
        for k, m in val_report["horizons"].items()
        if int(k) in tracking.SUMMARY_HORIZONS
    }
    report = score(TorchForecaster(model), splits.windows["test"])
    model_dir = out / "model"
    test = splits.windows["test"]
    rng = np.random.default_rng(0)
    pick = np.sort(rng.choice(len(test), size=min(PARITY_WINDOWS, len(test)), replace=False))
    model_dir.mkdir(parents=True, exist_ok=True)
    torch.save({"spec": spec, "state_dict": model.state_dict()}, model_dir / WEIGHTS)
    info = {
        "split": split_info(cfg.data),
        "training_data_hash": splits.hashes["train"],
        "test_dataset_hash": splits.test_hash,
        "mlflow_run_id": run_id,
        "validation_metrics": validation,
        "calibration": {
            "method": "split-conformal per horizon and quantile on the validation split",
            "coverage_before": calib["coverage_before"],
            "coverage_after": calib["coverage_after"],
        },
        "torch_weights": WEIGHTS,
        "torch_weights_sha256": sha256_file(model_dir / WEIGHTS),
        "config": cfg.to_dict(),
    }
    info.update(extra_info or {})
    export_model_dir(
        model,
        model_dir,
        kind=cfg.model,
        window_config=wc,
        past=test.past[pick],
        future=test.future[pick],
        info=info,
        exporter=cfg.export.exporter,
        tol=cfg.export.parity_tol_mgdl,
    )
    # names and units: docs/metrics.md (shares in percent, like the test coverage)
    extra_metrics = {
        "fit_s": fit["fit_seconds"],
        "epochs_trained": fit["epochs"],
        "train_windows_per_s": fit["windows_per_second"],
        "val_coverage_before_conformal": 100.0 * calib["coverage_before"],
        "val_coverage_after_conformal": 100.0 * calib["coverage_after"],
    }
    for k, m in validation.items():
        for name, v in m.items():
            if v is not None:
                extra_metrics[f"best_val_{name}_{k}"] = v
    return {
        "report": report,
        "model_dir": model_dir,
        "validation": validation,
        "fit": fit,
        "extra_metrics": extra_metrics,
    }


def _fit_baseline(cfg: TrainConfig, splits: Splits, out: Path) -> dict[str, Any]:
    start = time.perf_counter()
    model = build_baseline(cfg.model, tuple(cfg.head.quantiles))
    model.fit(splits.windows["train"])
    if hasattr(model, "calibrate"):
        model.calibrate(splits.windows["val"])
    seconds = time.perf_counter() - start
    report = score(model, splits.windows["test"])
    model_dir = out / "model"
    model_dir.mkdir(parents=True, exist_ok=True)
    payload = {
        "baseline": model.to_dict(),
        "split": split_info(cfg.data),
        "test_dataset_hash": splits.test_hash,
        "training_data_hash": splits.hashes["train"],
    }
    (model_dir / "baseline.json").write_text(json.dumps(payload, indent=2, default=float) + "\n")
    return {
        "report": report,
        "model_dir": model_dir,
        "fit": {"fit_seconds": seconds},
        "extra_metrics": {"fit_s": seconds},
        "params": model.get_params(),
    }


# --------------------------------------------------------------------------- finetune


def load_weights(model_dir: str | Path) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(manifest, spec, state_dict) of an exported deep model, verified against its manifest."""
    import torch

    from training.export import ManifestError, OnnxForecaster, sha256_file

    fc = OnnxForecaster.load(model_dir)  # verifies the ONNX file against the manifest
    m = fc.manifest
    wpath = Path(model_dir) / m.get("torch_weights", WEIGHTS)
    if not wpath.exists():
        raise ManifestError(
            f"{model_dir} has no {wpath.name}: finetuning needs the torch weights that "
            "`glucast train` writes beside model.onnx"
        )
    if m.get("torch_weights_sha256") and sha256_file(wpath) != m["torch_weights_sha256"]:
        raise ManifestError(f"{wpath} does not match the sha256 in its manifest")
    blob = torch.load(wpath, map_location="cpu", weights_only=True)
    return m, blob["spec"], blob["state_dict"]


def finetune(
    model_dir: str | Path,
    frame: pd.DataFrame,
    subject: str,
    *,
    cfg_overrides: dict[str, Any] | None = None,
    experiment: str = "glucast",
    out_dir: str | Path | None = None,
    data_path: str | None = None,
    progress: bool = True,
    register: bool = True,
) -> dict[str, Any]:
    """Adapt a population model to one subject: continue training on the subject's own
    train split (normalisation kept, smaller learning rate), recalibrate the interval on the
    subject's validation split, and score both models on the subject's test split."""
    from training.export import OnnxForecaster

    manifest, spec, state = load_weights(model_dir)
    base = TrainConfig.from_dict(manifest.get("config") or {"model": spec["kind"]})
    ft_defaults = {
        "data": {"split": "chronological", "test_subjects": [], "stride": 1},
        "trainer": {"max_epochs": min(base.trainer.max_epochs, 8), "patience": 2},
    }
    cfg = base.override(ft_defaults).override(cfg_overrides or {})
    _threads(cfg.trainer.threads)
    sub = subject_frame(frame, subject)
    wc = OnnxForecaster.load(model_dir).window_config
    splits = build_splits(sub, cfg.data, wc)
    out = Path(out_dir) if out_dir else default_out(f"{cfg.model}-{_safe(subject)}")
    out.mkdir(parents=True, exist_ok=True)
    population = score(OnnxForecaster.load(model_dir), splits.windows["test"])
    tags = {
        tracking.TAG_HASH: splits.test_hash,
        tracking.TAG_TRAIN_HASH: splits.hashes["train"],
        tracking.TAG_MODEL: f"{cfg.model}-finetuned",
        "glucast.subject": subject,
        "glucast.parent_run_id": str(manifest.get("mlflow_run_id")),
    }
    if data_path:
        tags[tracking.TAG_DATA] = str(data_path)
    if ddp_worker():
        spec_ = _spec(cfg, wc)
        fit_module(spec_, splits, cfg, out, run_id=None, experiment=experiment,
                   init_state=state, fit_normalisation=False, lr=cfg.trainer.lr * 0.3, progress=False)  # fmt: skip
        return {}
    # the population model it started from (its own run and ONNX file)
    tags["glucast.base_model_sha256"] = str(manifest.get("sha256"))
    with tracking.run(
        experiment, run_name=f"{cfg.model}-finetune-{subject}", tags=tags, kind="finetune"
    ) as active:
        run_id = active.info.run_id
        tracking.log_params(tracking.train_params(cfg, wc))
        _log_splits(splits, data_path)
        result = _train_deep(
            cfg,
            splits,
            out,
            run_id,
            experiment,
            register,
            progress,
            init_state=state,
            lr=cfg.trainer.lr * 0.3,
            extra_info={"finetuned_from": str(Path(model_dir).resolve()), "subject": subject},
        )
        if result is None:
            return {}
        report = result["report"]
        pred = report.pop("_pred")
        population.pop("_pred")
        plots = save_plots(
            splits.windows["test"],
            pred,
            tuple(cfg.head.quantiles),
            out / "plots",
            f"{cfg.model} ({subject})",
        )
        report["dataset_hash"] = splits.test_hash
        report["model"] = f"{cfg.model}-finetuned"
        (out / "evaluation.json").write_text(json.dumps(public(report), indent=2) + "\n")
        tracking.log_evaluation(report)
        tracking.log_evaluation(population, prefix="population")
        tracking.log_metrics(result["extra_metrics"])
        tracking.log_artifact(out / "evaluation.json")
        tracking.log_artifact(out / "plots", "plots")
        tracking.log_artifact(result["model_dir"], "model")
        description = _description(
            f"{cfg.model} (fine-tuned for {subject})", "adapted", data_path, "chronological",
            report,
        )  # fmt: skip
        version = _track_model(
            result["model_dir"], f"glucast-{cfg.model}-finetuned", description, register=register
        )
        tracking.set_description(description)
    return {
        "run_id": run_id,
        "experiment": experiment,
        "model": f"{cfg.model}-finetuned",
        "subject": subject,
        "model_dir": str(Path(result["model_dir"]).resolve()),
        "out_dir": str(out.resolve()),
        "dataset_hash": splits.test_hash,
        "registered_version": version,
        "metrics": _headline(report),
        "population_metrics": _headline(population),
        "fit": result["fit"],
        "plots": [str(p) for p in plots],
        "tracking_uri": tracking.tracking_uri(),
    }


def _safe(s: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in s)
