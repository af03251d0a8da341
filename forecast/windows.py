"""Past/future windows from a canonical frame: THE one builder training, evaluation and serving share.

A window at origin slot ``t0`` (a subject's slot with a real CGM reading) holds

- ``past``   ``[L, F_past]``: slots ``t0-L+1 … t0`` — glucose (carried forward where no reading,
  so the network never sees NaN), the observed-reading mask, insulin, carbs, IOB, COB and the
  local time of day;
- ``future`` ``[H, F_future]``: slots ``t0+1 … t0+H`` — the *known* future inputs: planned
  insulin (what the frame says was delivered; at serving time what the controller plans),
  announced carbs and the time of day;
- ``target`` ``[H]``: the real CGM readings at ``t0+1 … t0+H`` (5 … H×5 minutes ahead), NaN
  where none landed. Targets are never carried forward or interpolated.

Which windows exist (`make_windows`), decided once and documented here:

1. every slot of the window's span ``t0-L+1 … t0+H`` is a row of the frame (a missing row means
   insulin and carbs are unknown there; a split frame ends where its split ends, so no window
   spans two splits);
2. the origin slot ``t0`` has a real reading (forecasts are issued at readings, as in the
   OhioT1DM BGLP challenge; the horizon is measured from a real value, not a carried one);
3. no run of missing readings inside the past is longer than ``max_past_gap_slots`` — a run
   that began before the window counts in full, because what matters is how stale the
   carried-forward value is — and the past starts after the subject's first reading;
4. at least one real target.

Features computed from the history (IOB, COB, and ``tdd_u``, the total daily dose over the
trailing 24 h) are exact for any history length: they run over the whole frame
(`forecast.insulin`). If the frame already has ``iob_u``, ``cob_g`` and ``tdd_u`` columns (from
`add_features`, e.g. computed on the full record before `split_chronological` cut it), those
are used, so the first hours of a test split still see the insulin given at the end of the
training split. Otherwise they are computed from the rows given, with the curves named in the
`WindowConfig` (a record younger than a day gives the daily dose seen so far).

Static exogenous inputs: the therapy profile (``carb_ratio_g_per_u``, ``isf_mgdl_per_u``,
`PROFILE_FEATURES`), the pump settings that say how this person responds to carbohydrate and
insulin. They are not part of the default feature list: a `WindowConfig` appends them when
the training frame carries them (`training.config.DataConfig.profile`), and they are then read
from the frame's columns, constant across a window unless the settings changed. At run time
the loop fills them per slot from its backend (a replay follows the recorded schedule) and
the trials from `serving.types.PatientSettings`. A population model
that knows the profile forecasts better than one that must guess the person from two hours
of history (demo cohort, LSTM RMSE at 30/60 min: see the README).

Carbohydrate inputs: a meal of unknown size (``carbs_g`` NaN) enters every model input — the
``carbs_g`` features and COB — as 0 g; the observed-reading mask and the glucose response still
tell a model that something happened. Where the frame has a ``meal_announced`` column, only
announced meals enter the inputs (past, future and COB), because that is all a controller
knows at run time; an unannounced meal is a disturbance to forecast, not an input.

Time of day is computed from the slot's UTC time in the subject's local clock
(`DatasetMeta.timezone`, or ``DatasetMeta.extra["subject_timezones"][subject]``), looked up in a
table so that training and serving produce bit-identical values.

`inputs_at` (serving) calls exactly the same code: a window at an origin of the latest frame,
with future inputs from frame rows after the origin where they exist and zeros beyond (the
controller then writes its plan into ``future[..., config.future_index("basal_u")]`` and
``"bolus_u"``). On the same frame, `inputs_at` equals the `make_windows` row bit for bit.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np
import pandas as pd
from numpy.lib.stride_tricks import as_strided, sliding_window_view

from forecast.insulin import CarbCurve, InsulinCurve, carbs_on_board, insulin_on_board
from forecast.schema import (
    PROFILE_COLUMNS,
    SLOT,
    SLOT_MINUTES,
    SchemaError,
    get_meta,
    sort_frame,
    validate_frame,
)

__all__ = [
    "FUTURE_FEATURES",
    "IncrementalWindows",
    "PAST_FEATURES",
    "PROFILE_FEATURES",
    "WindowConfig",
    "Windows",
    "add_features",
    "history_slots",
    "inputs_at",
    "make_windows",
    "split_chronological",
    "split_subjects",
    "windows_from_slots",
]

PAST_FEATURES: tuple[str, ...] = (
    "glucose",
    "observed",
    "basal_u",
    "bolus_u",
    "carbs_g",
    "iob_u",
    "cob_g",
    "tod_sin",
    "tod_cos",
    "tdd_u",
)
FUTURE_FEATURES: tuple[str, ...] = ("basal_u", "bolus_u", "carbs_g", "tod_sin", "tod_cos")
PROFILE_FEATURES: tuple[str, ...] = PROFILE_COLUMNS  # static: the pump's therapy profile

# Features the builder knows how to compute; a past feature may also be any other numeric
# column of the frame (heart_rate, steps...), NaN → 0.
_ENGINEERED_PAST = frozenset(PAST_FEATURES)
_ALLOWED_FUTURE = frozenset(FUTURE_FEATURES)
FEATURE_COLUMNS: tuple[str, ...] = ("observed", "iob_u", "cob_g", "tod_sin", "tod_cos", "tdd_u")
# Features that depend on history before the window: computed on the whole record (by
# `add_features`, before a split cuts it) and taken from the frame when it has them.
_HISTORY_FEATURES: tuple[str, ...] = ("iob_u", "cob_g", "tdd_u")

DEFAULT_INSULIN_CURVE = InsulinCurve()  # immutable (frozen dataclasses), safe as defaults
DEFAULT_CARB_CURVE = CarbCurve()

_SLOT_NS = SLOT.value
_SECONDS_PER_DAY = 86_400


# --------------------------------------------------------------------------- config


@dataclass(frozen=True)
class WindowConfig:
    """Window geometry and feature order; travels in the model manifest (`to_dict`).

    The insulin and carb curve parameters are part of it so that serving computes IOB/COB with
    the curves the model was trained with.
    """

    past_slots: int = 24  # L (2 h)
    horizon_slots: int = 12  # H (60 min), up to 24
    slot_minutes: int = SLOT_MINUTES
    past_features: tuple[str, ...] = PAST_FEATURES
    future_features: tuple[str, ...] = FUTURE_FEATURES
    max_past_gap_slots: int = 6  # longer CGM gaps inside the past → window skipped
    insulin_peak_min: float = 75.0
    insulin_dia_min: float = 360.0
    carb_absorption_min: float = 180.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "past_features", tuple(self.past_features))
        object.__setattr__(self, "future_features", tuple(self.future_features))
        for name in ("past_slots", "horizon_slots", "slot_minutes", "max_past_gap_slots"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                raise SchemaError(f"WindowConfig.{name} must be an integer, got {v!r}")
            object.__setattr__(self, name, int(v))
        if self.past_slots < 1:
            raise SchemaError(f"WindowConfig.past_slots must be >= 1, got {self.past_slots}")
        if self.horizon_slots < 1:
            raise SchemaError(f"WindowConfig.horizon_slots must be >= 1, got {self.horizon_slots}")
        if self.slot_minutes != SLOT_MINUTES:
            raise SchemaError(
                f"WindowConfig.slot_minutes must be {SLOT_MINUTES} (the canonical frame's grid), "
                f"got {self.slot_minutes}"
            )
        if self.max_past_gap_slots < 0:
            raise SchemaError("WindowConfig.max_past_gap_slots must be >= 0")
        if "glucose" not in self.past_features:
            raise SchemaError("WindowConfig.past_features must include 'glucose'")
        for feats, what in ((self.past_features, "past"), (self.future_features, "future")):
            if len(set(feats)) != len(feats):
                raise SchemaError(f"WindowConfig.{what}_features has duplicates: {feats}")
        bad = [f for f in self.future_features if f not in _ALLOWED_FUTURE]
        if bad:
            raise SchemaError(
                f"unknown future feature(s) {bad}; known future inputs are {sorted(_ALLOWED_FUTURE)}"
            )
        # The curves validate their own parameters (KineticsError, a ValueError).
        InsulinCurve(self.insulin_peak_min, self.insulin_dia_min)
        CarbCurve(self.carb_absorption_min)

    @classmethod
    def from_minutes(
        cls, past_min: float = 120, horizon_min: float = 60, **kwargs: Any
    ) -> WindowConfig:
        """A config from minutes; raises if a duration is not a whole number of slots."""
        out = {}
        for name, v in (("past", past_min), ("horizon", horizon_min)):
            slots = v / SLOT_MINUTES
            if v <= 0 or abs(slots - round(slots)) > 1e-9:
                raise SchemaError(
                    f"{name} of {v} min is not a positive multiple of the {SLOT_MINUTES}-minute slot"
                )
            out[f"{name}_slots"] = int(round(slots))
        return cls(**out, **kwargs)

    @property
    def insulin_curve(self) -> InsulinCurve:
        return InsulinCurve(self.insulin_peak_min, self.insulin_dia_min)

    @property
    def carb_curve(self) -> CarbCurve:
        return CarbCurve(self.carb_absorption_min)

    def past_index(self, name: str) -> int:
        """Position of a past feature on the last axis of `past`."""
        try:
            return self.past_features.index(name)
        except ValueError:
            raise KeyError(
                f"{name!r} is not a past feature; they are {self.past_features}"
            ) from None

    def future_index(self, name: str) -> int:
        """Position of a future feature on the last axis of `future`."""
        try:
            return self.future_features.index(name)
        except ValueError:
            raise KeyError(
                f"{name!r} is not a future feature; they are {self.future_features}"
            ) from None

    @property
    def horizons_min(self) -> list[int]:
        """Minutes ahead of each target column: [5, 10, …, H×5]."""
        return [self.slot_minutes * (h + 1) for h in range(self.horizon_slots)]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["past_features"] = list(self.past_features)
        d["future_features"] = list(self.future_features)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> WindowConfig:
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        unknown = sorted(set(d) - set(cls.__dataclass_fields__))
        if unknown:
            raise SchemaError(f"unknown WindowConfig field(s) {unknown}")
        return cls(**known)


# --------------------------------------------------------------------------- windows


@dataclass
class Windows:
    """A batch of windows (all arrays share the first axis N)."""

    past: np.ndarray  # [N, L, F_past] float32, raw units; glucose carried forward where missing
    future: np.ndarray  # [N, H, F_future] float32, known future inputs
    target: np.ndarray  # [N, H] float32 mg/dL; NaN where no real reading
    subject_id: np.ndarray  # [N] str
    origin: np.ndarray  # [N] datetime64[ns] (UTC): start of the last past slot (t0)
    config: WindowConfig = field(default_factory=WindowConfig)

    def __post_init__(self) -> None:
        n = len(self.past)
        L, H = self.config.past_slots, self.config.horizon_slots
        shapes = {
            "past": (self.past.shape, (n, L, len(self.config.past_features))),
            "future": (self.future.shape, (n, H, len(self.config.future_features))),
            "target": (self.target.shape, (n, H)),
            "subject_id": (self.subject_id.shape, (n,)),
            "origin": (self.origin.shape, (n,)),
        }
        for name, (got, want) in shapes.items():
            if tuple(got) != want:
                raise SchemaError(f"Windows.{name} has shape {tuple(got)}, expected {want}")

    def __len__(self) -> int:
        return len(self.past)

    def subset(self, idx: np.ndarray | slice | Sequence[int]) -> Windows:
        """The windows at `idx` (integer indices, a boolean mask or a slice)."""
        if not isinstance(idx, slice):
            idx = np.asarray(idx)
            if idx.dtype != bool:
                idx = idx.astype(np.intp)
        return Windows(
            past=self.past[idx],
            future=self.future[idx],
            target=self.target[idx],
            subject_id=self.subject_id[idx],
            origin=self.origin[idx],
            config=self.config,
        )

    @staticmethod
    def concat(parts: Sequence[Windows]) -> Windows:
        """Windows of several frames (splits, subjects) in one batch; configs must agree."""
        parts = list(parts)
        if not parts:
            raise SchemaError("Windows.concat needs at least one Windows")
        cfg = parts[0].config
        for p in parts[1:]:
            if p.config != cfg:
                raise SchemaError("Windows.concat: windows were built with different WindowConfigs")
        return Windows(
            past=np.concatenate([p.past for p in parts]),
            future=np.concatenate([p.future for p in parts]),
            target=np.concatenate([p.target for p in parts]),
            subject_id=np.concatenate([p.subject_id.astype(str) for p in parts]),
            origin=np.concatenate([p.origin for p in parts]),
            config=cfg,
        )


# --------------------------------------------------------------------------- helpers


_TOD_TABLE: tuple[np.ndarray, np.ndarray] | None = None


def _tod_table() -> tuple[np.ndarray, np.ndarray]:
    """sin/cos of the time of day for every second of a day (computed once).

    A table lookup gives the same bits for the same second whatever the array it sits in;
    vectorised sin/cos may differ in the last ulp between SIMD and scalar tails.
    """
    global _TOD_TABLE
    if _TOD_TABLE is None:
        ang = 2 * np.pi * np.arange(_SECONDS_PER_DAY, dtype=np.float64) / _SECONDS_PER_DAY
        s, c = np.sin(ang), np.cos(ang)
        s.setflags(write=False)
        c.setflags(write=False)
        _TOD_TABLE = (s, c)
    return _TOD_TABLE


def _local_seconds_of_day(utc_ns: np.ndarray, tz: str) -> np.ndarray:
    """Seconds since local midnight for UTC nanosecond times, in time zone `tz`."""
    if tz in ("UTC", "utc", "Etc/UTC", "Z"):
        wall = utc_ns
    else:
        try:
            idx = pd.DatetimeIndex(utc_ns.astype("datetime64[ns]")).tz_localize("UTC")
            wall = idx.tz_convert(tz).tz_localize(None).as_unit("ns").asi8
        except Exception as e:  # zoneinfo/pytz raise several unrelated types
            raise SchemaError(
                f"time zone {tz!r} in the dataset metadata is not a known IANA zone ({e}); "
                "set DatasetMeta.timezone to e.g. 'Europe/London' or 'UTC'"
            ) from e
    return np.floor_divide(wall, 1_000_000_000) % _SECONDS_PER_DAY


def _utc_ns(times: pd.Series) -> np.ndarray:
    return times.dt.tz_convert(None).to_numpy(dtype="datetime64[ns]").astype(np.int64)


def _prepare(frame: pd.DataFrame) -> pd.DataFrame:
    """Sort and validate at the boundary; keep the metadata."""
    if not isinstance(frame, pd.DataFrame):
        raise SchemaError(f"expected a canonical glucose DataFrame, got {type(frame).__name__}")
    for c in ("subject_id", "time"):
        if c not in frame.columns:
            raise SchemaError(f"frame is missing required column {c!r} (see forecast.schema)")
    return validate_frame(sort_frame(frame))


def _announced_carbs(frame: pd.DataFrame) -> np.ndarray:
    """Carbs as model inputs: NaN (unknown size) → 0; only announced meals where that is known."""
    carbs = np.nan_to_num(frame["carbs_g"].to_numpy(dtype=np.float64), nan=0.0)
    if "meal_announced" in frame.columns:
        ann = frame["meal_announced"].astype("boolean").fillna(False).to_numpy(dtype=bool)
        carbs = np.where(ann, carbs, 0.0)
    return carbs


@dataclass
class _Dense:
    """Every subject's slots laid end to end on one flat grid, with empty slots between.

    Subject s occupies positions ``start[s] … start[s] + span[s] - 1`` (its first to last slot,
    including slots without a row) and is followed by ``pad`` empty slots, which is more than
    any kernel, window or horizon is long: nothing computed on the grid leaks from one subject
    into the next, and the trailing empty slots give `inputs_at` its future times.
    """

    subjects: np.ndarray  # [S] str
    start: np.ndarray  # [S] dense position of the subject's first slot
    span: np.ndarray  # [S] slots from first to last row
    owner: np.ndarray  # [D] subject of each dense position (padding belongs to the one before)
    time_ns: np.ndarray  # [D] UTC ns of each dense slot
    present: np.ndarray  # [D] bool: the frame has a row for the slot
    glucose: np.ndarray  # [D] float64, NaN = no reading
    glucose_ff: np.ndarray  # [D] float64, carried forward within the subject
    run: np.ndarray  # [D] int64, length of the missing-reading run ending here (0 = reading)
    past: np.ndarray  # [D, F_past] float32
    future: np.ndarray  # [D, F_future] float32
    cols: dict[str, np.ndarray]  # engineered features, float64 [D] each


def _build_dense(
    frame: pd.DataFrame,
    config: WindowConfig,
    *,
    insulin: InsulinCurve | None = None,
    carbs: CarbCurve | None = None,
    use_frame_features: bool = True,
) -> _Dense:
    """The dense grid and all per-slot features of a validated, sorted, non-empty frame."""
    if len(frame) == 0:
        raise SchemaError("the frame has no rows")
    insulin = insulin or config.insulin_curve
    carbs = carbs or config.carb_curve
    L, H = config.past_slots, config.horizon_slots
    n = len(frame)
    sid = frame["subject_id"].to_numpy(dtype=object)
    t_ns = _utc_ns(frame["time"])
    first = np.flatnonzero(np.r_[True, sid[1:] != sid[:-1]])  # [S] first row of each subject
    last = np.r_[first[1:] - 1, n - 1]  # [S]
    codes = np.repeat(np.arange(len(first)), np.diff(np.r_[first, n]))  # [n] subject of row
    slot = (t_ns - t_ns[first][codes]) // _SLOT_NS  # [n] slot within subject
    span = (t_ns[last] - t_ns[first]) // _SLOT_NS + 1  # [S]
    k_ins = len(insulin.iob_kernel(config.slot_minutes))
    k_carb = len(carbs.cob_kernel(config.slot_minutes))
    pad = max(k_ins, k_carb, L, H) + 1
    start = pad + np.r_[0, np.cumsum(span + pad)[:-1]].astype(np.int64)  # [S]
    d = int(start[-1] + span[-1] + pad)
    pos = start[codes] + slot  # [n]

    idx = np.arange(d)
    owner = np.maximum(np.searchsorted(start, idx, side="right") - 1, 0)  # [D]
    time_ns = t_ns[first][owner] + (idx - start[owner]) * _SLOT_NS  # [D]

    present = np.zeros(d, bool)
    present[pos] = True
    glucose = np.full(d, np.nan)
    glucose[pos] = frame["glucose"].to_numpy(dtype=np.float64)
    observed = np.isfinite(glucose)
    last_obs = np.maximum.accumulate(np.where(observed, idx, -1))
    own_subject = last_obs >= start[owner]
    glucose_ff = np.where(own_subject, glucose[np.maximum(last_obs, 0)], np.nan)
    big = np.int64(1) << 40  # a leading gap (no reading yet in this subject) is "infinitely" stale
    run = np.where(own_subject, idx - last_obs, big)

    def dense(values: np.ndarray) -> np.ndarray:
        out = np.zeros(d)
        out[pos] = values
        return out

    basal = dense(frame["basal_u"].to_numpy(dtype=np.float64))
    bolus = dense(frame["bolus_u"].to_numpy(dtype=np.float64))
    carb_in = dense(_announced_carbs(frame))

    cols: dict[str, np.ndarray] = {
        "glucose": glucose_ff,
        "observed": observed.astype(np.float64),
        "basal_u": basal,
        "bolus_u": bolus,
        "carbs_g": carb_in,
    }
    for name, compute in (
        ("iob_u", lambda: insulin_on_board(basal + bolus, config.slot_minutes, insulin)),
        ("cob_g", lambda: carbs_on_board(carb_in, config.slot_minutes, carbs)),
        ("tdd_u", lambda: _trailing_daily_dose(basal + bolus, present, start, owner)),
    ):
        if use_frame_features and name in frame.columns:
            v = frame[name].to_numpy(dtype=np.float64)
            if not np.isfinite(v).all():
                raise SchemaError(
                    f"column {name!r} has NaN or infinite values; drop it to let the window "
                    "builder compute it, or recompute it with forecast.windows.add_features"
                )
            cols[name] = dense(v)
        else:
            cols[name] = compute()
    if "tod_sin" in config.past_features + config.future_features or "tod_cos" in (
        config.past_features + config.future_features
    ):
        sec = _seconds_of_day(frame, time_ns, owner, sid[first])
        tab_s, tab_c = _tod_table()
        cols["tod_sin"] = tab_s[sec]
        cols["tod_cos"] = tab_c[sec]

    past = np.empty((d, len(config.past_features)), np.float32)  # [D, F_past]
    for j, name in enumerate(config.past_features):
        if name in cols:
            past[:, j] = cols[name]
        elif name in frame.columns:
            past[:, j] = np.nan_to_num(dense(pd.to_numeric(frame[name]).to_numpy(np.float64)))
        elif name in PROFILE_FEATURES:
            raise SchemaError(
                f"the model takes the therapy profile {list(PROFILE_FEATURES)} as inputs and "
                f"the frame has no {name!r} column: add the person's pump settings as columns "
                "(one value per row), or use a model trained without them "
                "(training config data.profile: off)"
            )
        else:
            raise SchemaError(
                f"past feature {name!r} is neither computed by the window builder "
                f"({sorted(_ENGINEERED_PAST)}) nor a column of the frame"
            )
    future = np.empty((d, len(config.future_features)), np.float32)  # [D, F_future]
    for j, name in enumerate(config.future_features):
        future[:, j] = cols[name]
    return _Dense(
        subjects=np.asarray(sid[first], dtype=str),
        start=start,
        span=span,
        owner=owner,
        time_ns=time_ns,
        present=present,
        glucose=glucose,
        glucose_ff=glucose_ff,
        run=run,
        past=past,
        future=future,
        cols=cols,
    )


def _trailing_daily_dose(
    dose: np.ndarray, present: np.ndarray, start: np.ndarray, owner: np.ndarray
) -> np.ndarray:
    """Total daily dose (U/day) over the trailing 24 h of every dense slot, its own included.

    The sum of basal + bolus over the subject's rows in the last 24 h, scaled up to a day by
    the rows present (a record younger than a day, or with missing rows, gives the rate seen
    so far). It is the person's insulin need — the clinical "1800 rule" sets the insulin
    sensitivity to about 1800 / TDD — as a slowly varying, *static-like* input: the models
    scale their insulin effect with it, which a 2-hour window's mean basal cannot do (temp
    basals make it noisy, and a noisy scale shrinks the learned dose exponent).
    """
    per_day = _SECONDS_PER_DAY // (SLOT_MINUTES * 60)  # slots in 24 h
    idx = np.arange(len(dose))
    lo = np.maximum(idx - per_day + 1, start[owner])  # [D] never reaches the previous subject
    cs = np.r_[0.0, np.cumsum(np.where(present, dose, 0.0))]  # [D+1]
    cn = np.r_[0, np.cumsum(present)]  # [D+1]
    total = cs[idx + 1] - cs[lo]
    rows = cn[idx + 1] - cn[lo]
    return np.where(rows > 0, total * per_day / np.maximum(rows, 1), 0.0)


def _seconds_of_day(
    frame: pd.DataFrame, time_ns: np.ndarray, owner: np.ndarray, subjects: np.ndarray
) -> np.ndarray:
    """Local seconds of day for every dense slot, in each subject's own time zone."""
    meta = get_meta(frame)
    per_subject = dict(meta.extra.get("subject_timezones", {}) or {})
    tzs = np.array([str(per_subject.get(str(s), meta.timezone or "UTC")) for s in subjects])
    sec = np.empty(len(time_ns), np.int64)
    slot_tz = tzs[owner]
    for tz in np.unique(tzs):
        m = slot_tz == tz
        sec[m] = _local_seconds_of_day(time_ns[m], str(tz))
    return sec


