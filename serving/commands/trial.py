"""`glucast trial`: an in-silico trial of one controller over a virtual cohort.

    glucast trial --controller mpc --model artifacts/lstm --patients all --days 7 \
        --scenario random --seed 1 --carb-error 0.2 --json --report reports/trial-mpc
    glucast trial --controller physio-mpc --patients adults --days 2 --mode advisory \
        --accept-prob 0.8 --accept-delay 10 --json
    glucast trial --controller oref0 --patients all --days 7 --unannounced --variability all

``--controller oref0|loop`` runs OpenAPS oref0 / Loop (pyloopkit) as their real code in their
own processes (`glucast peers install` makes their environments); the report counts their
failures (scheduled basal instead) and how often the supervisor changed or vetoed their
commands, and the run info holds the settings they ran with.

Standard-library imports only at the top (the CLI must start fast and never load torch);
the simulator, onnxruntime and matplotlib load inside `run`. MLflow is imported only when
`--mlflow` is given, through `training.tracking`.
"""

from __future__ import annotations

import argparse
import sys

CONTROLLERS = ("mpc", "physio-mpc", "basal-bolus", "pid", "oref0", "loop")
MODES = ("closed", "advisory", "monitor")
GROUPS = ("all", "adults", "adolescents", "children")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "trial",
        help="in-silico trial of a controller over a virtual cohort",
        description="Run all selected virtual patients together in closed loop (5-minute "
        "cycles, every dose through the safety supervisor) and report glycaemic outcomes "
        "per patient and for the cohort.",
    )
    p.add_argument("--controller", required=True, choices=CONTROLLERS)
    p.add_argument("--model", metavar="DIR", help="exported forecaster (model.onnx + manifest)")
    p.add_argument(
        "--patients",
        default="all",
        help=f"{' | '.join(GROUPS)} or names like adult#001,child#002 (default: all)",
    )
    p.add_argument("--days", type=float, default=1.0, help="trial length in days (default 1)")
    p.add_argument("--scenario", default="random", choices=("random",), help="meal scenario")
    p.add_argument("--seed", type=int, default=0, help="meals, announcements, sensor noise")
    p.add_argument(
        "--carb-error",
        type=float,
        default=0.0,
        metavar="SD",
        help="relative SD of carb counts in meal announcements (e.g. 0.2)",
    )
    p.add_argument("--unannounced", action="store_true", help="meals are never announced")
    p.add_argument(
        "--variability",
        default="none",
        metavar="SPEC",
        help="intra-patient variability: none (default), all, or a comma list of circadian "
        "(daily insulin-sensitivity sinusoid, lowest at 06:00), daily (day-to-day sensitivity), "
        "meals (per-meal absorption rate), each optionally =value (amplitude or log-normal σ; "
        "defaults 0.25, 0.2, 0.3); see forecast/sim/variability.py",
    )
    p.add_argument(
        "--sensor",
        default="dexcom",
        choices=("dexcom", "dexcom-noise", "simglucose", "none"),
        help="dexcom: Dexcom G6 (its published noise model, dropouts, compression lows, drift); "
        "dexcom-noise: the G6 noise only; simglucose: simglucose's Dexcom noise; none: "
        "noise-free (default dexcom)",
    )
    p.add_argument("--target", type=float, default=110.0, help="glucose target mg/dL")
    p.add_argument(
        "--mode",
        default="closed",
        choices=MODES,
        help="closed: the supervisor's verdicts go to the pump; advisory: they are offered as "
        "advice to a simulated person who confirms some of them, late; monitor: the pump "
        "runs its schedule, the controller is never asked (default closed)",
    )
    p.add_argument(
        "--accept-prob",
        type=float,
        default=0.8,
        metavar="P",
        help="advisory: probability that the person accepts an advice (default 0.8)",
    )
    p.add_argument(
        "--accept-delay",
        type=float,
        default=10.0,
        metavar="MIN",
        help="advisory: minutes before the person answers an advice (default 10)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help="split the patients over N processes (same results, about N times faster on N "
        "free cores; closed and monitor modes; default 1)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--report", metavar="DIR", help="write index.html, trial.json, patients.csv")
    p.add_argument("--mlflow", action="store_true", help="log the trial as an MLflow run")
    p.add_argument("--experiment", default="glucast-trials", help="MLflow experiment")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from forecast.cli import emit_json
    from serving.insilico.trial import TrialConfig, build_controller, run_trial, write_report

    config = TrialConfig(
        controller=args.controller,
        patients=args.patients,
        days=args.days,
        scenario=args.scenario,
        seed=args.seed,
        carb_error=args.carb_error,
        unannounced=args.unannounced,
        variability=args.variability,
        sensor=args.sensor,
        model_dir=args.model,
        target_mgdl=args.target,
        mode=args.mode,
        accept_prob=args.accept_prob,
        accept_delay_min=args.accept_delay,
    )
    from serving.insilico.trial import close_controller

    if args.workers > 1:  # each worker builds its own controller (and records its info)
        result = _run_with_progress(
            run_trial, config, None, None, None, quiet=args.json, workers=args.workers
        )
    else:
        controller, window, info, predictor = build_controller(config)
        try:
            result = _run_with_progress(
                run_trial, config, controller, window, predictor, quiet=args.json
            )
        finally:  # a peer's processes end with the trial
            close_controller(controller)
        result.info.update(info)
    report = None
    if args.report:
        report = write_report(result, args.report)
        print(f"report: {report}", file=sys.stderr)
    data = result.to_json()
    if args.mlflow:
        data["mlflow"] = _log_mlflow(args.experiment, data, report)
    if args.json:
        emit_json(data)
    else:
        _print_summary(data)
    return 0


def _run_with_progress(
    run_trial, config, controller, window, predictor, *, quiet: bool, workers: int = 1
):
    """Run with a rich progress bar on stderr (none when stderr is not a terminal)."""
    kw = {"workers": workers} if workers > 1 else {}
    if quiet or not sys.stderr.isatty():
        return run_trial(config, controller=controller, window=window, predictor=predictor, **kw)
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn(f"trial {config.controller} ({config.mode})"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} cycles"),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=True,
    ) as bar:
        task = bar.add_task("cycles", total=config.cycles)

        def progress(done: int, total: int) -> None:
            if done % 12 == 0 or done == total:
                bar.update(task, completed=done)

        return run_trial(
            config,
            controller=controller,
            window=window,
            predictor=predictor,
            progress=progress,
            **kw,
        )


