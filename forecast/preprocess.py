"""Onto the 5-minute grid: the one place where readings, insulin and carbs become a frame.

Every reader translates its source into the same intermediate representation, `Events`
(six small long tables: CGM readings, insulin doses, basal rates, carbohydrate events,
other measurements, free-text labels), and calls `to_grid`. No reader grids anything itself,
so the rules below hold for every source alike:

* **Slots.** The row labelled ``t`` collects what happened in ``[t - 2.5 min, t + 2.5 min)``:
  a reading goes to the *nearest* slot and is never moved by more than half a slot.
  Instantaneous doses and carbs follow the same rule, so a bolus and a reading taken at the
  same moment share a row. Slot labels are multiples of 5 minutes since the epoch (UTC).
* **Glucose** is never interpolated: a slot without a reading is NaN. Two readings in one
  slot: the one closest to the slot label is kept (ties: the earlier, then the first in input
  order); the other is listed in the `DataReport` as a ``duplicate`` rejection.
* **Insulin and carbs** are summed per slot and conserved: an extended (square) bolus or a
  basal segment is spread over its span in proportion to its overlap with each slot, so the
  frame's total equals the input's total (to float rounding).
* **Basal rates** (U/h) are held from their start until the next scheduled rate of the same
  subject or their `end` (the end of the record they came from), whichever comes first.
  A temporary rate overrides the schedule for its span (0 U/h = suspension); a newer temp
  cancels an older one; a *percent* temp scales the scheduled rate in force.
* **Carbs** of unknown size (a meal known to have happened, e.g. ShanghaiT1DM) make
  ``carbs_g`` NaN in their slot unless the slot also holds meals of known size (the known
  grams are kept, so totals are conserved); ``meal_announced`` marks every slot with a meal.
* Every subject's grid is **contiguous** from its first to its last slot (any event counts).

Units helpers (mg/dL vs mmol/L) live here too, since every reader needs the same rules.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import pandas as pd

from forecast.schema import (
    FLOAT_COLUMNS,
    MGDL_PER_MMOLL,
    OPTIONAL_COLUMNS,
    REQUIRED_COLUMNS,
    SLOT,
    DataReport,
    DatasetMeta,
    SchemaError,
    UnitsError,
    empty_frame,
    set_meta,
    validate_frame,
)

SLOT_NS = int(SLOT.value)
HALF_SLOT_NS = SLOT_NS // 2
NS_PER_HOUR = 3_600_000_000_000
#: No subject's grid may exceed ten years: beyond that a timestamp is wrong, not data.
MAX_GRID_SLOTS = 10 * 366 * 288

# --------------------------------------------------------------------------- the IR

#: Column dtypes of each intermediate table. ``start``/``end`` spans are half-open;
#: ``end == start`` means an instantaneous event.
TABLES: dict[str, dict[str, str]] = {
    # one CGM reading each, already screened (finite, 20-600 mg/dL, valid time)
    "readings": {
        "subject_id": "string",
        "time": "datetime64[ns, UTC]",
        "glucose": "float64",
        "file": "string",
        "record": "string",
    },
    # insulin amounts (U) delivered over [start, end); `column` = frame column they feed
    "doses": {
        "subject_id": "string",
        "start": "datetime64[ns, UTC]",
        "end": "datetime64[ns, UTC]",
        "units": "float64",
        "column": "string",
    },
    # basal rates (U/h): scheduled (temp=False) or temporary; `percent` (change relative to
    # the schedule, -100 = suspension) replaces `rate_u_h` when the source gives a percentage
    "rates": {
        "subject_id": "string",
        "start": "datetime64[ns, UTC]",
        "end": "datetime64[ns, UTC]",
        "rate_u_h": "float64",
        "percent": "float64",
        "temp": "bool",
    },
    # carbohydrate events; grams NaN = a meal of unknown size
    "carbs": {
        "subject_id": "string",
        "time": "datetime64[ns, UTC]",
        "grams": "float64",
        "column": "string",
        "announced": "bool",
    },
    # other measurements and annotations; aggregation per column from COLUMN_RULES
    "values": {
        "subject_id": "string",
        "start": "datetime64[ns, UTC]",
        "end": "datetime64[ns, UTC]",
        "column": "string",
        "value": "float64",
    },
    # free text kept per slot (insulin names, agents); joined with "; "
    "texts": {
        "subject_id": "string",
        "time": "datetime64[ns, UTC]",
        "column": "string",
        "text": "string",
    },
}

#: How optional value columns aggregate within a slot and what an empty slot holds.
#: "mean"/"sum" are measurements (NaN where nothing was measured); "max" marks spans
#: (exercise intensity, sleep quality: 0 outside any span); "count" counts point events.
COLUMN_RULES: dict[str, tuple[str, float]] = {
    "finger_stick": ("mean", np.nan),
    "heart_rate": ("mean", np.nan),
    "steps": ("sum", np.nan),
    "exercise": ("max", 0.0),
    "bg_true": ("mean", np.nan),
    "gsr": ("mean", np.nan),
    "skin_temperature": ("mean", np.nan),
    "air_temperature": ("mean", np.nan),
    "acceleration": ("mean", np.nan),
    "ketones_mmol": ("mean", np.nan),
    "sleep": ("max", 0.0),
    "basis_sleep": ("max", 0.0),
    "work": ("max", 0.0),
    "illness": ("max", 0.0),
    "stressors": ("count", 0.0),
    "hypo_event": ("count", 0.0),
}

#: Order of optional columns in the frame (those a source does not have are absent).
EXTRA_COLUMNS: tuple[str, ...] = (
    *OPTIONAL_COLUMNS,
    "carbs_bwz_g",
    "insulin_iv_u",
    *[c for c in COLUMN_RULES if c not in OPTIONAL_COLUMNS],
    "insulin_sc",
    "insulin_iv",
    "agents",
)


_EMPTY: dict[str, pd.DataFrame] = {}


def table(kind: str, **columns: Any) -> pd.DataFrame:
    """Build one IR table with the canonical dtypes (scalars broadcast to the column length).

    Times may be tz-aware datetimes of any zone (converted to UTC); naive times are refused
    here so a reader cannot forget its time zone.
    """
    spec = TABLES[kind]
    unknown = set(columns) - set(spec)
    if unknown:
        raise TypeError(f"{kind} has no column(s) {sorted(unknown)}; columns: {list(spec)}")
    if not columns:
        if kind not in _EMPTY:
            _EMPTY[kind] = pd.DataFrame({n: pd.Series([], dtype=d) for n, d in spec.items()})
        return _EMPTY[kind].copy(deep=False)
    n = max((len(v) for v in columns.values() if _is_array(v)), default=0)
    if "end" in spec and "end" not in columns:
        columns["end"] = columns.get("start", [])  # instantaneous events
    data = {}
    for name, dtype in spec.items():
        v = columns[name] if name in columns else _default(kind, name)
        if not _is_array(v):
            v = [v] * n
        if dtype.startswith("datetime64"):
            s = pd.Series(pd.to_datetime(pd.Series(v).reset_index(drop=True)))
            if len(s) and s.dt.tz is None:
                raise ValueError(f"{kind}.{name} has naive times; localise them first")
            data[name] = (
                s.dt.tz_convert("UTC").astype(dtype) if len(s) else pd.Series([], dtype=dtype)
            )
        else:
            data[name] = pd.Series(v).reset_index(drop=True).astype(dtype)
    return pd.DataFrame(data)


def _is_array(v: Any) -> bool:
    return isinstance(
        v, (list, tuple, np.ndarray, pd.Series, pd.Index, pd.api.extensions.ExtensionArray)
    )


def _default(kind: str, name: str) -> Any:
    if kind == "rates" and name in ("rate_u_h", "percent"):
        return np.nan
    if kind == "rates" and name == "temp":
        return False
    if kind == "carbs" and name == "column":
        return "carbs_g"
    if kind == "carbs" and name == "announced":
        return True
    if kind == "readings" and name in ("file", "record"):
        return ""
    raise TypeError(f"{kind} needs column {name!r}")


@dataclass
class Events:
    """What a reader found, in source-neutral form; `to_grid` turns it into a frame."""

    readings: pd.DataFrame = field(default_factory=lambda: table("readings"))
    doses: pd.DataFrame = field(default_factory=lambda: table("doses"))
    rates: pd.DataFrame = field(default_factory=lambda: table("rates"))
    carbs: pd.DataFrame = field(default_factory=lambda: table("carbs"))
    values: pd.DataFrame = field(default_factory=lambda: table("values"))
    texts: pd.DataFrame = field(default_factory=lambda: table("texts"))

    def add(self, kind: str, frame: pd.DataFrame) -> None:
        """Append rows (built with `table`) to one of the tables."""
        if len(frame):
            cur = getattr(self, kind)
            setattr(
                self, kind, frame if not len(cur) else pd.concat([cur, frame], ignore_index=True)
            )

    @classmethod
    def concat(cls, parts: Iterable[Events]) -> Events:
        """All parts' tables stacked (one concatenation per table)."""
        parts = list(parts)
        out = cls()
        for f in fields(cls):
            frames = [getattr(p, f.name) for p in parts if len(getattr(p, f.name))]
            if frames:
                setattr(out, f.name, pd.concat(frames, ignore_index=True))
        return out


