"""`glucast alerts evaluate`: how much earlier a forecast warns than a threshold alert.

Replays a frame through the runtime's alert engine with a forecaster (a baseline fitted on
the training split, or an exported ONNX model directory) and prints, for predicted and
threshold lows and highs: sensitivity, false alerts per day, median lead time, episodes.
Definitions: `serving.alert_eval`.
"""

from __future__ import annotations

import argparse
import sys

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
        choices=("test", "all"),
        default="test",
        help="replay the held-out test split (default) or the whole frame",
    )
    e.add_argument("--json", action="store_true", help="print one JSON object on stdout")
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
    r.add_argument("--low", type=float, default=None, help="low threshold, mg/dL (70)")
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
    from serving.alert_eval import (
        HIGH_EPISODE,
        LOW_EPISODE,
        consensus_readings,
        evaluate_alerts,
        find_subject_models,
        load_forecaster,
    )
    from serving.alerts import AlertThresholds

    frame = read_parquet(args.data)
    print(f"alerts evaluate: {args.data} ({len(frame)} rows)", file=sys.stderr)
    is_baseline = args.model in BASELINES
    splits = split_chronological(frame) if (is_baseline or args.split == "test") else None
    train = splits["train"] if (splits is not None and is_baseline) else None
    data = splits["test"] if args.split == "test" else frame
    print(f"model {args.model}: loading/fitting", file=sys.stderr)
    quantiles = None
    if is_baseline and args.quantile is not None:  # fit the baseline for the quantile asked
        quantiles = tuple(sorted({0.05, 0.5, 0.95, float(args.quantile)}))
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
    print(f"replaying {args.split} split", file=sys.stderr)
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
    )
    res = {"model": args.model, "data": str(args.data), "split": args.split, **res}
    if args.subject_models:
        res["subject_models"] = {"dir": args.subject_models, "subjects": sorted(personal)}
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
        sens = "—" if r["sensitivity"] is None else f"{100 * r['sensitivity']:.1f} %"
        lead = "—" if r["lead_min"] is None else f"{r['lead_min']:.1f}"
        fpd = "—" if r["false_per_day"] is None else f"{r['false_per_day']:.2f}"
        print(f"{key:<16}{r['episodes']:>9}{sens:>13}{lead:>12}{fpd:>11}")
    return 0
