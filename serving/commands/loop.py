"""`glucast loop`: run the runtime on simulated or replayed devices (stdlib imports only here).

    glucast loop --backend sim --patient adult#001 --journal run.db --speed fast --hours 24
    glucast loop --model DIR --backend sim --patient adult#001 --journal run.db --speed realtime
    glucast loop --backend replay --replay frame.parquet --patient ohio-559 --journal r.db
    glucast loop --mode monitor --journal m.db --speed fast --hours 24
    glucast loop --mode advisory --accept-prob 0.8 --accept-delay 10 --journal a.db --speed fast

``--mode``: ``monitor`` (CGM, forecast and alerts; the pump is never commanded),
``advisory`` (advice a simulated person confirms with ``--accept-prob`` after
``--accept-delay`` minutes; only confirmed advice goes, through the supervisor, to the pump)
or ``closed`` (the default). ``open`` is advisory with nobody to confirm (advice journaled
only). Alerts run in every mode.

Restarting the same command continues the same run: the journal and the simulated devices'
state file (``--device-state``, default ``<journal>.device.db``) carry everything over, and
``--hours`` counts from the run's first start. Also runnable as
``python -m serving.commands.loop ...``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

# the names of serving.controllers.CONTROLLER_NAMES (spelled here: --help loads no numpy)
CONTROLLERS = ("mpc", "physio-mpc", "basal-bolus", "pid", "oref0", "loop")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("loop", help="run the closed loop (simulated or replayed devices)")
    add_arguments(p)
    p.set_defaults(func=run)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", metavar="DIR", help="exported forecaster (model.onnx + manifest.json)"
    )
    p.add_argument("--backend", choices=("sim", "replay"), default="sim")
    p.add_argument(
        "--patient",
        default="adult#001",
        help="sim: patient(s) e.g. adult#001 or adults; replay: subject id",
    )
    p.add_argument("--journal", required=True, metavar="F.db", help="the loop's SQLite journal")
    p.add_argument(
        "--journal-sync",
        choices=("full", "normal"),
        default="full",
        help="full: commits survive a power cut (default); normal: survive a process crash only",
    )
    p.add_argument(
        "--device-state",
        metavar="F.db",
        help="sim: simulated devices' state file (default <journal>.device.db)",
    )
    p.add_argument("--replay", metavar="FRAME", help="replay: canonical frame (.parquet or .csv)")
    p.add_argument("--speed", choices=("realtime", "fast"), default="realtime")
    p.add_argument(
        "--hours", type=float, help="stop when the run (from its first start) reaches N hours"
    )
    p.add_argument(
        "--controller", choices=CONTROLLERS, help="default: mpc with --model, else physio-mpc"
    )
    p.add_argument(
        "--mode",
        choices=("monitor", "advisory", "closed", "open"),
        default="closed",
        help="monitor: alerts only, the pump runs its schedule; advisory: advice a person "
        "confirms; closed: the loop acts (default); open: advisory with nobody to confirm",
    )
    p.add_argument("--accept-prob", type=float, default=0.8, metavar="P",
                   help="advisory: probability the simulated person accepts advice (default 0.8)")  # fmt: skip
    p.add_argument("--accept-delay", type=float, default=10.0, metavar="MIN",
                   help="advisory: minutes before the person answers (default 10)")  # fmt: skip
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="sim: meals, sensor noise; advisory: the simulated person",
    )
    p.add_argument(
        "--sensor", default="dexcom", help="sim: dexcom | dexcom-noise | none | simglucose"
    )
    p.add_argument(
        "--carb-error", type=float, default=0.0, help="sim: SD of the announced-carb error"
    )
    p.add_argument("--start", default=None, help="sim: start time (UTC, on the 5-min grid)")
    p.add_argument("--fault", action="append", default=[], metavar="SPEC",
                   help="inject a device fault, e.g. dropout:start=60,minutes=30 (repeatable)")  # fmt: skip
    p.add_argument("--quiet", action="store_true", help="no per-cycle lines on stderr")
    p.add_argument("--json", action="store_true", help="print one JSON summary at the end")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    import pandas as pd

    from serving.insilico.backends import ReplayBackend, SimBackend
    from serving.journal import Journal
    from serving.loop import ControlLoop, LoopError, StopFlag, run_loop

    journal_path = Path(args.journal)
    from serving.controllers import build_controller

    # a model that cannot be trusted is not fatal: the predictor falls back and says why
    built = build_controller(args.controller, args.model, strict=False)
    controller, predictor = built.controller, built.predictor
    if args.backend == "sim":
        from serving.insilico.simulated import DEFAULT_START, SimulatedCohort, WorldConfig

        cfg = WorldConfig(
            patients=args.patient,
            seed=args.seed,
            start=args.start or DEFAULT_START,
            sensor=args.sensor,
            carb_error=args.carb_error,
        )
        state = (
            Path(args.device_state)
            if args.device_state
            else journal_path.with_name(journal_path.name + ".device.db")
        )
        backend = SimBackend(SimulatedCohort(cfg, state_path=state), faults=args.fault)
    else:
        if not args.replay:
            raise LoopError("--backend replay needs --replay FRAME")
        from forecast.schema import read_parquet

        src = Path(args.replay)
        frame = (
            read_parquet(src)
            if src.suffix == ".parquet"
            else pd.read_csv(src, parse_dates=["time"])
        )
        backend = ReplayBackend(frame, args.patient, window=predictor.config, faults=args.fault)
    person = None
    if args.mode == "advisory":
        from serving.insilico.advisory import AdvisoryPerson

        person = AdvisoryPerson(len(backend.names), args.accept_prob, args.accept_delay, args.seed)
    journal = Journal(journal_path, sync=args.journal_sync)
    loop = ControlLoop(backend, journal, controller, predictor, mode=args.mode, person=person)
    loop.start(describe=backend.describe())
    until = None
    if args.hours is not None:
        until = loop.run_start + pd.Timedelta(hours=args.hours)
    if args.backend == "replay":
        until = backend.until if until is None else min(until, backend.until)
    stop = StopFlag()
    print(f"glucast loop: {', '.join(backend.names)} from {backend.now()} ({args.speed}, {args.mode})",
          file=sys.stderr, flush=True)  # fmt: skip
    on_cycle = None if args.quiet else _printer(loop.mode.value)
    summary = run_loop(loop, until=until, speed=args.speed, stop=stop, on_cycle=on_cycle)
    info = journal.summary()
    journal.close()
    if callable(getattr(controller, "close", None)):  # a peer's process ends with the loop
        controller.close()
    if hasattr(backend, "world"):
        backend.world.close()
    if args.json:
        from forecast.cli import emit_json

        emit_json(
            {
                "mode": loop.mode.value,
                "cycles_this_run": summary.cycles,
                "start": summary.start.isoformat(),
                "end": summary.end.isoformat(),
                "stopped_by": summary.stopped_by,
                "wall_s": summary.wall_s,
                "journal": info,
            }
        )
    print(f"glucast loop: stopped ({summary.stopped_by}) at {summary.end} after {summary.cycles} cycles",
          file=sys.stderr, flush=True)  # fmt: skip
    return 0 if not info["problems"] else 1


def _printer(mode: str = "closed"):
    """One line per patient per cycle on stderr (alerts are printed by the loop itself)."""

    def show(recs) -> None:
        for r in recs:
            v = r.verdict
            g = "---" if r.glucose != r.glucose else f"{r.glucose:3.0f}"
            sent = ",".join(f"{c.command.kind}:{c.status}" for c in r.results) or "-"
            if mode == "monitor":
                what = "schedule"
            else:
                what = (f"{'advice ' if mode != 'closed' else ''}{v.temp_basal_u_per_h:5.2f} U/h "
                        f"{v.duration_min}m +{v.bolus_u:4.2f} U {v.fallback or ''}")  # fmt: skip
            said = " ".join(a["action"] for a in r.advice)
            print(
                f"{r.time:%Y-%m-%d %H:%M} {r.patient} g={g} iob={r.iob_u:5.2f} → {what} "
                f"[{sent}]{' ' + said if said else ''}",
                file=sys.stderr,
                flush=True,
            )

    return show


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m serving.commands.loop ...`: the same command without the plugin scan."""
    from forecast.schema import GlucastError

    p = argparse.ArgumentParser(prog="glucast loop")
    add_arguments(p)
    args = p.parse_args(argv)
    try:
        return run(args)
    except GlucastError as e:
        print(f"glucast loop: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
