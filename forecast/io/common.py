"""What every reader shares: paths, time zones, record screening, and the last step.

A reader parses its format into small tables, screens every record here (so the rules and
the wording of rejections are the same for all sources), fills an `Events` and calls
`finish`. Screening names each bad record precisely:

* ``file``   the input file;
* ``record`` where it is in the file and which source field is at fault
  (``"row 15, column 'CGM (mg / dl)'"``, ``"glucose_level event 12 (line 40), ts"``);
* ``field``  the canonical field the record would have fed (``glucose``, ``bolus_u``,
  ``basal_u``, ``carbs_g``, ``finger_stick`` ...); a rejected CGM reading always has
  ``field == "glucose"``, which is what `DataReport.readings_rejected` counts;
* ``value``  the raw value as found;
* ``reason`` a short category (``out of range``, ``sensor error code``, ``duplicate``...).

With ``strict=True`` the first bad record raises the typed error instead.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import numpy as np
import pandas as pd

from forecast.preprocess import Events, to_grid
from forecast.schema import (
    GLUCOSE_MAX_MGDL,
    GLUCOSE_MIN_MGDL,
    DataReport,
    DatasetMeta,
    EmptyInputError,
    InputError,
)

#: Earliest plausible timestamp: no CGM existed before; earlier dates are unset clocks.
EARLIEST = pd.Timestamp("1990-01-01", tz="UTC")
#: A timestamp more than this after "now" is in the future. Local times stored without a
#: zone can be up to 14 h ahead of UTC, hence a day rather than zero.
FUTURE_TOLERANCE = pd.Timedelta(days=1)

PathLike = str | Path


# --------------------------------------------------------------------------- paths


def expand_paths(paths: PathLike | Iterable[PathLike], suffixes: Sequence[str]) -> list[Path]:
    """Files to read: files as given, directories searched (recursively) for `suffixes`."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out.extend(
                sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in suffixes)
            )
        elif p.exists():
            out.append(p)
        else:
            raise FileNotFoundError(f"no such file or directory: {p}")
    if not out:
        raise FileNotFoundError(
            f"no input files (looked for {', '.join(suffixes)} in {', '.join(map(str, paths))})"
        )
    return out


def reject_unread(
    sink: Sink, path: PathLike, rows: Iterable[tuple[int, list[str]]], reason: str
) -> None:
    """Count the rows of a file that was not read (bad header...) as input, each rejected.

    Any of them might have been a reading, so each is an input reading with a reason;
    the header's own rejection says why (call this after reporting it).
    """
    rep = sink.report
    for ln, fields in rows:
        rep.readings_in += 1
        rep.reject(
            file=path,
            record=f"line {ln}",
            field="glucose",
            value=",".join(fields)[:200],
            reason=reason,
        )


def read_bytes(path: Path, sink: Sink) -> bytes | None:
    """The file's bytes, or None (after reporting) when it is empty."""
    data = path.read_bytes()
    if not data.strip():
        sink.fail(EmptyInputError("empty file", file=path, record="", field="file", value=""))
        return None
    return data


# --------------------------------------------------------------------------- time


