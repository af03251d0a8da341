"""``glucast data``: ingest real data into a canonical frame, and describe a frame.

    glucast data ingest PATH... --format ohio|shanghai|nightscout|csv|azt1d --out F.parquet
                        [--strict] [--json] [--timezone TZ] [--units U] [--columns MAP]
                        [--subject ID] [--basal U/H] [--time-format FMT] [--extended-hours H]
    glucast data describe F.parquet [--json]

Only the standard library is imported here; pandas and the readers load inside `run`.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "data", help="ingest real data (OhioT1DM, ShanghaiT1DM, AZT1D, Nightscout, CSV)"
    )
    dsub = p.add_subparsers(dest="data_command", metavar="ACTION")
    dsub.required = True

    ing = dsub.add_parser(
        "ingest",
        help="read source files into a canonical Parquet frame",
        description="Read source files onto the 5-minute grid and write a Parquet frame. "
        "Bad records are listed (or, with --strict, stop the ingest) with file, record, "
        "field and value.",
    )
    ing.add_argument("paths", nargs="+", metavar="PATH", help="files or directories")
    ing.add_argument(
        "--format",
        choices=["ohio", "shanghai", "nightscout", "csv", "azt1d"],
        help="source format (default: from the file suffixes; AZT1D from the CSV header)",
    )
    ing.add_argument("--out", required=True, metavar="F.parquet", help="frame to write")
    ing.add_argument("--strict", action="store_true", help="stop at the first bad record")
    ing.add_argument("--json", action="store_true", help="print one JSON summary on stdout")
    ing.add_argument(
        "--timezone",
        metavar="TZ",
        help="IANA zone of local timestamps (defaults: ohio/csv UTC, shanghai Asia/Shanghai, "
        "nightscout the profile's zone)",
    )
    ing.add_argument("--units", metavar="U", help="glucose units of a CSV: mg/dL or mmol/L")
    ing.add_argument(
        "--columns",
        metavar="MAP",
        help="CSV column mapping, e.g. subject_id=id,time=ts,glucose=sgv; time=date+time joins "
        "two columns; insulin and carbs: bolus_u=COL (U per record), basal_rate=COL (U/h held "
        "until the next value), basal_u=COL (U per record), carbs_g=COL (g); finger_stick=COL; "
        "type=COL with cgm/manual rows",
    )
    ing.add_argument("--subject", metavar="ID", help="subject id (Nightscout, single-person CSV)")
    ing.add_argument(
        "--basal",
        type=float,
        metavar="U/H",
        help="Nightscout scheduled basal rate without a profile",
    )
    ing.add_argument("--time-format", metavar="FMT", help="CSV strftime format of timestamps")
    ing.add_argument(
        "--extended-hours",
        type=float,
        metavar="H",
        help="AZT1D: spread the delayed part of extended boluses over H hours (the files do "
        "not record the duration; without it that part is listed in the report, not the frame)",
    )
    ing.set_defaults(func=run)

    desc = dsub.add_parser(
        "describe",
        help="per-subject days, coverage, glycaemic outcomes, daily insulin (basal / own bolus "
        "/ automatic) and carbs",
    )
    desc.add_argument("path", metavar="F.parquet")
    desc.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    desc.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.data_command == "ingest":
        return _ingest(args)
    return _describe(args)


def parse_columns(spec: str | None) -> dict[str, str] | None:
    """'subject_id=id,time=ts,glucose=sgv' -> {'subject_id': 'id', ...}."""
    if not spec:
        return None
    from forecast.schema import InputError

    out = {}
    for item in spec.split(","):
        key, sep, val = item.partition("=")
        if not sep or not key.strip() or not val.strip():
            raise InputError(
                "bad --columns item (expected canonical=source)", field="columns", value=item
            )
        out[key.strip()] = val.strip()
    return out


def ingest_summary(frame: Any, report: Any, out: str) -> dict[str, Any]:
    """The JSON object of ``ingest --json``."""
    import numpy as np

    def total(col: str) -> float:
        return float(np.nansum(frame[col].to_numpy(dtype=float))) if col in frame else 0.0

    return {
        "out": out,
        "source": report.source,
        "files": list(report.files),
        "subjects": int(frame["subject_id"].nunique()),
        "subject_ids": sorted(map(str, frame["subject_id"].unique())),
        "rows": len(frame),
        "readings": int(frame["glucose"].notna().sum()),
        "readings_in": report.readings_in,
        "readings_rejected": report.readings_rejected,
        "rejected": [r.as_dict() for r in report.rejected],
        "bolus_u": round(total("bolus_u"), 6),
        "basal_u": round(total("basal_u"), 6),
        "carbs_g": round(total("carbs_g"), 6),
        "counts": dict(report.counts),
        "notes": list(report.notes),
    }


def _ingest(args: argparse.Namespace) -> int:
    from forecast.cli import emit_json
    from forecast.io import read
    from forecast.metrics import json_safe
    from forecast.schema import write_parquet

    frame, report = read(
        args.paths,
        args.format,
        strict=args.strict,
        timezone=args.timezone,
        units=args.units,
        columns=parse_columns(args.columns),
        subject_id=args.subject,
        basal=args.basal,
        time_format=args.time_format,
        extended_hours=getattr(args, "extended_hours", None),
    )
    # a file that could not be read at all (unrecognised header...) fails the ingest: an
    # empty or partial frame with exit status 0 would pass for success in a script
    unread = [r for r in report.rejected if r.field == "header"]
    if unread and not len(frame):
        for r in unread:
            print(f"error: {r.file}: {r.reason} ({r.record}: {r.value!r})", file=sys.stderr)
        for note in report.notes:
            print(f"  note: {note}", file=sys.stderr)
        print(
            f"  readings 0 of {report.readings_in}; nothing written to {args.out}",
            file=sys.stderr,
        )
        return 1
    write_parquet(frame, args.out)
    summary = ingest_summary(frame, report, str(args.out))
    if args.json:
        emit_json(json_safe(summary))
        return _unread(unread)
    print(
        f"{summary['source']}: {len(summary['files'])} file(s) -> {args.out}\n"
        f"  subjects {summary['subjects']}, rows {summary['rows']}, readings "
        f"{summary['readings']} of {summary['readings_in']} "
        f"({summary['readings_rejected']} rejected)\n"
        f"  bolus {summary['bolus_u']:.2f} U, basal {summary['basal_u']:.2f} U, "
        f"carbs {summary['carbs_g']:.1f} g"
    )
    rejected = {
        k[len("rejected:") :]: v for k, v in report.counts.items() if k.startswith("rejected:")
    }
    for reason, n in sorted(rejected.items(), key=lambda kv: -kv[1]):
        print(f"  rejected {n:6d} x {reason}")
    if report.rejected:
        r = report.rejected[0]
        print(f"  e.g. {r.file}: {r.record}: {r.field}={r.value!r} ({r.reason})", file=sys.stderr)
    for note in report.notes[:10]:
        print(f"  note: {note}")
    return _unread(unread)


def _unread(unread: list[Any]) -> int:
    """Exit status 1 (with the reasons on stderr) when some file was not read at all."""
    for r in unread:
        print(f"error: {r.file} was not read: {r.reason} ({r.value!r})", file=sys.stderr)
    return 1 if unread else 0


def describe_frame(frame: Any) -> dict[str, Any]:
    """Per-subject days, readings, coverage and outcome metrics (forecast.glycemia)."""
    import numpy as np

    from forecast.glycemia import outcomes_frame
    from forecast.schema import PROFILE_COLUMNS, SLOT_MINUTES, get_meta

    meta = get_meta(frame)
    table = outcomes_frame(frame, by="subject")
    slots = frame.groupby("subject_id", sort=True, observed=True).size()
    # the therapy profile (a forecaster's static inputs), median per subject where the frame has it
    profile_cols = [c for c in PROFILE_COLUMNS if c in frame.columns]
    profile = frame.groupby("subject_id", sort=True, observed=True)[profile_cols].median()
    per_day = insulin_per_day(frame)
    subjects = []
    sampling = float(meta.sampling_minutes or SLOT_MINUTES)
    for sid, row in table.iterrows():
        n = int(row["n"])
        d: dict[str, Any] = {
            "subject_id": str(sid),
            # days of CGM data (readings x sampling period): gaps do not count, and a
            # 15-min sensor is not penalised; span_days is the subject's grid, first to last
            "days": n * sampling / 1440.0,
            "span_days": float(slots.get(sid, 0) * SLOT_MINUTES / 1440.0),
        }
        for k, v in row.items():
            d[k] = None if isinstance(v, float) and not np.isfinite(v) else v
        d["n"] = n
        for c in profile_cols:
            d[c] = float(profile.loc[sid, c])
        d.update(per_day.get(sid, {}))
        subjects.append(d)
    return {
        "source": meta.source,
        "timezone": meta.timezone,
        "sampling_minutes": meta.sampling_minutes,
        "licence": meta.licence,
        "therapy_profile": profile_cols,
        "subjects": subjects,
        "totals": {
            "subjects": len(subjects),
            "days": float(sum(s["days"] for s in subjects)),
            "readings": int(frame["glucose"].notna().sum()),
            "bolus_u": float(np.nansum(frame["bolus_u"])),
            "basal_u": float(np.nansum(frame["basal_u"])),
            "carbs_g": float(np.nansum(frame["carbs_g"])),
        },
    }


def insulin_per_day(frame: Any) -> dict[str, dict[str, float | None]]:
    """Per subject: total daily insulin split basal / own bolus / automatic, and carbs/day.

    Per day of the subject's grid. Basal is per day *where the rate is known* when the frame
    says so (``basal_known``): a day with no stated rate would otherwise read as no basal.
    Automatic boluses (``bolus_auto_u``) are part of ``bolus_u`` and are shown apart.
    """
    import numpy as np

    from forecast.schema import SLOT_MINUTES

    per_slot = SLOT_MINUTES / 1440.0
    out: dict[str, dict[str, float | None]] = {}
    for sid, g in frame.groupby("subject_id", sort=True, observed=True):
        days = len(g) * per_slot
        auto = float(g["bolus_auto_u"].sum()) if "bolus_auto_u" in g else 0.0
        if "basal_known" in g:
            known = g["basal_known"].to_numpy(dtype=float) > 0
            kdays = float(known.sum()) * per_slot
            basal = float(g["basal_u"].to_numpy()[known].sum()) / kdays if kdays else None
        else:
            kdays, basal = days, float(g["basal_u"].sum()) / days
        bolus = (float(g["bolus_u"].sum()) - auto) / days
        d = {
            "basal_u_day": basal,
            "bolus_u_day": bolus,
            "auto_u_day": auto / days,
            "tdd_u_day": None if basal is None else basal + bolus + auto / days,
            "carbs_g_day": float(np.nansum(g["carbs_g"])) / days,
            "basal_known_days": kdays,
        }
        out[str(sid)] = d
    return out


def _describe(args: argparse.Namespace) -> int:
    from forecast.cli import emit_json
    from forecast.metrics import json_safe
    from forecast.schema import read_parquet

    frame = read_parquet(args.path)
    info = describe_frame(frame)
    if args.json:
        emit_json(json_safe({"file": str(args.path), **info}))
        return 0
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"{args.path} — {info['source']} ({info['timezone']})")
    cols = [
        ("subject_id", "subject", "{}"),
        ("days", "days", "{:.1f}"),
        ("span_days", "span", "{:.1f}"),
        ("n", "readings", "{}"),
        ("coverage", "coverage %", "{:.0f}"),
        ("mean", "mean", "{:.0f}"),
        ("cv", "CV %", "{:.0f}"),
        ("gmi", "GMI %", "{:.1f}"),
        ("tir", "TIR %", "{:.0f}"),
        ("tbr70", "<70 %", "{:.1f}"),
        ("tbr54", "<54 %", "{:.1f}"),
        ("tar180", ">180 %", "{:.0f}"),
        ("tar250", ">250 %", "{:.0f}"),
        ("lbgi", "LBGI", "{:.1f}"),
        ("hbgi", "HBGI", "{:.1f}"),
        ("tdd_u_day", "TDD U/d", "{:.1f}"),
        ("basal_u_day", "basal", "{:.1f}"),
        ("bolus_u_day", "bolus", "{:.1f}"),
        ("auto_u_day", "auto", "{:.1f}"),
        ("carbs_g_day", "carbs g/d", "{:.0f}"),
    ]
    cols += [
        (c, head, "{:.0f}")
        for c, head in (("carb_ratio_g_per_u", "CR g/U"), ("isf_mgdl_per_u", "ISF"))
        if c in info["therapy_profile"]
    ]
    for _, head, _ in cols:
        t.add_column(head, justify="left" if head == "subject" else "right")
    for s in info["subjects"]:
        t.add_row(*["—" if s.get(k) is None else fmt.format(s[k]) for k, _, fmt in cols])
    Console(width=200).print(t)
    tot = info["totals"]
    print(
        f"{tot['subjects']} subjects, {tot['days']:.1f} days, {tot['readings']} readings; "
        f"bolus {tot['bolus_u']:.1f} U, basal {tot['basal_u']:.1f} U, carbs {tot['carbs_g']:.0f} g"
    )
    return 0
