"""`glucast evaluate`: score an exported model or a baseline on the test split."""

from __future__ import annotations

import argparse
import os


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate",
        help="score an exported model (DIR) or a baseline on the test split",
        description="RMSE, MAE, MARD, bias, Clarke and Parkes zones, time lag, errors by "
        "glucose range and interval coverage per horizon, on the test split the model "
        "directory's manifest describes (or a baseline fitted on the train split). "
        "--bglp adds the OhioT1DM challenge scores, --interventional re-simulates held-out "
        "windows (simulator data) to check the response to planned insulin.",
    )
    p.add_argument(
        "--model",
        required=True,
        help="model directory (model.onnx + manifest.json) or persistence|linear|ridge|physio, "
        "or on a simulated frame oracle-noise|oracle-filter|oracle (the forecast ceilings; "
        "oracle = oracle-filter with --ceiling)",
    )
    p.add_argument("--data", required=True, help="canonical frame (.parquet)")
    p.add_argument("--config", help="YAML config for baselines (split, window)")
    p.add_argument(
        "--split",
        choices=("auto", "all"),
        default="auto",
        help="auto: the model's own test split; all: every window of the frame",
    )
    p.add_argument("--bglp", action="store_true", help="add OhioT1DM BGLP challenge scores")
    p.add_argument(
        "--interventional",
        action="store_true",
        help="re-simulate held-out windows with changed insulin (simulator data only)",
    )
    p.add_argument("--max-windows", type=int, default=300, help="windows for --interventional")
    p.add_argument("--plots", metavar="DIR", help="write Clarke/Parkes/overlay PNGs here")
    p.add_argument(
        "--ceiling",
        action="store_true",
        help="simulated frames: also score both oracles on the same windows and report the "
        "model's RMSE ratio to each per horizon (the filter oracle takes ~1 min)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument(
        "--mlflow",
        action="store_true",
        help="log the results to MLflow: a child run of the model's training run (found "
        "from its manifest), or a run in --experiment for a baseline",
    )
    p.add_argument("--experiment", default="glucast", help="MLflow experiment (default: glucast)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
    from forecast.cli import emit_json
    from forecast.schema import read_parquet
    from training.evaluate import bglp, public, resolve, save_plots, score

    frame = read_parquet(args.data)
    fc, windows, info, test_frame = resolve(
        args.model, frame, config_path=args.config, split=args.split
    )
    report = score(fc, windows)
    pred = report.pop("_pred")
    out = {**info, **public(report)}
    if args.ceiling or args.model == "oracle":
        from training.evaluate import ceiling

        known = {str(info["model"]): report}  # an oracle is not scored twice
        out["ceiling"] = ceiling(frame, windows, report, tuple(fc.quantiles), known)
    if args.bglp:
        out["bglp"] = bglp(fc, test_frame, windows.config)
    if args.interventional:
        from training.interventional import interventional_accuracy

        out["interventional"] = interventional_accuracy(
            fc.predict, frame, windows, max_windows=args.max_windows, quantiles=fc.quantiles
        )
    if args.plots:
        paths = save_plots(windows, pred, tuple(fc.quantiles), args.plots, str(info["model"]))
        out["plots"] = [str(p) for p in paths]
    if args.mlflow:
        from training.tracking import log_evaluation_run

        out["mlflow"] = log_evaluation_run(
            args.experiment, out, model=args.model, frame=test_frame, data_path=args.data
        )
    if args.json:
        emit_json(out)
    else:
        _table(out)
    return 0


def _table(out: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"{out['model']} on test data {out['dataset_hash'][:12]}")
    for c in (
        "horizon",
        "n",
        "RMSE",
        "MAE",
        "MARD %",
        "Clarke A %",
        "Parkes A %",
        "cover %",
        "lag",
    ):
        t.add_column(c, justify="right")

    def f(v, d=1):
        return "-" if v is None else f"{v:.{d}f}"

    for h, m in out["horizons"].items():
        t.add_row(
            f"{h} min",
            str(m["n"]),
            f(m["rmse"], 2),
            f(m["mae"], 2),
            f(m["mard"]),
            f(m["clarke"].get("A")),
            f(m["parkes"].get("A")),
            f(m["coverage"]),
            f(m["lag_min"], 0),
        )
    import sys

    Console(width=None if sys.stdout.isatty() else 160).print(t)
    if "bglp" in out:
        b = out["bglp"]
        print(
            "BGLP (mean of per-subject scores): "
            + ", ".join(
                f"{k} min RMSE {b[k]['rmse']:.2f} MAE {b[k]['mae']:.2f}"
                for k in ("30", "60")
                if k in b
            )
        )
    if "interventional" in out:
        iv = out["interventional"]
        print(
            f"interventional: relative error at 60 min {iv['relative_error_60']}, "
            f"monotonicity violations {iv['monotonicity_violation_pct']}%"
        )
    for name, r in out.get("ceiling", {}).get("ratio", {}).items():
        print(
            f"RMSE / {name}: "
            + ", ".join(f"{h} min {r[h]:.2f}x" for h in ("30", "60") if r.get(h) is not None)
        )
    for p in out.get("plots", []):
        print(f"plot: {p}")
    if "mlflow" in out:
        print(f"MLflow run: {out['mlflow']['url']}")