def _print_summary(data: dict) -> None:
    c, r = data["cohort"], data["run"]
    keys = ("tir", "tbr70", "tbr54", "tar180", "tar250", "cv", "mean", "bg_tir", "bg_tbr54", "tdi_u",
            "interventions")  # fmt: skip
    print(f"{'patient':18s}" + "".join(f"{k:>9s}" for k in keys))
    for name, m in data["patients"].items():
        print(f"{name:18s}" + "".join(_fmt(m.get(k)) for k in keys))
    print(f"{'cohort (mean)':18s}" + "".join(_fmt(c.get(k)) for k in keys))
    if "advice_offered" in c:
        print(
            f"advice per patient: offered {c['advice_offered']:.1f}, accepted "
            f"{c['advice_accepted']:.1f} (re-advised {c['advice_readvised']:.1f}), refused "
            f"{c['advice_refused']:.1f}, superseded {c['advice_superseded']:.1f}"
        )
    if c.get("controller_fallbacks_total") or c.get("controller_interventions_total"):
        print(
            f"controller: {c['controller_fallbacks_total']:.0f} fallbacks (failed cycles); "
            f"supervisor changed {c['controller_interventions_total']:.0f} "
            f"({c['controller_interventions_pct']:.1f} %) and vetoed "
            f"{c['controller_vetoes_total']:.0f} of its commands"
        )
    print(
        f"mode {r['mode']}; median TBR<70 {c['tbr70_median']:.2f} %, patients with TBR<54 "
        f"{c['patients_with_tbr54']:.0f}, limit violations {c['limit_violations']:.0f}; "
        f"{r['cycles']} cycles in {r['wall_s']:.1f} s, decision p99 {r['decision_ms_p99']:.1f} ms"
    )


def _fmt(v) -> str:
    return f"{v:9.2f}" if isinstance(v, int | float) else f"{'-':>9s}"


def _log_mlflow(experiment: str, data: dict, report) -> dict:
    """One MLflow run (training.tracking.log_trial_run: settings as params, outcomes and
    timings as metrics, the model's lineage as tags); its id and UI link."""
    from training import tracking  # the lab's MLflow logging; never loaded by the runtime

    ref = tracking.log_trial_run(experiment, data, report)
    print(f"MLflow run: {ref['url']}", file=sys.stderr)
    return ref
