"""`glucast train` and `glucast finetune` (argument parsing only; see training/pipeline.py)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

MODELS = ("lstm", "transformer", "ridge", "linear", "persistence", "physio")


def _trainer_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("Lightning (passed straight to lightning.Trainer)")
    g.add_argument("--accelerator", help="cpu (default), gpu, auto ...")
    g.add_argument("--devices", help="number of devices or a list, e.g. 1, 2, auto")
    g.add_argument("--strategy", help="auto (default), ddp, ddp_spawn ...")
    g.add_argument("--num-nodes", type=int, help="machines for multi-node ddp")
    g.add_argument(
        "--threads",
        type=int,
        help="torch CPU threads (default: $GLUCAST_TORCH_THREADS or 1)",
    )
    p.add_argument("--max-epochs", type=int, help="override trainer.max_epochs")
    p.add_argument("--seed", type=int, help="override trainer.seed")
    p.add_argument("--config", help="YAML file overriding the defaults (training/config.py)")
    p.add_argument("--experiment", default="glucast", help="MLflow experiment (default: glucast)")
    p.add_argument("--out", help="output directory (default: artifacts/<model>-<time>)")
    p.add_argument("--no-register", action="store_true", help="do not register the ONNX model")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a forecaster (deep or baseline), score it on the test split, track it",
        description="Split the frame (chronological or held-out subjects), fit the model, "
        "calibrate its interval on the validation split, score it on the test split, export "
        "deep models to ONNX (model.onnx + manifest.json) and record everything in MLflow "
        "($MLFLOW_TRACKING_URI, default sqlite:///mlflow.db).",
    )
    p.add_argument("--model", required=True, choices=MODELS)
    p.add_argument("--data", required=True, help="canonical frame (.parquet)")
    _trainer_flags(p)
    p.set_defaults(func=run)

    f = sub.add_parser(
        "finetune",
        help="adapt a trained population model to one subject",
        description="Continue training an exported deep model on one subject's own data "
        "(chronological split of that subject), recalibrate its interval and compare it with "
        "the population model on the subject's test days.",
    )
    f.add_argument("--model", required=True, help="model directory written by `glucast train`")
    f.add_argument("--data", required=True, help="canonical frame (.parquet) holding the subject")
    f.add_argument(
        "--subject",
        required=True,
        help="subject_id to adapt to; several comma-separated, or 'all' (one model each, "
        "under --out/<subject>; `glucast alerts evaluate --subject-models` reads that folder)",
    )
    _trainer_flags(f)
    f.set_defaults(func=run_finetune)


def _overrides(args: argparse.Namespace) -> dict:
    t: dict = {}
    for flag, key in (
        ("max_epochs", "max_epochs"),
        ("seed", "seed"),
        ("accelerator", "accelerator"),
        ("devices", "devices"),
        ("strategy", "strategy"),
        ("num_nodes", "num_nodes"),
        ("threads", "threads"),
    ):
        v = getattr(args, flag, None)
        if v is not None:
            t[key] = v
    return {"trainer": t} if t else {}


def _read(path: str):
    from forecast.schema import read_parquet

    return read_parquet(path)


def _print(args: argparse.Namespace, out: dict) -> None:
    from forecast.cli import emit_json

    if args.json:
        emit_json(out)
        return
    print(f"run {out['run_id']} ({out['model']}) -> {out['model_dir']}")
    for h, m in out["metrics"].items():
        print(
            f"  {h:>3} min  RMSE {m['rmse']:.2f}  MAE {m['mae']:.2f}  MARD {m['mard']:.2f}%  "
            f"coverage {m['coverage'] if m['coverage'] is None else round(m['coverage'], 1)}%"
        )
    print(f"  test dataset hash {out['dataset_hash'][:16]}  tracking {out['tracking_uri']}")


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
    from training.config import load_config
    from training.pipeline import train

    overrides = _overrides(args)
    overrides["model"] = args.model
    cfg = load_config(args.config, overrides)
    frame = _read(args.data)
    out = train(
        frame,
        cfg,
        experiment=args.experiment,
        out_dir=args.out,
        data_path=args.data,
        register=not args.no_register,
    )
    if out:  # empty on non-zero DDP ranks
        _print(args, out)
    return 0


def run_finetune(args: argparse.Namespace) -> int:
    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
    import yaml

    from training.pipeline import _safe, finetune

    overrides = _overrides(args)
    if args.config:
        from training.config import ConfigError

        with open(args.config) as fh:
            loaded = yaml.safe_load(fh) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{args.config}: the top level must be a mapping")
        for k, v in loaded.items():
            overrides[k] = {**v, **overrides.get(k, {})} if isinstance(v, dict) else v
    frame = _read(args.data)
    subjects = _subjects(args.subject, frame)
    if len(subjects) > 1 and not args.out:
        from training.config import ConfigError

        raise ConfigError("several subjects need --out DIR (one model each, under DIR/<subject>)")
    results = {}
    for i, subject in enumerate(subjects):
        if len(subjects) > 1:
            print(f"[{i + 1}/{len(subjects)}] {subject}", file=sys.stderr)
        out = finetune(
            args.model,
            frame,
            subject,
            cfg_overrides=overrides,
            experiment=args.experiment,
            out_dir=args.out if len(subjects) == 1 else Path(args.out) / _safe(subject),
            data_path=args.data,
            register=not args.no_register,
        )
        if not out:  # a non-zero DDP rank
            continue
        results[subject] = out
        if len(subjects) == 1:
            _print(args, out)
            if not args.json:
                for h, m in out["population_metrics"].items():
                    print(f"  population model {h:>3} min  RMSE {m['rmse']:.2f}")
    if len(subjects) > 1 and results:
        _print_many(args, results)
    return 0


def _subjects(spec: str, frame) -> list[str]:
    """'all', one subject_id or a comma-separated list, checked against the frame."""
    known = sorted(frame["subject_id"].astype(str).unique())
    if spec.strip().lower() == "all":
        return known
    wanted = [s.strip() for s in spec.split(",") if s.strip()]
    missing = [s for s in wanted if s not in known]
    if missing and len(wanted) > 1:  # one subject: the pipeline says what is wrong with it
        from training.splits import DataError

        raise DataError(f"subject(s) {missing} not in the frame; it holds {known[:20]}")
    return wanted


def _print_many(args: argparse.Namespace, results: dict) -> None:
    """Per subject: the personal and the population model's RMSE on its test days."""
    import statistics

    from forecast.cli import emit_json

    rows = {
        s: {
            "model_dir": str(r["model_dir"]),
            **{
                f"rmse_{h}": r["metrics"][h]["rmse"]
                for h in r["metrics"]
                if r["metrics"][h]["rmse"] is not None
            },
            **{
                f"population_rmse_{h}": r["population_metrics"][h]["rmse"]
                for h in r["population_metrics"]
                if r["population_metrics"][h]["rmse"] is not None
            },
        }
        for s, r in results.items()
    }
    horizons = sorted({k[5:] for row in rows.values() for k in row if k.startswith("rmse_")})
    summary = {
        h: {
            "median_rmse": statistics.median(r[f"rmse_{h}"] for r in rows.values()),
            "median_population_rmse": statistics.median(
                r[f"population_rmse_{h}"] for r in rows.values()
            ),
            "better": sum(r[f"rmse_{h}"] < r[f"population_rmse_{h}"] for r in rows.values()),
        }
        for h in horizons
    }
    if args.json:
        emit_json({"subjects": rows, "summary": summary, "out": str(args.out)})
        return
    for s, r in rows.items():
        cells = "  ".join(
            f"{h} min {r[f'rmse_{h}']:.2f} (population {r[f'population_rmse_{h}']:.2f})"
            for h in horizons
        )
        print(f"{s:<20} {cells}")
    for h, m in summary.items():
        print(
            f"median RMSE {h} min: personal {m['median_rmse']:.2f}, population "
            f"{m['median_population_rmse']:.2f}; better for {m['better']} of {len(rows)}"
        )
    print(f"models under {args.out}: glucast alerts evaluate --subject-models {args.out} ...")
