"""CSV exports: iglu, Dexcom Clarity, LibreView, or any table with a column mapping.

The layout is recognised from the header:

* **iglu** (``id,time,gl``): one row per reading, several subjects per file; mg/dL unless
  the values or ``units=`` say otherwise.
* **Dexcom Clarity** (``Timestamp (YYYY-MM-DDThh:mm:ss)``, ``Event Type``, ``Glucose Value
  (mg/dL)`` or ``(mmol/L)``, ``Insulin Value (u)``, ``Carb Value (grams)``...): EGV rows
  are readings ("Low"/"High" -- outside the sensor's 40–400 mg/dL -- are rejected as
  ``sensor error code``); Calibration -> ``finger_stick``; Insulin "Fast-Acting" ->
  bolus, "Long-Acting" -> spread over 24 h into basal (see `forecast.io.insulins`); Carbs;
  Exercise (Light/Medium/Heavy -> 1/2/3 for its duration). Patient-info rows are skipped
  and counted, their contents (names) are never read into the frame.
* **LibreView** (a title line, then ``Device,Serial Number,Device Timestamp,Record Type,
  Historic Glucose mg/dL,Scan Glucose mg/dL,...``): historic and scan glucose are both
  readings (the grid keeps the one nearest each slot); strip glucose -> ``finger_stick``;
  rapid-acting insulin -> bolus; long-acting insulin -> spread into basal; carbohydrates
  (grams); ketones. The meal/correction/user-change insulin columns split the rapid-acting
  dose the reader's calculator suggested and are not added again. LibreView writes records
  grouped by device and type, not in time order, so order is not checked.
* **anything else** with ``columns={"subject_id": .., "time": .., "glucose": ..}``
  (CLI ``--columns subject_id=id,time=ts,glucose=sgv``; ``subject_id`` optional). The keys
  a mapping accepts are `MAPPABLE` (any other is an error that lists them):
  ``time=date+time`` joins a date column and a time-of-day column; ``bolus_u`` (U per
  record), ``basal_rate`` (U/h, held until the next value or the end of the file),
  ``basal_u`` (U per record), ``carbs_g`` (g per record), ``finger_stick`` (a column of
  meter readings); ``type`` names a column that tells CGM rows (``cgm``...) from finger
  sticks (``manual``...), whose glucose then goes to ``finger_stick``.

Every column a layout does not read is named in the report's notes. A file whose header
matches no layout is rejected (field ``header``, naming the layouts looked for, with a
note giving a ``--columns`` line to start from), and each of its rows is counted as an
input reading, rejected as ``file not read``.

Units: a header that names them (Clarity, LibreView) is believed unless the values
contradict it; otherwise ``units="mmol/L"`` (or ``"mg/dL"``) or the values decide, and
when they cannot (every value between 20 and 33.3) `UnitsError` asks for ``--units``.
Timestamps without a zone are local to ``timezone`` (default UTC); the date format is
inferred from the values, and a file where day and month cannot be told apart raises
unless ``time_format=`` is given. Each row is a record named by its line number.
"""

from __future__ import annotations

import csv as _csv
import io
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from forecast.io.common import (
    PathLike,
    Sink,
    check_timezone,
    count,
    expand_paths,
    finish,
    numbers,
    parse_local,
    present,
    read_bytes,
    record_end,
    reject_unread,
    screen_amounts,
    screen_readings,
    screen_times,
    text_codes,
)
from forecast.io.insulins import classify, injection_events
from forecast.preprocess import MGDL, MMOLL, Events, detect_units, parse_units, table, to_mgdl
from forecast.schema import MGDL_PER_MMOLL, DataReport, DatasetMeta, EmptyInputError, InputError

SOURCE = "CSV"
DEXCOM_TIME = "Timestamp (YYYY-MM-DDThh:mm:ss)"
#: candidate timestamp formats, tried when the values are not ISO 8601
TIME_FORMATS = (
    "%d-%m-%Y %H:%M",
    "%m-%d-%Y %H:%M",
    "%m-%d-%Y %I:%M %p",
    "%d-%m-%Y %H:%M:%S",
    "%m-%d-%Y %H:%M:%S",
    "%d/%m/%Y %H:%M",
    "%m/%d/%Y %H:%M",
    "%m/%d/%Y %I:%M %p",
    "%d/%m/%Y %H:%M:%S",
    "%m/%d/%Y %H:%M:%S",
    "%d.%m.%Y %H:%M",
    "%d.%m.%Y %H:%M:%S",
    "%Y/%m/%d %H:%M",
    "%Y/%m/%d %H:%M:%S",
)
EXERCISE_INTENSITY = {"light": 1.0, "medium": 2.0, "heavy": 3.0}

