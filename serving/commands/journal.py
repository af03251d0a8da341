"""`glucast journal show|export`: read a closed-loop journal (stdlib imports only up here)."""

from __future__ import annotations

import argparse
import sys

TABLES = ("frame", "cycles", "commands", "events", "deliveries")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("journal", help="inspect or export a closed-loop journal (SQLite)")
    jsub = p.add_subparsers(dest="journal_command", metavar="ACTION")
    jsub.required = True

    show = jsub.add_parser("show", help="summary, consistency check and the last cycles")
    show.add_argument("path", help="journal file (.db)")
    show.add_argument(
        "--last", type=int, default=10, metavar="N", help="cycles to list (default 10)"
    )
    show.add_argument("--json", action="store_true", help="print one JSON object")
    show.set_defaults(func=run)

    exp = jsub.add_parser("export", help="write the journal as CSV or Parquet")
    exp.add_argument("path", help="journal file (.db)")
    exp.add_argument("--out", required=True, help="F.csv or F.parquet")
    exp.add_argument(
        "--table",
        choices=TABLES,
        default="frame",
        help="frame: a canonical glucose frame with iob/mode/fallback (default); or a raw table",
    )
    exp.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    path = Path(args.path)
    if not path.is_file():
        raise FileNotFoundError(f"no journal at {path}")
    from serving.journal import Journal

    with Journal(path, readonly=True) as j:
        if args.journal_command == "show":
            return _show(j, args)
        return _export(j, args)


def _show(j, args) -> int:
    import json

    from forecast.cli import emit_json

    summary = j.summary()
    cycles = j.cycles(last=max(0, args.last)) if args.last else None
    events = j.events(last=max(0, args.last)) if args.last else None
    if args.json:
        rows = []
        if cycles is not None and len(cycles):
            for r in cycles.to_dict("records"):
                rows.append(
                    {
                        "patient": r["patient"],
                        "time": r["time"].isoformat(),
                        "glucose": r["glucose"],
                        "iob_u": r["iob_u"],
                        "mode": r["mode"],
                        "fallback": r["fallback"],
                        "verdict": json.loads(r["verdict"]),
                    }
                )
        ev = [] if events is None else [
            {**{k: r[k] for k in ("patient", "time", "kind")}, "detail": json.loads(r["detail"])}
            for r in events.to_dict("records")
        ]  # fmt: skip
        emit_json({"summary": summary, "cycles": rows, "events": ev})
        return 0
    w = sys.stdout.write
    w(f"journal {summary['path']} ({summary['journal_mode']})\n")
    w(f"  patients  {', '.join(summary['patients']) or '-'}\n")
    w(f"  cycles    {summary['cycles']}  ({summary['first'] or '-'} … {summary['last'] or '-'})\n")
    w(f"  commands  {summary['commands']}  {summary['commands_by_status']}\n")
    w(f"  insulin   basal {summary['basal_u']:.2f} U, bolus {summary['bolus_u']:.2f} U\n")
    w(
        f"  events    {summary['events']} ({summary['vetoes']} vetoes)  fallbacks {summary['fallbacks']}\n"
    )
    w(f"  problems  {'; '.join(summary['problems']) or 'none'}\n")
    if cycles is not None and len(cycles):
        w("\n  time                       patient       glucose  iob_u  fallback         verdict\n")
        for r in cycles.to_dict("records"):
            v = json.loads(r["verdict"])
            g = (
                "-"
                if r["glucose"] is None or r["glucose"] != r["glucose"]
                else f"{r['glucose']:.0f}"
            )
            bolus = f" + {v['bolus_u']:.2f} U" if v["bolus_u"] else ""
            w(
                f"  {r['time'].isoformat():<26} {r['patient']:<13} {g:>7}  {r['iob_u'] or 0:5.2f}  "
                f"{r['fallback'] or '-':<16} {v['temp_basal_u_per_h']:.2f} U/h × {v['duration_min']} min"
                f"{bolus}\n"
            )
    return 0 if not summary["problems"] else 1


def _export(j, args) -> int:
    from pathlib import Path

    import pandas as pd

    from forecast.schema import write_parquet

    out = Path(args.out)
    if args.table == "frame":
        df = j.to_frame()
    elif args.table == "commands":
        df = pd.DataFrame([{k: v for k, v in vars(c).items() if k != "ack"} for c in j.commands()])
    elif args.table == "deliveries":
        df = pd.DataFrame(j._read("SELECT * FROM deliveries ORDER BY patient, seq"))
    elif args.table == "events":
        df = j.events()
    else:
        df = j.cycles()
    suffix = out.suffix.lower()
    if suffix == ".parquet":
        if args.table == "frame":
            write_parquet(df, out)
        else:
            df.to_parquet(out, index=False)
    elif suffix == ".csv":
        df.to_csv(out, index=False)
    else:
        print(
            f"glucast journal export: --out must end in .csv or .parquet, got {out}",
            file=sys.stderr,
        )
        return 2
    print(f"wrote {len(df)} rows to {out}", file=sys.stderr)
    return 0