def as_rate(value: Any, field: str, maximum: float = 35.0) -> float:
    """A user-given basal rate (U/h) as a float, or InputError."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        v = float("nan")
    if not (0.0 <= v <= maximum):
        raise InputError(
            f"basal rate must be a number of U/h between 0 and {maximum:g}",
            field=field,
            value=value,
        )
    return v


def check_timezone(tz: str | None) -> str:
    """An IANA zone name, validated (a typo should not silently mean UTC)."""
    tz = tz or "UTC"
    try:
        if not isinstance(tz, str):
            raise ValueError(tz)
        ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError, TypeError) as e:
        raise InputError(
            "unknown time zone",
            field="timezone",
            value=tz,
            hint="use an IANA name such as 'Europe/Paris' or 'America/New_York'",
        ) from e
    return tz


def localize(naive: pd.Series, tz: str) -> pd.Series:
    """Local wall-clock times (naive) in zone `tz` -> UTC.

    The repeated hour when clocks go back is resolved from the order of the records where
    possible, otherwise taken as summer time; times in the skipped hour move forward.
    """
    s = pd.Series(pd.to_datetime(naive)).reset_index(drop=True)
    if s.dt.tz is not None:
        return s.dt.tz_convert("UTC")
    if tz == "UTC":
        return s.dt.tz_localize("UTC")
    try:
        loc = s.dt.tz_localize(tz, ambiguous="infer", nonexistent="shift_forward")
    except Exception:  # ambiguity cannot be inferred (unordered records)
        loc = s.dt.tz_localize(tz, ambiguous=np.ones(len(s), bool), nonexistent="shift_forward")
    return loc.dt.tz_convert("UTC")


def parse_local(raw: pd.Series, fmt: str | None, tz: str) -> pd.Series:
    """Parse timestamps (NaT where unparseable); naive ones are local to `tz`; UTC out.

    Strings carrying an offset or ``Z`` are honoured as such.
    """
    raw = pd.Series(raw).reset_index(drop=True)
    if pd.api.types.is_datetime64_any_dtype(raw.dtype):
        t = raw
    else:
        txt = raw.astype("string").str.strip()
        zoned = txt.str.contains(r"(?:Z|[+-]\d\d:?\d\d)$", regex=True, na=False).any()
        try:
            if fmt in (None, "ISO8601") and zoned:
                t = pd.to_datetime(txt, errors="coerce", utc=True, format="ISO8601")
            else:
                # no format known: parse each value on its own rather than guess from the first
                t = pd.to_datetime(txt, errors="coerce", format=fmt or "mixed")
        except (ValueError, OverflowError, pd.errors.OutOfBoundsDatetime):
            t = _parse_each(txt, fmt)
    t = storable(t)
    if t.dt.tz is not None:
        return t.dt.tz_convert("UTC").astype("datetime64[ns, UTC]")
    return localize(t, tz).astype("datetime64[ns, UTC]")


def storable(t: pd.Series) -> pd.Series:
    """Times as nanoseconds (NaT where they cannot be: before 1678 or after 2261).

    pandas parses into coarser units that reach far further; such a time is as good as
    unparseable, and would overflow the nanosecond grid.
    """
    t = pd.Series(t)
    lo, hi = pd.Timestamp("1678-01-01"), pd.Timestamp("2261-12-31")
    if t.dt.tz is not None:
        lo, hi = lo.tz_localize("UTC"), hi.tz_localize("UTC")
        return t.where((t > lo) & (t < hi)).dt.tz_convert("UTC").astype("datetime64[ns, UTC]")
    return t.where((t > lo) & (t < hi)).astype("datetime64[ns]")


def minutes(raw: Any, *, max_minutes: float = 7 * 1440) -> pd.Series:
    """Durations in minutes as Timedelta; NaT where missing, negative or beyond `max_minutes`."""
    v = numbers(raw)
    ok = np.isfinite(v) & (v >= 0) & (v <= max_minutes)
    return pd.Series(pd.to_timedelta(np.where(ok, v, np.nan), unit="min"))


def _parse_each(txt: pd.Series, fmt: str | None) -> pd.Series:
    """Value by value, NaT for anything unparseable (slow path for pathological columns)."""
    out = []
    for v in txt:
        try:
            ts = pd.to_datetime(
                v, format=None if fmt in (None, "ISO8601", "mixed") else fmt, utc=True
            )
            out.append(ts if isinstance(ts, pd.Timestamp) else pd.NaT)
        except (ValueError, TypeError, OverflowError, pd.errors.OutOfBoundsDatetime):
            out.append(pd.NaT)
    return pd.Series(out, dtype="datetime64[ns, UTC]").dt.tz_convert(None)


# --------------------------------------------------------------------------- reporting


def count(report: DataReport, key: str, n: int) -> None:
    """Add to a report counter, leaving zero counts out of the report."""
    if n:
        report.counts[key] += int(n)


class Sink:
    """Where bad records go: raised (strict) or listed in the report."""

    def __init__(self, report: DataReport, strict: bool = False) -> None:
        self.report = report
        self.strict = strict

    def fail(self, err: InputError) -> None:
        if self.strict:
            raise err
        self.report.reject_error(err)


class Screen:
    """Vectorised record checks: the first failing check names a record's reason."""

    def __init__(self, n: int) -> None:
        self.reason = np.full(n, None, dtype=object)
        self.record = np.full(n, "", dtype=object)
        self.value = np.full(n, None, dtype=object)

    def flag(self, mask: Any, reason: str, records: Any, values: Any) -> None:
        m = np.asarray(mask, dtype=bool) & (self.reason == None)  # noqa: E711
        if not m.any():
            return
        self.reason[m] = reason
        self.record[m] = np.asarray(records, dtype=object)[m]
        self.value[m] = np.asarray(values, dtype=object)[m]

    @property
    def ok(self) -> np.ndarray:
        return self.reason == None  # noqa: E711

    def emit(self, sink: Sink, file: PathLike, field: str) -> np.ndarray:
        """Raise (strict) on the first flagged record or report all; return the ok mask."""
        bad = np.flatnonzero(~self.ok)
        if bad.size and sink.strict:
            i = int(bad[0])
            raise InputError(
                self.reason[i],
                file=file,
                record=self.record[i],
                field=field,
                value=_raw(self.value[i]),
            )
        rep = sink.report
        for i in bad:
            rep.reject(
                file=file,
                record=self.record[i],
                field=field,
                value=_raw(self.value[i]),
                reason=self.reason[i],
            )
        return self.ok