#: what ``columns=`` may map, and the unit each column must be in
MAPPABLE: dict[str, str] = {
    "subject_id": "subject id (optional; default the file name)",
    "time": "timestamp; DATE+TIME joins two columns",
    "glucose": "CGM glucose (mg/dL or mmol/L)",
    "finger_stick": "meter glucose (same units as glucose)",
    "bolus_u": "bolus insulin, U per record",
    "basal_rate": "basal rate, U/h held until the next value",
    "basal_u": "basal insulin, U per record",
    "carbs_g": "carbohydrate, g per record",
    "type": "record type column: cgm rows vs manual (finger-stick) rows",
}
#: values of a ``type`` column
CGM_TYPES = {"cgm", "sgv", "egv", "sensor", "cgm reading", "historic", "scan"}
MANUAL_TYPES = {"manual", "bg", "bgm", "mbg", "smbg", "meter", "finger", "fingerstick", "cbg"}
LAYOUTS_LOOKED_FOR = "iglu (id,time,gl), Dexcom Clarity, LibreView"


def check_columns(columns: dict[str, str] | None) -> dict[str, str] | None:
    """A column mapping with only known keys, or InputError listing the accepted ones."""
    if columns is None:
        return None
    accepted = "; ".join(f"{k} ({v})" for k, v in MAPPABLE.items())
    for k, v in columns.items():
        if k not in MAPPABLE:
            raise InputError(
                f"unknown --columns key {k!r}",
                field="columns",
                value=f"{k}={v}",
                hint=f"accepted keys: {accepted}",
            )
        if not str(v).strip() or (k != "time" and "+" in str(v)):
            raise InputError("bad --columns value", field="columns", value=f"{k}={v}")
    for need in ("time", "glucose"):
        if need not in columns:
            raise InputError(
                f"--columns must map {need!r}",
                field="columns",
                value=columns,
                hint=f"accepted keys: {accepted}",
            )
    if "basal_rate" in columns and "basal_u" in columns:
        raise InputError(
            "map basal_rate (U/h) or basal_u (U per record), not both",
            field="columns",
            value=columns,
        )
    return columns


def suggest_columns(header: list[str]) -> str:
    """A ``--columns`` line to start from, guessed from a header's names."""
    norm = {_norm(h): h for h in header if h.strip()}

    def pick(*keys: str) -> str | None:
        for k in keys:
            for n, h in norm.items():
                if k in n:
                    return h
        return None

    out = {}
    date, tod = pick("date"), pick("time")
    if date and tod and date != tod:
        out["time"] = f"{date}+{tod}"
    elif date or tod:
        out["time"] = date or tod
    g = pick("cgm", "glucose", "sgv", "gl", "bg", "reading")
    if g:
        out["glucose"] = g
    for key, names in (
        ("subject_id", ("subject", "patient", "id")),
        ("bolus_u", ("bolus",)),
        ("basal_rate", ("basal",)),
        ("carbs_g", ("carb",)),
        ("type", ("type",)),
    ):
        c = pick(*names)
        if c and c not in out.values() and not any(c in v.split("+") for v in out.values()):
            out[key] = c
    out.setdefault("time", "<time column>")
    out.setdefault("glucose", "<glucose column>")
    return "--columns " + ",".join(f"{k}={v}" for k, v in out.items())


