"""AZT1D (Khamesian et al. 2025): one CSV per person on automated insulin delivery.

Files are ``Subject N/Subject N.csv`` (subject id ``azt1d-N``). Each row is one CGM reading
(every 5 min, Arizona local time: ``America/Phoenix``, no daylight saving) with, on the same
row, what the pump did then:

===========================  ==========================================================
column                       becomes
===========================  ==========================================================
EventDateTime                the time (local, naive) -> UTC ``time``
CGM / Readings (CGM / BGM)   ``glucose`` (one file names it the second way)
Basal                        basal *rate* (U/h) repeated on every row while in force:
                             held until the next row that states one, at most
                             `BASAL_HOLD` (a long run of blank cells means the pump's
                             record is missing, not that the rate went on); blank
                             from a file's start = not known. ``basal_known`` is 1 in
                             slots a rate covers, 0 elsewhere (``basal_u`` is 0 there,
                             which is *unknown*, not "no insulin")
BolusType                    the kind of bolus on the row: Standard, Standard/Correction,
                             BLE Standard Bolus[/Correction], Quick (the person's own);
                             ``Automatic Bolus/Correction`` (the pump's own correction:
                             added to ``bolus_u`` *and* to ``bolus_auto_u``);
                             ``Extended[/Correction] P%/X``: P % of the food bolus X
                             delivered now, the rest over a duration the file does not
                             give (see `read_azt1d`'s ``extended_hours``)
TotalBolusInsulinDelivered   units delivered now (``bolus_u``); CorrectionDelivered and
                             FoodDelivered are its parts and are not added again
CarbSize                     ``carbs_g`` (0 = no carbs)
DeviceMode                   ``device_mode`` text column: ``sleep`` / ``exercise``
===========================  ==========================================================

Layouts in the files: the header above in that order (most subjects); the same columns in
another order with the glucose column named ``Readings (CGM / BGM)`` (subject 14); and
``0`` written in every empty cell, including DeviceMode and BolusType (subject 8). Columns
are found by name, so any order works; a column not listed above is named in the notes.

What is rejected (file, record = line and column, field, value, reason): rows repeated
verbatim (``duplicate row``; the CGM value counts as rejected, the bolus is not given
twice), a bolus record repeated at the same time with a different CGM value (``duplicate
bolus record``), basal rates above `BASAL_MAX_U_H` (some files hold runs of 300 to 4127
"U/h"), boluses above `BOLUS_MAX_U`, carbs above `CARBS_MAX_G`, unknown bolus types and
device modes, and anything unparseable. Subjects whose own boluses average more than
`FLAG_BOLUS_U_PER_DAY` are *flagged* in the notes (kept: the records are individually
plausible, the total is not checked against anything).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd

from forecast.io.common import (
    PathLike,
    Screen,
    Sink,
    check_times,
    check_timezone,
    count,
    expand_paths,
    finish,
    numbers,
    parse_local,
    present,
    reject_unread,
    screen_amounts,
    screen_readings,
    text_codes,
)
from forecast.io.csv import read_rows
from forecast.preprocess import Events, table
from forecast.schema import DataReport, DatasetMeta, EmptyInputError, InputError

SOURCE = "AZT1D"
TIMEZONE = "America/Phoenix"
LICENCE = (
    "CC BY 4.0. Khamesian S, et al. AZT1D: A Real-World Dataset for Type 1 Diabetes (2025), "
    "arXiv:2506.14789; Mendeley Data, doi:10.17632/gk9m674wcx.1"
)
#: The pump's highest programmable basal rate is 15 U/h; a larger "rate" is an export error.
BASAL_MAX_U_H = 15.0
#: A basal rate is restated on every row; after this long without one the rate is unknown.
BASAL_HOLD = pd.Timedelta(hours=1)
#: The pump's largest single bolus is 25 U (with margin).
BOLUS_MAX_U = 30.0
CARBS_MAX_G = 300.0
#: Above this many units per day of the person's own boluses a subject is flagged.
FLAG_BOLUS_U_PER_DAY = 100.0
TIME_FORMAT = "ISO8601"

#: canonical key -> accepted header names (lower case, spaces collapsed)
COLUMNS: dict[str, tuple[str, ...]] = {
    "time": ("eventdatetime",),
    "glucose": ("cgm", "readings (cgm / bgm)"),
    "basal": ("basal",),
    "bolus_type": ("bolustype",),
    "bolus": ("totalbolusinsulindelivered",),
    "correction": ("correctiondelivered",),
    "food": ("fooddelivered",),
    "carbs": ("carbsize",),
    "mode": ("devicemode",),
}
#: without these a file is not AZT1D
REQUIRED = ("time", "glucose", "basal", "bolus_type", "bolus", "carbs")
OWN_BOLUS = {
    "standard",
    "standard/correction",
    "ble standard bolus",
    "ble standard bolus/correction",
    "quick",
}
AUTO_BOLUS = {"automatic bolus/correction", "automatic bolus"}
EXTENDED = re.compile(r"^extended(?:/correction)?\s+([0-9.]+)\s*%\s*/\s*([0-9.]+)$")
DEVICE_MODES = ("sleep", "exercise")
#: cells meaning "nothing here" (subject 8 writes 0 in every empty cell)
EMPTY = {"", "0", "0.0"}


def _norm(h: str) -> str:
    return re.sub(r"\s+", " ", str(h).strip().lower())


def header_columns(header: list[str]) -> dict[str, int] | None:
    """canonical key -> index in `header`, or None when the header is not AZT1D's."""
    norm = [_norm(h) for h in header]
    out = {}
    for key, names in COLUMNS.items():
        for i, h in enumerate(norm):
            if h in names:
                out[key] = i
                break
    return out if all(k in out for k in REQUIRED) else None