def _raw(v: Any) -> Any:
    if v is None or (isinstance(v, float) and np.isnan(v)) or v is pd.NA or v is pd.NaT:
        return ""
    if isinstance(v, (pd.Timestamp, np.datetime64)):
        return str(v)
    return v


def _strs(x: Any, n: int) -> np.ndarray:
    if isinstance(x, str):
        return np.full(n, x, dtype=object)
    return np.asarray(pd.Series(x).astype("string").fillna(""), dtype=object)


def record_span(times: pd.Series, now: pd.Timestamp | None = None, allow_future: bool = False):
    """(earliest, latest) plausible timestamp of a record (what a held basal rate spans).

    Timestamps that the screen would reject (unset clocks, the future) are ignored, so one
    bad date cannot stretch a basal rate over decades; (NaT, NaT) when none is plausible.
    """
    t = pd.Series(times).dropna()
    t = t[t >= EARLIEST]
    if not allow_future:
        t = t[t <= (now if now is not None else pd.Timestamp.now(tz="UTC")) + FUTURE_TOLERANCE]
    return (t.min(), t.max()) if len(t) else (pd.NaT, pd.NaT)


def record_end(times: pd.Series, now: pd.Timestamp | None = None, allow_future: bool = False):
    """Latest plausible timestamp of a record (`record_span`'s end)."""
    return record_span(times, now, allow_future)[1]


def check_times(
    screen: Screen,
    time: pd.Series,
    time_raw: Any,
    records: Any,
    *,
    now: pd.Timestamp | None = None,
    allow_future: bool = False,
) -> None:
    """Flag unparseable, implausibly early and future timestamps."""
    t = pd.Series(time).reset_index(drop=True)
    raw = np.asarray(pd.Series(time_raw).reset_index(drop=True).astype(object), dtype=object)
    screen.flag(t.isna().to_numpy(), "unparseable timestamp", records, raw)
    screen.flag(
        (t < EARLIEST).fillna(False).to_numpy(), "implausible timestamp (before 1990)", records, raw
    )
    if not allow_future:
        limit = (now if now is not None else pd.Timestamp.now(tz="UTC")) + FUTURE_TOLERANCE
        screen.flag((t > limit).fillna(False).to_numpy(), "timestamp in the future", records, raw)