def read_csv(
    paths: PathLike | Iterable[PathLike],
    *,
    strict: bool = False,
    units: str | None = None,
    columns: dict[str, str] | None = None,
    subject_id: str | None = None,
    timezone: str = "UTC",
    time_format: str | None = None,
    now: pd.Timestamp | None = None,
) -> tuple[pd.DataFrame, DataReport]:
    """Read CSV exports (files or directories) into a canonical frame.

    `units`: "mg/dL" or "mmol/L" for files whose header does not say (checked against the
    values). `columns`: mapping for other layouts. `subject_id`: id for single-person
    exports (default: layout prefix + file stem). `timezone`: zone of naive timestamps.
    `time_format`: strftime format when the date order is ambiguous.
    """
    tz = check_timezone(timezone)
    columns = check_columns(columns)
    declared = None
    if units is not None:
        declared = parse_units(units)
        if declared is None:
            raise InputError(
                "unknown glucose units", field="units", value=units, hint="use mg/dL or mmol/L"
            )
    files = expand_paths(paths, (".csv", ".tsv", ".txt"))
    report = DataReport(source=SOURCE)
    sink = Sink(report, strict)
    parts, layouts, seen = [], set(), set()
    for f in files:
        report.files.append(str(f))
        got = _read_file(f, sink, declared, columns, subject_id, tz, time_format, now)
        if got is not None:
            ev, layout, u = got
            parts.append(ev)
            layouts.add(layout)
            seen.add(u)
    meta = DatasetMeta(
        source=f"CSV ({', '.join(sorted(layouts))})" if layouts else SOURCE,
        device="CGM export",
        sampling_minutes=15.0 if layouts == {"libreview"} else 5.0,
        timezone=tz,
        units_seen=sorted(seen) or [MGDL],
        licence="",
        extra={"files": [f.name for f in files], "layouts": sorted(layouts)},
    )
    return finish(Events.concat(parts), report, meta), report


# --------------------------------------------------------------------------- parsing


def read_rows(path: Path, sink: Sink) -> tuple[list[tuple[int, list[str]]], str] | None:
    """(line number, fields) of every non-blank row, and the delimiter; None if empty."""
    data = read_bytes(path, sink)
    if data is None:
        return None
    for enc in ("utf-8-sig", "utf-16", "latin-1"):
        try:
            text = data.decode(enc)
            break
        except UnicodeError:
            continue
    sample = "\n".join(text.splitlines()[:20])
    try:
        delim = _csv.Sniffer().sniff(sample, delimiters=",;\t").delimiter
    except _csv.Error:
        delim = "\t" if path.suffix.lower() == ".tsv" else ","
    reader = _csv.reader(io.StringIO(text), delimiter=delim)
    rows = []
    try:
        for fields in reader:
            if any(x.strip() for x in fields):
                rows.append((reader.line_num, fields))
    except _csv.Error as e:
        sink.fail(
            InputError(
                "malformed CSV (rows after this point were not read)",
                file=path,
                record=f"line {reader.line_num}",
                field="csv",
                value=str(e),
            )
        )
    return rows, delim


def _norm(h: str) -> str:
    return re.sub(r"\s+", " ", h.strip().lower())


def detect_layout(
    rows: list[tuple[int, list[str]]], columns: dict[str, str] | None
) -> tuple[str, int]:
    """(layout, index of the header row) from the first rows."""
    for i, (_, fields) in enumerate(rows[:5]):
        norm = [_norm(x) for x in fields]
        if columns:
            parts = [p for v in columns.values() for p in str(v).split("+")]
            if all(_norm(p) in norm for p in parts):
                return "columns", i
            continue
        if "device timestamp" in norm and "record type" in norm:
            return "libreview", i
        if _norm(DEXCOM_TIME) in norm and "event type" in norm:
            return "dexcom", i
        if {"id", "time", "gl"} <= set(norm):
            return "iglu", i
    return "unknown", 0