def looks_like(path: PathLike) -> bool:
    """Whether a file's first line is an AZT1D header (for format detection)."""
    try:
        with open(path, encoding="utf-8-sig", errors="replace") as f:
            first = f.readline()
    except OSError:
        return False
    return header_columns(first.strip().split(",")) is not None


def subject_of(path: Path) -> str:
    """``Subject 14.csv`` -> ``azt1d-14``; any other name -> ``azt1d-<stem>``."""
    m = re.fullmatch(r"subject[\s_-]*(\d+)", path.stem.strip().lower())
    return f"azt1d-{int(m.group(1))}" if m else f"azt1d-{path.stem.strip()}"


def read_azt1d(
    paths: PathLike | Iterable[PathLike],
    *,
    strict: bool = False,
    timezone: str = TIMEZONE,
    extended_hours: float | None = None,
    now: pd.Timestamp | None = None,
) -> tuple[pd.DataFrame, DataReport]:
    """Read AZT1D subject files (or the folder holding them) into a canonical frame.

    `timezone`: zone of the local timestamps (Arizona, no DST). `extended_hours`: duration
    over which the delayed part of an extended bolus is spread; the files do not record it,
    so by default (None) that part is left out of the frame and listed in the report
    (reason ``extended portion without a duration``) with its units.
    """
    tz = check_timezone(timezone)
    if extended_hours is not None and not (0 < float(extended_hours) <= 12):
        raise InputError(
            "extended bolus duration must be between 0 and 12 hours",
            field="extended_hours",
            value=extended_hours,
        )
    files = expand_paths(paths, (".csv",))
    report = DataReport(source=SOURCE)
    sink = Sink(report, strict)
    parts, layouts = [], {}
    for f in files:
        report.files.append(str(f))
        got = _read_file(f, sink, tz, extended_hours, now)
        if got is not None:
            parts.append(got[0])
            layouts[f.name] = got[1]
    meta = DatasetMeta(
        source=SOURCE,
        device="automated insulin delivery pump with CGM",
        sampling_minutes=5.0,
        timezone=tz,
        units_seen=["mg/dL"],
        licence=LICENCE,
        extra={
            "files": [f.name for f in files],
            "layouts": layouts,
            "basal_max_u_h": BASAL_MAX_U_H,
            "basal_hold_h": BASAL_HOLD / pd.Timedelta(hours=1),
            "extended_hours": extended_hours,
        },
    )
    frame = finish(Events.concat(parts), report, meta)
    frame = _finish_columns(frame)
    _flag_daily_bolus(frame, report)
    return frame, report


