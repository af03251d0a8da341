"""Glucose rate of change and the CGM trend arrow, for a frame and for the runtime.

A CGM user reads two things: the number and the arrow. The arrow is the rate of change
(mg/dL/min) binned with the convention every CGM uses::

    ↑↑  > 3        ↑  2…3        ↗  1…2        →  −1…1        ↘  −2…−1        ↓  −3…−2        ↓↓  < −3

(boundaries: a rate of exactly ±1 is flat; ±2 is ↗/↘; ±3 is ↑/↓ — the outer bin starts strictly
beyond each edge, symmetric around zero).

The rate is a least-squares slope over the *real* readings of the last `window_min` minutes
(15 by default), anchored at the current reading. A slope over a few readings absorbs
sensor noise (one 5 mg/dL glitch moves a 4-point slope by < 0.5 mg/dL/min, half of what a
2-point difference would), and it is only computed when the readings deserve it: at least
`min_readings` (3) readings spanning at least `min_span_min` (10) minutes. Otherwise — a gap,
a sensor that just came back, a clock that jumped — there is no arrow, never a guess from
carried-forward values. A slot without a reading has no arrow either: an arrow belongs to a
reading.

`add_trend(frame)` computes it for every row of a canonical frame (vectorised);
`trend_at(times, glucose)` computes it for the latest of a short list of readings, which is
what the runtime has. Both compute the same least-squares sums (vectorised in `_ls_slope`,
in plain floats for the runtime's handful of readings; a property test pins them together),
so the runtime shows the arrow the evaluation scored.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

import numpy as np
import pandas as pd

from forecast.schema import SLOT_MINUTES, SchemaError

ROC_COLUMN = "roc_mgdl_min"
ARROW_COLUMN = "trend_arrow"


class TrendArrow(StrEnum):
    """The seven CGM arrows; the value is the symbol a display shows."""

    DOUBLE_UP = "↑↑"
    SINGLE_UP = "↑"
    FORTY_FIVE_UP = "↗"
    FLAT = "→"
    FORTY_FIVE_DOWN = "↘"
    SINGLE_DOWN = "↓"
    DOUBLE_DOWN = "↓↓"


# Ordered from fastest fall to fastest rise; index = bin of np.digitize over _EDGES.
_ARROWS_BY_BIN: tuple[TrendArrow, ...] = (
    TrendArrow.DOUBLE_DOWN,
    TrendArrow.SINGLE_DOWN,
    TrendArrow.FORTY_FIVE_DOWN,
    TrendArrow.FLAT,
    TrendArrow.FORTY_FIVE_UP,
    TrendArrow.SINGLE_UP,
    TrendArrow.DOUBLE_UP,
)


@dataclass(frozen=True)
class TrendConfig:
    """How much data a rate of change needs before it is shown.

    The defaults follow CGM practice: a 15-minute window, and no arrow unless three readings
    spanning ten minutes support it (one missed reading still leaves an arrow, two do not).
    """

    window_min: float = 15.0
    min_readings: int = 3
    min_span_min: float = 10.0

    def __post_init__(self) -> None:
        if self.window_min <= 0:
            raise ValueError(f"window_min must be positive, got {self.window_min}")
        if self.min_readings < 2:
            raise ValueError(f"min_readings must be >= 2 for a slope, got {self.min_readings}")
        if not 0 < self.min_span_min <= self.window_min:
            raise ValueError(
                f"min_span_min must be in (0, window_min={self.window_min}], got {self.min_span_min}"
            )

    @classmethod
    def for_sampling(cls, sampling_minutes: float) -> TrendConfig:
        """The same rule for a sensor that reports less often than every 5 minutes.

        A 15-minute Libre export has at most two readings in 15 minutes, so the default rule
        would never show an arrow; three readings over two to three sampling periods keep the
        same noise-averaging idea.
        """
        if not sampling_minutes > 0:
            raise ValueError(f"sampling_minutes must be positive, got {sampling_minutes}")
        if sampling_minutes <= SLOT_MINUTES:
            return cls()
        return cls(window_min=3 * sampling_minutes, min_span_min=2 * sampling_minutes)


@dataclass(frozen=True)
class Trend:
    """Rate of change at one reading (NaN and no arrow when it cannot be computed)."""

    roc_mgdl_min: float
    arrow: TrendArrow | None

    @property
    def symbol(self) -> str:
        return "" if self.arrow is None else self.arrow.value


def arrow_for_rate(roc_mgdl_min: float) -> TrendArrow | None:
    """The arrow for one rate (mg/dL/min); None for NaN."""
    r = float(roc_mgdl_min)
    if not math.isfinite(r):
        return None
    a = abs(r)  # the same bins as `_bin`, without numpy's per-call cost (runtime path)
    b = 0 if a <= 1.0 else 1 if a <= 2.0 else 2 if a <= 3.0 else 3
    return _ARROWS_BY_BIN[3 + b if r >= 0 else 3 - b]


def arrows_for_rates(roc: np.ndarray) -> np.ndarray:
    """Vectorised `arrow_for_rate`: an object array of symbols, None where the rate is NaN."""
    roc = np.asarray(roc, dtype=float)
    symbols = np.array([a.value for a in _ARROWS_BY_BIN], dtype=object)
    out = np.full(roc.shape, None, dtype=object)
    ok = np.isfinite(roc)
    out[ok] = symbols[_bin(roc[ok])]
    return out


def _bin(roc: np.ndarray) -> np.ndarray:
    # Flat is closed [-1, 1]; the up bins are (1, 2], (2, 3], (3, inf); the down bins mirror
    # them. Binning |roc| for both sides keeps the symmetry exact.
    up = np.digitize(roc, [1.0, 2.0, 3.0], right=True)  # 0: <=1, 1: (1,2], 2: (2,3], 3: >3
    down = np.digitize(-roc, [1.0, 2.0, 3.0], right=True)
    return np.where(roc >= 0, 3 + up, 3 - down)


def _ls_slope(dt_min: np.ndarray, g: np.ndarray, mask: np.ndarray, config: TrendConfig):
    """Least-squares slope along the last axis over masked readings.

    ``dt_min`` are reading times relative to the anchor (<= 0), so sums stay small and exact
    whatever the absolute time. Returns NaN where fewer than `min_readings` readings or a
    span shorter than `min_span_min` are available.
    """
    w = mask.astype(float)
    t = np.where(mask, dt_min, 0.0)
    y = np.where(mask, g, 0.0)
    n = w.sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        t_mean = t.sum(-1) / n
        y_mean = y.sum(-1) / n
        tc = np.where(mask, t - t_mean[..., None], 0.0)
        sxx = (tc * tc).sum(-1)
        sxy = (tc * (y - y_mean[..., None]) * w).sum(-1)
        slope = sxy / sxx
    t_min = np.where(mask, dt_min, np.inf).min(-1)
    t_max = np.where(mask, dt_min, -np.inf).max(-1)
    span = t_max - t_min
    ok = (n >= config.min_readings) & (span >= config.min_span_min - 1e-9) & (sxx > 0)
    return np.where(ok, slope, np.nan)


def _minutes(times: Sequence | np.ndarray | pd.Series | pd.DatetimeIndex) -> np.ndarray:
    """Times as float minutes: datetimes (any tz, or naive) or numbers already in minutes."""
    if isinstance(times, (pd.Series, pd.Index)) and times.dtype.kind in "iuf":
        return times.to_numpy(dtype=float)
    if isinstance(times, (pd.Series, pd.Index)):
        idx = pd.DatetimeIndex(times)
    else:
        arr = np.asarray(times)
        if arr.dtype.kind in "iuf":
            return arr.astype(float)
        idx = pd.DatetimeIndex(pd.to_datetime(list(arr) if arr.dtype == object else arr))
    if idx.tz is not None:
        idx = idx.tz_convert("UTC").tz_localize(None)
    ns = idx.as_unit("ns").asi8.astype(float)
    ns[idx.isna()] = np.nan
    return ns / 60e9


def trend_at(
    times: Sequence | np.ndarray | pd.Series | pd.DatetimeIndex,
    glucose: Sequence[float] | np.ndarray,
    *,
    config: TrendConfig = TrendConfig(),
) -> Trend:
    """Rate of change and arrow at the *last* reading of a short history (the runtime's view).

    ``times`` are datetimes or minutes; ``glucose`` mg/dL with NaN for missing readings. The
    anchor is the last element as received. Readings stamped *after* the anchor (the sensor
    clock jumped backwards) and readings older than the window are ignored, so a clock jump
    leaves too few readings and yields no arrow rather than a slope across the jump. A NaN
    last reading gives no arrow.
    """
    t = _minutes(times)
    g = np.asarray(glucose, dtype=float)
    if t.shape != g.shape or t.ndim != 1:
        raise ValueError(f"times and glucose must be 1-D of equal length, got {t.shape}, {g.shape}")
    if len(g) == 0 or not np.isfinite(g[-1]) or not np.isfinite(t[-1]):
        return Trend(math.nan, None)
    # A runtime history is a handful of readings: plain floats beat numpy's per-call cost
    # 20-fold here. Same sums as `_ls_slope` (pinned by a property test in test_trend.py).
    anchor = float(t[-1])
    lo = -config.window_min - 1e-9
    pts = [
        (dt, gv)
        for dt, gv in zip((t - anchor).tolist(), g.tolist())
        if math.isfinite(gv) and math.isfinite(dt) and lo <= dt <= 0.0
    ]
    n = len(pts)
    if n < config.min_readings:
        return Trend(math.nan, None)
    ts = [p[0] for p in pts]
    if max(ts) - min(ts) < config.min_span_min - 1e-9:
        return Trend(math.nan, None)
    t_mean = sum(ts) / n
    y_mean = sum(p[1] for p in pts) / n
    sxx = sum((x - t_mean) * (x - t_mean) for x in ts)
    if not sxx > 0:
        return Trend(math.nan, None)
    sxy = sum((x - t_mean) * (y - y_mean) for x, y in pts)
    roc = sxy / sxx
    return Trend(roc, arrow_for_rate(roc))


def rate_of_change(frame: pd.DataFrame, *, config: TrendConfig = TrendConfig()) -> np.ndarray:
    """Rate of change (mg/dL/min) at every row of a frame sorted by (subject_id, time).

    Rows without a real reading get NaN. Works on the 5-minute grid with or without NaN rows
    for missing slots: each row looks back at the previous rows of the same subject whose
    time lies within the window.
    """
    for c in ("subject_id", "time", "glucose"):
        if c not in frame.columns:
            raise SchemaError(f"rate_of_change needs column {c!r}")
    n = len(frame)
    if n == 0:
        return np.empty(0)
    sid = frame["subject_id"].astype(str).to_numpy()
    t = _minutes(frame["time"])
    g = frame["glucose"].to_numpy(dtype=float)
    same_sid = sid[1:] == sid[:-1]
    if (np.diff(t)[same_sid] <= 0).any():
        raise SchemaError(
            "rate_of_change needs a frame sorted by (subject_id, time), one row per slot"
        )
    # Rows are unique per slot, so at most window/slot earlier rows can fall in the window.
    k_back = int(np.floor(config.window_min / SLOT_MINUTES + 1e-9))
    cols = k_back + 1
    dt = np.full((n, cols), np.nan)
    gg = np.full((n, cols), np.nan)
    dt[:, -1] = 0.0
    gg[:, -1] = g
    for k in range(1, cols):
        dt[k:, -1 - k] = t[:-k] - t[k:]
        gg[k:, -1 - k] = g[:-k]
        gg[k:, -1 - k][sid[:-k] != sid[k:]] = np.nan
    mask = np.isfinite(gg) & np.isfinite(dt) & (dt >= -config.window_min - 1e-9)
    roc = _ls_slope(np.nan_to_num(dt, nan=0.0), gg, mask, config)
    return np.where(np.isfinite(g), roc, np.nan)


def add_trend(frame: pd.DataFrame, *, config: TrendConfig = TrendConfig()) -> pd.DataFrame:
    """A copy of ``frame`` with ``roc_mgdl_min`` (float) and ``trend_arrow`` (string, NA = none)."""
    out = frame.copy()
    roc = rate_of_change(frame, config=config)
    out[ROC_COLUMN] = roc
    out[ARROW_COLUMN] = pd.array(arrows_for_rates(roc), dtype="string")
    out.attrs = dict(frame.attrs)
    return out
