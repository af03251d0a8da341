"""Nightscout exports: ``entries.json``, ``treatments.json`` and (optionally) ``profile.json``.

Files are recognised by content, not name, and all files of one directory are one person
(``nightscout-<directory>``, or ``subject_id=``). What is read:

* **entries** (``/api/v1/entries.json``): ``type`` "sgv" -> ``glucose`` (``sgv`` is always
  mg/dL in Nightscout, whatever the display units); ``date`` (epoch ms) or ``dateString``.
  Values below 39 are Dexcom error codes (1 ?SN sensor not active, 3 ?NA no antenna,
  5 ?NC not calibrated, 9 ?AD absolute deviation, 10 ??? power deviation, 12 ?RF bad RF)
  and 39 is Dexcom's "LOW" (below 40 mg/dL): these are rejected as ``sensor error code``,
  never kept as glucose. ``mbg`` (meter) entries -> ``finger_stick``; ``cal`` entries are
  counted and not used.
* **treatments**: ``created_at`` (ISO; ``date``/``mills`` epoch ms as fallback).
  "Temp Basal" with ``absolute``/``rate`` (U/h) or ``percent`` (change relative to the
  scheduled basal: -100 = suspension) for ``duration`` minutes; a new temp cancels the
  previous one, a temp of duration 0 cancels without replacing. Any treatment with
  ``insulin`` (Bolus, Correction Bolus, Meal Bolus, Snack Bolus, SMB...) -> ``bolus_u``;
  "Combo Bolus" adds its extended part (``relative`` U/h for ``duration``). Any treatment
  with ``carbs`` (Carb Correction, Meal Bolus...) -> ``carbs_g``. "BG Check" (``glucose``,
  ``units`` "mg/dl" or "mmol") -> ``finger_stick``. "Exercise" -> ``exercise`` = 1 for
  its duration. "Suspend Pump" -> basal 0 until "Resume Pump" (or its duration). Other
  event types (notes, site changes, targets...) are counted in the report.
* **profile** (``/api/v1/profile.json``): the daily schedules of ``store[defaultProfile]``,
  local times in the profile's ``timezone``. ``basal`` gives the scheduled basal that temp
  basals override and percent temps scale; without a profile pass ``basal=`` (U/h, flat).
  Without either, only temp basals are known and the report says so. ``carbratio`` (g/U)
  -> ``carb_ratio_g_per_u`` and ``sens`` (the profile's ``units`` per U; mmol/L converted)
  -> ``isf_mgdl_per_u``: on each slot, the value in effect at its local time of day. Such a
  column is all or nothing: a schedule that is missing or has an unusable entry (reported)
  leaves the column out for that person, and a frame of several persons has it only when
  every person does (the report's notes say who lacked it).
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from forecast.io.common import (
    PathLike,
    Sink,
    as_rate,
    check_timezone,
    count,
    expand_paths,
    finish,
    localize,
    minutes,
    numbers,
    read_bytes,
    record_span,
    screen_amounts,
    screen_readings,
    screen_spans,
    screen_times,
    storable,
)
from forecast.preprocess import (
    EXTRA_COLUMNS,
    MGDL,
    MMOLL,
    Events,
    detect_units,
    parse_units,
    table,
)
from forecast.schema import (
    MGDL_PER_MMOLL,
    PROFILE_COLUMNS,
    PROFILE_RANGES,
    REQUIRED_COLUMNS,
    DataReport,
    DatasetMeta,
    EmptyInputError,
    InputError,
    validate_frame,
)

SOURCE = "Nightscout"
DEXCOM_CODES = {
    0: "NONE",
    1: "?SN sensor not active",
    2: "?MD minimal deviation",
    3: "?NA no antenna",
    5: "?NC not calibrated",
    6: "?CD counts deviation",
    9: "?AD absolute deviation",
    10: "??? power deviation",
    12: "?RF bad RF",
    39: "LOW",
}
#: The daily schedules read from a profile: Nightscout key -> (canonical field, valid range,
#: unit). ``sens`` is in the profile's units, converted to mg/dL before the range check.
SCHEDULES: dict[str, tuple[str, tuple[float, float], str]] = {
    "basal": ("basal_u", (0.0, 35.0), "U/h"),
    "carbratio": ("carb_ratio_g_per_u", PROFILE_RANGES["carb_ratio_g_per_u"], "g/U"),
    "sens": ("isf_mgdl_per_u", PROFILE_RANGES["isf_mgdl_per_u"], "mg/dL per U"),
}
#: A profile's schedules: Nightscout key -> (usable entries, whether every entry was usable).
Schedules = dict[str, tuple[list[tuple[int, float]], bool]]
#: What a person's profile gives the profile columns: column -> (time zone, schedule).
ProfileColumns = dict[str, tuple[str, tuple[tuple[int, float], ...]]]


def read_nightscout(
    paths: PathLike | Iterable[PathLike],
    *,
    strict: bool = False,
    subject_id: str | None = None,
    basal: float | None = None,
    timezone: str | None = None,
    now: pd.Timestamp | None = None,
) -> tuple[pd.DataFrame, DataReport]:
    """Read Nightscout JSON exports (files or directories) into a canonical frame.

    `basal`: scheduled basal rate (U/h) when no profile.json is given. `timezone`: the
    person's zone, for time-of-day features (default: the profile's, else UTC); the
    exported timestamps are absolute and need no zone.
    """
    if basal is not None:
        basal = as_rate(basal, "basal")
    if timezone is not None:
        timezone = check_timezone(timezone)
    files = expand_paths(paths, (".json",))
    report = DataReport(source=SOURCE)
    sink = Sink(report, strict)
    groups: dict[Path, list[Path]] = defaultdict(list)
    for f in files:
        groups[f.parent].append(f)
    parts, zones, units = [], set(), set()
    profiles: dict[str, list[ProfileColumns | None]] = defaultdict(list)
    for folder, members in sorted(groups.items()):
        sid = subject_id or f"nightscout-{folder.resolve().name}"
        ev, tz, u, prof = _read_person(members, sid, sink, basal, now)
        parts.append(ev)
        profiles[sid].append(prof)
        zones |= {tz} if tz else set()
        units |= u
    tz = check_timezone(timezone or (sorted(zones)[0] if len(zones) == 1 else "UTC"))
    if len(zones) > 1 and not timezone:
        report.notes.append(f"profiles in several time zones {sorted(zones)}; metadata says UTC")
    meta = DatasetMeta(
        source=SOURCE,
        device="Nightscout (CGM and pump uploads)",
        sampling_minutes=5.0,
        timezone=tz,
        units_seen=sorted(units | {MGDL}),
        licence="personal data of the exporting user",
        extra={"files": [str(f) for f in files]},
    )
    frame = finish(Events.concat(parts), report, meta)
    return _add_profile(frame, profiles, report), report


def load_json(path: Path, sink: Sink) -> Any:
    """Parsed JSON, or None after reporting an empty or malformed file."""
    data = read_bytes(path, sink)
    if data is None:
        return None
    try:
        doc = json.loads(data)
    except RecursionError:
        sink.fail(
            InputError(
                "malformed JSON (nested too deeply)", file=path, record="", field="json", value=""
            )
        )
        return None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        record = f"line {e.lineno}, column {e.colno}" if isinstance(e, json.JSONDecodeError) else ""
        sink.fail(
            InputError(
                "malformed JSON",
                file=path,
                record=record,
                field="json",
                value=getattr(e, "msg", str(e)),
            )
        )
        return None
    if doc in ([], {}):
        sink.fail(EmptyInputError("no records", file=path, record="", field="file", value=str(doc)))
        return None
    return doc


def kind_of(doc: Any) -> str:
    """'entries', 'treatments', 'profile', 'devicestatus' or 'unknown' from the content."""
    items = doc if isinstance(doc, list) else [doc]
    first = next((d for d in items if isinstance(d, dict)), {})
    if "store" in first or "defaultProfile" in first:
        return "profile"
    if "eventType" in first:
        return "treatments"
    if "sgv" in first or first.get("type") in ("sgv", "mbg", "cal"):
        return "entries"
    if any(k in first for k in ("openaps", "loop", "pump", "uploader", "device")):
        return "devicestatus"
    return "unknown"


def _times(
    df: pd.DataFrame, iso: tuple[str, ...], epoch: tuple[str, ...]
) -> tuple[pd.Series, pd.Series]:
    """Absolute times from ISO strings (with zone) or epoch ms, and the raw value used."""
    n = len(df)
    t = pd.Series(pd.NaT, index=range(n), dtype="datetime64[ns, UTC]")
    raw = pd.Series([None] * n, dtype=object)
    for col in epoch:
        if col in df:
            v = numbers(df[col])
            # beyond +-9.2e12 ms a time cannot be stored (years 1677-2262): left unparsed
            use = t.isna().to_numpy() & np.isfinite(v) & (np.abs(np.nan_to_num(v)) < 9.2e12)
            t[use] = pd.to_datetime(v[use], unit="ms", utc=True)
            # epoch ms read as float when some records lack it: show them as integers
            raw[use] = [int(x) if float(x).is_integer() else x for x in v[use]]
    for col in iso:
        if col in df:
            s = df[col].astype("string")
            parsed = storable(pd.to_datetime(s, errors="coerce", utc=True, format="ISO8601"))
            use = t.isna().to_numpy() & parsed.notna().to_numpy()
            t[use] = parsed[use]
            miss = raw.isna().to_numpy() & df[col].notna().to_numpy()
            raw[miss] = df[col].to_numpy(dtype=object)[miss]
    return t.astype("datetime64[ns, UTC]"), raw


def _col(df: pd.DataFrame, name: str) -> pd.Series:
    return df[name] if name in df else pd.Series([None] * len(df), dtype=object)


def _read_person(files: list[Path], sid: str, sink: Sink, basal: float | None, now):
    report = sink.report
    ev = Events()
    docs: dict[str, list[tuple[Path, Any]]] = defaultdict(list)
    for f in files:
        report.files.append(str(f))
        doc = load_json(f, sink)
        if doc is None:
            continue
        k = kind_of(doc)
        if k in ("devicestatus", "unknown"):
            n = len(doc) if isinstance(doc, list) else 1
            count(report, f"ignored:{k}", n)
            report.notes.append(f"{f.name}: {k} records ({n}) are not used")
            continue
        docs[k].append((f, doc))
    units: set[str] = set()
    # treatment glucose without its own units is in the profile's units
    profile_mmol = any(profile_units(doc) == "mmol/L" for _, doc in docs["profile"])
    all_times: list[pd.Series] = []

    # ---- entries
    for f, doc in docs["entries"]:
        df = pd.DataFrame.from_records([d if isinstance(d, dict) else {"_bad": d} for d in doc])
        rec = pd.Series([f"entries[{i}]" for i in range(len(df))])
        t, traw = _times(df, ("dateString", "sysTime"), ("date", "mills"))
        typ = _col(df, "type").astype("string").fillna("sgv").to_numpy()
        sgv = typ == "sgv"
        report.readings_in += int(sgv.sum())
        raw = _col(df, "sgv")[sgv]
        v = numbers(raw)
        if np.isfinite(v).sum() >= 10:
            detect_units(v, declared=MGDL, file=str(f), field="sgv")
        code = pd.Series(
            [
                DEXCOM_CODES.get(int(x), f"code {int(x)}") if np.isfinite(x) and x <= 39 else None
                for x in v
            ],
            dtype="string",
        )
        ev.add(
            "readings",
            screen_readings(
                sink,
                file=f,
                subject_id=sid,
                time=t[sgv],
                time_raw=traw[sgv],
                glucose=v,
                value_raw=raw,
                record=rec[sgv],
                time_field="date",
                value_field="sgv",
                code=code,
                now=now,
            ),
        )
        mbg = typ == "mbg"
        if mbg.any():
            raw = _col(df, "mbg")[mbg]
            _finger_sticks(ev, sink, f, sid, t[mbg], traw[mbg], rec[mbg], numbers(raw), raw,
                           "date", "mbg", now)  # fmt: skip
        other = ~(sgv | mbg)
        for k, n in pd.Series(typ[other]).value_counts().items():
            count(report, f"ignored:entries:{k}", n)
        all_times.append(t)

    # ---- treatments
    temps: list[pd.DataFrame] = []
    for f, doc in docs["treatments"]:
        df = pd.DataFrame.from_records([d if isinstance(d, dict) else {"_bad": d} for d in doc])
        rec = pd.Series([f"treatments[{i}]" for i in range(len(df))])
        t, traw = _times(df, ("created_at", "timestamp"), ("date", "mills"))
        all_times.append(t)
        et = _col(df, "eventType").astype("string").fillna("").to_numpy()
        used = np.zeros(len(df), bool)

        def amounts(mask, field, col, *, maximum, minimum=0.0, f=f, t=t, traw=traw, rec=rec, df=df):
            raw = _col(df, col)[mask]
            v = numbers(raw)
            ok = screen_amounts(
                sink,
                file=f,
                field=field,
                time=t[mask],
                time_raw=traw[mask],
                amount=v,
                amount_raw=raw,
                record=rec[mask],
                time_field="created_at",
                value_field=col,
                maximum=maximum,
                minimum=minimum,
                now=now,
            )
            return ok, t[mask][ok], v[ok]

        present = lambda c, df=df: _col(df, c).notna().to_numpy()  # noqa: E731

        # boluses: any treatment with insulin
        m = present("insulin") & (et != "Temp Basal")
        ok, tt, u = amounts(m, "bolus_u", "insulin", maximum=100.0)
        ev.add("doses", table("doses", subject_id=sid, start=tt, units=u, column="bolus_u"))
        used |= m
        # combo bolus: extended part
        m = (et == "Combo Bolus") & present("relative") & present("duration")
        if m.any():
            ok, tt, rate = amounts(m, "bolus_u", "relative", maximum=35.0)
            span = minutes(_col(df, "duration")[m], max_minutes=12 * 60)[ok].reset_index(drop=True)
            good = span.notna().to_numpy()
            tt, rate, span = (
                tt[good].reset_index(drop=True),
                rate[good],
                span[good].reset_index(drop=True),
            )
            dur = (span / pd.Timedelta(minutes=1)).to_numpy(dtype=float)
            e = tt + span
            ev.add(
                "doses",
                table(
                    "doses",
                    subject_id=sid,
                    start=tt,
                    end=e,
                    units=rate * np.nan_to_num(dur) / 60,
                    column="bolus_u",
                ),
            )
        # carbs
        m = present("carbs")
        ok, tt, g = amounts(m, "carbs_g", "carbs", maximum=1000.0)
        keep = g > 0
        ev.add("carbs", table("carbs", subject_id=sid, time=tt[keep], grams=g[keep]))
        used |= m
        # finger sticks (treatment glucose may be mmol/L)
        m = present("glucose") & np.isin(
            et,
            [
                "BG Check",
                "Meal Bolus",
                "Correction Bolus",
                "Snack Bolus",
                "Carb Correction",
                "Note",
                "Bolus",
            ],
        )
        if m.any():
            u_col = _col(df, "units").astype("string").str.lower().fillna("")[m]
            raw = _col(df, "glucose")[m]
            v = numbers(raw)
            mmol = (u_col.str.contains("mmol") | ((u_col == "") & profile_mmol)).to_numpy()
            mg = np.where(mmol, v * MGDL_PER_MMOLL, v)
            units |= {"mmol/L"} if mmol.any() else set()
            _finger_sticks(ev, sink, f, sid, t[m], traw[m], rec[m], mg, raw,
                           "created_at", "glucose", now)  # fmt: skip
            used |= m
        # temp basals
        m = et == "Temp Basal"
        if m.any():
            sub = df[m].reset_index(drop=True)
            has_abs = sub.get("absolute", pd.Series([None] * len(sub))).notna()
            rate_col = np.where(has_abs, "absolute", "rate")
            rate_raw = pd.Series(
                [sub.at[i, c] if c in sub else None for i, c in enumerate(rate_col)], dtype=object
            )
            rate = numbers(rate_raw)
            pct = numbers(_col(sub, "percent"))
            dur = numbers(_col(sub, "duration"))
            tt = t[m].reset_index(drop=True)
            # duration 0 cancels the running temp: its rate does not matter
            cancel = np.isfinite(dur) & (dur == 0)
            rate = np.where(cancel & ~np.isfinite(rate) & ~np.isfinite(pct), 0.0, rate)
            bad_rate = ~np.isfinite(rate) & ~np.isfinite(pct)
            amount = np.where(np.isfinite(rate), rate, np.where(np.isfinite(pct), 0.0, np.nan))
            ok = screen_amounts(
                sink,
                file=f,
                field="basal_u",
                time=tt,
                time_raw=traw[m],
                amount=np.where(bad_rate, np.nan, amount),
                amount_raw=np.where(np.isfinite(rate), rate_raw, _col(sub, "percent")),
                record=rec[m],
                time_field="created_at",
                value_field="absolute/rate/percent",
                maximum=35.0,
                now=now,
            )
            ok &= ~(np.isfinite(pct) & (pct < -100))
            e = tt + minutes(_col(sub, "duration"))  # NaT: missing or absurd duration
            ok2 = screen_spans(
                sink,
                file=f,
                field="basal_u",
                start=tt[ok],
                end=e[ok],
                end_raw=_col(sub, "duration")[ok],
                record=rec[m][ok],
                end_field="duration",
                max_hours=24,
                what="duration",
            )
            idx = np.flatnonzero(ok)[ok2]
            temps.append(
                table(
                    "rates",
                    subject_id=sid,
                    start=tt[idx],
                    end=e[idx],
                    rate_u_h=rate[idx],
                    percent=np.where(np.isfinite(rate[idx]), np.nan, pct[idx]),
                    temp=True,
                )
            )
            used |= m

        # pump suspensions
        def timed(mask, field, f=f, t=t, traw=traw, rec=rec):
            """The rows of `mask` whose timestamps pass the screen."""
            ok = screen_times(
                sink,
                file=f,
                field=field,
                time=t[mask],
                time_raw=traw[mask],
                record=rec[mask],
                time_field="created_at",
                now=now,
            )
            use = np.zeros(len(mask), bool)
            use[np.flatnonzero(mask)[ok]] = True
            return use

        m = np.isin(et, ["Suspend Pump", "Resume Pump"])
        if m.any():
            ok = timed(m, "basal_u")
            temps.append(
                _suspensions(df[ok].reset_index(drop=True), t[ok].reset_index(drop=True), sid)
            )
            used |= m
        # exercise
        m = et == "Exercise"
        if m.any():
            dur = numbers(_col(df, "duration")[m])
            # a duration beyond a day is not an exercise session: the session is kept as a moment
            dur = np.where((dur >= 0) & (dur <= 24 * 60), dur, 0.0)
            tt = t[m].reset_index(drop=True)
            e = tt + pd.to_timedelta(np.nan_to_num(dur), unit="min")
            okt = timed(m, "exercise")[m]
            ev.add(
                "values",
                table(
                    "values",
                    subject_id=sid,
                    start=tt[okt],
                    end=e[okt],
                    column="exercise",
                    value=1.0,
                ),
            )
            used |= m
        for k, n in pd.Series(et[~used]).value_counts().items():
            count(report, f"ignored:treatments:{k or '(no eventType)'}", n)

    # ---- scheduled basal: profile, or a flat rate, or unknown
    times = (
        pd.concat(all_times, ignore_index=True)
        if all_times
        else pd.Series([], dtype="datetime64[ns, UTC]")
    )
    # both ends screened: an unset clock (1970) must not start a basal span that no
    # plausible time ends
    start, end = record_span(times, now)
    tz = None
    sched = None
    profile: ProfileColumns | None = None
    if docs["profile"]:
        f, doc = docs["profile"][-1]
        read = _read_profile(doc, f, sink)
        if read is not None:
            tz, schedules = read
            sched = _basal_segments(schedules["basal"][0], tz, sid, start, end)
            profile = {
                SCHEDULES[key][0]: (tz, tuple(entries))
                for key, (entries, complete) in schedules.items()
                if complete and SCHEDULES[key][0] in PROFILE_COLUMNS
            }
        if len(docs["profile"]) > 1:
            report.notes.append(f"several profile files for {sid}; used {f.name}")
    elif basal is not None:
        if pd.notna(start):
            sched = table(
                "rates", subject_id=sid, start=[start], end=[end], rate_u_h=[float(basal)]
            )
    elif temps:
        report.notes.append(
            f"{sid}: no profile.json and no --basal: basal_u holds temp basals only; "
            "scheduled basal between them is unknown (0)"
        )
    if sched is not None:
        ev.add("rates", sched)
    for tb in temps:
        ev.add("rates", tb)
    return ev, tz, units, profile


def profile_units(doc: Any) -> str | None:
    """'mg/dL' or 'mmol/L' from a profile document (its default store, else the document)."""
    docs = [d for d in (doc if isinstance(doc, list) else [doc]) if isinstance(d, dict)]
    if not docs:
        return None
    d = sorted(docs, key=lambda d: str(d.get("startDate", "")))[-1]
    store = d.get("store") if isinstance(d.get("store"), dict) else {}
    name = d.get("defaultProfile")
    return _units_of(d, store.get(name) if isinstance(name, str) else None)


def _units_of(doc: dict[str, Any], prof: Any) -> str | None:
    """'mg/dL' or 'mmol/L' of a profile (its own ``units``, else its document's), or None."""
    text = (prof if isinstance(prof, dict) else {}).get("units") or doc.get("units")
    return parse_units(text) if isinstance(text, str) else None


def _schedule_entry(b: Any) -> tuple[int | None, float]:
    """(seconds after midnight, value) of one profile schedule entry; (None, nan) if unusable."""
    if not isinstance(b, dict):
        return None, np.nan
    secs = numbers([b.get("timeAsSeconds")])[0]
    if not np.isfinite(secs):
        hh, _, mm = str(b.get("time", "")).partition(":")
        digits = hh.isascii() and hh.isdigit() and mm[:2].isascii() and mm[:2].isdigit()
        secs = int(hh) * 3600 + int(mm[:2]) * 60 if digits else np.nan
    if not np.isfinite(secs) or not 0 <= secs < 86400:
        return None, np.nan
    return int(secs), float(numbers([b.get("value")])[0])


def _suspensions(df: pd.DataFrame, t: pd.Series, sid: str) -> pd.DataFrame:
    """'Suspend Pump' -> a 0 U/h temp until the next 'Resume Pump' (or its duration)."""
    et = _col(df, "eventType").astype("string").to_numpy()
    durations = minutes(_col(df, "duration"), max_minutes=7 * 1440)
    order = np.argsort(pd.DatetimeIndex(t).asi8, kind="stable")
    starts, ends = [], []
    for j, i in enumerate(order):
        if et[i] != "Suspend Pump" or pd.isna(t.iloc[i]):
            continue
        dur = durations.iloc[i]
        end = t.iloc[i] + dur if pd.notna(dur) and dur > pd.Timedelta(0) else None
        if end is None:
            resume = [t.iloc[k] for k in order[j + 1 :] if et[k] == "Resume Pump"]
            end = resume[0] if resume else t.iloc[i] + pd.Timedelta(hours=24)
        starts.append(t.iloc[i])
        ends.append(end)
    return table(
        "rates", subject_id=sid, start=starts, end=ends, rate_u_h=[0.0] * len(starts), temp=True
    )


def _read_profile(doc: Any, path: Path, sink: Sink) -> tuple[str, Schedules] | None:
    """The time zone and the daily schedules (`SCHEDULES`) of a profile document's default
    profile (its newest document's); None, after reporting, where it has no ``store``."""
    docs = doc if isinstance(doc, list) else [doc]
    docs = [d for d in docs if isinstance(d, dict) and "store" in d]
    if not docs:
        sink.fail(
            InputError(
                "profile without a 'store'", file=path, record="profile", field="store", value=""
            )
        )
        return None
    docs.sort(key=lambda d: str(d.get("startDate", "")))
    d = docs[-1]
    store = d["store"] if isinstance(d["store"], dict) else {}
    name = d.get("defaultProfile") if isinstance(d.get("defaultProfile"), str) else None
    name = name or next(iter(store), None)
    prof = store.get(name) if name is not None else None
    prof = prof if isinstance(prof, dict) else {}
    tz = prof.get("timezone") or "UTC"
    try:
        tz = check_timezone(tz)
    except InputError as e:
        sink.fail(
            InputError(e.reason, file=path, record=f"store[{name!r}]", field="timezone", value=tz)
        )
        tz = "UTC"
    mmol = _units_of(d, prof) == MMOLL
    schedules = {
        key: _schedule(prof, key, path, name, sink, MGDL_PER_MMOLL if mmol and key == "sens" else 1)
        for key in SCHEDULES
    }
    return tz, schedules


def _schedule(
    prof: dict[str, Any], key: str, path: Path, name: str | None, sink: Sink, scale: float = 1.0
) -> tuple[list[tuple[int, float]], bool]:
    """One daily schedule of a profile (a `SCHEDULES` key) as (seconds after local midnight,
    value x `scale`) sorted by time, and whether every entry was usable.

    A missing schedule and each unusable entry (no time of day; a value that is not a
    number or, after `scale`, out of the key's range) are reported; the others are kept.
    """
    field, (lo, hi), unit = SCHEDULES[key]
    items = prof.get(key)
    if not isinstance(items, list) or not items:
        sink.fail(
            InputError(
                f"profile has no {key} schedule",
                file=path,
                record=f"store[{name!r}]",
                field=field,
                value="",
            )
        )
        return [], False
    entries = []
    for i, b in enumerate(items):
        secs, value = _schedule_entry(b)
        value *= scale
        if secs is None or not np.isfinite(value) or not lo <= value <= hi:
            sink.fail(
                InputError(
                    f"bad {key} schedule entry",
                    file=path,
                    record=f"store[{name!r}].{key}[{i}]",
                    field=field,
                    value=json.dumps(b)[:200],
                    hint=f"an entry needs a time of day and a value in {lo:g}-{hi:g} {unit}"
                    + (" (mmol/L x 18.0182)" if scale != 1 else ""),
                )
            )
            continue
        entries.append((secs, float(value)))
    return sorted(entries), len(entries) == len(items)


def _basal_segments(
    entries: list[tuple[int, float]], tz: str, sid: str, start, end
) -> pd.DataFrame | None:
    """Scheduled-basal segments over [start, end] from a profile's basal schedule."""
    if not entries or pd.isna(start):
        return None
    local0 = start.tz_convert(tz).tz_localize(None).normalize()
    local1 = end.tz_convert(tz).tz_localize(None).normalize()
    days = pd.date_range(local0, local1, freq="D")
    naive = pd.Series([day + pd.Timedelta(seconds=s) for day in days for s, _ in entries])
    st = localize(naive, tz).astype("datetime64[ns, UTC]")
    rates = np.array([r for _ in days for _, r in entries])
    # keep the segments that overlap the data, the first one clipped to its start
    nxt = st.shift(-1).fillna(end)
    keep = ((nxt > start) & (st <= end)).to_numpy()
    st = st.where(st >= start, start)[keep]
    return table(
        "rates", subject_id=sid, start=st, end=[end] * int(keep.sum()), rate_u_h=rates[keep]
    )


def _in_effect(entries: tuple[tuple[int, float], ...], tz: str, times: pd.Series) -> np.ndarray:
    """The value of a daily schedule in effect at each of `times` (local time of day in
    `tz`): an entry holds from its start to the next one's; before the first, the day
    before's last still holds."""
    secs = np.array([s for s, _ in entries], dtype=np.int64)
    values = np.array([v for _, v in entries], dtype=np.float64)
    local = pd.Series(times).dt.tz_convert(tz)
    of_day = (local.dt.hour * 3600 + local.dt.minute * 60 + local.dt.second).to_numpy()
    return values[np.searchsorted(secs, of_day, side="right") - 1]  # -1: wraps to the last


def _add_profile(
    frame: pd.DataFrame, profiles: dict[str, list[ProfileColumns | None]], report: DataReport
) -> pd.DataFrame:
    """The therapy-profile columns (`PROFILE_COLUMNS`) from each person's profile schedules.

    A column is all or nothing: written only when every person in the frame has one
    complete schedule for it (a person read from several folders, the same in each);
    otherwise a note names those who lack it.
    """
    if not len(frame) or not any(p is not None for ps in profiles.values() for p in ps):
        return frame
    sids = [str(s) for s in pd.unique(frame["subject_id"])]
    for col in PROFILE_COLUMNS:
        have = {}
        for sid in sids:
            got = {p.get(col) if p is not None else None for p in profiles.get(sid, [None])}
            if len(got) == 1 and None not in got:
                have[sid] = got.pop()
        lacking = [sid for sid in sids if sid not in have]
        if lacking:
            report.notes.append(
                f"{col} not written: no complete profile schedule for {', '.join(lacking)}"
            )
            continue
        values = np.empty(len(frame))
        for sid, (tz, entries) in have.items():
            rows = (frame["subject_id"] == sid).to_numpy()
            values[rows] = _in_effect(entries, tz, frame["time"][rows])
        frame[col] = values
    rank = {c: i for i, c in enumerate((*REQUIRED_COLUMNS, *EXTRA_COLUMNS))}
    return validate_frame(frame[sorted(frame.columns, key=lambda c: rank.get(c, len(rank)))])


def _finger_sticks(ev, sink, file, sid, t, traw, rec, mgdl, raw, time_field, value_field, now):
    """Screen finger-stick values (20–600 mg/dL) and add the good ones as `finger_stick`.

    Entries (`mbg`) and treatments (`glucose`) both carry finger sticks; one path for both.
    """
    ok = screen_amounts(
        sink,
        file=file,
        field="finger_stick",
        time=t,
        time_raw=traw,
        amount=mgdl,
        amount_raw=raw,
        record=rec,
        time_field=time_field,
        value_field=value_field,
        minimum=20.0,
        maximum=600.0,
        now=now,
    )
    ev.add(
        "values",
        table("values", subject_id=sid, start=t[ok], column="finger_stick", value=mgdl[ok]),
    )
