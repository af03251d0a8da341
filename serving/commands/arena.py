"""`glucast arena`: every controller on the same patients, seeds and meals, in three scenarios.

    glucast arena --patients all --days 7 --seeds 0,1 --model artifacts/lstm \
        --out reports/arena --mlflow
    nice -n 10 glucast arena --patients adult#001,adult#002,child#001 --days 2 --seeds 0 \
        --controllers basal-bolus,pid,oref0,loop,physio-mpc --out reports/arena-small

Standard-library imports only at the top (the CLI must start fast); the simulator, the peers
and matplotlib load inside `run`, MLflow only with `--mlflow` (through `training.tracking`).
See `serving.insilico.arena` for what is compared and how.
"""

from __future__ import annotations

import argparse
import sys

# serving.insilico.arena's names, spelled here so that --help loads nothing heavy
ARENA_CONTROLLERS = "basal-bolus,pid,oref0,loop,mpc"
SCENARIOS = "announced,unannounced,variability"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "arena",
        help="compare controllers (basal-bolus, PID, oref0, Loop, MPC) on the same cohort",
        description="Run every controller on the same virtual patients, seeds and meals in "
        "three scenarios (announced meals with 20 %% carb error, unannounced meals, announced "
        "with intra-patient variability); write one table per age group, an HTML report with "
        "the cohort CVGA and per-patient outcomes, optionally an MLflow run.",
    )
    p.add_argument("--patients", default="all", help="all | adults | ... | names (default all)")
    p.add_argument("--days", type=float, default=7.0, help="days per trial (default 7)")
    p.add_argument("--seeds", default="0,1", help="comma-separated seeds (default 0,1)")
    p.add_argument(
        "--controllers",
        default=ARENA_CONTROLLERS,
        help=f"comma-separated (default {ARENA_CONTROLLERS}; physio-mpc: the MPC without a model)",
    )
    p.add_argument("--scenarios", default=SCENARIOS, help=f"comma-separated (default {SCENARIOS})")
    p.add_argument("--model", metavar="DIR", help="the mpc's exported forecaster")
    p.add_argument(
        "--workers", type=int, default=2, help="processes the patients are split over (default 2)"
    )
    p.add_argument("--sensor", default="dexcom", help="dexcom | dexcom-noise | simglucose | none")
    p.add_argument("--out", metavar="DIR", help="write index.html, arena.json, table.csv, ...")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--mlflow", action="store_true", help="log the arena as an MLflow run")
    p.add_argument("--experiment", default="glucast-arena", help="MLflow experiment")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from serving.insilico.arena import (
        ArenaConfig,
        ArenaError,
        log_mlflow,
        run_arena,
        table_markdown,
        write_report,
    )

    try:
        seeds = tuple(int(s) for s in args.seeds.split(",") if s.strip())
    except ValueError:
        raise ArenaError(f"--seeds must be comma-separated integers, got {args.seeds!r}") from None
    config = ArenaConfig(
        patients=args.patients,
        days=args.days,
        seeds=seeds,
        controllers=tuple(c.strip() for c in args.controllers.split(",") if c.strip()),
        scenarios=tuple(s.strip() for s in args.scenarios.split(",") if s.strip()),
        model_dir=args.model,
        workers=args.workers,
        sensor=args.sensor,
    )
    result = run_arena(config)
    report = None
    if args.out:
        report = write_report(result, args.out)
        print(f"report: {report}", file=sys.stderr)
    data = result.to_json()
    if args.mlflow:
        data["mlflow"] = log_mlflow(result, args.experiment, report)
        print(f"MLflow run: {data['mlflow']['url']}", file=sys.stderr)
    if args.json:
        from forecast.cli import emit_json

        emit_json(data)
    else:
        print(table_markdown(result.table()))
        print(f"\n{result.cycles} cycles per trial; {result.wall_s:.0f} s", file=sys.stderr)
    return 0