# --------------------------------------------------------------------------- time helpers


def _ns(s: pd.Series) -> np.ndarray:
    return pd.DatetimeIndex(s).as_unit("ns").asi8


def slot_index(t_ns: np.ndarray) -> np.ndarray:
    """Index of the nearest slot (label = index x 5 min): ``floor((t + 2.5 min) / 5 min)``."""
    return np.floor_divide(np.asarray(t_ns, dtype=np.int64) + HALF_SLOT_NS, SLOT_NS)


def spread(
    start_ns: np.ndarray, end_ns: np.ndarray, amounts: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split amounts delivered over [start, end) into slots, in proportion to the overlap.

    Returns (event index, slot index, amount) triplets; an event with ``end <= start`` is
    instantaneous and goes whole to its nearest slot. Overlaps are computed in integer
    nanoseconds, so the pieces of one event sum to its amount up to float rounding.
    """
    a = np.asarray(start_ns, dtype=np.int64) + HALF_SLOT_NS
    b = np.asarray(end_ns, dtype=np.int64) + HALF_SLOT_NS
    amounts = np.asarray(amounts, dtype=np.float64)
    inst = b <= a
    k0 = np.floor_divide(a, SLOT_NS)
    k1 = np.where(inst, k0, np.floor_divide(b - 1, SLOT_NS))
    n = (k1 - k0 + 1).astype(np.int64)
    total = int(n.sum())
    idx = np.repeat(np.arange(a.size), n)
    first = np.repeat(np.cumsum(n) - n, n)
    k = k0[idx] + (np.arange(total) - first)
    lo = np.maximum(k * SLOT_NS, a[idx])
    hi = np.minimum((k + 1) * SLOT_NS, b[idx])
    width = (b - a)[idx]
    frac = np.where(inst[idx], 1.0, (hi - lo) / np.where(width > 0, width, 1))
    return idx, k, amounts[idx] * frac


def _truncate_at_next(start: np.ndarray, end: np.ndarray) -> np.ndarray:
    """Ends of start-sorted segments, cut at the next segment's start (newest wins)."""
    if start.size == 0:
        return end
    nxt = np.append(start[1:], np.iinfo(np.int64).max)
    return np.maximum(np.minimum(end, nxt), start)


def basal_doses(rates: pd.DataFrame, report: DataReport | None = None) -> pd.DataFrame:
    """Resolve scheduled and temporary basal rates into delivered-insulin segments.

    Per subject: scheduled rates are held until the next scheduled rate or their own end;
    temp rates override the schedule for their span, a newer temp cancelling an older one;
    percent temps scale the scheduled rate in force. Returns a ``doses`` table (column
    ``basal_u``) with one segment per piece of constant rate.
    """
    if not len(rates):
        return table("doses")
    parts = []
    unknown_ns = 0
    for sid, g in rates.groupby("subject_id", sort=True, observed=True):
        sched = g[~g["temp"].to_numpy()]
        temp = g[g["temp"].to_numpy()]
        segs = []
        for part in (sched, temp):
            order = np.argsort(_ns(part["start"]), kind="stable")
            st = _ns(part["start"])[order]
            en = _truncate_at_next(st, _ns(part["end"])[order])
            segs.append(
                (
                    st,
                    en,
                    part["rate_u_h"].to_numpy(dtype=np.float64)[order],
                    part["percent"].to_numpy(dtype=np.float64)[order],
                )
            )
        (s_st, s_en, s_rate, _), (t_st, t_en, t_rate, t_pct) = segs
        bps = np.unique(np.concatenate([s_st, s_en, t_st, t_en]))
        if bps.size < 2:
            continue
        lo, hi = bps[:-1], bps[1:]
        mid = lo + (hi - lo) // 2
        si = np.searchsorted(s_st, mid, side="right") - 1
        s_on = (
            (si >= 0) & (s_en[np.clip(si, 0, None)] > mid)
            if s_st.size
            else np.zeros(mid.size, bool)
        )
        ti = np.searchsorted(t_st, mid, side="right") - 1
        t_on = (
            (ti >= 0) & (t_en[np.clip(ti, 0, None)] > mid)
            if t_st.size
            else np.zeros(mid.size, bool)
        )
        base = np.where(s_on, s_rate[np.clip(si, 0, None)] if s_st.size else np.nan, np.nan)
        if t_st.size:
            tr = t_rate[np.clip(ti, 0, None)]
            tp = t_pct[np.clip(ti, 0, None)]
            temp_rate = np.where(np.isfinite(tr), tr, base * (1.0 + tp / 100.0))
            rate = np.where(t_on, temp_rate, base)
            unknown_ns += int(((hi - lo)[t_on & ~np.isfinite(temp_rate)]).sum())
        else:
            rate = base
        keep = np.isfinite(rate) & (hi > lo)
        units = rate[keep] * (hi - lo)[keep] / NS_PER_HOUR
        parts.append(
            table(
                "doses",
                subject_id=[sid] * int(keep.sum()),
                start=pd.to_datetime(lo[keep], utc=True),
                end=pd.to_datetime(hi[keep], utc=True),
                units=units,
                column="basal_u",
            )
        )
    if unknown_ns and report is not None:
        report.notes.append(
            f"{unknown_ns / 6e10:.0f} min of percent temp basal fell where no scheduled rate "
            "was known and were not counted; give the scheduled basal (profile or --basal)"
        )
    return pd.concat(parts, ignore_index=True) if parts else table("doses")


# --------------------------------------------------------------------------- the grid


def to_grid(events: Events, report: DataReport, meta: DatasetMeta | None = None) -> pd.DataFrame:
    """Put `events` on the 5-minute grid; return a validated canonical frame.

    Duplicate readings are added to `report` (reason ``duplicate``, field ``glucose``) and
    ``report.readings_kept`` is set to the CGM values in the frame. `meta` is attached.
    """
    meta = meta or DatasetMeta()
    doses = events.doses
    if len(events.rates):
        doses = pd.concat([doses, basal_doses(events.rates, report)], ignore_index=True)

    subjects = sorted(
        set(events.readings["subject_id"].dropna())
        | set(doses["subject_id"].dropna())
        | set(events.carbs["subject_id"].dropna())
        | set(events.values["subject_id"].dropna())
        | set(events.texts["subject_id"].dropna())
    )
    if not subjects:
        report.readings_kept = 0
        return set_meta(empty_frame(), meta)
    subject_arr = np.array(subjects, dtype=object)

    def codes(df: pd.DataFrame) -> np.ndarray:
        ids = df["subject_id"].to_numpy(dtype=object)
        return (
            np.searchsorted(subject_arr, ids).astype(np.int64)
            if ids.size
            else np.zeros(0, np.int64)
        )

    # ---- slot indices of everything
    r_sid = codes(events.readings)
    r_t = _ns(events.readings["time"])
    r_k = slot_index(r_t)

    d_idx, d_k, d_amt = spread(_ns(doses["start"]), _ns(doses["end"]), doses["units"].to_numpy())
    d_sid = codes(doses)[d_idx]
    d_col = doses["column"].to_numpy(dtype=object)[d_idx]

    c_sid = codes(events.carbs)
    c_k = slot_index(_ns(events.carbs["time"]))

    v = events.values
    v_idx, v_k, v_val = spread(_ns(v["start"]), _ns(v["end"]), v["value"].to_numpy())
    # spread() splits amounts; for values the *value* holds over the whole span, so undo
    # the proportional split and keep the original value on every covered slot
    v_val = v["value"].to_numpy(dtype=np.float64)[v_idx] if len(v) else v_val
    v_sid = codes(v)[v_idx]
    v_col = v["column"].to_numpy(dtype=object)[v_idx]

    x_sid = codes(events.texts)
    x_k = slot_index(_ns(events.texts["time"]))

    all_sid = np.concatenate([r_sid, d_sid, c_sid, v_sid, x_sid])
    all_k = np.concatenate([r_k, d_k, c_k, v_k, x_k])
    n_sub = len(subjects)
    kmin = np.full(n_sub, np.iinfo(np.int64).max)
    kmax = np.full(n_sub, np.iinfo(np.int64).min)
    np.minimum.at(kmin, all_sid, all_k)
    np.maximum.at(kmax, all_sid, all_k)
    present = kmax >= kmin
    lengths = np.where(present, kmax - kmin + 1, 0)
    too_long = np.flatnonzero(lengths > MAX_GRID_SLOTS)
    if too_long.size:
        i = int(too_long[0])
        raise SchemaError(
            f"subject {subjects[i]!r} would span {float(lengths[i]) * SLOT_NS / 8.64e13:.0f} days "
            f"({pd.Timestamp(kmin[i] * SLOT_NS, tz='UTC')} to "
            f"{pd.Timestamp(kmax[i] * SLOT_NS, tz='UTC')}); a reader let an implausible "
            "timestamp through"
        )
    offset = np.cumsum(lengths) - lengths
    n_rows = int(lengths.sum())

    def pos(sid: np.ndarray, k: np.ndarray) -> np.ndarray:
        return offset[sid] + (k - kmin[sid])

    out: dict[str, Any] = {}
    out["subject_id"] = np.repeat(np.array(subjects, dtype=object), lengths)
    slot_k = np.concatenate([np.arange(kmin[i], kmax[i] + 1) for i in range(n_sub) if present[i]])
    out["time"] = pd.to_datetime(slot_k * SLOT_NS, utc=True)

    # ---- glucose: nearest reading per slot, duplicates reported
    glucose = np.full(n_rows, np.nan)
    if r_t.size:
        off = np.abs(r_t - r_k * SLOT_NS)
        order = np.lexsort((np.arange(r_t.size), r_t, off, r_k, r_sid))
        key_s, key_k = r_sid[order], r_k[order]
        first = np.ones(order.size, dtype=bool)
        first[1:] = (key_s[1:] != key_s[:-1]) | (key_k[1:] != key_k[:-1])
        kept = order[first]
        g = events.readings["glucose"].to_numpy(dtype=np.float64)
        glucose[pos(r_sid[kept], r_k[kept])] = g[kept]
        dup = np.sort(order[~first])
        if dup.size:
            files = events.readings["file"].to_numpy(dtype=object)
            recs = events.readings["record"].to_numpy(dtype=object)
            for i in dup:
                report.reject(
                    file=files[i],
                    record=recs[i],
                    field="glucose",
                    value=float(g[i]),
                    reason="duplicate",
                )
    out["glucose"] = glucose
    report.readings_kept = int(np.isfinite(glucose).sum())

    # ---- insulin: every dose column summed per slot
    d_pos = pos(d_sid, d_k) if d_k.size else d_k
    dose_cols = ["basal_u", "bolus_u", *sorted(set(d_col) - {"basal_u", "bolus_u"})]
    for col in dose_cols:
        m = d_col == col
        out[col] = np.bincount(d_pos[m], weights=d_amt[m], minlength=n_rows).astype(np.float64)

    # ---- carbs: known grams summed; a slot with only unknown-size meals is NaN
    cb = events.carbs
    grams = cb["grams"].to_numpy(dtype=np.float64)
    c_col = cb["column"].to_numpy(dtype=object)
    c_pos = pos(c_sid, c_k) if c_k.size else c_k
    for col in ["carbs_g", *sorted(set(c_col) - {"carbs_g"})]:
        m = c_col == col
        known = m & np.isfinite(grams)
        total = np.bincount(c_pos[known], weights=grams[known], minlength=n_rows)
        n_known = np.bincount(c_pos[known], minlength=n_rows)
        n_unknown = np.bincount(c_pos[m & ~np.isfinite(grams)], minlength=n_rows)
        out[col] = np.where((n_known == 0) & (n_unknown > 0), np.nan, total)
    announced = cb["announced"].to_numpy(dtype=bool)
    if announced.any():
        out["meal_announced"] = (np.bincount(c_pos[announced], minlength=n_rows) > 0).astype(
            np.float64
        )

    # ---- other measurements
    v_pos = pos(v_sid, v_k) if v_k.size else v_k
    for col in sorted(set(v_col)):
        m = v_col == col
        how, fill = COLUMN_RULES.get(col, ("mean", np.nan))
        cnt = np.bincount(v_pos[m], minlength=n_rows)
        if how == "max":
            res = np.full(n_rows, -np.inf)
            np.maximum.at(res, v_pos[m], v_val[m])
        elif how == "count":
            res = cnt.astype(np.float64)
        else:
            res = np.bincount(v_pos[m], weights=v_val[m], minlength=n_rows)
            if how == "mean":
                res = res / np.where(cnt > 0, cnt, 1)
        out[col] = np.where(cnt > 0, res, fill)

    # ---- free text
    tx = events.texts
    text_cols: list[str] = []
    if len(tx):
        x_pos = pos(x_sid, x_k)
        for col in sorted(set(tx["column"])):
            m = (tx["column"] == col).to_numpy()
            joined = (
                pd.Series(tx["text"].to_numpy(dtype=object)[m])
                .groupby(x_pos[m], sort=True)
                .agg(lambda s: "; ".join(dict.fromkeys(s)))
            )
            col_arr = pd.Series(pd.NA, index=range(n_rows), dtype="string")
            col_arr.iloc[joined.index.to_numpy()] = joined.to_numpy()
            out[col] = col_arr.to_numpy()
            text_cols.append(col)

    frame = pd.DataFrame(out)
    for c in FLOAT_COLUMNS:
        if c not in frame:
            frame[c] = 0.0
    extras = [c for c in EXTRA_COLUMNS if c in frame.columns]
    extras += sorted(set(frame.columns) - set(REQUIRED_COLUMNS) - set(extras))
    frame = frame[[*REQUIRED_COLUMNS, *extras]]
    for c in text_cols:
        if c in frame:
            frame[c] = frame[c].astype("string")
    set_meta(frame, meta)
    return validate_frame(frame)


# --------------------------------------------------------------------------- units

MGDL = "mg/dL"
MMOLL = "mmol/L"
#: Highest plausible glucose in mmol/L (600 mg/dL); anything above can only be mg/dL.
MMOLL_MAX = 600.0 / MGDL_PER_MMOLL


def parse_units(text: str | None) -> str | None:
    """'mg/dL', 'mmol/L' or None from free text such as a header or a CLI flag."""
    if text is None:
        return None
    t = str(text).lower().replace(" ", "")
    if "mmol" in t:
        return MMOLL
    if "mg/dl" in t or "mg" == t or "mgdl" in t:
        return MGDL
    return None


def to_mgdl(values: np.ndarray | pd.Series, units: str) -> np.ndarray:
    """Glucose values in `units` as mg/dL."""
    v = np.asarray(values, dtype=np.float64)
    if units == MMOLL:
        return v * MGDL_PER_MMOLL
    if units == MGDL:
        return v
    raise UnitsError(
        f"unknown glucose units {units!r}", field="units", value=units, hint="use mg/dL or mmol/L"
    )


def detect_units(
    values: np.ndarray | pd.Series,
    declared: str | None = None,
    *,
    file: str | None = None,
    field: str = "glucose",
) -> str:
    """Decide the units of a glucose column, or refuse.

    Readings in mmol/L never exceed 33.3 and in mg/dL are never below 20, so the data decide
    when most values sit on one side: more than half above 33.3 means mg/dL, more than half
    below 20 means mmol/L. When the values fit both (everything between 20 and 33.3) or
    neither, no guess is made: `UnitsError` asks for ``--units``. A declared unit (header or
    flag) is checked against the same evidence and refused when the data contradict it.
    """
    v = np.asarray(pd.to_numeric(pd.Series(values), errors="coerce"), dtype=np.float64)
    v = v[np.isfinite(v)]
    hi = float((v > MMOLL_MAX).mean()) if v.size else 0.0
    lo = float((v < 20.0).mean()) if v.size else 0.0
    evidence = MGDL if hi > 0.5 else MMOLL if lo > 0.5 else None
    if declared is not None:
        if evidence is not None and evidence != declared:
            example = v[v > MMOLL_MAX][0] if evidence == MGDL else v[v < 20.0][0]
            raise UnitsError(
                f"glucose values look like {evidence} but the source says {declared}",
                file=file,
                field=field,
                value=float(example),
                hint=f"check the export or pass --units {evidence}",
            )
        return declared
    if evidence is None:
        raise UnitsError(
            "cannot tell whether glucose is mg/dL or mmol/L from the values",
            file=file,
            field=field,
            value=float(np.median(v)) if v.size else None,
            hint="pass --units mg/dL or --units mmol/L",
        )
    return evidence
