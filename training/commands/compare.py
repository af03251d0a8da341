"""`glucast compare`: MLflow runs of an experiment side by side, per test dataset hash."""

from __future__ import annotations

import argparse

COLUMNS = (
    ("RMSE 30", "test_rmse_30"),
    ("RMSE 60", "test_rmse_60"),
    ("MAE 30", "test_mae_30"),
    ("MAE 60", "test_mae_60"),
    ("MARD 30", "test_mard_30"),
    ("Clarke A 30", "test_clarke_A_30"),
    ("cover 60", "test_coverage_60"),
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "compare",
        help="compare the runs of an MLflow experiment on identical test data",
        description="Runs are grouped by their test dataset hash: numbers are only put side "
        "by side when the models were scored on exactly the same test windows.",
    )
    p.add_argument("--experiment", required=True, help="MLflow experiment name")
    p.add_argument("--dataset-hash", help="only this test dataset (a prefix is enough)")
    p.add_argument("--latest", action="store_true", help="keep only the newest run per model")
    p.add_argument("--plot", metavar="F.png", help="per-horizon RMSE plot of one hash group")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from forecast.cli import emit_json
    from training.evaluate import ceiling_ratios, ceiling_runs
    from training.tracking import (
        TrackingError,
        compare_url,
        find_runs,
        group_by_hash,
        tracking_uri,
    )

    runs = find_runs(args.experiment)
    # the forecast ceilings (`glucast evaluate --model oracle-* --mlflow`) are evaluation runs
    runs += ceiling_runs(args.experiment, exclude={r["run_id"] for r in runs})
    if args.dataset_hash:
        runs = [r for r in runs if r["dataset_hash"].startswith(args.dataset_hash)]
        if not runs:
            raise TrackingError(
                f"no runs in {args.experiment!r} were scored on a dataset hash starting "
                f"with {args.dataset_hash!r}"
            )
    groups = group_by_hash(runs)
    if args.latest:
        for g in groups:
            seen: set[str] = set()
            keep = []
            for r in g["runs"]:  # newest first
                if r["model"] not in seen:
                    seen.add(r["model"])
                    keep.append(r)
            g["runs"] = keep
    for g in groups:
        g["runs"].sort(key=lambda r: r["metrics"].get("test_rmse_30", float("inf")))
    plot = None
    if args.plot:
        if len(groups) != 1:
            hashes = ", ".join(g["dataset_hash"][:12] for g in groups)
            raise TrackingError(
                f"the runs of {args.experiment!r} were scored on {len(groups)} different test "
                f"datasets ({hashes}); results on different data do not compare — pass "
                "--dataset-hash to choose one"
            )
        plot = _plot(groups[0], args.plot)
    out = {
        "experiment": args.experiment,
        "tracking_uri": tracking_uri(),
        "groups": [
            {
                "dataset_hash": g["dataset_hash"],
                # MLflow's compare-runs page of this group (open it with the UI running)
                "url": compare_url(
                    [r["experiment_id"] for r in g["runs"]], [r["run_id"] for r in g["runs"]]
                ),
                "runs": [
                    {
                        # RMSE / each oracle's per horizon, where the group has oracle runs
                        "ceiling_ratio": ceiling_ratios(g["runs"])[r["run_id"]],
                        "run_id": r["run_id"],
                        "url": r["url"],
                        "model": r["model"],
                        "data": r["data"],
                        "metrics": {k: r["metrics"].get(m) for k, m in COLUMNS},
                        "rmse_by_horizon": _rmse(r),
                    }
                    for r in g["runs"]
                ],
            }
            for g in groups
        ],
    }
    if plot:
        out["plot"] = plot
    if args.json:
        emit_json(out)
    else:
        _tables(out)
    return 0


def _rmse(run: dict) -> dict[str, float]:
    from training.tracking import rmse_by_horizon

    return {str(k): v for k, v in rmse_by_horizon(run["metrics"]).items()}


def _plot(group: dict, path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    from forecast.plots import horizon_metric_plot

    results = {}
    for r in group["runs"]:
        label = f"{r['model']} ({r['run_id'][:6]})"
        results[label] = {h: {"rmse": v} for h, v in _rmse(r).items()}
    fig = horizon_metric_plot(
        results, "rmse", title=f"RMSE by horizon — test data {group['dataset_hash'][:12]}"
    )
    fig.savefig(path, dpi=100, bbox_inches="tight")
    return str(path)


def _tables(out: dict) -> None:
    import sys

    from rich.console import Console
    from rich.table import Table

    # a pipe or a log file gets the full table, not one squeezed to 80 columns
    console = Console(width=None if sys.stdout.isatty() else 160)
    if not out["groups"]:
        console.print(f"no finished glucast runs in experiment {out['experiment']!r}")
    for g in out["groups"]:
        t = Table(title=f"test dataset {g['dataset_hash'][:16]} ({len(g['runs'])} runs)")
        t.add_column("model", no_wrap=True, min_width=11)
        t.add_column("run", no_wrap=True, min_width=8)
        for name, _ in COLUMNS:
            t.add_column(name, justify="right")
        oracles = sorted({o for r in g["runs"] for o in r["ceiling_ratio"]})
        for o in oracles:  # "x oracle-filter": RMSE 30 / 60 over the oracle's
            t.add_column(f"x {o} 30/60", justify="right")
        for r in g["runs"]:
            cr = r["ceiling_ratio"]
            t.add_row(
                r["model"],
                r["run_id"][:8],
                *("-" if v is None else f"{v:.2f}" for v in r["metrics"].values()),
                *(
                    "/".join(
                        "-" if cr[o].get(h) is None else f"{cr[o][h]:.2f}" for h in ("30", "60")
                    )
                    for o in oracles
                ),
            )
        console.print(t)
        # plain print: rich would wrap the long link and break it for copy and paste
        print(f"compare in MLflow: {g['url']}")
    if "plot" in out:
        console.print(f"plot: {out['plot']}")