def screen_readings(
    sink: Sink,
    *,
    file: PathLike,
    subject_id: Any,
    time: pd.Series,
    time_raw: Any,
    glucose: Any,
    value_raw: Any,
    record: Any,
    time_field: str,
    value_field: str,
    code: Any = None,
    now: pd.Timestamp | None = None,
    allow_future: bool = False,
    check_order: bool = True,
) -> pd.DataFrame:
    """Screen CGM records (in file order) and return the good ones as a ``readings`` table.

    `glucose` is already in mg/dL (NaN where the value did not parse); `code` holds, per
    record, a sensor error-code description or NA. Checks, first failure wins: timestamp
    unparseable / before 1990 / in the future, sensor error code, glucose unparseable,
    glucose outside 20–600 mg/dL, timestamp out of order (earlier than the record before it,
    for a file whose records otherwise run forwards; or later, for one running backwards).
    """
    from forecast.preprocess import table

    t = pd.Series(time).reset_index(drop=True)
    n = len(t)
    base = _strs(record, n)
    rec_t = np.array([f"{b}, {time_field}" for b in base], dtype=object)
    rec_v = np.array([f"{b}, {value_field}" for b in base], dtype=object)
    g = np.asarray(glucose, dtype=np.float64)
    vraw = np.asarray(pd.Series(value_raw).reset_index(drop=True).astype(object), dtype=object)
    sc = Screen(n)
    check_times(sc, t, time_raw, rec_t, now=now, allow_future=allow_future)
    if code is not None:
        c = pd.Series(code).reset_index(drop=True).astype("string")
        has = c.notna().to_numpy()
        sc.flag(has, "sensor error code", rec_v, vraw)
    sc.flag(~np.isfinite(g), "unparseable glucose", rec_v, vraw)
    with np.errstate(invalid="ignore"):
        sc.flag(
            (g < GLUCOSE_MIN_MGDL) | (g > GLUCOSE_MAX_MGDL),
            f"glucose outside {GLUCOSE_MIN_MGDL:g}-{GLUCOSE_MAX_MGDL:g} mg/dL",
            rec_v,
            vraw,
        )
    sid = _strs(subject_id, n)
    if check_order and n > 1:
        # order is judged per subject (a file may hold several people one after another)
        ns = pd.DatetimeIndex(t).as_unit("ns").asi8.astype(np.float64)
        ns[t.isna().to_numpy()] = np.nan
        ns_valid = pd.Series(np.where(sc.ok, ns, np.nan))
        prev = ns_valid.groupby(sid).transform(lambda s: s.ffill().shift(1)).to_numpy()
        d = ns_valid.to_numpy() - prev
        forwards = np.nansum(d > 0) >= np.nansum(d < 0)
        with np.errstate(invalid="ignore"):
            back = (d < 0) if forwards else (d > 0)
        raw_t = np.asarray(pd.Series(time_raw).reset_index(drop=True).astype(object), dtype=object)
        sc.flag(back, "timestamp out of order", rec_t, raw_t)
    ok = sc.emit(sink, file, "glucose")
    return table(
        "readings",
        subject_id=sid[ok],
        time=t[ok].reset_index(drop=True),
        glucose=g[ok],
        file=str(file),
        record=base[ok],
    )


def screen_amounts(
    sink: Sink,
    *,
    file: PathLike,
    field: str,
    time: pd.Series,
    time_raw: Any,
    amount: Any,
    amount_raw: Any,
    record: Any,
    time_field: str,
    value_field: str,
    maximum: float | None = None,
    minimum: float = 0.0,
    allow_nan: bool = False,
    now: pd.Timestamp | None = None,
    allow_future: bool = False,
) -> np.ndarray:
    """Screen insulin/carb/measurement records; return the mask of good ones.

    Checks: timestamp (as for readings), amount unparseable (unless `allow_nan`, e.g. a
    meal of unknown size), below `minimum` (negative, for amounts), above `maximum`
    (implausible for the field).
    """
    t = pd.Series(time).reset_index(drop=True)
    n = len(t)
    base = _strs(record, n)
    rec_t = np.array([f"{b}, {time_field}" for b in base], dtype=object)
    rec_v = np.array([f"{b}, {value_field}" for b in base], dtype=object)
    a = np.asarray(amount, dtype=np.float64)
    raw = np.asarray(pd.Series(amount_raw).reset_index(drop=True).astype(object), dtype=object)
    sc = Screen(n)
    check_times(sc, t, time_raw, rec_t, now=now, allow_future=allow_future)
    if not allow_nan:
        sc.flag(~np.isfinite(a), f"unparseable {field}", rec_v, raw)
    with np.errstate(invalid="ignore"):
        if minimum == 0:
            sc.flag(a < 0, f"negative {field}", rec_v, raw)
        else:
            sc.flag(a < minimum, f"implausible {field} (below {minimum:g})", rec_v, raw)
        if maximum is not None:
            sc.flag(a > maximum, f"implausible {field} (above {maximum:g})", rec_v, raw)
    return sc.emit(sink, file, field)