def _read_file(path, sink, declared, columns, subject_id, tz, time_format, now):
    report = sink.report
    got = read_rows(path, sink)
    if got is None:
        return None
    rows, _ = got
    if not rows:
        sink.fail(EmptyInputError("empty file", file=path, record="", field="file", value=""))
        return None
    layout, h = detect_layout(rows, columns)
    if layout == "unknown":
        want = (
            "the mapped columns " + ", ".join(columns.values())
            if columns
            else f"a known layout: {LAYOUTS_LOOKED_FOR}"
        )
        line = suggest_columns(rows[0][1])
        from forecast.io.azt1d import header_columns

        if header_columns([x.strip() for x in rows[0][1]]) is not None:
            line = "--format azt1d"
        sink.fail(
            InputError(
                f"unrecognised CSV header (looked for {want})",
                file=path,
                record=f"line {rows[0][0]}",
                field="header",
                value=",".join(rows[0][1])[:200],
                hint=f"recognised: {LAYOUTS_LOOKED_FOR}; otherwise pass e.g. {line}",
            )
        )
        report.notes.append(f"{path.name} was not read; try: {line}")
        reject_unread(sink, path, rows[1:], "file not read (unrecognised CSV header)")
        return None
    header = [x.strip() for x in rows[h][1]]
    body = rows[h + 1 :]
    if not body:
        sink.fail(
            EmptyInputError(
                "no records", file=path, record=f"line {rows[h][0]}", field="file", value=""
            )
        )
        return None
    good, lines = [], []
    for ln, fields in body:
        if len(fields) == len(header):
            good.append(fields)
            lines.append(ln)
            continue
        # a row we cannot split might have been a reading: it is counted as one, rejected
        report.readings_in += 1
        sink.fail(
            InputError(
                f"malformed CSV row (expected {len(header)} fields, got {len(fields)})",
                file=path,
                record=f"line {ln}",
                field="glucose",
                value=",".join(fields)[:200],
            )
        )
    df = pd.DataFrame(good, columns=_unique(header), dtype=object)
    df["_record"] = [f"line {ln}" for ln in lines]
    long, header_units = LAYOUTS[layout](df, path, subject_id, columns)
    used = set(long["time_field"]) | set(long["value_field"]) | CONSULTED.get(layout, set())
    if layout == "columns":
        used |= {_norm(p) for v in columns.values() for p in v.split("+")}
    unread = [
        c
        for c in df.columns
        if c != "_record" and c.strip() and c not in used and _norm(c) not in used
    ]
    if unread:
        report.notes.append(f"{path.name}: column(s) not read: {', '.join(unread)}")
    return _to_events(long, path, sink, declared, header_units, tz, time_format, now, layout)