# --------------------------------------------------------------------------- one file


def _read_file(path: Path, sink: Sink, tz: str, extended_hours: float | None, now):
    report = sink.report
    got = read_rows(path, sink)
    if got is None:
        return None
    rows, _ = got
    if not rows:
        sink.fail(EmptyInputError("empty file", file=path, record="", field="file", value=""))
        return None
    header = [x.strip() for x in rows[0][1]]
    cols = header_columns(header)
    if cols is None:
        sink.fail(
            InputError(
                "not an AZT1D header (rows of this file were not read)",
                file=path,
                record=f"line {rows[0][0]}",
                field="header",
                value=",".join(header)[:200],
                hint="an AZT1D file has EventDateTime, Basal, BolusType, "
                "TotalBolusInsulinDelivered, CarbSize and CGM columns",
            )
        )
        reject_unread(sink, path, rows[1:], "file not read (not an AZT1D header)")
        return None
    unread = [h for i, h in enumerate(header) if i not in cols.values()]
    if unread:
        report.notes.append(f"{path.name}: column(s) not read: {', '.join(unread)}")
    gname = header[cols["glucose"]]
    if _norm(gname) != "cgm":
        report.notes.append(f"{path.name}: glucose read from column {gname!r} (as CGM)")
    body = rows[1:]
    if not body:
        sink.fail(EmptyInputError("no records", file=path, record="line 1", field="file", value=""))
        return None
    good, lines = [], []
    for ln, fields in body:
        if len(fields) == len(header):
            good.append([x.strip() for x in fields])
            lines.append(ln)
            continue
        report.readings_in += 1  # a row that cannot be split might have held a reading
        sink.fail(
            InputError(
                f"malformed CSV row (expected {len(header)} fields, got {len(fields)})",
                file=path,
                record=f"line {ln}",
                field="glucose",
                value=",".join(fields)[:200],
            )
        )
    if not good:
        return None
    raw = pd.DataFrame(good, dtype=object)
    df = pd.DataFrame({k: raw[i] for k, i in cols.items()})
    for k in COLUMNS:
        if k not in df:
            df[k] = ""
    df = df.astype(object)
    rec = np.array([f"line {ln}" for ln in lines], dtype=object)
    zero_filled = (df["bolus_type"] == "0").mean() > 0.5
    layout = (
        "zero-filled"
        if zero_filled
        else ("standard" if list(cols) == list(COLUMNS) and _norm(gname) == "cgm" else "reordered")
    )
    sid = subject_of(path)
    t = parse_local(df["time"], TIME_FORMAT, tz)
    ev = Events()

    # ---- rows repeated verbatim: one is kept, the others rejected whole
    dup_row = raw.duplicated().to_numpy()
    has_g = present(df["glucose"])
    report.readings_in += int(has_g.sum())
    for i in np.flatnonzero(dup_row & has_g):
        sink.fail(
            InputError(
                "duplicate row",
                file=path,
                record=f"{rec[i]}, column {gname!r}",
                field="glucose",
                value=df["glucose"].iat[i],
            )
        )
    count(report, "duplicate rows", int(dup_row.sum()))
    use = ~dup_row

    # ---- readings
    m = use & has_g
    ev.add(
        "readings",
        screen_readings(
            sink,
            file=path,
            subject_id=sid,
            time=t[m].reset_index(drop=True),
            time_raw=df["time"][m],
            glucose=numbers(df["glucose"][m]),
            value_raw=df["glucose"][m],
            record=rec[m],
            time_field="EventDateTime",
            value_field=gname,
            code=text_codes(df["glucose"][m]),
            now=now,
        ),
    )

    _basal(ev, sink, path, sid, df, t, rec, use, header[cols["basal"]], now)
    _boluses(ev, sink, path, sid, df, t, rec, use, extended_hours, now)
    _modes(ev, sink, path, sid, df, t, rec, use, now)
    return ev, layout


