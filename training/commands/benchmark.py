"""`glucast benchmark` (argument parsing only; see training/benchmark.py)."""

from __future__ import annotations

import argparse
import os
import shlex
import sys


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "benchmark",
        help="models x datasets x seeds x splits, GlucoBench-style tables, peers on the same windows",
        description="Fit every model on each dataset's training windows and score it on the "
        "same test windows (one test dataset hash per dataset and split): chronological "
        "per subject (held-out days) and held-out subjects. Prints one table per dataset "
        "and split (RMSE/MAE/MARD/Clarke A+B/90%% coverage at 30 and 60 min, mean ± SD over "
        "seeds), writes benchmark.md/.html/.json under --out, and records one MLflow parent "
        "run with a child run per model and seed. A finished child run (same data, model, "
        "seed and config) is not redone, so an interrupted benchmark resumes. GluPredKit "
        "models (glupredkit:ridge ...) run in their own venv (`glucast peers install "
        "glupredkit`; $GLUCAST_PEERS_DIR).",
    )
    p.add_argument(
        "--data",
        action="append",
        default=[],
        metavar="SPEC",
        help="NAME=PATH:FORMAT (e.g. shanghai=data/ShanghaiT1DM:shanghai, "
        "azt1d=data/AZT1D:azt1d, ohio=OhioT1DM/2018/train:ohio), NAME=F.parquet, or "
        "sim:PATIENTS:DAYS (e.g. sim:adults:7); repeat for several datasets",
    )
    p.add_argument(
        "--models",
        help="comma-separated: persistence,linear,ridge,physio,lstm,transformer, "
        "lstm+sim|transformer+sim (pretrained on --pretrain-sim, then trained on the data) and "
        "glupredkit:zero_order|ridge|loop|random_forest|svr|naive_linear_regressor "
        "(default: persistence,ridge,physio,lstm,glupredkit:zero_order,glupredkit:ridge,"
        "glupredkit:loop)",
    )
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    p.add_argument(
        "--splits",
        default="chronological,subjects",
        help="chronological and/or subjects (default both)",
    )
    p.add_argument("--max-epochs", type=int, help="deep models: override trainer.max_epochs")
    p.add_argument("--config", help="YAML training config applied to every model")
    p.add_argument(
        "--held-out-fraction", type=float, default=0.2, help="subjects held out (default 0.2)"
    )
    p.add_argument(
        "--loop-samples",
        type=int,
        default=100,
        help="GluPredKit Loop: rows per subject in its ISF/CR grid search (its default 1000)",
    )
    p.add_argument(
        "--peer-max-train-rows",
        help="GluPredKit: fit on at most N of its training rows, for every peer model (N) or "
        "per model (random_forest=3000,svr=5000: the others use all rows); its random "
        "forest is slow",
    )
    p.add_argument(
        "--extra-features",
        metavar="COLS",
        help="comma-separated frame columns added to every glucast model's past inputs "
        "where the dataset has them (e.g. bolus_auto_u,basal_known on AZT1D)",
    )
    p.add_argument(
        "--pretrain-sim",
        default="adults:7",
        metavar="PATIENTS:DAYS",
        help="the simulated cohort lstm+sim/transformer+sim pretrain on (default adults:7)",
    )
    p.add_argument("--experiment", default="glucast-benchmark", help="MLflow experiment")
    p.add_argument("--out", default="reports/benchmark", help="where benchmark.md/.html/.json go")
    p.add_argument(
        "--quick",
        action="store_true",
        help="the CI form: the ShanghaiT1DM fixture and a 3-patient, 2-day simulated cohort, "
        "small models, 2 seeds (about a minute)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
    from forecast.cli import emit_json
    from training.benchmark import (
        BenchmarkConfig,
        BenchmarkError,
        markdown,
        parse_dataset,
        parse_peer_cap,
        quick_config,
        run_benchmark,
    )

    command = "glucast " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    if args.quick:
        cfg = quick_config(args.out, command)
        if args.data:
            cfg.datasets = [parse_dataset(s) for s in args.data]
    else:
        if not args.data:
            raise BenchmarkError("give --data (one or more datasets) or --quick")
        cfg = BenchmarkConfig(datasets=[parse_dataset(s) for s in args.data], command=command,
                              out_dir=args.out, experiment=args.experiment)  # fmt: skip
        cfg.held_out_fraction = args.held_out_fraction
        cfg.config_path = args.config
        cfg.loop_samples = args.loop_samples
        cfg.peer_max_train_rows = parse_peer_cap(args.peer_max_train_rows)
    if args.models:
        cfg.models = tuple(m.strip() for m in args.models.split(",") if m.strip())
    if args.seeds and not (args.quick and args.seeds == "0,1,2"):
        try:
            cfg.seeds = tuple(int(s) for s in args.seeds.split(",") if s.strip())
        except ValueError:
            raise BenchmarkError(f"--seeds {args.seeds!r}: comma-separated integers") from None
    cfg.splits = tuple(s.strip() for s in args.splits.split(",") if s.strip())
    cfg.pretrain_sim = args.pretrain_sim
    if args.extra_features:
        cfg.extra_features = tuple(c.strip() for c in args.extra_features.split(",") if c.strip())
    if args.max_epochs:
        cfg.overrides.setdefault("trainer", {})["max_epochs"] = args.max_epochs
    if args.experiment != "glucast-benchmark":
        cfg.experiment = args.experiment
    results = run_benchmark(cfg)
    if args.json:
        emit_json(results)
    else:
        print(markdown(results))
        print("written: " + ", ".join(results["outputs"]))
    return 0
