"""OhioT1DM (Marling & Bunescu, 2018 and 2020 cohorts): one XML file per patient and split.

Files are ``NNN-ws-training.xml`` / ``NNN-ws-testing.xml``; the root is
``<patient id="559" weight="99" insulin_type="Novalog">`` and each child element holds
``<event .../>`` records with timestamps ``dd-mm-yyyy HH:MM:SS`` (local clock, no zone).
Training and testing files of a patient are one subject, ``ohio-<id>``.

===========================  ==========================  ===================================
element                      attributes                  becomes
===========================  ==========================  ===================================
glucose_level                ts, value (mg/dL)           ``glucose``
finger_stick                 ts, value                   ``finger_stick``
basal                        ts, value (U/h)             basal rate held until the next one
                                                         (or the file's last timestamp)
temp_basal                   ts_begin, ts_end, value     overrides the basal for its span;
                                                         0 = suspension
bolus                        ts_begin, ts_end, type,     ``bolus_u``; "square" and "square
                             dose, bwz_carb_input        dual" spread over ts_begin..ts_end;
                                                         bwz_carb_input -> ``carbs_bwz_g``
meal                         ts, type, carbs             ``carbs_g``, ``meal_announced``
exercise                     ts, intensity, type,        ``exercise`` = intensity during
                             duration (min)              [ts, ts + duration)
sleep / basis_sleep          ts_begin, ts_end, quality   ``sleep`` / ``basis_sleep`` =
                             (basis: tbegin, tend)       quality during the span
work                         ts_begin, ts_end, intensity ``work`` = intensity during the span
illness                      ts_begin, ts_end            ``illness`` = 1 during the span
stressors, hypo_event        ts                          counts per slot
basis_heart_rate             ts, value                   ``heart_rate``
basis_gsr                    ts, value                   ``gsr``
basis_skin_temperature       ts, value (°F)              ``skin_temperature``
basis_air_temperature        ts, value (°F)              ``air_temperature``
basis_steps                  ts, value                   ``steps`` (summed per slot)
acceleration (2020)          ts, value                   ``acceleration``
===========================  ==========================  ===================================

Time zone: the files carry local wall-clock time without a zone. The default
``timezone="UTC"`` stores those clock times unchanged (time-of-day features stay right);
pass the participants' zone (``America/New_York``) to get true UTC instants.

Dates in OhioT1DM were shifted for de-identification, some to years after the release, so
the "timestamp in the future" check is off for this source by default (``allow_future``).
Bolus-wizard carbs (``bwz_carb_input``, what the pump was told) are kept apart from the
self-reported ``meal`` carbs: both describe the same meals and must not be added.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from xml.parsers import expat

import numpy as np
import pandas as pd

from forecast.io.common import (
    PathLike,
    Sink,
    check_timezone,
    count,
    expand_paths,
    finish,
    localize,
    minutes,
    numbers,
    parse_local,
    read_bytes,
    record_end,
    screen_amounts,
    screen_readings,
    screen_spans,
    storable,
)
from forecast.preprocess import Events, table
from forecast.schema import DataReport, DatasetMeta, EmptyInputError, InputError

SOURCE = "OhioT1DM"
TIME_FORMAT = "%d-%m-%Y %H:%M:%S"
LICENCE = (
    "OhioT1DM Data Use Agreement (Ohio University); not redistributable. Marling C, "
    "Bunescu R. The OhioT1DM Dataset for Blood Glucose Level Prediction: Update 2020. "
    "CEUR Workshop Proc. 2675:71-74 (2020)"
)

#: point measurements: element -> (column, minimum, maximum)
MEASUREMENTS: dict[str, tuple[str, float, float]] = {
    "finger_stick": ("finger_stick", 20.0, 600.0),
    "basis_heart_rate": ("heart_rate", 0.0, 300.0),
    "basis_gsr": ("gsr", 0.0, 100.0),
    "basis_skin_temperature": ("skin_temperature", -100.0, 200.0),
    "basis_air_temperature": ("air_temperature", -100.0, 200.0),
    "basis_steps": ("steps", 0.0, 10_000.0),
    "acceleration": ("acceleration", 0.0, 100.0),
}
#: point events counted per slot
MARKERS: dict[str, str] = {"stressors": "stressors", "hypo_event": "hypo_event"}
#: spans: element -> (column, begin attrs, end attrs, value attr or None for 1)
SPANS: dict[str, tuple[str, tuple[str, ...], tuple[str, ...], str | None]] = {
    "sleep": ("sleep", ("ts_begin", "tbegin"), ("ts_end", "tend"), "quality"),
    "basis_sleep": ("basis_sleep", ("tbegin", "ts_begin"), ("tend", "ts_end"), "quality"),
    "work": ("work", ("ts_begin",), ("ts_end",), "intensity"),
    "illness": ("illness", ("ts_begin",), ("ts_end",), None),
}
INSULIN_ELEMENTS = ("basal", "temp_basal", "bolus")
KNOWN = {"glucose_level", "meal", "exercise", *INSULIN_ELEMENTS, *MEASUREMENTS, *MARKERS, *SPANS}
#: bolus types delivered over ts_begin..ts_end
EXTENDED_BOLUS = {"square", "square dual"}


def read_ohio(
    paths: PathLike | Iterable[PathLike],
    *,
    strict: bool = False,
    timezone: str = "UTC",
    allow_future: bool = True,
    now: pd.Timestamp | None = None,
) -> tuple[pd.DataFrame, DataReport]:
    """Read OhioT1DM XML files (or directories of them) into a canonical frame.

    `timezone`: zone of the files' wall-clock times (default "UTC": keep them as they are).
    `allow_future`: OhioT1DM's shifted dates may lie after today; set False to reject them.
    With ``strict=True`` the first bad record (or malformed XML) raises `InputError`.
    """
    tz = check_timezone(timezone)
    files = expand_paths(paths, (".xml",))
    report = DataReport(source=SOURCE)
    sink = Sink(report, strict)
    parts, ids = [], {}
    for f in files:
        report.files.append(str(f))
        ev, pid, attrs = _read_file(f, sink, tz, allow_future, now)
        parts.append(ev)
        if pid:
            ids[pid] = attrs
    cohorts = sorted({"2018" if pid in COHORT_2018 else "2020" for pid in ids if pid.isdigit()})
    meta = DatasetMeta(
        source=SOURCE,
        device="Medtronic Enlite CGM + Medtronic 530G/630G pump; Basis Peak (2018) or "
        "Empatica Embrace (2020) band",
        sampling_minutes=5.0,
        timezone=tz,
        units_seen=["mg/dL"],
        licence=LICENCE,
        extra={"files": [f.name for f in files], "patients": ids, "cohorts": cohorts},
    )
    return finish(Events.concat(parts), report, meta), report


#: patients of the first (2018) release; the others came in 2020
COHORT_2018 = {"559", "563", "570", "575", "588", "591"}


def parse_xml(data: bytes, path: Path, sink: Sink):
    """Root attributes and, per element, its events as (attributes, line) pairs.

    Expat gives line numbers for every record. Malformed XML raises (strict) or is reported,
    keeping the events read before the error.
    """
    root: dict[str, str] = {}
    events: dict[str, list[tuple[dict[str, str], int]]] = {}
    stack: list[str] = []
    parser = expat.ParserCreate()

    def start(name: str, attrs: dict[str, str]) -> None:
        stack.append(name)
        if len(stack) == 1:
            root.update(attrs, _tag=name)
        elif len(stack) == 2:
            events.setdefault(name, [])
        elif len(stack) == 3 and name == "event":
            events[stack[1]].append((attrs, parser.CurrentLineNumber))

    def end(name: str) -> None:
        stack.pop()

    parser.StartElementHandler = start
    parser.EndElementHandler = end
    try:
        parser.Parse(data, True)
    except expat.ExpatError as e:
        sink.fail(
            InputError(
                "malformed XML (records after this point were not read)",
                file=path,
                record=f"line {e.lineno}, column {e.offset}",
                field="xml",
                value=expat.errors.messages[e.code] if e.code else str(e),
            )
        )
    return root, events


def _subject(path: Path, root: dict[str, str], sink: Sink) -> str:
    pid = root.get("id", "").strip()
    if not pid:
        m = re.match(r"(\d+)-ws-", path.name)
        err = InputError(
            "patient element has no id", file=path, record="line 1", field="id", value=""
        )
        if sink.strict:
            raise err
        pid = m.group(1) if m else path.stem
        sink.report.notes.append(f"{path.name}: {err.reason}; id {pid!r} taken from the file name")
    return pid


TIME_ATTRS = ("ts", "ts_begin", "ts_end", "tbegin", "tend")
_OHIO_TS = r"^\d{2}-\d{2}-\d{4} \d{2}:\d{2}:\d{2}$"


def parse_ohio_times(raw: pd.Series, tz: str) -> pd.Series:
    """``dd-mm-yyyy HH:MM:SS`` (local) -> UTC; NaT where a value is not a real time.

    Rearranged into ISO text and parsed in one vectorised call (much faster than strptime
    on the hundred thousand records of a wearable stream); anything not of the exact shape
    goes through the strict format parser, so bad dates still come out NaT.
    """
    s = pd.Series(raw).reset_index(drop=True).astype("string").str.strip()
    shaped = s.str.match(_OHIO_TS).fillna(False).to_numpy()
    iso = (
        s.str.slice(6, 10)
        + "-"
        + s.str.slice(3, 5)
        + "-"
        + s.str.slice(0, 2)
        + "T"
        + s.str.slice(11)
    )
    naive = pd.Series(pd.NaT, index=s.index, dtype="datetime64[ns]")
    if shaped.any():
        parsed = pd.to_datetime(iso[shaped], errors="coerce", format="ISO8601")
        naive[shaped] = storable(parsed).to_numpy()
    if (~shaped).any():
        parsed = pd.to_datetime(s[~shaped], errors="coerce", format=TIME_FORMAT)
        naive[~shaped] = storable(parsed).to_numpy()
    return localize(naive, tz).astype("datetime64[ns, UTC]")


def _frame(items: list[tuple[dict[str, str], int]], tag: str) -> pd.DataFrame:
    df = pd.DataFrame.from_records([a for a, _ in items]) if items else pd.DataFrame()
    df = df.reset_index(drop=True)
    df["_record"] = [f"{tag} event {i + 1} (line {ln})" for i, (_, ln) in enumerate(items)]
    return df


def _attr(df: pd.DataFrame, *names: str) -> pd.Series:
    for n in names:
        if n in df:
            return df[n]
    return pd.Series([None] * len(df), dtype=object)


def _read_file(path: Path, sink: Sink, tz: str, allow_future: bool, now):
    ev = Events()
    report = sink.report
    data = read_bytes(path, sink)
    if data is None:
        return ev, None, {}
    root, elements = parse_xml(data, path, sink)
    if not root:
        return ev, None, {}
    if root.get("_tag") != "patient":
        sink.fail(
            InputError(
                "not an OhioT1DM file: the root element is not <patient>",
                file=path,
                record="line 1",
                field="xml",
                value=root.get("_tag"),
            )
        )
        return ev, None, {}
    pid = _subject(path, root, sink)
    sid = f"ohio-{pid}"
    if not any(elements.values()):
        sink.fail(EmptyInputError("no records", file=path, record="", field="file", value=""))
        return ev, pid, {}
    frames = {tag: _frame(items, tag) for tag, items in elements.items()}
    for tag in sorted(set(frames) - KNOWN):
        report.counts[f"ignored:{tag}"] += len(frames[tag])
        report.notes.append(
            f"{path.name}: unknown element <{tag}> ({len(frames[tag])} events) not used"
        )

    # every timestamp attribute parsed once, kept beside its raw text as "_t:<attr>"
    for df in frames.values():
        for a in TIME_ATTRS:
            if a in df:
                df[f"_t:{a}"] = parse_ohio_times(df[a], tz)

    def times(df: pd.DataFrame, *names: str) -> tuple[pd.Series, pd.Series]:
        for n in names:
            if n in df:
                return df[f"_t:{n}"], df[n]
        raw = _attr(df, *names)
        return parse_local(raw, TIME_FORMAT, tz), raw

    # the record's end: its latest plausible timestamp of any kind
    all_t = [df[f"_t:{a}"] for df in frames.values() for a in TIME_ATTRS if a in df]
    end = record_end(pd.concat(all_t, ignore_index=True), now, allow_future) if all_t else pd.NaT
    common = {"now": now, "allow_future": allow_future}

    # ---- CGM
    g = frames.get("glucose_level", _frame([], "glucose_level"))
    report.readings_in += len(g)
    t, traw = times(g, "ts")
    vraw = _attr(g, "value")
    ev.add(
        "readings",
        screen_readings(
            sink,
            file=path,
            subject_id=sid,
            time=t,
            time_raw=traw,
            glucose=numbers(vraw),
            value_raw=vraw,
            record=g["_record"],
            time_field="ts",
            value_field="value",
            **common,
        ),
    )

    def amounts(df, field, tattr, vattr, *, maximum, minimum=0.0, allow_nan=False):
        t, traw = times(df, tattr)
        raw = _attr(df, vattr)
        v = numbers(raw)
        ok = screen_amounts(
            sink,
            file=path,
            field=field,
            time=t,
            time_raw=traw,
            amount=v,
            amount_raw=raw,
            record=df["_record"],
            time_field=tattr,
            value_field=vattr,
            maximum=maximum,
            minimum=minimum,
            allow_nan=allow_nan,
            **common,
        )
        return ok, t, v

    def span_ok(df, field, start, eattr, *, max_hours):
        e, eraw = times(df, eattr)
        ok = screen_spans(
            sink,
            file=path,
            field=field,
            start=start,
            end=e,
            end_raw=eraw,
            record=df["_record"],
            end_field=eattr,
            max_hours=max_hours,
        )
        return ok, e

    # ---- basal and temp basal (U/h)
    if "basal" in frames:
        b = frames["basal"]
        ok, t, v = amounts(b, "basal_u", "ts", "value", maximum=35.0)
        ev.add(
            "rates",
            table("rates", subject_id=sid, start=t[ok], end=[end] * int(ok.sum()), rate_u_h=v[ok]),
        )
    if "temp_basal" in frames:
        tb = frames["temp_basal"]
        ok, t, v = amounts(tb, "basal_u", "ts_begin", "value", maximum=35.0)
        ok2, e = span_ok(tb[ok], "basal_u", t[ok], "ts_end", max_hours=24)
        t, e, v = t[ok][ok2], e[ok2], v[ok][ok2]
        ev.add("rates", table("rates", subject_id=sid, start=t, end=e, rate_u_h=v, temp=True))
        count(report, "temp_basal_suspensions", (v == 0).sum())

    # ---- boluses (and what the bolus wizard was told)
    if "bolus" in frames:
        bo = frames["bolus"]
        ok, t, v = amounts(bo, "bolus_u", "ts_begin", "dose", maximum=100.0)
        kind = _attr(bo, "type").astype("string").str.strip().str.lower().fillna("normal")
        ext = kind.isin(EXTENDED_BOLUS).to_numpy()
        ok2, e = span_ok(bo[ok & ext], "bolus_u", t[ok & ext], "ts_end", max_hours=12)
        use_ext = np.zeros(len(bo), bool)
        use_ext[np.flatnonzero(ok & ext)[ok2]] = True
        end_t = t.copy()
        end_t[use_ext] = e[ok2].to_numpy()
        keep = (ok & ~ext) | use_ext
        ev.add(
            "doses",
            table(
                "doses",
                subject_id=sid,
                start=t[keep],
                end=end_t[keep],
                units=v[keep],
                column="bolus_u",
            ),
        )
        count(report, "extended_boluses", use_ext.sum())
        if "bwz_carb_input" in bo:
            has = _attr(bo, "bwz_carb_input").notna().to_numpy()
            okc, tc, c = amounts(
                bo[has], "carbs_bwz_g", "ts_begin", "bwz_carb_input", maximum=1000.0
            )
            ev.add(
                "carbs",
                table(
                    "carbs",
                    subject_id=sid,
                    time=tc[okc],
                    grams=c[okc],
                    column="carbs_bwz_g",
                    announced=False,
                ),
            )

    # ---- meals (self-reported carbs; a meal without carbs has unknown size)
    if "meal" in frames:
        ok, t, v = amounts(frames["meal"], "carbs_g", "ts", "carbs", maximum=1000.0, allow_nan=True)
        ev.add("carbs", table("carbs", subject_id=sid, time=t[ok], grams=v[ok]))

    # ---- exercise: intensity over [ts, ts + duration)
    if "exercise" in frames:
        ex = frames["exercise"]
        ok, t, dur = amounts(ex, "exercise", "ts", "duration", maximum=24 * 60.0)
        inten = numbers(_attr(ex, "intensity"))
        inten = np.where(np.isfinite(inten), inten, 1.0)
        e = t + minutes(_attr(ex, "duration"), max_minutes=24 * 60).fillna(pd.Timedelta(0))
        ev.add(
            "values",
            table(
                "values", subject_id=sid, start=t[ok], end=e[ok], column="exercise", value=inten[ok]
            ),
        )

    # ---- measurements, markers, spans
    for tag, (col, lo, hi) in MEASUREMENTS.items():
        if tag in frames:
            ok, t, v = amounts(frames[tag], col, "ts", "value", maximum=hi, minimum=lo)
            ev.add("values", table("values", subject_id=sid, start=t[ok], column=col, value=v[ok]))
    for tag, col in MARKERS.items():
        if tag in frames:
            df = frames[tag]
            ok, t, _ = amounts(df, col, "ts", "_one", maximum=1.0, allow_nan=True)
            ev.add("values", table("values", subject_id=sid, start=t[ok], column=col, value=1.0))
    for tag, (col, battrs, eattrs, vattr) in SPANS.items():
        if tag not in frames:
            continue
        df = frames[tag]
        battr = next((a for a in battrs if a in df), battrs[0])
        eattr = next((a for a in eattrs if a in df), eattrs[0])
        ok, t, v = amounts(df, col, battr, vattr or "_one", maximum=100.0, allow_nan=True)
        v = np.where(np.isfinite(v), v, 1.0)
        e, eraw = times(df, eattr)
        e = e.where(
            e.notna() | pd.Series(_attr(df, eattr)).notna().to_numpy(), t
        )  # no end: a moment
        # an overnight span written with the morning's date on its end ("23:00" -> "06:52"
        # of the same day) is read as ending the next day
        overnight = ((e < t) & (e + pd.Timedelta(days=1) >= t)).fillna(False).to_numpy()
        e = e.where(~overnight, e + pd.Timedelta(days=1))
        count(report, f"{col}_overnight_spans", (overnight & ok).sum())
        ok2 = screen_spans(
            sink,
            file=path,
            field=col,
            start=t[ok],
            end=e[ok],
            end_raw=eraw[ok],
            record=df["_record"][ok],
            end_field=eattr,
            max_hours=14 * 24 if col == "illness" else 24,
        )
        t, e, v = t[ok][ok2], e[ok][ok2], v[ok][ok2]
        ev.add("values", table("values", subject_id=sid, start=t, end=e, column=col, value=v))
    attrs = {k: v for k, v in root.items() if k not in ("_tag", "id")}
    return ev, pid, attrs