def _basal(ev, sink, path, sid, df, t, rec, use, col, now) -> None:
    """Rates held from their row to the next row stating one (at most BASAL_HOLD)."""
    has = use & present(df["basal"])
    idx = np.flatnonzero(has)
    if not idx.size:
        return
    tt = t.iloc[idx].reset_index(drop=True)
    v = numbers(df["basal"].iloc[idx])
    vraw = df["basal"].iloc[idx].to_numpy(dtype=object)
    r = np.array([f"{x}, column {col!r}" for x in rec[idx]], dtype=object)
    sc = Screen(idx.size)
    check_times(sc, tt, df["time"].iloc[idx], r, now=now)
    sc.flag(~np.isfinite(v), "unparseable basal rate", r, vraw)
    with np.errstate(invalid="ignore"):
        sc.flag(v < 0, "negative basal rate", r, vraw)
        sc.flag(v > BASAL_MAX_U_H, f"implausible basal rate (above {BASAL_MAX_U_H:g} U/h)", r, vraw)
    ok = sc.emit(sink, path, "basal_u")
    # every row with a parseable time ends the rate before it, even a rejected one: a
    # rejected rate is unknown, and the previous one is not stretched over it
    timed = tt.notna().to_numpy()
    tt, v, ok = tt[timed].reset_index(drop=True), v[timed], ok[timed]
    order = np.argsort(tt.to_numpy(), kind="stable")
    tt, v, ok = tt.iloc[order].reset_index(drop=True), v[order], ok[order]
    nxt = tt.shift(-1)
    end = (tt + BASAL_HOLD).where(nxt.isna() | (nxt > tt + BASAL_HOLD), nxt)
    keep = ok & (end > tt).to_numpy()
    if keep.any():
        ev.add(
            "rates",
            table(
                "rates",
                subject_id=sid,
                start=tt[keep],
                end=end[keep],
                rate_u_h=v[keep],
                temp=False,
            ),
        )
        ev.add(
            "values",
            table(
                "values",
                subject_id=sid,
                start=tt[keep],
                end=end[keep],
                column="basal_known",
                value=1.0,
            ),
        )


