"""`glucast simulate`: closed-loop UVA/Padova cohort data as a canonical Parquet frame.

Only the standard library is imported here; numpy, pandas, numba and rich load inside `run`
so that `glucast --help` stays fast.
"""

from __future__ import annotations

import argparse
import sys
import time


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "simulate",
        help="simulate a UVA/Padova S2008 cohort in closed loop and write a glucose frame",
        description=(
            "Simulate virtual patients (UVA/Padova S2008, simglucose's 30 parameter sets) under a "
            "dosing policy with meals, a CGM and a pump; write the canonical frame (CGM in "
            "'glucose', plasma BG in 'bg_true', delivered insulin and announced carbs per "
            "5-minute slot) to Parquet."
        ),
    )
    p.add_argument(
        "--patients",
        default="all",
        help="all | adults | adolescents | children | names, comma-separated (e.g. adult#001,child#002)",
    )
    p.add_argument("--days", type=float, default=1.0, help="days to simulate (default 1)")
    p.add_argument(
        "--scenario",
        choices=("random", "fixed"),
        default="random",
        help="random: simglucose's daily meal distribution; fixed: 07:00 45 g, 12:00 70 g, "
        "18:30 80 g, 22:00 15 g every day",
    )
    p.add_argument("--seed", type=int, default=0, help="random seed (meals, sensor, policy)")
    p.add_argument(
        "--policy",
        choices=("basal-bolus", "excitation"),
        default="basal-bolus",
        help="basal-bolus therapy, or basal-bolus with random temp basals and extra boluses",
    )
    p.add_argument(
        "--sensor",
        choices=("dexcom", "none", "simglucose"),
        default="dexcom",
        help="dexcom: Dexcom G6 (5 min, its published noise model, dropouts, compression lows, "
        "calibration drift); none: "
        "noise-free; simglucose: simglucose's Dexcom (3 min, noise only)",
    )
    p.add_argument("--pump", default="Insulet", help="Insulet | Cozmo | ideal")
    p.add_argument(
        "--announcement-errors",
        action="store_true",
        help="realistic carb-count errors, missed/late boluses and unannounced snacks",
    )
    p.add_argument(
        "--start",
        default="2018-01-01T00:00:00Z",
        help="start time (ISO 8601; default 2018-01-01 UTC)",
    )
    p.add_argument(
        "--variability",
        default="none",
        metavar="SPEC",
        help="intra-patient variability: none (default), all, or a comma list of circadian "
        "(daily insulin-sensitivity sinusoid, lowest at 06:00), daily (day-to-day sensitivity), "
        "meals (per-meal absorption rate), each optionally =value (amplitude or log-normal σ; "
        "defaults 0.25, 0.2, 0.3), e.g. circadian=0.3,meals (see forecast/sim/variability.py)",
    )
    p.add_argument("--out", required=True, help="output Parquet file")
    p.add_argument("--json", action="store_true", help="print one JSON summary on stdout")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import warnings

    import numpy as np

    from forecast.schema import dataset_hash, write_parquet
    from forecast.sim import AnnouncementConfig, load_patients, simulate_cohort
    from forecast.sim.errors import PhysiologyWarning

    patients = load_patients(args.patients)
    announcement = AnnouncementConfig.realistic() if args.announcement_errors else None
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", PhysiologyWarning)
        if args.no_progress:
            frame = _simulate(simulate_cohort, patients, args, announcement, None)
        else:
            from rich.console import Console
            from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

            with Progress(
                TextColumn("[bold]simulate[/] {task.description}"),
                BarColumn(),
                TextColumn("{task.percentage:>3.0f}%"),
                TimeRemainingColumn(),
                console=Console(stderr=True),
                transient=not sys.stderr.isatty(),
            ) as bar:
                task = bar.add_task(f"{len(patients)} patients x {args.days:g} days", total=1)

                def progress(done: int, total: int) -> None:
                    bar.update(task, completed=done, total=total)

                frame = _simulate(simulate_cohort, patients, args, announcement, progress)
    elapsed = time.perf_counter() - t0
    path = write_parquet(frame, args.out)
    extra = frame.attrs["glucast"]["extra"]
    oor = extra["out_of_range"]
    for w in caught:
        if not issubclass(w.category, PhysiologyWarning):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    summary = {
        "out": str(path),
        "patients": len(patients),
        "days": args.days,
        "rows": len(frame),
        "seconds": round(elapsed, 3),
        "patient_days_per_s": round(len(patients) * args.days / max(elapsed, 1e-9), 2),
        "scenario": args.scenario,
        "policy": args.policy,
        "sensor": args.sensor,
        "seed": args.seed,
        "glucose_mean": float(np.nanmean(frame["glucose"]))
        if frame["glucose"].notna().any()
        else None,
        "glucose_missing_fraction": float(frame["glucose"].isna().mean()),
        "out_of_range": oor,
        "dataset_hash": dataset_hash(frame),
    }
    if args.json:
        from forecast.cli import emit_json

        emit_json(summary)
    else:
        print(
            f"wrote {summary['rows']} rows ({len(patients)} patients x {args.days:g} days) to "
            f"{path} in {elapsed:.1f} s"
        )
    if oor:
        print(
            f"warning: BG left 10-600 mg/dL for {len(oor)} patient(s): {', '.join(oor)} "
            "(kept in the frame; see DatasetMeta.extra['out_of_range'])",
            file=sys.stderr,
        )
    return 0


def _simulate(simulate_cohort, patients, args, announcement, progress):
    from forecast.sim.variability import VariabilityConfig

    return simulate_cohort(
        patients,
        days=args.days,
        scenario=args.scenario,
        seed=args.seed,
        policy=args.policy,
        sensor=args.sensor,
        pump=args.pump,
        start=args.start,
        announcement=announcement,
        progress=progress,
        variability=VariabilityConfig.parse(args.variability),
    )