def _gather(dense_rows: np.ndarray, origins: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """Rows ``origin+lo … origin+hi-1`` of a ``[D, F]`` array for every origin → ``[N, hi-lo, F]``."""
    width = hi - lo
    view = sliding_window_view(dense_rows, width, axis=0)  # [D-width+1, F, width], no copy
    out = view[origins + lo]  # [N, F, width]
    return np.ascontiguousarray(out.transpose(0, 2, 1))  # [N, width, F]


# --------------------------------------------------------------------------- public API


def add_features(
    frame: pd.DataFrame,
    insulin: InsulinCurve = DEFAULT_INSULIN_CURVE,
    carbs: CarbCurve = DEFAULT_CARB_CURVE,
) -> pd.DataFrame:
    """A sorted, validated copy of `frame` with ``observed``, ``iob_u``, ``cob_g``, ``tod_sin``,
    ``tod_cos``.

    IOB and COB run over each subject's whole record (exact, whatever its length); compute
    them on the full record *before* splitting it so that the start of a split still sees the
    insulin and meals given just before it. Existing feature columns are recomputed.
    """
    f = _prepare(frame)
    if len(f) == 0:
        out = f.copy()
        for name in FEATURE_COLUMNS:
            out[name] = pd.Series([], dtype="float64")
        out.attrs = dict(frame.attrs)
        return out
    cfg = WindowConfig(
        insulin_peak_min=insulin.peak_min,
        insulin_dia_min=insulin.dia_min,
        carb_absorption_min=carbs.absorption_min,
    )
    dense = _build_dense(f, cfg, insulin=insulin, carbs=carbs, use_frame_features=False)
    pos = _row_positions(f, dense)
    out = f.copy()
    for name in FEATURE_COLUMNS:
        out[name] = dense.cols[name][pos]
    out.attrs = dict(frame.attrs)
    return out


def _row_positions(frame: pd.DataFrame, dense: _Dense) -> np.ndarray:
    """Dense position of every row of a validated, sorted frame."""
    sid = frame["subject_id"].to_numpy(dtype=object)
    n = len(frame)
    if n == 0:
        return np.zeros(0, np.intp)
    first = np.flatnonzero(np.r_[True, sid[1:] != sid[:-1]])
    codes = np.repeat(np.arange(len(first)), np.diff(np.r_[first, n]))
    t_ns = _utc_ns(frame["time"])
    return dense.start[codes] + (t_ns - t_ns[first][codes]) // _SLOT_NS


def _valid_origins(dense: _Dense, config: WindowConfig, stride: int) -> np.ndarray:
    """Dense positions of every origin that yields a window (rules in the module docstring)."""
    L, H = config.past_slots, config.horizon_slots
    d = len(dense.present)
    idx = np.arange(d)
    observed = np.isfinite(dense.glucose)
    cum_present = np.r_[0, np.cumsum(dense.present)]  # [D+1]
    cum_obs = np.r_[0, np.cumsum(observed)]  # [D+1]
    cand = idx[(idx >= L - 1) & (idx + H < d)]
    cand = cand[observed[cand]]  # rule 2: a reading at the origin
    all_present = cum_present[cand + H + 1] - cum_present[cand - L + 1] == L + H  # rule 1
    cand = cand[all_present]
    runs = sliding_window_view(dense.run, L)  # [D-L+1, L], no copy
    gap_ok = runs[cand - L + 1].max(axis=1) <= config.max_past_gap_slots  # rule 3
    cand = cand[gap_ok]
    has_target = cum_obs[cand + H + 1] - cum_obs[cand + 1] > 0  # rule 4
    cand = cand[has_target]
    if stride > 1:
        cand = cand[(cand - dense.start[dense.owner[cand]]) % stride == 0]
    return cand


def make_windows(
    frame: pd.DataFrame, config: WindowConfig = WindowConfig(), *, stride: int = 1
) -> Windows:
    """Every window of every subject of `frame` (see the module docstring for which exist).

    Build windows per split frame (`split_chronological`, `split_subjects`): a window never
    spans two frames. `stride` keeps origins whose slot index within the subject's record is a
    multiple of it (aligned in time, so two frames of one subject thin the same way).
    """
    if isinstance(stride, bool) or not isinstance(stride, (int, np.integer)) or stride < 1:
        raise SchemaError(f"stride must be a positive integer, got {stride!r}")
    f = _prepare(frame)
    L, H = config.past_slots, config.horizon_slots
    if len(f) == 0:
        return _empty_windows(config)
    dense = _build_dense(f, config)
    origins = _valid_origins(dense, config, int(stride))
    past = _gather(dense.past, origins, -L + 1, 1)  # [N, L, F_past]
    future = _gather(dense.future, origins, 1, H + 1)  # [N, H, F_future]
    target = _gather(dense.glucose[:, None], origins, 1, H + 1)[..., 0].astype(np.float32)  # [N, H]
    return Windows(
        past=past,
        future=future,
        target=target,
        subject_id=dense.subjects[dense.owner[origins]],
        origin=dense.time_ns[origins].astype("datetime64[ns]"),
        config=config,
    )


def _empty_windows(config: WindowConfig) -> Windows:
    L, H = config.past_slots, config.horizon_slots
    return Windows(
        past=np.zeros((0, L, len(config.past_features)), np.float32),
        future=np.zeros((0, H, len(config.future_features)), np.float32),
        target=np.zeros((0, H), np.float32),
        subject_id=np.zeros(0, dtype=str),
        origin=np.zeros(0, dtype="datetime64[ns]"),
        config=config,
    )


def inputs_at(
    frame: pd.DataFrame,
    config: WindowConfig = WindowConfig(),
    origin: pd.Timestamp | str | None = None,
    *,
    subject_id: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Serving: ``past [1, L, F_past]`` and ``future [1, H, F_future]`` at `origin`.

    `frame` is the subject's recent record (give it at least DIA + L of history so that IOB is
    complete). `origin` defaults to the frame's last slot. Future inputs come from rows after
    the origin where the frame has them (scheduled basal, announced meals), zeros beyond; time
    of day is always filled in. No validity rule is applied (serving decides what a stale
    reading means) except that the past needs a reading to carry forward.
    """
    f = _prepare(frame)
    if len(f) == 0:
        raise SchemaError("inputs_at needs a frame with at least one row")
    subjects = f["subject_id"].unique()
    if subject_id is None:
        if len(subjects) != 1:
            raise SchemaError(
                f"frame holds {len(subjects)} subjects; pass subject_id= to choose one"
            )
        subject_id = str(subjects[0])
    sub = f[f["subject_id"] == subject_id]
    if len(sub) == 0:
        raise SchemaError(f"subject {subject_id!r} is not in the frame")
    sub = sub.reset_index(drop=True)
    sub.attrs = dict(f.attrs)
    dense = _build_dense(sub, config)
    t_first = int(dense.time_ns[dense.start[0]])
    t_last = t_first + (int(dense.span[0]) - 1) * _SLOT_NS
    if origin is None:
        o_ns = t_last
    else:
        ts = pd.Timestamp(origin)
        if ts.tzinfo is None:
            raise SchemaError(f"origin {origin!r} is naive; pass a UTC (tz-aware) timestamp")
        o_ns = int(ts.tz_convert("UTC").as_unit("ns").value)
        if (o_ns - t_first) % _SLOT_NS:
            raise SchemaError(f"origin {ts} is not on the {SLOT_MINUTES}-minute grid")
        if not t_first <= o_ns <= t_last:
            raise SchemaError(
                f"origin {ts} is outside the frame's record for {subject_id!r} "
                f"({pd.Timestamp(t_first, tz='UTC')} … {pd.Timestamp(t_last, tz='UTC')})"
            )
    o = int(dense.start[0] + (o_ns - t_first) // _SLOT_NS)
    L, H = config.past_slots, config.horizon_slots
    if not np.isfinite(dense.glucose_ff[o - L + 1]):
        raise SchemaError(
            f"no glucose reading at or before the start of the past window ({L} slots before "
            f"{pd.Timestamp(o_ns, tz='UTC')}); serving needs a longer history or a reading"
        )
    origins = np.array([o])
    past = _gather(dense.past, origins, -L + 1, 1)  # [1, L, F_past]
    future = _gather(dense.future, origins, 1, H + 1)  # [1, H, F_future]
    return past, future


# --------------------------------------------------------------------------- the incremental form


@lru_cache(maxsize=64)
def _slot_kernels(config: WindowConfig) -> tuple[np.ndarray, np.ndarray, int]:
    """(IOB kernel, COB kernel, slots per day) of a config, computed once per config."""
    k_ins = config.insulin_curve.iob_kernel(config.slot_minutes)
    k_cob = config.carb_curve.cob_kernel(config.slot_minutes)
    for k in (k_ins, k_cob):
        k.setflags(write=False)
    return k_ins, k_cob, _SECONDS_PER_DAY // (config.slot_minutes * 60)


def history_slots(config: WindowConfig) -> int:
    """Slots of record, ending at the current slot, that `windows_from_slots` needs: the past
    window plus the longest look-back of a feature (IOB/COB kernels, 24 h for ``tdd_u``)."""
    k_ins, k_cob, per_day = _slot_kernels(config)
    return config.past_slots + max(len(k_ins), len(k_cob), per_day)


def windows_from_slots(
    config: WindowConfig,
    *,
    glucose: np.ndarray,
    basal_u: np.ndarray,
    bolus_u: np.ndarray,
    carbs_g: np.ndarray,
    first_slot_ns: int,
    future_basal_u: np.ndarray,
    profile: Mapping[str, np.ndarray] | None = None,
    daily_dose_before_u: np.ndarray | None = None,
    known_from: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The window at the current slot of N records on the slot grid — the same features as
    `make_windows`/`inputs_at`, from arrays instead of a frame (the runtime's every cycle).

    Each array is ``[N, T]``, oldest first, the last column being the current slot (its
    insulin is what the controller is about to decide: write the scheduled basal there).
    ``T >= history_slots(config)``. `glucose` holds readings (NaN = none; carried forward
    within the span, with the ``observed`` mask); `carbs_g` announced grams; `first_slot_ns`
    the UTC ns of column 0 (time of day, UTC). `future_basal_u` ``[N]`` is the insulin per
    slot planned after the current slot (scheduled basal; bolus and carbs are 0 there).
    `profile`: the therapy profile, ``[N]`` (static) or ``[N, T]`` per slot, per feature.
    ``tdd_u`` counts `daily_dose_before_u` ``[N]`` (U per slot) for the columns before
    `known_from` (a record that starts mid-life: what the pump history would show).

    Returns ``past [N, L, F_past]``, ``future [N, H, F_future]`` (float32) and ``ok [N]``:
    False where no reading lies at or before the past window's start (no input to give).
    """
    c = config
    L, H = c.past_slots, c.horizon_slots
    g = np.asarray(glucose, np.float64)
    n, t = g.shape
    if t < history_slots(c):
        raise SchemaError(f"{t} slots of record; the window needs {history_slots(c)}")
    basal = np.asarray(basal_u, np.float64)
    dose = basal + np.asarray(bolus_u, np.float64)  # [N, T]
    carbs = np.asarray(carbs_g, np.float64)
    idx = np.arange(t)
    observed = np.isfinite(g)
    past_sl = slice(t - L, t)
    last_obs = np.maximum.accumulate(np.where(observed, idx, -1), axis=1)[:, past_sl]  # [N, L]
    # glucose carried forward, gathered for the past window only
    ff = np.where(last_obs >= 0, g[np.arange(n)[:, None], np.maximum(last_obs, 0)], np.nan)
    ok = np.isfinite(ff[:, 0])

    def on_board(x: np.ndarray, kernel: np.ndarray) -> np.ndarray:
        """On-board amounts after each of the last L slots' doses: [N, L]."""
        k = len(kernel)
        seg = x[:, t - L - k + 1 :]  # [N, L+K-1]
        s0, s1 = seg.strides  # its [N, L, K] sliding windows: sliding_window_view, unchecked
        return as_strided(seg, (n, L, k), (s0, s1, s1), writeable=False) @ kernel[::-1]  # [N, L]

    k_ins, k_cob, per_day = _slot_kernels(c)
    seg = dose[:, t - L - per_day + 1 :].copy()  # [N, L+D-1]
    if daily_dose_before_u is not None and known_from > t - L - per_day + 1:
        before = np.arange(t - L - per_day + 1, t) < known_from
        seg[:, before] = np.asarray(daily_dose_before_u, np.float64)[:, None]
    cs = np.concatenate([np.zeros((n, 1)), np.cumsum(seg, axis=1)], axis=1)  # [N, L+D]
    tdd = cs[:, per_day:] - cs[:, :L]  # [N, L] the 24 h ending at each past slot

    tab_s, tab_c = _tod_table()
    sec0 = (int(first_slot_ns) // 1_000_000_000) % _SECONDS_PER_DAY
    step = c.slot_minutes * 60
    sec = (sec0 + np.arange(t - L, t + H) * step) % _SECONDS_PER_DAY  # [L+H] past, future
    cols = {
        "glucose": ff,
        "observed": observed[:, past_sl],
        "basal_u": basal[:, past_sl],
        "bolus_u": np.asarray(bolus_u, np.float64)[:, past_sl],
        "carbs_g": carbs[:, past_sl],
        "iob_u": on_board(dose, k_ins),
        "cob_g": on_board(carbs, k_cob),
        "tdd_u": tdd,
        "tod_sin": tab_s[sec[:L]][None, :],
        "tod_cos": tab_c[sec[:L]][None, :],
    }
    for k, v in (profile or {}).items():
        v = np.asarray(v, np.float64)
        cols[k] = v[:, None] if v.ndim == 1 else v[:, past_sl]
    past = np.empty((n, L, len(c.past_features)), np.float32)  # [N, L, F_past]
    for j, name in enumerate(c.past_features):
        if name not in cols:
            raise SchemaError(
                f"past feature {name!r} is not computed from the runtime's record "
                f"({sorted(cols)}); the model needs inputs the loop does not have"
            )
        past[:, :, j] = cols[name]
    fut = {
        "basal_u": np.asarray(future_basal_u, np.float64).reshape(n, 1),
        "bolus_u": 0.0,
        "carbs_g": 0.0,
        "tod_sin": tab_s[sec[L:]][None, :],
        "tod_cos": tab_c[sec[L:]][None, :],
    }
    future = np.empty((n, H, len(c.future_features)), np.float32)  # [N, H, F_future]
    for j, name in enumerate(c.future_features):
        future[:, :, j] = fut[name]
    return past, future, ok


class IncrementalWindows:
    """The records of N subjects that grow one slot per cycle, and their windows.

    The incremental form of this module's builder, for a loop that steps a whole cohort
    (the in-silico trial): readings and announced carbs arrive with each cycle
    (`observe`), delivered insulin after it (`deliver`), and `windows` gives the model
    inputs at the current slot through `windows_from_slots` — the same function the
    journaled runtime calls on its record — instead of rebuilding a frame every cycle.

    Before the first cycle the subjects rest at steady state on scheduled basal with their
    first reading (how the simulator starts them); the prefill is never reported as data.
    The trailing daily dose (``tdd_u``) counts the day before at ``prior_daily_dose_u`` (what
    the pump history would show; scheduled basal alone when not given).
    """

    def __init__(
        self,
        config: WindowConfig,
        scheduled_u_per_h: np.ndarray,
        start: pd.Timestamp,
        cycles: int,
        prior_daily_dose_u: np.ndarray | None = None,
        profile: Mapping[str, np.ndarray] | None = None,
    ) -> None:
        c = self.config = config
        self.n = len(scheduled_u_per_h)
        self.start = pd.Timestamp(start)
        self.span = history_slots(c)
        self.pad = self.span
        width = self.pad + cycles + 1
        self.scheduled_slot = np.asarray(scheduled_u_per_h, np.float64) * c.slot_minutes / 60.0
        self.glucose = np.full((self.n, width), np.nan)  # [N, T] readings (NaN = none)
        self.basal = np.zeros((self.n, width))  # U per slot
        self.bolus = np.zeros((self.n, width))
        self.carbs = np.zeros((self.n, width))  # announced grams per slot
        self.basal[:, : self.pad] = self.scheduled_slot[:, None]
        per_day = _SECONDS_PER_DAY // (c.slot_minutes * 60)
        prior = (
            self.scheduled_slot * per_day
            if prior_daily_dose_u is None
            else np.asarray(prior_daily_dose_u, np.float64)
        )
        self.prior_slot = prior / per_day  # [N] U per slot before the record
        self.profile = {k: np.asarray(v, np.float64) for k, v in (profile or {}).items()}
        self.k_ins = c.insulin_curve.iob_kernel(c.slot_minutes)  # [K], k[0] = 1
        t0 = self.start.tz_localize("UTC") if self.start.tzinfo is None else self.start
        self._t0_ns = int(t0.tz_convert("UTC").as_unit("ns").value)
        self.cycle = -1

    def col(self, cycle: int) -> int:
        return self.pad + cycle

    def observe(self, cycle: int, glucose: np.ndarray, carbs_g: np.ndarray) -> None:
        """A new cycle: this slot's readings and announced carbs (insulin still to decide)."""
        j = self.col(cycle)
        g = np.asarray(glucose, np.float64)
        if cycle == 0:  # steady-state prefill from the first reading
            self.glucose[:, : self.pad] = np.where(np.isfinite(g), g, 120.0)[:, None]
        self.glucose[:, j] = g
        self.carbs[:, j] = np.nan_to_num(carbs_g, nan=0.0)
        self.basal[:, j] = self.scheduled_slot  # placeholder until delivery is known
        self.bolus[:, j] = 0.0
        self.cycle = cycle

    def deliver(self, cycle: int, basal_u: np.ndarray, bolus_u: np.ndarray) -> None:
        """Record what was delivered in this slot (U)."""
        j = self.col(cycle)
        self.basal[:, j] = basal_u
        self.bolus[:, j] = bolus_u

    def record(self, cycle: int) -> dict[str, np.ndarray]:
        """The last `history_slots` of every record, ending at the cycle's slot: ``[N, T]``
        arrays ``glucose``, ``basal_u``, ``bolus_u``, ``carbs_g`` and ``time`` ``[T]`` (UTC)."""
        j = self.col(cycle)
        sl = slice(j - self.span + 1, j + 1)
        ns = self._t0_ns + (np.arange(sl.start, sl.stop) - self.pad) * (
            self.config.slot_minutes * 60 * 1_000_000_000
        )
        return {
            "time": ns.astype("datetime64[ns]"),
            "glucose": self.glucose[:, sl],
            "basal_u": self.basal[:, sl],
            "bolus_u": self.bolus[:, sl],
            "carbs_g": self.carbs[:, sl],
        }

    def iob_before(self, cycle: int) -> np.ndarray:
        """[N] insulin on board at the start of the cycle's slot, before its own dose."""
        from forecast.insulin import iob_before

        r = self.record(cycle)
        return iob_before(r["basal_u"] + r["bolus_u"], self.k_ins)

    def windows(
        self, cycle: int, *, future_basal_u: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """past [N, L, F_past], future [N, H, F_future] at the cycle's slot (float32).

        The slot's own insulin is what `observe` or `deliver` last wrote there; future insulin
        is scheduled basal unless `future_basal_u` ``[N]`` says otherwise.
        """
        r = self.record(cycle)
        j = self.col(cycle)
        past, future, _ = windows_from_slots(
            self.config,
            glucose=r["glucose"],
            basal_u=r["basal_u"],
            bolus_u=r["bolus_u"],
            carbs_g=r["carbs_g"],
            first_slot_ns=int(r["time"][0].astype(np.int64)),
            future_basal_u=self.scheduled_slot if future_basal_u is None else future_basal_u,
            profile=self.profile,
            daily_dose_before_u=self.prior_slot,
            known_from=self.pad - (j - self.span + 1),
        )
        return past, future

    def frame(self, names: Sequence[str], upto_cycle: int) -> pd.DataFrame:
        """The canonical frame of cycles 0 … upto_cycle (readings, delivered insulin, carbs)."""
        a, b = self.col(0), self.col(upto_cycle) + 1
        t = self.start + pd.to_timedelta(np.arange(b - a) * self.config.slot_minutes, "min")
        parts = [
            pd.DataFrame(
                {
                    "subject_id": name,
                    "time": t,
                    "glucose": self.glucose[i, a:b],
                    "basal_u": self.basal[i, a:b],
                    "bolus_u": self.bolus[i, a:b],
                    "carbs_g": self.carbs[i, a:b],
                    **{k: v[i] for k, v in self.profile.items()},
                }
            )
            for i, name in enumerate(names)
        ]
        out = pd.concat(parts, ignore_index=True)
        out["subject_id"] = out["subject_id"].astype("string")
        return out


def split_chronological(
    frame: pd.DataFrame,
    fractions: Sequence[float] = (0.7, 0.15, 0.15),
    *,
    config: WindowConfig | None = None,
) -> dict[str, pd.DataFrame]:
    """Each subject's record cut by time into train/val/test (or train/test for 2 fractions).

    Cuts fall at the fractions of the subject's time span. Each split is its own frame, so
    windows built per split never span two. IOB/COB are computed (`add_features`) on the
    whole record first when the frame does not have them, so a split's first hours still see
    the insulin and meals given before it — only past inputs cross the cut, never targets.
    With `config`, each subject needs at least L + H slots in every split (otherwise a clear
    error: that subject cannot give windows to every split).
    """
    fr = [float(x) for x in fractions]
    names = {3: ("train", "val", "test"), 2: ("train", "test")}.get(len(fr))
    if names is None:
        raise SchemaError(f"fractions must have 2 or 3 entries (train[, val], test), got {fr}")
    if any(not np.isfinite(x) or x <= 0 for x in fr) or abs(sum(fr) - 1) > 1e-6:
        raise SchemaError(f"fractions must be positive and sum to 1, got {fr}")
    cfg = config or WindowConfig()
    if all(c in frame.columns for c in _HISTORY_FEATURES):
        f = _prepare(frame)
    else:
        f = add_features(frame, cfg.insulin_curve, cfg.carb_curve)
    if len(f) == 0:
        raise SchemaError("cannot split an empty frame")
    sid = f["subject_id"].to_numpy(dtype=object)
    n = len(f)
    first = np.flatnonzero(np.r_[True, sid[1:] != sid[:-1]])
    counts = np.diff(np.r_[first, n])
    codes = np.repeat(np.arange(len(first)), counts)
    t_ns = _utc_ns(f["time"])
    slot = (t_ns - t_ns[first][codes]) // _SLOT_NS  # [n]
    span = np.r_[slot[first[1:] - 1], slot[-1]] + 1  # [S]
    cuts = np.cumsum(fr)[:-1]  # [K-1] fraction at which each later split begins
    bounds = np.floor(span[:, None] * cuts[None, :] + 1e-9).astype(np.int64)  # [S, K-1]
    part = (slot[:, None] >= bounds[codes]).sum(axis=1)  # [n] split index of each row
    need = (cfg.past_slots + cfg.horizon_slots) if config is not None else 1
    per = np.zeros((len(first), len(names)), np.int64)  # [S, K] rows per subject per split
    np.add.at(per, (codes, part), 1)
    short = np.argwhere(per < need)
    if len(short):
        s, k = short[0]
        raise SchemaError(
            f"subject {sid[first[s]]!r} has {per[s, k]} slot(s) in split {names[k]!r} but "
            f"needs {need}; too little data for a chronological split — use fewer/larger "
            "fractions, a shorter window, or hold the subject out with split_subjects"
        )
    out: dict[str, pd.DataFrame] = {}
    for k, name in enumerate(names):
        part_frame = f[part == k].reset_index(drop=True)
        part_frame.attrs = dict(frame.attrs)
        out[name] = part_frame
    return out


def split_subjects(
    frame: pd.DataFrame, test_subjects: Iterable[str] | str
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(frame without the held-out subjects, frame of the held-out subjects)."""
    held = [test_subjects] if isinstance(test_subjects, str) else [str(s) for s in test_subjects]
    if not held:
        raise SchemaError("split_subjects needs at least one held-out subject")
    if "subject_id" not in frame.columns:
        raise SchemaError("frame is missing required column 'subject_id'")
    ids = frame["subject_id"].astype(str)
    known = set(ids.unique())
    unknown = [s for s in held if s not in known]
    if unknown:
        raise SchemaError(
            f"held-out subject(s) {unknown} are not in the frame; it holds {sorted(known)[:20]}"
        )
    is_test = ids.isin(held).to_numpy()
    if is_test.all():
        raise SchemaError("every subject is held out; leave at least one for training")
    train = frame[~is_test].reset_index(drop=True)
    test = frame[is_test].reset_index(drop=True)
    train.attrs = dict(frame.attrs)
    test.attrs = dict(frame.attrs)
    return train, test