def _unique(header: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for h in header:
        n = seen.get(h, 0)
        seen[h] = n + 1
        out.append(h if n == 0 else f"{h}.{n}")
    return out


def _find(df: pd.DataFrame, *prefixes: str) -> str | None:
    """The first column whose normalised name starts with one of `prefixes`."""
    for p in prefixes:
        for c in df.columns:
            if _norm(c).startswith(p):
                return c
    return None


def _long(
    kind: str, df: pd.DataFrame, sid: Any, tcol: str, vcol: str | None, mask=None, **extra
) -> pd.DataFrame:
    """Rows of `df` (within `mask`, with a value in `vcol`) as records of one `kind`.

    Every layout reduces to this one long table -- kind ("reading", "finger_stick", "bolus",
    "injection", "carbs", "exercise", "ketones"), subject, raw time, raw value, the source
    columns and the line -- so units, time parsing and screening are written once.
    """
    m = np.ones(len(df), bool) if mask is None else np.asarray(mask, bool)
    if vcol is not None:
        m = m & present(df[vcol])
    n = int(m.sum())
    sid_arr = np.asarray(sid, dtype=object)[m] if not isinstance(sid, str) else [sid] * n
    out = pd.DataFrame(
        {
            "kind": kind,
            "subject_id": sid_arr,
            "time_raw": df[tcol].to_numpy(dtype=object)[m],
            "time_field": tcol,
            "value_raw": df[vcol].to_numpy(dtype=object)[m] if vcol else np.full(n, None, object),
            "value_field": vcol or "",
            "record": df["_record"].to_numpy(dtype=object)[m],
        }
    )
    for k, v in extra.items():
        out[k] = np.asarray(v, dtype=object)[m] if not isinstance(v, str) else v
    return out


def _iglu(df, path, subject_id, columns):
    cols = {_norm(c): c for c in df.columns}
    return _long(
        "reading", df, df[cols["id"]].astype(str).to_numpy(), cols["time"], cols["gl"]
    ), None


def _mapped(df, path, subject_id, columns):
    cols = {_norm(c): c for c in df.columns}
    col = {k: "+".join(cols[_norm(p)] for p in v.split("+")) for k, v in columns.items()}
    if "+" in col["time"]:
        # a date column and a time-of-day column, joined into one timestamp
        parts = col["time"].split("+")
        joined = df[parts[0]].astype(str).str.strip()
        for p in parts[1:]:
            joined = joined + " " + df[p].astype(str).str.strip()
        df = df.copy()
        df[col["time"]] = joined
    sid = (
        df[col["subject_id"]].astype(str).to_numpy()
        if "subject_id" in col
        else (subject_id or path.stem)
    )
    tcol = col["time"]
    if "type" in col:
        typ = df[col["type"]].astype(str).str.strip().str.lower()
        cgm, manual = typ.isin(CGM_TYPES).to_numpy(), typ.isin(MANUAL_TYPES).to_numpy()
        parts = [
            _long("reading", df, sid, tcol, col["glucose"], cgm),
            _long("finger_stick", df, sid, tcol, col["glucose"], manual),
            # a row of another type may hold a reading: counted, rejected with its type
            _long("untyped", df, sid, tcol, col["glucose"], ~cgm & ~manual, rtype=typ),
        ]
    else:
        parts = [_long("reading", df, sid, tcol, col["glucose"])]
    for key, kind in (
        ("bolus_u", "bolus"),
        ("carbs_g", "carbs"),
        ("finger_stick", "finger_stick"),
        ("basal_rate", "basal_rate"),
        ("basal_u", "basal_dose"),
    ):
        if key in col:
            parts.append(_long(kind, df, sid, tcol, col[key]))
    return pd.concat(parts, ignore_index=True), None


def _dexcom(df, path, subject_id, columns):
    sid = subject_id or f"dexcom-{path.stem}"
    t = DEXCOM_TIME
    et = df["Event Type"].astype(str).str.strip().str.lower().to_numpy()
    sub = (
        df["Event Subtype"].astype(str).str.strip()
        if "Event Subtype" in df
        else pd.Series([""] * len(df))
    )
    g = _find(df, "glucose value")
    units = parse_units(g)
    ins, carb, dur = _find(df, "insulin value"), _find(df, "carb value"), _find(df, "duration")
    parts = [
        _long("reading", df, sid, t, g, et == "egv"),
        _long("finger_stick", df, sid, t, g, et == "calibration"),
        _long("carbs", df, sid, t, carb, et == "carbs") if carb else None,
    ]
    if ins:
        fast = et == "insulin"
        parts.append(_long("injection", df, sid, t, ins, fast, name=sub.to_numpy(dtype=object)))
    ex = et == "exercise"
    if ex.any():
        parts.append(
            _long(
                "exercise",
                df,
                sid,
                t,
                None,
                ex,
                duration=(df[dur] if dur else pd.Series([""] * len(df))).to_numpy(dtype=object),
                intensity=sub.to_numpy(dtype=object),
            )
        )
    used = np.isin(et, ["egv", "calibration", "carbs", "insulin", "exercise"])
    skipped = pd.Series(df["Event Type"].to_numpy()[~used]).value_counts()
    return pd.concat([p for p in parts if p is not None], ignore_index=True), (units, dict(skipped))


def _libreview(df, path, subject_id, columns):
    sid = subject_id or f"libre-{path.stem}"
    t = _find(df, "device timestamp")
    hist, scan, strip = (
        _find(df, "historic glucose"),
        _find(df, "scan glucose"),
        _find(df, "strip glucose"),
    )
    units = parse_units(hist or scan)
    parts = [_long("reading", df, sid, t, c) for c in (hist, scan) if c]
    if strip:
        parts.append(_long("finger_stick", df, sid, t, strip))
    rapid = _find(df, "rapid-acting insulin (units)", "rapid-acting insulin")
    long_ = _find(
        df, "long-acting insulin value", "long-acting insulin (units)", "long-acting insulin"
    )
    carbs = _find(df, "carbohydrates (grams)")
    ket = _find(df, "ketone")
    if rapid:
        parts.append(_long("injection", df, sid, t, rapid, name="rapid-acting"))
    if long_:
        parts.append(_long("injection", df, sid, t, long_, name="long-acting"))
    if carbs:
        parts.append(_long("carbs", df, sid, t, carbs))
    if ket:
        parts.append(_long("ketones", df, sid, t, ket))
    return pd.concat(parts, ignore_index=True), (units, {})


LAYOUTS = {"iglu": _iglu, "columns": _mapped, "dexcom": _dexcom, "libreview": _libreview}
#: columns a layout reads besides the time and value columns of its records
CONSULTED = {
    "dexcom": {"Event Type", "Event Subtype", "Duration (hh:mm:ss)"},
    "libreview": {"Record Type"},
    "iglu": {"id"},
}


# --------------------------------------------------------------------------- times & units


def infer_time_format(raw: pd.Series, path: Path) -> str | None:
    """The strftime format parsing (nearly) all values, "ISO8601", or None (leave to parse).

    Refuses to choose between formats that parse everything but disagree (day/month order).
    """
    s = pd.Series(raw).dropna().astype(str).str.strip()
    s = s[s != ""]
    if s.empty:
        return None
    sample = s.iloc[:: max(1, len(s) // 2000)]
    if sample.str.match(r"^\d{4}-\d{2}-\d{2}").mean() > 0.9:
        return "ISO8601"
    scores = {}
    for fmt in TIME_FORMATS:
        parsed = pd.to_datetime(sample, format=fmt, errors="coerce")
        scores[fmt] = (parsed.notna().mean(), parsed)
    best = max(v[0] for v in scores.values())
    if best < 0.9:
        return None
    tied = [f for f, (sc, _) in scores.items() if sc == best]
    first = scores[tied[0]][1]
    for f in tied[1:]:
        if not scores[f][1].equals(first):
            raise InputError(
                "cannot tell day from month in the timestamps",
                file=path,
                record="",
                field="time",
                value=sample.iloc[0],
                hint=f"pass --time-format (e.g. {tied[0]!r} or {f!r})",
            )
    return tied[0]


def _to_events(long, path, sink, declared, header, tz, time_format, now, layout):
    report = sink.report
    header_units, skipped = header if header else (None, {})
    for k, n in skipped.items():
        count(report, f"ignored:{k}", n)
    ev = Events()
    fmt = time_format or infer_time_format(long["time_raw"], path)
    t_all = parse_local(long["time_raw"], fmt, tz).reset_index(drop=True)
    long = long.reset_index(drop=True)

    # ---- units: a header is believed unless contradicted; else flag or values decide
    rd = (long["kind"] == "reading").to_numpy()
    fs = (long["kind"] == "finger_stick").to_numpy()
    vals = numbers(long["value_raw"][rd | fs])
    units = detect_units(vals, declared or header_units, file=str(path))
    if declared and header_units and declared != header_units:
        sink.report.notes.append(
            f"{path.name}: header says {header_units}; --units {declared} used"
        )
    factor = MGDL_PER_MMOLL if units == MMOLL else 1.0

    def sub(mask):
        return long[mask].reset_index(drop=True), t_all[mask].reset_index(drop=True)

    # ---- readings
    r, t = sub(rd)
    report.readings_in += len(r)
    for field, rr in r.groupby("value_field", sort=False):
        idx = rr.index.to_numpy()
        ev.add(
            "readings",
            screen_readings(
                sink,
                file=path,
                subject_id=rr["subject_id"],
                time=t[idx],
                time_raw=rr["time_raw"],
                glucose=to_mgdl(numbers(rr["value_raw"]), units),
                value_raw=rr["value_raw"],
                record=rr["record"],
                time_field=rr["time_field"].iloc[0],
                value_field=field,
                code=text_codes(rr["value_raw"]),
                now=now,
                check_order=layout != "libreview",
            ),
        )

    def amounts(kind, field, *, maximum, minimum=0.0, scale=1.0):
        d, t = sub((long["kind"] == kind).to_numpy())
        if d.empty:
            return d, t, np.zeros(0), np.zeros(0, bool)
        v = numbers(d["value_raw"]) * scale
        ok = screen_amounts(
            sink,
            file=path,
            field=field,
            time=t,
            time_raw=d["time_raw"],
            amount=v,
            amount_raw=d["value_raw"],
            record=d["record"],
            time_field=d["time_field"].iloc[0],
            value_field=d["value_field"].iloc[0],
            maximum=maximum,
            minimum=minimum,
            now=now,
        )
        return d, t, v, ok

    # ---- rows whose record type is neither CGM nor manual: input readings, rejected
    d, t = sub((long["kind"] == "untyped").to_numpy())
    for i in range(len(d)):
        report.readings_in += 1
        sink.fail(
            InputError(
                "unknown record type (neither cgm nor manual)",
                file=path,
                record=f"{d['record'].iat[i]}, {d['time_field'].iat[i]}",
                field="glucose",
                value=d["rtype"].iat[i],
            )
        )

    kinds = set(long["kind"])
    if "basal_rate" in kinds:
        d, t, v, ok = amounts("basal_rate", "basal_u", maximum=35.0)
        if ok.any():
            sid = d["subject_id"][ok].reset_index(drop=True)
            st = t[ok].reset_index(drop=True)
            # held until the next value of the same subject, the last until the file's end
            last = record_end(t_all, now)
            end = pd.Series(last if pd.notna(last) else st.max(), index=st.index)
            end = end.where(end > st, st)
            ev.add(
                "rates",
                table("rates", subject_id=sid, start=st, end=end, rate_u_h=v[ok], temp=False),
            )
    if "basal_dose" in kinds:
        d, t, v, ok = amounts("basal_dose", "basal_u", maximum=35.0)
        ev.add(
            "doses",
            table(
                "doses", subject_id=d["subject_id"][ok], start=t[ok], units=v[ok], column="basal_u"
            ),
        )
    for kind, field, lo, hi, scale in (
        ("finger_stick", "finger_stick", 20.0, 600.0, factor),
        ("ketones", "ketones_mmol", 0.0, 30.0, 1.0),
        ("carbs", "carbs_g", 0.0, 1000.0, 1.0),
        ("bolus", "bolus_u", 0.0, 100.0, 1.0),
    ):
        if kind not in kinds:
            continue
        d, t, v, ok = amounts(kind, field, minimum=lo, maximum=hi, scale=scale)
        sid, t, v = d["subject_id"][ok], t[ok], v[ok]
        if kind == "carbs":
            ev.add("carbs", table("carbs", subject_id=sid, time=t, grams=v))
        elif kind == "bolus":
            ev.add("doses", table("doses", subject_id=sid, start=t, units=v, column="bolus_u"))
        else:
            ev.add("values", table("values", subject_id=sid, start=t, column=field, value=v))

    if "injection" in kinds:
        d, t, v, ok = amounts("injection", "bolus_u", maximum=100.0)
        names = d["name"].astype(str).str.strip().replace({"": "fast-acting", "nan": "fast-acting"})
        known = names.map(lambda n: classify(n) is not None).to_numpy()
        for i in np.flatnonzero(ok & ~known):
            sink.fail(
                InputError(
                    "unknown insulin type",
                    file=path,
                    record=d["record"].iloc[i],
                    field="insulin_sc",
                    value=names.iloc[i],
                )
            )
        use = ok & known
        if use.any():
            doses, texts = injection_events(
                list(d["subject_id"][use]), t[use], list(names[use]), v[use]
            )
            ev.add("doses", doses)
            ev.add("texts", texts)

    if "exercise" in kinds:
        d, t = sub((long["kind"] == "exercise").to_numpy())
        dur = pd.to_timedelta(d["duration"].astype("string").str.strip(), errors="coerce").fillna(
            pd.Timedelta(0)
        )
        inten = (
            d["intensity"].astype(str).str.strip().str.lower().map(EXERCISE_INTENSITY).fillna(1.0)
        )
        okt = screen_times(
            sink,
            file=path,
            field="exercise",
            time=t,
            time_raw=d["time_raw"],
            record=d["record"],
            time_field=d["time_field"].iloc[0],
            now=now,
        )
        dur = dur.where((dur >= pd.Timedelta(0)) & (dur <= pd.Timedelta(days=1)), pd.Timedelta(0))
        ev.add(
            "values",
            table(
                "values",
                subject_id=d["subject_id"][okt],
                start=t[okt],
                end=(t + dur)[okt],
                column="exercise",
                value=inten.to_numpy(dtype=float)[okt],
            ),
        )
    return ev, layout, units
