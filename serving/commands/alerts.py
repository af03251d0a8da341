"""`glucast alerts evaluate`: how much earlier a forecast warns than a threshold alert.

Replays a frame through the runtime's alert engine with a forecaster (a baseline fitted on
the training split, or an exported ONNX model directory) and prints, for predicted and
threshold lows and highs: sensitivity, false alerts per day, median lead time, episodes.
With ``--sweep`` it scores several predicted-low quantiles on the same forecasts instead (a
table, ``--plot`` draws it) and, with ``--max-false-per-day``, names the one to use.
Definitions: `serving.insilico.alert_eval`, `serving.insilico.alert_sweep`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the CLI imports its heavy parts when a command runs
    import pandas as pd

    from serving.alerts import AlertThresholds
    from serving.insilico.alert_eval import EpisodeRule

BASELINES = ("persistence", "linear", "ridge", "physio")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "alerts",
        help="glucose alerts: evaluate predicted vs threshold alerts on a frame",
        description="Glucose alerts (urgent low, low, predicted low, high, rapid change, "
        "signal loss, pump faults) and their evaluation.",
    )
    asub = p.add_subparsers(dest="alerts_command", metavar="SUBCOMMAND")
    asub.required = True
    e = asub.add_parser(
        "evaluate",
        help="replay a frame; score predicted vs threshold alerts",
        description="Replay a frame through the alert engine, one cycle per slot, with a "
        "forecast at every reading. Reports sensitivity (episodes warned at or before onset), "
        "false alerts per day and median lead time, for forecast-based and threshold-only "
        "alerts. Baselines are fitted on the training split of a chronological split.",
    )
    e.add_argument(
        "--model",
        required=True,
        metavar="DIR|BASELINE",
        help=f"an exported ONNX model directory, or a baseline: {', '.join(BASELINES)}",
    )
    e.add_argument(
        "--subject-models",
        metavar="DIR",
        default=None,
        help="personal models: every model under DIR whose manifest names a subject (what "
        "`glucast finetune --subject all --out DIR` writes) forecasts for that subject; "
        "--model for the rest",
    )
    e.add_argument("--data", required=True, metavar="F.parquet", help="canonical frame (Parquet)")
    e.add_argument(
        "--split",
        choices=("test", "val", "all"),
        default="test",
        help="replay the held-out test split (default), the validation split (to choose a "
        "rule with --sweep without touching the test days) or the whole frame",
    )
    e.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    e.add_argument(
        "--per-subject",
        action="store_true",
        help="also print each subject's scores (the JSON always has them, under by_subject)",
    )
    e.add_argument(
        "--mlflow",
        action="store_true",
        help="log the scores to MLflow: a child run of the model's training run (from its "
        "manifest), or a run in --experiment for a baseline",
    )
    e.add_argument("--experiment", default="glucast", help="MLflow experiment (default: glucast)")
    r = e.add_argument_group("alert rule (defaults: the engine's)")
    r.add_argument(
        "--quantile",
        type=float,
        default=None,
        help="forecast quantile the predicted low looks at (default: the engine's, 0.4; "
        "interpolated between the forecast's quantiles)",
    )
    r.add_argument("--margin", type=float, default=None, help="mg/dL added to the low threshold")
    r.add_argument("--cycles", type=int, default=None, help="consecutive cycles before alerting")
    r.add_argument("--horizon", type=float, default=None, help="alert horizon, minutes")
    r.add_argument(
        "--realert",
        type=float,
        default=None,
        metavar="MIN",
        help="say a standing predicted low again after MIN minutes (default 20; 0: once)",
    )
    r.add_argument(
        "--realert-falling",
        action="store_true",
        help="trend-aware re-alerting: say a standing predicted low again only while glucose "
        "still falls",
    )
    r.add_argument(
        "--quiet-after-low",
        type=float,
        default=None,
        metavar="MIN",
        help="no predicted low for MIN minutes after a low ended (a treated low's recovery)",
    )
    r.add_argument(
        "--quiet-after-carbs",
        type=float,
        default=None,
        metavar="MIN",
        help="no predicted low for MIN minutes after carbs in the frame",
    )
    r.add_argument(
        "--calibrate",
        type=float,
        default=None,
        metavar="ALPHA",
        help="personal calibration: each subject's predicted-low line is the median times "
        "the ALPHA quantile of its forecast's log error near lows on that subject's "
        "validation days (split-conformal; serving.insilico.alert_tuning), instead of "
        "--quantile",
    )
    r.add_argument("--low", type=float, default=None, help="low threshold, mg/dL (70)")
    r.add_argument(
        "--sweep",
        metavar="Q[,Q...]",
        default=None,
        help="score each of these predicted-low quantiles on the same forecasts (e.g. "
        "0.2,0.3,0.4,0.5) instead of one rule: a table of sensitivity, lead and false alerts",
    )
    r.add_argument(
        "--max-false-per-day",
        type=float,
        default=None,
        metavar="N",
        help="with --sweep: name the most sensitive quantile with at most N false alerts a day",
    )
    r.add_argument(
        "--plot",
        metavar="F.png",
        default=None,
        help="with --sweep: draw warned lows against false alerts per day, leads as labels",
    )
    r.add_argument("--high", type=float, default=None, help="high threshold, mg/dL (250)")
    s = e.add_argument_group("scoring")
    s.add_argument(
        "--window",
        type=float,
        default=None,
        help="minutes before onset an alert may come and still count (default: the horizon)",
    )
    s.add_argument(
        "--min-readings",
        type=int,
        default=None,
        help="consecutive readings beyond threshold per episode (default: the consensus' 15 "
        "min at the frame's sensor period: 3 at 5 min, 2 at 15 min)",
    )
    s.add_argument(
        "--separation", type=float, default=30.0, help="minutes between distinct episodes (30)"
    )
    s.add_argument(
        "--episodes-from",
        default="glucose",
        metavar="COLUMN",
        help="column whose episodes are scored: glucose (the CGM, default) or, on simulated "
        "frames, bg_true / gsub (true hypoglycaemia, without sensor artefacts)",
    )
    s.add_argument(
        "--future-inputs",
        choices=("known", "actual"),
        default="known",
        help="known: only what the runtime knows at each cycle (default); actual: the frame's",
    )
    e.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from forecast.cli import emit_json
    from forecast.schema import read_parquet
    from forecast.windows import split_chronological
    from serving.alerts import AlertThresholds
    from serving.insilico.alert_eval import (
        HIGH_EPISODE,
        LOW_EPISODE,
        consensus_readings,
        evaluate_alerts,
        find_subject_models,
        load_forecaster,
    )

    if args.sweep is None and (args.plot or args.max_false_per_day is not None):
        print("error: --plot and --max-false-per-day need --sweep Q[,Q...]", file=sys.stderr)
        return 2
    if args.sweep is not None and args.quantile is not None:
        print("error: give --quantile (one rule) or --sweep (several), not both", file=sys.stderr)
        return 2
    if args.calibrate is not None and (args.sweep is not None or args.quantile is not None):
        print("error: --calibrate replaces --quantile and --sweep", file=sys.stderr)
        return 2
    frame = read_parquet(args.data)
    print(f"alerts evaluate: {args.data} ({len(frame)} rows)", file=sys.stderr)
    is_baseline = args.model in BASELINES
    need_splits = is_baseline or args.split != "all" or args.calibrate is not None
    splits = split_chronological(frame) if need_splits else None
    train = splits["train"] if (splits is not None and is_baseline) else None
    data = splits[args.split] if splits is not None and args.split != "all" else frame
    print(f"model {args.model}: loading/fitting", file=sys.stderr)
    sweep = parse_sweep(args.sweep)
    quantiles = None
    if is_baseline and (args.quantile is not None or sweep):  # fit it for the quantiles asked
        asked = sweep or (float(args.quantile),)
        quantiles = tuple(sorted({0.05, 0.5, 0.95, *asked}))
    model = load_forecaster(
        args.model, train, future_inputs=args.future_inputs, quantiles=quantiles
    )
    personal = {}
    if args.subject_models:
        found = find_subject_models(args.subject_models)
        present = set(data["subject_id"].astype(str))
        personal = {s: load_forecaster(str(d), None) for s, d in found.items() if s in present}
        print(
            f"personal models for {len(personal)} of {len(present)} subjects",
            file=sys.stderr,
        )

    th = AlertThresholds()
    changes = {}
    if args.quantile is not None:
        changes["predicted_low_quantile"] = args.quantile
    if args.margin is not None:
        changes["predicted_low_margin_mgdl"] = args.margin
    if args.cycles is not None:
        changes["predicted_cycles"] = args.cycles
    if args.realert is not None:
        changes["predicted_low_realert_min"] = args.realert if args.realert > 0 else None
    if args.realert_falling:
        changes["predicted_low_realert_falling"] = True
    if args.quiet_after_low is not None:
        changes["predicted_low_quiet_after_low_min"] = args.quiet_after_low
    if args.quiet_after_carbs is not None:
        changes["predicted_low_quiet_after_carbs_min"] = args.quiet_after_carbs
    if args.horizon is not None:
        changes["predicted_horizon_min"] = args.horizon
    if args.low is not None:
        changes["low_mgdl"] = args.low
        changes["predicted_low_mgdl"] = args.low
    if args.high is not None:
        changes["high_mgdl"] = args.high
        changes["predicted_high_mgdl"] = args.high
    th = replace(th, **changes)
    if args.min_readings is None:
        from forecast.schema import get_meta

        args.min_readings = consensus_readings(get_meta(frame).sampling_minutes or 5)
    low = replace(
        LOW_EPISODE,
        threshold_mgdl=th.low_mgdl or LOW_EPISODE.threshold_mgdl,
        min_readings=args.min_readings,
        min_separation_min=args.separation,
    )
    high = replace(
        HIGH_EPISODE,
        threshold_mgdl=th.high_mgdl or HIGH_EPISODE.threshold_mgdl,
        min_readings=args.min_readings,
        min_separation_min=args.separation,
    )
    personal_th = {}
    if args.calibrate is not None:
        assert splits is not None
        personal_th = _calibrate(args, splits["val"], model, personal, th)
    print(f"replaying {args.split} split", file=sys.stderr)
    if sweep:
        return run_sweep(args, data, model, personal, sweep, th, low, high)
    res = evaluate_alerts(
        data,
        model,
        thresholds=th,
        low=low,
        high=high,
        window_min=args.window,
        future_inputs=args.future_inputs,
        episodes_from=args.episodes_from,
        subject_models=personal,
        subject_thresholds=personal_th,
    )
    res = {"model": args.model, "data": str(args.data), "split": args.split, **res}
    if args.calibrate is not None:
        res["calibration"] = {
            "alpha": args.calibrate,
            "on": "val",
            "log_offsets": {s: list(t.predicted_low_log_offsets) for s, t in personal_th.items()},
        }
    if args.subject_models:
        res["subject_models"] = {"dir": args.subject_models, "subjects": sorted(personal)}
    if args.mlflow:
        res["mlflow"] = _log_mlflow(args, res, data, th)
    if args.json:
        emit_json(res)
        return 0
    print(
        f"{res['days']:.1f} days, {res['subjects']} subject(s), split {args.split}, "
        f"model {args.model}, alert horizon {th.predicted_horizon_min:g} min"
    )
    print(f"{'alert':<16}{'episodes':>9}{'sensitivity':>13}{'lead (min)':>12}{'false/day':>11}")
    for key in ("predicted_low", "threshold_low", "predicted_high", "threshold_high"):
        r = res[key]
        sens, lead, fpd = score_cells(r)
        print(f"{key:<16}{r['episodes']:>9}{sens:>13}{lead:>12}{fpd:>11}")
    if args.per_subject:
        print(f"\n{'subject':<16}{'days':>6}{'lows':>6}{'warned':>9}{'lead':>7}{'false/day':>11}"
              f"{'threshold false/day':>21}")  # fmt: skip
        for sid, r in res["by_subject"].items():
            p, t = r["predicted_low"], r["threshold_low"]
            sens, lead, fpd = score_cells(p)
            print(
                f"{sid:<16}{r['days']:>6.1f}{p['episodes']:>6}{sens:>9}{lead:>7}{fpd:>11}"
                f"{score_cells(t)[2]:>21}"
            )
    return 0


def _calibrate(
    args: argparse.Namespace,
    val: pd.DataFrame,
    model: Any,
    personal: Mapping[str, Any],
    th: AlertThresholds,
) -> dict[str, AlertThresholds]:
    """`--calibrate ALPHA`: every subject's offsets from its validation days' forecasts."""
    from forecast.windows import WindowConfig
    from serving.insilico.alert_eval import replay_forecasts
    from serving.insilico.alert_tuning import calibrate_low, personal_thresholds

    cfg = getattr(model, "config", None) or WindowConfig()
    table = replay_forecasts(
        val, model, config=cfg, future_inputs=args.future_inputs, subject_models=personal
    )
    offsets = calibrate_low(val, table, args.calibrate)
    subjects = sorted(set(val["subject_id"].astype(str)))
    print(f"calibrated the predicted low of {len(subjects)} subject(s) on val", file=sys.stderr)
    return personal_thresholds(th, offsets, subjects)


def parse_sweep(text: str | None) -> tuple[float, ...]:
    """``--sweep 0.2,0.3`` → (0.2, 0.3); () when not given. Bad values: a clear error."""
    from serving.insilico.alert_eval import AlertEvalError
    from serving.insilico.alert_sweep import check_quantiles

    if text is None:
        return ()
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise AlertEvalError(
            f"--sweep {text!r}: give quantiles separated by commas, e.g. 0.2,0.3,0.4"
        ) from None
    return check_quantiles(values)


def run_sweep(
    args: argparse.Namespace,
    data: pd.DataFrame,
    model: Any,
    personal: Mapping[str, Any],
    sweep: tuple[float, ...],
    th: AlertThresholds,
    low: EpisodeRule,
    high: EpisodeRule,
) -> int:
    """`--sweep`: the same forecasts through each quantile's rule; table, JSON or plot."""
    from forecast.cli import emit_json
    from forecast.windows import WindowConfig
    from serving.insilico.alert_eval import replay_forecasts
    from serving.insilico.alert_sweep import (
        GOAL_LEAD_MIN,
        GOAL_SENSITIVITY,
        choose_quantile,
        sweep_quantiles,
    )

    cfg = getattr(model, "config", None) or WindowConfig()
    table = replay_forecasts(
        data, model, config=cfg, future_inputs=args.future_inputs, subject_models=personal
    )
    frame = sweep_quantiles(
        data,
        table,
        sweep,
        thresholds=th,
        past_slots=cfg.past_slots,
        low=low,
        high=high,
        window_min=args.window,
        episodes_from=args.episodes_from,
    )
    budget = args.max_false_per_day
    chosen = None if budget is None else choose_quantile(frame, budget)
    if args.plot:
        from forecast.plots import alert_tradeoff_plot

        goal = None if budget is None else (budget, GOAL_SENSITIVITY, GOAL_LEAD_MIN)
        fig = alert_tradeoff_plot(
            frame, goal=goal, title=f"Predicted-low alerts: {_name(model, args.model)}, "
            f"{args.split} split"
        )  # fmt: skip
        fig.savefig(args.plot, dpi=100, bbox_inches="tight")
        print(f"wrote {args.plot}", file=sys.stderr)
    ref = None
    if args.mlflow:
        ref = _log_mlflow(args, {"split": args.split}, data, th, sweep=frame)
    if args.json:
        rows = frame.astype(object).where(frame.notna(), None).to_dict(orient="records")
        emit_json(
            {
                "model": args.model,
                "data": str(args.data),
                "split": args.split,
                "sweep": rows,
                "max_false_per_day": budget,
                "chosen_quantile": chosen,
                **({"mlflow": ref} if ref else {}),
            }
        )
        return 0
    print(f"{args.split} split, model {args.model}: predicted low by quantile")
    print(f"{'rule':<22}{'episodes':>9}{'sensitivity':>13}{'lead (min)':>12}{'false/day':>11}")
    for _, r in frame.iterrows():
        name = r["rule"] if r["rule"] != "predicted_low" else f"predicted_low q {r['quantile']:g}"
        sens, lead, fpd = score_cells(r)
        print(f"{name:<22}{r['episodes']:>9}{sens:>13}{lead:>12}{fpd:>11}")
    if budget is not None:
        print(
            f"most sensitive within {budget:g} false alert(s)/day: "
            + (f"quantile {chosen:g}" if chosen is not None else "none of the sweep")
        )
    return 0