def _boluses(ev, sink, path, sid, df, t, rec, use, extended_hours, now) -> None:
    typ = df["bolus_type"].astype(str).str.strip()
    amount_raw = df["bolus"].astype(str).str.strip()
    has_type = ~typ.isin(EMPTY).to_numpy()
    has_amount = ~amount_raw.isin(EMPTY).to_numpy() & present(df["bolus"])
    carbs_raw = df["carbs"].astype(str).str.strip()
    has_carbs = ~carbs_raw.isin(EMPTY).to_numpy() & present(df["carbs"])
    rows = use & (has_type | has_amount | has_carbs)
    # a bolus record repeated at the same time (rows differing only in their CGM value)
    key = pd.DataFrame(
        {
            "t": df["time"],
            "ty": typ,
            "a": amount_raw,
            "c": df["correction"],
            "f": df["food"],
            "g": carbs_raw,
        }
    )
    dup = np.zeros(len(df), bool)
    dup[rows] = key[rows].duplicated().to_numpy()
    for i in np.flatnonzero(dup):
        sink.fail(
            InputError(
                "duplicate bolus record",
                file=path,
                record=f"{rec[i]}, column 'TotalBolusInsulinDelivered'",
                field="bolus_u",
                value=amount_raw.iat[i],
            )
        )
    rows &= ~dup

    # ---- carbs
    m = rows & has_carbs
    if m.any():
        g = numbers(df["carbs"][m])
        ok = screen_amounts(
            sink,
            file=path,
            field="carbs_g",
            time=t[m].reset_index(drop=True),
            time_raw=df["time"][m],
            amount=g,
            amount_raw=df["carbs"][m],
            record=rec[m],
            time_field="EventDateTime",
            value_field="CarbSize",
            maximum=CARBS_MAX_G,
            now=now,
        )
        keep = ok & (g > 0)
        tm = t[m].reset_index(drop=True)
        ev.add("carbs", table("carbs", subject_id=sid, time=tm[keep], grams=g[keep]))

    # ---- insulin
    m = rows & (has_type | has_amount)
    if not m.any():
        return
    idx = np.flatnonzero(m)
    ty = typ.iloc[idx].str.lower().str.replace(r"\s+", " ", regex=True).to_numpy(dtype=object)
    a = numbers(df["bolus"].iloc[idx])
    tm = t.iloc[idx].reset_index(drop=True)
    r = np.array([f"{x}, column 'BolusType'" for x in rec[idx]], dtype=object)
    ext = [EXTENDED.match(x) for x in ty]
    kind = np.array(
        [
            "auto"
            if x in AUTO_BOLUS
            else "own"
            if x in OWN_BOLUS
            else "extended"
            if e is not None
            else "none"
            if x in EMPTY
            else "unknown"
            for x, e in zip(ty, ext, strict=True)
        ],
        dtype=object,
    )
    sc = Screen(idx.size)
    sc.flag(kind == "unknown", "unknown bolus type", r, typ.iloc[idx].to_numpy(dtype=object))
    sc.flag(kind == "none", "bolus without a type", r, typ.iloc[idx].to_numpy(dtype=object))
    bad_type = ~sc.ok
    sc.emit(sink, path, "bolus_u")
    sel = ~bad_type
    ok = np.zeros(idx.size, bool)
    if sel.any():
        ok[sel] = screen_amounts(
            sink,
            file=path,
            field="bolus_u",
            time=tm[sel].reset_index(drop=True),
            time_raw=df["time"].iloc[idx][sel],
            amount=a[sel],
            amount_raw=df["bolus"].iloc[idx][sel],
            record=rec[idx][sel],
            time_field="EventDateTime",
            value_field="TotalBolusInsulinDelivered",
            maximum=BOLUS_MAX_U,
            now=now,
        )
    ev.add(
        "doses",
        table("doses", subject_id=sid, start=tm[ok], units=a[ok], column="bolus_u"),
    )
    auto = ok & (kind == "auto")
    if auto.any():
        ev.add(
            "doses",
            table("doses", subject_id=sid, start=tm[auto], units=a[auto], column="bolus_auto_u"),
        )
    count(report := sink.report, "boluses:own", int((ok & (kind == "own")).sum()))
    count(report, "boluses:automatic", int(auto.sum()))
    count(report, "boluses:extended", int((ok & (kind == "extended")).sum()))

    # ---- the delayed part of extended boluses
    left_out = 0.0
    for j in np.flatnonzero(ok & (kind == "extended")):
        pct, total = float(ext[j].group(1)), float(ext[j].group(2))
        rest = total * (1.0 - pct / 100.0)
        where = dict(file=path, record=r[j], field="bolus_u", value=typ.iat[idx[j]])
        if rest > 0 and extended_hours is None:
            where["value"] = f"{typ.iat[idx[j]]} ({rest:.2f} U delayed)"
        if not (0.0 <= pct <= 100.0) or not np.isfinite(rest) or rest > BOLUS_MAX_U:
            sink.fail(InputError("implausible extended bolus", **where))
        elif rest <= 0.0:
            if total == 0.0 and pct < 100.0:
                sink.fail(InputError("extended bolus without its programmed total", **where))
        elif extended_hours is None:
            sink.fail(
                InputError(
                    "extended portion without a duration (not in the frame)",
                    **where,
                )
            )
            left_out += rest
        else:
            start = tm.iloc[[j]]
            ev.add(
                "doses",
                table(
                    "doses",
                    subject_id=sid,
                    start=start,
                    end=start + pd.Timedelta(hours=float(extended_hours)),
                    units=[rest],
                    column="bolus_u",
                ),
            )
    if left_out:
        report.notes.append(
            f"{path.name}: {left_out:.2f} U of extended boluses' delayed parts are not in the "
            "frame (the file gives no duration; pass extended_hours / --extended-hours)"
        )