def screen_times(
    sink: Sink,
    *,
    file: PathLike,
    field: str,
    time: pd.Series,
    time_raw: Any,
    record: Any,
    time_field: str,
    now: pd.Timestamp | None = None,
    allow_future: bool = False,
) -> np.ndarray:
    """Screen only the timestamps of records without an amount (labels, markers, spans)."""
    t = pd.Series(time).reset_index(drop=True)
    base = _strs(record, len(t))
    rec_t = np.array([f"{b}, {time_field}" for b in base], dtype=object)
    sc = Screen(len(t))
    check_times(sc, t, time_raw, rec_t, now=now, allow_future=allow_future)
    return sc.emit(sink, file, field)


def screen_spans(
    sink: Sink,
    *,
    file: PathLike,
    field: str,
    start: pd.Series,
    end: pd.Series,
    end_raw: Any,
    record: Any,
    end_field: str,
    max_hours: float,
    what: str = "timestamp",
) -> np.ndarray:
    """Flag spans whose end (or duration: `what`) is unparseable, before the start, too long."""
    s = pd.Series(start).reset_index(drop=True)
    e = pd.Series(end).reset_index(drop=True)
    n = len(s)
    base = _strs(record, n)
    rec = np.array([f"{b}, {end_field}" for b in base], dtype=object)
    raw = np.asarray(pd.Series(end_raw).reset_index(drop=True).astype(object), dtype=object)
    sc = Screen(n)
    sc.flag(e.isna().to_numpy() & s.notna().to_numpy(), f"unparseable {what}", rec, raw)
    sc.flag((e < s).fillna(False).to_numpy(), "end before start", rec, raw)
    sc.flag(
        ((e - s) > pd.Timedelta(hours=max_hours)).fillna(False).to_numpy(),
        f"implausible duration (over {max_hours:g} h)",
        rec,
        raw,
    )
    return sc.emit(sink, file, field)


#: Text a CGM writes instead of a number when glucose is beyond its range. Such a record
#: says "below/above what the sensor can measure", not a value: it is rejected with reason
#: ``sensor error code`` rather than replaced by an invented number.
TEXT_CODES = {"low": "LOW", "lo": "LOW", "high": "HIGH", "hi": "HIGH"}


def text_codes(raw: Any) -> pd.Series:
    """Per record: 'LOW'/'HIGH' where the raw glucose is such a text flag, else NA."""
    s = pd.Series(raw).reset_index(drop=True)
    txt = s.where(s.map(lambda v: isinstance(v, str))).astype("string").str.strip().str.lower()
    return txt.map(TEXT_CODES).astype("string")


def numbers(raw: Any) -> np.ndarray:
    """Float values of a raw column (text with a decimal comma accepted); NaN otherwise."""
    s = pd.Series(raw).reset_index(drop=True)
    if s.dtype == object or isinstance(s.dtype, pd.StringDtype):
        s = s.astype("string").str.strip().str.replace(",", ".", regex=False)
    return pd.to_numeric(s, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)


def present(raw: Any) -> np.ndarray:
    """Cells that hold something (not NaN/None/blank)."""
    s = pd.Series(raw).reset_index(drop=True)
    # Python's own notion of whitespace (str.strip), the same for every string backend
    blank = np.fromiter((isinstance(v, str) and not v.strip() for v in s), bool, len(s))
    return ~(s.isna().to_numpy() | blank)


# --------------------------------------------------------------------------- the end


def finish(events: Events, report: DataReport, meta: DatasetMeta) -> pd.DataFrame:
    """Grid the events, attach `meta`, and check that every reading is accounted for."""
    frame = to_grid(events, report, meta)
    report.source = report.source or meta.source
    accounted = report.readings_kept + report.readings_rejected
    if accounted != report.readings_in:
        raise RuntimeError(
            f"reader bug: {report.readings_in} readings in, {report.readings_kept} kept + "
            f"{report.readings_rejected} rejected = {accounted}"
        )
    return frame
