"""ShanghaiT1DM (Zhao et al., Sci Data 2023): one spreadsheet per CGM record.

File names are ``<patient>_<record>_<yyyymmdd>.xls[x]``; records of one patient
(``1002_0``, ``1002_1``, ``1002_2``) are the same subject, ``shanghai-1002``. One sheet per
file with a ``Date`` column and, per row, whatever happened then:

================================  ==================================================
column                            becomes
================================  ==================================================
CGM (mg / dl)                     ``glucose`` (FreeStyle Libre H, every 15 min: the
                                  reading lands in its 5-min slot, the two slots
                                  between stay NaN)
CBG (mg / dl)                     ``finger_stick``
Blood Ketone (mmol / L)           ``ketones_mmol``
Dietary intake / 饮食             a meal event: ``meal_announced`` = 1, ``carbs_g`` NaN
                                  (the size is unknown) -- except glucose given for a
                                  hypo ("Glucose 20 g", "... equal to 30 g glucose"),
                                  whose grams are known
Insulin dose - s.c.               free text, one or more "<name>, <n> IU": see
                                  `forecast.io.insulins` (regular insulin -> bolus;
                                  long-acting analogues spread over 24 h into basal);
                                  the text column ``insulin_sc`` keeps name and units
CSII - bolus insulin (IU)         ``bolus_u``
CSII - basal insulin (IU / H)     basal rate held until the next value or the end of
                                  the record; "temporarily suspend insulin delivery"
                                  (in either CSII column) = rate 0 until the next value
Insulin dose - i.v.               ``insulin_iv_u`` (units of insulin in an infusion; the
                                  infusion rate is not recorded, so they are *not* added
                                  to bolus/basal); the text is kept in ``insulin_iv``
Non-insulin hypoglycemic agents   text column ``agents``
================================  ==================================================

Times are China Standard Time (``Asia/Shanghai``, no daylight saving). The Libre reports
values below its range as 2.2 mmol/L, which the dataset stores as 39.6 mg/dL: these are
real (censored) low readings, inside 20–600 mg/dL, and are kept; the report counts them.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

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
    record_end,
    screen_amounts,
    screen_readings,
    screen_times,
    text_codes,
)
from forecast.io.insulins import classify, display_name, injection_events
from forecast.preprocess import Events, table
from forecast.schema import DataReport, DatasetMeta, EmptyInputError, InputError

SOURCE = "ShanghaiT1DM"
LICENCE = (
    "CC BY 4.0. Zhao Q, Zhu J, Shen X, et al. Chinese diabetes datasets for data-driven "
    "machine learning. Scientific Data 10, 35 (2023). doi:10.1038/s41597-023-01940-7"
)
SAMPLING_MINUTES = 15.0
#: The Libre's lowest reportable value (2.2 mmol/L) as stored in the dataset.
SENSOR_FLOOR_MGDL = 39.6

#: canonical key -> start of the header (compared lower-case, spaces collapsed)
HEADERS = {
    "date": "date",
    "cgm": "cgm",
    "cbg": "cbg",
    "ketone": "blood ketone",
    "diet": "dietary intake",
    "diet_cn": "饮食",
    "sc": "insulin dose - s.c",
    "agents": "non-insulin",
    "csii_bolus": "csii - bolus",
    "csii_basal": "csii - basal",
    "iv": "insulin dose - i.v",
}

_NAME = re.compile(r"^(?P<patient>\d+)_(?P<record>\d+)_(?P<date>\d{8})$")
# "Novolin R, 6 IU" / "insulin degludec, 12 IU" (several per cell, separated by , or ;)
_SC_DOSE = re.compile(
    r"(?P<name>[^,;]*?[A-Za-z][^,;]*?)\s*,?\s*(?P<units>\d+(?:\.\d+)?)\s*IU\b", re.I
)
# "500ml 0.9% sodium chloride, 12 IU Novolin R, 10 ml 10% potassium chloride"
_IV_DOSE = re.compile(
    r"(?P<units>\d+(?:\.\d+)?)\s*IU\s+(?P<name>[A-Za-z][A-Za-z0-9 \xa0]*?)\s*(?:[,;]|$)", re.I
)
_GLUCOSE_G = re.compile(
    r"(?:(?P<a>\d+(?:\.\d+)?)\s*g\s+(?:of\s+)?glucose\b)|(?:\bglucose\s+(?P<b>\d+(?:\.\d+)?)\s*g\b)",
    re.I,
)
_SUSPEND = re.compile(r"suspend", re.I)


def read_shanghai(
    paths: PathLike | Iterable[PathLike],
    *,
    strict: bool = False,
    timezone: str = "Asia/Shanghai",
    now: pd.Timestamp | None = None,
) -> tuple[pd.DataFrame, DataReport]:
    """Read ShanghaiT1DM spreadsheets (files or directories) into a canonical frame.

    `timezone` is the clock of the ``Date`` column (the study ran in Shanghai). With
    ``strict=True`` the first bad record raises `InputError`; otherwise it is listed in the
    returned `DataReport` with its reason.
    """
    tz = check_timezone(timezone)
    files = [
        f for f in expand_paths(paths, (".xls", ".xlsx")) if not f.name.startswith("Shanghai_T")
    ]
    report = DataReport(source=SOURCE)
    sink = Sink(report, strict)
    parts = []
    insulins: Counter = Counter()
    for f in files:
        report.files.append(str(f))
        parts.append(_read_file(f, sink, tz, now, insulins))
    meta = DatasetMeta(
        source=SOURCE,
        device="FreeStyle Libre H CGM; insulin pump (CSII) or injections",
        sampling_minutes=SAMPLING_MINUTES,
        timezone=tz,
        units_seen=["mg/dL"],
        licence=LICENCE,
        extra={
            "files": [f.name for f in files],
            "insulin_units_by_name": {k: round(v, 6) for k, v in sorted(insulins.items())},
        },
    )
    return finish(Events.concat(parts), report, meta), report


def subject_of(path: Path, sink: Sink) -> str:
    """``shanghai-<patient>`` from ``<patient>_<record>_<date>``; the stem otherwise."""
    m = _NAME.match(path.stem)
    if m:
        return f"shanghai-{m['patient']}"
    err = InputError(
        "file name is not <patient>_<record>_<yyyymmdd>",
        file=path,
        record="file name",
        field="subject_id",
        value=path.name,
        hint="rename the file as in the dataset release so records of one patient join",
    )
    if sink.strict:
        raise err
    sink.report.notes.append(f"{path.name}: {err.reason}; subject id taken from the stem")
    return f"shanghai-{path.stem}"


def _columns(df: pd.DataFrame, path: Path, sink: Sink) -> dict[str, str] | None:
    norm = {c: re.sub(r"\s+", " ", str(c)).strip().lower() for c in df.columns}
    found: dict[str, str] = {}
    for key, prefix in HEADERS.items():
        for col, n in norm.items():
            if n.startswith(prefix) and col not in found.values():
                found[key] = col
                break
    for need in ("date", "cgm"):
        if need not in found:
            sink.fail(
                InputError(
                    f"not a ShanghaiT1DM sheet: no column starting with {HEADERS[need]!r}",
                    file=path,
                    record="header row",
                    field=need,
                    value=", ".join(map(str, df.columns))[:200],
                )
            )
            return None
    return found


def _read_file(
    path: Path, sink: Sink, tz: str, now: pd.Timestamp | None, insulins: Counter
) -> Events:
    ev = Events()
    report = sink.report
    if path.stat().st_size == 0:
        sink.fail(EmptyInputError("empty file", file=path, record="", field="file", value=""))
        return ev
    try:
        df = pd.read_excel(path, engine="calamine", sheet_name=0)
    except Exception as e:  # calamine raises its own types for corrupt workbooks
        sink.fail(
            InputError(
                "unreadable spreadsheet", file=path, record="", field="file", value=str(e)[:200]
            )
        )
        return ev
    cols = _columns(df, path, sink)
    if cols is None:
        return ev
    if df.empty:
        sink.fail(EmptyInputError("no records", file=path, record="", field="file", value=""))
        return ev
    sid = subject_of(path, sink)
    df = df.reset_index(drop=True)
    rows = np.array([f"row {i + 2}" for i in range(len(df))], dtype=object)  # Excel numbering
    date_raw = df[cols["date"]]
    t = parse_local(date_raw, None, tz)
    date_col = cols["date"]

    def col(key: str) -> pd.Series:
        return df[cols[key]] if key in cols else pd.Series([None] * len(df), dtype=object)

    def header(key: str) -> str:
        return f"column {cols[key]!r}" if key in cols else key

    # ---- CGM
    raw = col("cgm")
    has = present(raw)
    report.readings_in += int(has.sum())
    ev.add(
        "readings",
        screen_readings(
            sink,
            file=path,
            subject_id=sid,
            time=t[has],
            time_raw=date_raw[has],
            glucose=numbers(raw[has]),
            value_raw=raw[has],
            record=rows[has],
            time_field=f"column {date_col!r}",
            value_field=header("cgm"),
            code=text_codes(raw[has]),
            now=now,
        ),
    )
    floor = int((numbers(raw) <= SENSOR_FLOOR_MGDL + 1e-9).sum())
    if floor:
        report.counts["readings_at_sensor_floor"] += floor
        report.notes.append(
            f"{path.name}: {floor} CGM values at the sensor floor {SENSOR_FLOOR_MGDL} mg/dL "
            "(Libre 'LO', 2.2 mmol/L) kept as censored low readings"
        )

    def amounts(key: str, field: str, *, maximum: float, minimum: float = 0.0):
        raw = col(key)
        m = present(raw)
        v = numbers(raw[m])
        ok = screen_amounts(
            sink,
            file=path,
            field=field,
            time=t[m],
            time_raw=date_raw[m],
            amount=v,
            amount_raw=raw[m],
            record=rows[m],
            time_field=f"column {date_col!r}",
            value_field=header(key),
            maximum=maximum,
            minimum=minimum,
            now=now,
        )
        return t[m][ok], v[ok]

    # ---- finger sticks and ketones
    tt, v = amounts("cbg", "finger_stick", maximum=600.0, minimum=20.0)
    ev.add("values", table("values", subject_id=sid, start=tt, column="finger_stick", value=v))
    tt, v = amounts("ketone", "ketones_mmol", maximum=30.0)
    ev.add("values", table("values", subject_id=sid, start=tt, column="ketones_mmol", value=v))

    # ---- meals
    en, cn = col("diet"), col("diet_cn")
    meal = present(en) | present(cn)
    text = en.astype("string").fillna("")[meal]
    grams = text.str.extract(_GLUCOSE_G).astype("float64")
    g = grams["a"].fillna(grams["b"]).to_numpy(dtype=np.float64)
    ok = screen_amounts(
        sink,
        file=path,
        field="carbs_g",
        time=t[meal],
        time_raw=date_raw[meal],
        amount=g,
        amount_raw=text,
        record=rows[meal],
        time_field=f"column {date_col!r}",
        value_field=header("diet"),
        maximum=500.0,
        allow_nan=True,
        now=now,
    )
    ev.add("carbs", table("carbs", subject_id=sid, time=t[meal][ok], grams=g[ok]))
    count(report, "meals", ok.sum())

    # ---- CSII bolus and basal (numbers; "suspend" text = basal rate 0)
    end = record_end(t, now)
    for key, field, maximum in (("csii_bolus", "bolus_u", 50.0), ("csii_basal", "basal_u", 35.0)):
        raw = col(key)
        m = present(raw)
        v = numbers(raw[m])
        susp = raw[m].astype("string").str.contains(_SUSPEND, na=False).to_numpy()
        ok = screen_amounts(
            sink,
            file=path,
            field=field,
            time=t[m],
            time_raw=date_raw[m],
            amount=np.where(susp, 0.0, v),
            amount_raw=raw[m],
            record=rows[m],
            time_field=f"column {date_col!r}",
            value_field=header(key),
            maximum=maximum,
            now=now,
        )
        tm = t[m].reset_index(drop=True)
        rate = (ok & susp) if key == "csii_bolus" else ok
        if key == "csii_bolus":
            b = ok & ~susp
            ev.add(
                "doses", table("doses", subject_id=sid, start=tm[b], units=v[b], column="bolus_u")
            )
        ev.add(
            "rates",
            table(
                "rates",
                subject_id=sid,
                start=tm[rate],
                end=[end] * int(rate.sum()),
                rate_u_h=np.where(susp, 0.0, v)[rate],
            ),
        )
        count(report, "pump_suspensions", (ok & susp).sum())

    # ---- injections (free text)
    def timed(key: str, field: str) -> np.ndarray:
        """Cells of a text column that hold something at a plausible time."""
        m = present(col(key))
        ok = screen_times(
            sink,
            file=path,
            field=field,
            time=t[m],
            time_raw=date_raw[m],
            record=rows[m],
            time_field=f"column {date_col!r}",
            now=now,
        )
        use = np.zeros(len(df), bool)
        use[np.flatnonzero(m)[ok]] = True
        return use

    _injections(
        ev, path, sink, sid, t, rows, col("sc"), timed("sc", "insulin_sc"), header("sc"), insulins
    )
    _infusions(
        ev, path, sink, sid, t, rows, col("iv"), timed("iv", "insulin_iv_u"), header("iv"), insulins
    )

    # ---- other agents, kept verbatim
    raw = col("agents")
    m = timed("agents", "agents")
    txt = raw[m].astype("string").map(display_name)
    ev.add("texts", table("texts", subject_id=sid, time=t[m], column="agents", text=txt))
    return ev


def parse_injections(text: str) -> tuple[list[tuple[str, float]], str]:
    """("Novolin R, 6 IU; insulin detemir, 4 IU") -> [(name, units), ...] and leftover text.

    Leftover text (anything that is not a "<name>, <n> IU" item or a separator) means the
    cell was not fully understood.
    """
    items = [(display_name(m["name"]), float(m["units"])) for m in _SC_DOSE.finditer(text)]
    rest = _SC_DOSE.sub("", text)
    rest = re.sub(r"[\s,;\xa0]+", "", rest)
    return items, rest


def _injections(ev, path, sink, sid, t, rows, raw, m, header, insulins) -> None:
    times, names, units = [], [], []
    for i in np.flatnonzero(m):
        cell = str(raw.iloc[i])
        items, rest = parse_injections(cell)
        problem = None
        if not items or rest:
            problem = "unparseable insulin dose (expected '<name>, <n> IU')"
        elif any(classify(n) is None for n, _ in items):
            problem = "unknown insulin name"
        if problem:
            sink.fail(
                InputError(
                    problem,
                    file=path,
                    record=f"{rows[i]}, {header}",
                    field="insulin_sc",
                    value=cell,
                )
            )
            continue
        for n, u in items:
            times.append(t.iloc[i])
            names.append(n)
            units.append(u)
            insulins[n] += u
    if times:
        doses, texts = injection_events(sid, pd.Series(times), names, units)
        ev.add("doses", doses)
        ev.add("texts", texts)


def _infusions(ev, path, sink, sid, t, rows, raw, m, header, insulins) -> None:
    times, units, texts = [], [], []
    for i in np.flatnonzero(m):
        cell = display_name(str(raw.iloc[i]))
        found = list(_IV_DOSE.finditer(cell))
        if not found:
            sink.fail(
                InputError(
                    "unparseable i.v. insulin (expected '<n> IU <name>')",
                    file=path,
                    record=f"{rows[i]}, {header}",
                    field="insulin_iv_u",
                    value=cell,
                )
            )
            continue
        total = sum(float(f["units"]) for f in found)
        times.append(t.iloc[i])
        units.append(total)
        texts.append(cell)
        for f in found:
            insulins[f"{display_name(f['name'])} (i.v.)"] += float(f["units"])
    if times:
        ts = pd.Series(times)
        ev.add(
            "doses", table("doses", subject_id=sid, start=ts, units=units, column="insulin_iv_u")
        )
        ev.add("texts", table("texts", subject_id=sid, time=ts, column="insulin_iv", text=texts))