def _modes(ev, sink, path, sid, df, t, rec, use, now) -> None:
    mode = df["mode"].astype(str).str.strip().str.lower()
    m = use & ~mode.isin(EMPTY).to_numpy() & present(df["mode"])
    if not m.any():
        return
    raw = mode[m]
    # "sleepsleep" (one file): a mode written twice over is still that mode
    norm = raw.str.replace(r"^(sleep|exercise)(?:\1)+$", r"\1", regex=True)
    doubled = int((norm != raw).sum())
    if doubled:
        sink.report.notes.append(
            f"{path.name}: {doubled} DeviceMode cell(s) hold a mode written twice "
            "(e.g. 'sleepsleep'), read as that mode"
        )
    idx = np.flatnonzero(m)
    tm = t.iloc[idx].reset_index(drop=True)
    r = np.array([f"{x}, column 'DeviceMode'" for x in rec[idx]], dtype=object)
    sc = Screen(idx.size)
    check_times(sc, tm, df["time"].iloc[idx], r, now=now)
    sc.flag(
        ~norm.isin(DEVICE_MODES).to_numpy(),
        "unknown device mode",
        r,
        df["mode"].iloc[idx].to_numpy(dtype=object),
    )
    ok = sc.emit(sink, path, "device_mode")
    ev.add(
        "texts",
        table(
            "texts",
            subject_id=sid,
            time=tm[ok],
            column="device_mode",
            text=norm.to_numpy(dtype=object)[ok],
        ),
    )


# --------------------------------------------------------------------------- the frame


def _finish_columns(frame: pd.DataFrame) -> pd.DataFrame:
    """Slots no rate covers have ``basal_known`` 0; no automatic bolus is 0 U."""
    attrs = dict(frame.attrs)
    if "basal_known" in frame:
        frame["basal_known"] = frame["basal_known"].fillna(0.0).clip(0.0, 1.0)
    elif len(frame):
        frame["basal_known"] = 0.0
    if "bolus_auto_u" not in frame and len(frame):
        frame["bolus_auto_u"] = 0.0
    frame.attrs = attrs
    return frame


def _flag_daily_bolus(frame: pd.DataFrame, report: DataReport) -> None:
    """Flag (not reject) subjects whose own boluses average more than a plausible amount."""
    if not len(frame):
        return
    own = frame["bolus_u"] - frame.get("bolus_auto_u", 0.0)
    g = pd.DataFrame({"sid": frame["subject_id"], "own": own, "n": frame["glucose"].notna()})
    per = g.groupby("sid", observed=True).agg(own=("own", "sum"), n=("n", "sum"))
    days = per["n"] * 5.0 / 1440.0
    rate = per["own"] / days.where(days > 0)
    for sid, v in rate.items():
        if np.isfinite(v) and v > FLAG_BOLUS_U_PER_DAY:
            report.notes.append(
                f"flagged: {sid} averages {v:.0f} U/day of its own boluses (over "
                f"{FLAG_BOLUS_U_PER_DAY:g}): check this subject's insulin before trusting it"
            )
            count(report, "flagged:high daily bolus", 1)