def _name(model: Any, spec: str) -> str:
    """What a plot calls the model: the manifest's model kind, not the directory path."""
    manifest = getattr(model, "manifest", None)
    kind = (getattr(manifest, "raw", None) or {}).get("model")
    return str(kind) if kind else spec


def _log_mlflow(
    args: argparse.Namespace,
    res: Mapping[str, Any],
    data: pd.DataFrame,
    th: AlertThresholds,
    sweep: pd.DataFrame | None = None,
) -> dict:
    """The replay as an MLflow run (training.tracking.log_alert_run); its id and UI link."""
    from dataclasses import asdict

    from training import tracking  # the lab's MLflow logging; never loaded by the runtime

    params = {
        **{f"rule.{k}": v for k, v in asdict(th).items()},
        "split": args.split,
        "future_inputs": args.future_inputs,
        "episodes_from": args.episodes_from,
        "min_readings": args.min_readings,
        "separation_min": args.separation,
        "window_min": args.window,
        "subject_models": args.subject_models,
    }
    if sweep is not None:  # the sweep's rule varies the quantile
        params.pop("rule.predicted_low_quantile")
    ref = tracking.log_alert_run(
        args.experiment, res, model=args.model, frame=data, data_path=args.data,
        params=params, sweep=sweep,
    )  # fmt: skip
    print(f"MLflow run: {ref['url']}", file=sys.stderr)
    return ref


def score_cells(r: Mapping[str, Any]) -> tuple[str, str, str]:
    """Sensitivity, lead and false alerts a day as table cells ("—" where not scored)."""

    def missing(x: Any) -> bool:
        return x is None or x != x  # None in JSON results, NaN in the sweep frame

    return (
        "—" if missing(r["sensitivity"]) else f"{100 * r['sensitivity']:.1f} %",
        "—" if missing(r["lead_min"]) else f"{r['lead_min']:.1f}",
        "—" if missing(r["false_per_day"]) else f"{r['false_per_day']:.2f}",
    )
