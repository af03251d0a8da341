"""The canonical glucose frame: columns, units, validation, errors, Parquet round trip.

One row per subject per 5-minute slot (long format). Glucose is mg/dL and NaN where no
reading landed in the slot — never invented. Insulin is units delivered in the slot, carbs
grams eaten in the slot. Times are UTC; the local time zone travels in the metadata so
time-of-day features can be computed in the subject's own clock.

Everything that touches a frame goes through `validate_frame`, and every reader reports the
records it could not use in a `DataReport` instead of dropping them.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

SLOT_MINUTES = 5
SLOT = pd.Timedelta(minutes=SLOT_MINUTES)

REQUIRED_COLUMNS: tuple[str, ...] = (
    "subject_id",
    "time",
    "glucose",
    "basal_u",
    "bolus_u",
    "carbs_g",
)
OPTIONAL_COLUMNS: tuple[str, ...] = (
    "finger_stick",
    "heart_rate",
    "steps",
    "exercise",
    "bg_true",
    "meal_announced",
    "carb_ratio_g_per_u",
    "isf_mgdl_per_u",
    # insulin the pump gave on its own (automated insulin delivery's correction boluses),
    # U per slot; already counted in `bolus_u` (which stays the total), so the person's own
    # boluses are `bolus_u - bolus_auto_u`
    "bolus_auto_u",
    # 1 where the source states the basal rate in force, 0 where it does not (there
    # `basal_u` is 0 because the rate is unknown, not because none was delivered)
    "basal_known",
    # the pump's mode in the slot as text ("sleep", "exercise"; NA = normal)
    "device_mode",
)
FLOAT_COLUMNS: tuple[str, ...] = ("glucose", "basal_u", "bolus_u", "carbs_g")

# The therapy profile in effect at each slot — the settings programmed in the pump, which a
# forecaster may take as static inputs (they say how this person responds to carbs and
# insulin). Optional; where a frame has one of these columns every row must hold a value in
# its plausible range (a profile known for part of a record is no profile: drop the column).
PROFILE_RANGES: dict[str, tuple[float, float]] = {
    "carb_ratio_g_per_u": (1.0, 150.0),  # grams of carbohydrate one unit covers
    "isf_mgdl_per_u": (5.0, 600.0),  # insulin sensitivity: mg/dL one unit lowers glucose
}
PROFILE_COLUMNS: tuple[str, ...] = tuple(PROFILE_RANGES)

# Physiological plausibility of a CGM value; outside this a reading is a sensor artefact.
GLUCOSE_MIN_MGDL = 20.0
GLUCOSE_MAX_MGDL = 600.0
MGDL_PER_MMOLL = 18.0182  # glucose molar mass 180.16 g/mol / 10

METADATA_KEY = b"glucast"


# --------------------------------------------------------------------------- errors


class GlucastError(Exception):
    """Base of every error glucast raises on purpose."""


class SchemaError(GlucastError, ValueError):
    """A frame does not have the canonical columns, dtypes or units."""


class InputError(GlucastError, ValueError):
    """One bad input record, named precisely enough to find and fix it.

    Carries the file, the record (line, element index, row...), the field and the value, so
    the message tells the user where to look and what was wrong.
    """

    def __init__(
        self,
        reason: str,
        *,
        file: str | Path | None = None,
        record: Any = None,
        field: str | None = None,
        value: Any = None,
        hint: str | None = None,
    ) -> None:
        self.reason = reason
        self.file = None if file is None else str(file)
        self.record = record
        self.field = field
        self.value = value
        self.hint = hint
        super().__init__(self._message())

    def _message(self) -> str:
        where = []
        if self.file is not None:
            where.append(f"file {self.file}")
        if self.record is not None:
            where.append(f"record {self.record}")
        if self.field is not None:
            where.append(f"field {self.field!r}")
        if self.value is not None:
            where.append(f"value {self.value!r}")
        msg = self.reason + (f" ({', '.join(where)})" if where else "")
        if self.hint:
            msg += f". {self.hint}"
        return msg

    def as_rejection(self) -> Rejection:
        return Rejection(
            file=self.file or "",
            record=str(self.record) if self.record is not None else "",
            field=self.field or "",
            value=_jsonable(self.value),
            reason=self.reason,
        )


class UnitsError(InputError):
    """Glucose units are wrong or cannot be decided from the data."""


class EmptyInputError(InputError):
    """A file holds no records at all."""


# --------------------------------------------------------------------------- report


def _jsonable(v: Any) -> Any:
    if v is None or isinstance(v, (bool, int, float, str)):
        if isinstance(v, float) and not np.isfinite(v):
            return str(v)
        return v
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (np.floating,)):
        return _jsonable(float(v))
    return str(v)


@dataclass(frozen=True)
class Rejection:
    """An input record that did not make it into the frame, and why."""

    file: str
    record: str
    field: str
    value: Any
    reason: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class DataReport:
    """What happened to every input record of an ingest.

    Invariant the readers keep: ``readings_in == readings_kept + readings_rejected +
    readings_merged`` (merged = duplicates that landed in an occupied slot and were resolved
    deterministically; each one is also listed in `rejected` with reason ``duplicate``).
    """

    source: str = ""
    files: list[str] = field(default_factory=list)
    readings_in: int = 0
    readings_kept: int = 0
    rejected: list[Rejection] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    counts: Counter = field(default_factory=Counter)

    def reject(self, *, file: str | Path, record: Any, field: str, value: Any, reason: str) -> None:
        self.rejected.append(Rejection(str(file), str(record), field, _jsonable(value), reason))
        self.counts[f"rejected:{reason}"] += 1

    def reject_error(self, err: InputError) -> None:
        r = err.as_rejection()
        self.rejected.append(r)
        self.counts[f"rejected:{r.reason}"] += 1

    @property
    def readings_rejected(self) -> int:
        return sum(1 for r in self.rejected if r.field == "glucose")

    def merge(self, other: DataReport) -> DataReport:
        self.files.extend(other.files)
        self.readings_in += other.readings_in
        self.readings_kept += other.readings_kept
        self.rejected.extend(other.rejected)
        self.notes.extend(other.notes)
        self.counts.update(other.counts)
        if not self.source:
            self.source = other.source
        return self

    def as_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "files": list(self.files),
            "readings_in": self.readings_in,
            "readings_kept": self.readings_kept,
            "readings_rejected": self.readings_rejected,
            "rejected": [r.as_dict() for r in self.rejected],
            "notes": list(self.notes),
            "counts": dict(self.counts),
        }


# --------------------------------------------------------------------------- metadata


@dataclass
class DatasetMeta:
    """Dataset-level facts that travel with a frame (in ``frame.attrs`` and in Parquet)."""

    source: str = "unknown"
    device: str = ""
    sampling_minutes: float = SLOT_MINUTES
    timezone: str = "UTC"
    units_seen: list[str] = field(default_factory=lambda: ["mg/dL"])
    licence: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DatasetMeta:
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        return cls(**known)


def get_meta(frame: pd.DataFrame) -> DatasetMeta:
    m = frame.attrs.get("glucast")
    if isinstance(m, DatasetMeta):
        return m
    if isinstance(m, dict):
        return DatasetMeta.from_dict(m)
    return DatasetMeta()


def set_meta(frame: pd.DataFrame, meta: DatasetMeta) -> pd.DataFrame:
    # Stored as a plain dict: pandas deep-copies attrs on many operations.
    frame.attrs["glucast"] = meta.as_dict()
    return frame


# --------------------------------------------------------------------------- frame


def empty_frame() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "subject_id": pd.Series([], dtype="string"),
            "time": pd.Series([], dtype="datetime64[ns, UTC]"),
            **{c: pd.Series([], dtype="float64") for c in FLOAT_COLUMNS},
        }
    )


def coerce_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """Cast the canonical columns to their dtypes (string ids, UTC ns times, float64)."""
    out = frame.copy()
    out["subject_id"] = out["subject_id"].astype("string")
    t = pd.to_datetime(out["time"])
    if t.dt.tz is None:
        raise SchemaError(
            "column 'time' has naive timestamps; the canonical frame stores UTC. "
            "Localise them first (tz_localize with the source's time zone) and convert to UTC"
        )
    out["time"] = t.dt.tz_convert("UTC").astype("datetime64[ns, UTC]")
    for c in FLOAT_COLUMNS:
        out[c] = pd.to_numeric(out[c], errors="raise").astype("float64")
    out.attrs = dict(frame.attrs)
    return out


def validate_frame(frame: pd.DataFrame, *, require_grid: bool = True) -> pd.DataFrame:
    """Check a frame against the canonical schema; return it (coerced) or raise SchemaError.

    Checks: required columns, dtypes castable, UTC times, slot alignment, one row per
    (subject, slot), sorted, glucose within 20–600 mg/dL or NaN, insulin and carbs
    non-negative (NaN carbs allowed: a meal whose size is unknown), therapy-profile columns
    (`PROFILE_RANGES`) complete and in range where present.
    """
    if not isinstance(frame, pd.DataFrame):
        raise SchemaError(f"expected a pandas DataFrame, got {type(frame).__name__}")
    missing = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
    if missing:
        raise SchemaError(
            f"frame is missing required column(s) {missing}; the canonical frame has "
            f"{list(REQUIRED_COLUMNS)} (see forecast.schema)"
        )
    try:
        out = coerce_frame(frame)
    except (TypeError, ValueError) as e:
        if isinstance(e, SchemaError):
            raise
        raise SchemaError(f"frame columns cannot be cast to the canonical dtypes: {e}") from e
    if out["subject_id"].isna().any():
        raise SchemaError("column 'subject_id' has missing values")
    if out["time"].isna().any():
        raise SchemaError("column 'time' has missing values")
    g = out["glucose"].to_numpy()
    bad = np.isfinite(g) & ((g < GLUCOSE_MIN_MGDL) | (g > GLUCOSE_MAX_MGDL))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise SchemaError(
            f"glucose {g[i]!r} at row {i} is outside {GLUCOSE_MIN_MGDL:g}–{GLUCOSE_MAX_MGDL:g} "
            "mg/dL; if the data are in mmol/L convert them (x 18.0182) before building a frame"
        )
    if np.isinf(g).any():
        raise SchemaError("column 'glucose' has infinite values")
    for c in ("basal_u", "bolus_u"):
        v = out[c].to_numpy()
        if np.isnan(v).any():
            raise SchemaError(f"column {c!r} has NaN; write 0 where no insulin was delivered")
        if (v < 0).any():
            i = int(np.flatnonzero(v < 0)[0])
            raise SchemaError(f"column {c!r} has negative value {v[i]!r} at row {i}")
    cg = out["carbs_g"].to_numpy()
    if (cg[np.isfinite(cg)] < 0).any():
        raise SchemaError("column 'carbs_g' has negative values")
    _check_profile(out)
    if require_grid and len(out):
        t_ns = _utc_ns(out["time"])
        if (t_ns % SLOT.value != 0).any():
            i = int(np.flatnonzero(t_ns % SLOT.value != 0)[0])
            raise SchemaError(
                f"time {out['time'].iloc[i]} at row {i} is not on the 5-minute grid; "
                "use forecast.preprocess.to_grid"
            )
        key = out[["subject_id", "time"]]
        if key.duplicated().any():
            i = int(np.flatnonzero(key.duplicated().to_numpy())[0])
            raise SchemaError(
                f"duplicate slot for subject {out['subject_id'].iloc[i]!r} at "
                f"{out['time'].iloc[i]}; one row per subject per slot"
            )
        sid = out["subject_id"].to_numpy()
        same = sid[1:] == sid[:-1]
        if (np.diff(t_ns)[same] <= 0).any():
            raise SchemaError("frame is not sorted by (subject_id, time)")
    return out


def _check_profile(frame: pd.DataFrame) -> None:
    """Therapy-profile columns, where present: numeric, on every row, within range."""
    for c, (lo, hi) in PROFILE_RANGES.items():
        if c not in frame.columns:
            continue
        v = pd.to_numeric(frame[c], errors="coerce").to_numpy(dtype="float64")
        bad = ~np.isfinite(v) | (v < lo) | (v > hi)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise SchemaError(
                f"column {c!r} holds {frame[c].iloc[i]!r} at row {i} (subject "
                f"{frame['subject_id'].iloc[i]!r}, {frame['time'].iloc[i]}); a therapy-profile "
                f"value must be a number in {lo:g}–{hi:g} on every row — drop the column if the "
                "profile is not known for the whole record"
            )


def _utc_ns(times: pd.Series) -> np.ndarray:
    """UTC nanoseconds since the epoch as int64 (no time zone warnings, no copies of tz)."""
    t = pd.to_datetime(times, utc=True)
    return t.dt.tz_convert(None).to_numpy(dtype="datetime64[ns]").astype(np.int64)


def sort_frame(frame: pd.DataFrame) -> pd.DataFrame:
    out = frame.sort_values(["subject_id", "time"], kind="stable").reset_index(drop=True)
    out.attrs = dict(frame.attrs)
    return out


# --------------------------------------------------------------------------- hashing & parquet


def dataset_hash(frame: pd.DataFrame) -> str:
    """A stable sha256 of the canonical content (ids, times, glucose, insulin, carbs).

    Two frames with the same hash hold the same test windows; comparisons between models are
    only made on equal hashes. Optional columns and metadata do not enter the hash.
    """
    h = hashlib.sha256()
    f = frame.sort_values(["subject_id", "time"], kind="stable")
    h.update("\x1f".join(f["subject_id"].astype(str)).encode())
    t = _utc_ns(f["time"])
    h.update(t.tobytes())
    for c in FLOAT_COLUMNS:
        v = f[c].to_numpy(dtype="float64")
        h.update(np.round(v, 6).tobytes())
    return h.hexdigest()


def write_parquet(frame: pd.DataFrame, path: str | Path) -> Path:
    """Write a validated frame with its DatasetMeta in the Parquet schema metadata."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    f = validate_frame(frame)
    table = pa.Table.from_pandas(f, preserve_index=False)
    md = dict(table.schema.metadata or {})
    md[METADATA_KEY] = json.dumps(get_meta(frame).as_dict()).encode()
    table = table.replace_schema_metadata(md)
    pq.write_table(table, path)
    return path


def read_parquet(path: str | Path) -> pd.DataFrame:
    """Read a frame written by `write_parquet`, restoring its DatasetMeta; validate it."""
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such frame file: {path}")
    table = pq.read_table(path)
    frame = table.to_pandas()
    frame.attrs = {}
    md = table.schema.metadata or {}
    if METADATA_KEY in md:
        set_meta(frame, DatasetMeta.from_dict(json.loads(md[METADATA_KEY].decode())))
    try:
        out = validate_frame(frame)
    except SchemaError as e:
        raise SchemaError(f"{path}: {e}") from e
    return out
