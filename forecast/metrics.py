"""Forecast accuracy: RMSE, MAE, MARD, Clarke and Parkes error grids, time lag, intervals.

Every function here scores *real* readings only: a NaN reference (no CGM reading in the slot)
is skipped, never filled. A missing (non-finite) *prediction* where a reference exists is a
model failure and raises `MetricError`, so a broken forecaster can never look accurate by
producing NaN on the hard cases.

Definitions used
----------------
- RMSE, MAE in mg/dL; MARD = mean(|pred - ref| / ref) x 100 (%), the usual CGM definition.
- Clarke error grid: Clarke WL, Cox D, Gonder-Frederick LA, Carter W, Pohl SL. "Evaluating
  clinical accuracy of systems for self-monitoring of blood glucose." Diabetes Care
  1987;10(5):622-628. Zone lines (x = reference, y = prediction, mg/dL), all inclusive:
  A: y within 20 % of x, or both x <= 70 and y <= 70;
  E: (x >= 180 and y <= 70) or (x <= 70 and y >= 180);
  C: (70 <= x <= 290 and y >= x + 110) or (130 <= x <= 180 and y <= 7/5 x - 182);
  D: (x >= 240 and 70 <= y <= 180) or (x <= 175/3 and 70 <= y <= 180)
     or (175/3 <= x <= 70 and y >= 6/5 x);
  B: everything else. Zones are tested in the order A, E, C, D (the first match wins), so a
  point on a line shared by two zones goes to the one tested first, e.g. (70, 84) is A and
  (50, 180) is E.
- Parkes (consensus) error grid: Parkes JL, Slatin SL, Pardo S, Ginsberg BH. "A new consensus
  error grid to evaluate the clinical significance of inaccuracies in the measurement of blood
  glucose." Diabetes Care 2000;23(8):1143-1148; vertices as published in Pfützner A, Klonoff
  DC, Pardo S, Parkes JL. "Technical aspects of the Parkes error grid." J Diabetes Sci Technol
  2013;7(5):1275-1281 (Table 1). Each zone border is an x-monotone polyline; past the last
  published vertex it continues with the slope of its last segment (as the CRAN package `ega`
  does). A point on a border belongs to the inner (less severe) zone.
- Interval coverage: share (%) of references with lo <= ref <= hi; width: mean(hi - lo).
- Time lag: see `time_lag_min`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from forecast.schema import GlucastError

ZONES: tuple[str, ...] = ("A", "B", "C", "D", "E")


class MetricError(GlucastError, ValueError):
    """Inputs to a metric are inconsistent (shapes, missing predictions, bad quantiles)."""


# --------------------------------------------------------------------------- helpers


def _as_float(x: Any, name: str) -> np.ndarray:
    try:
        return np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise MetricError(f"{name} must be numeric (mg/dL): {e}") from e


def _pairs(ref: Any, pred: Any) -> tuple[np.ndarray, np.ndarray]:
    """Flattened (ref, pred) at real readings; raise where a reading has no prediction."""
    r = _as_float(ref, "ref")
    p = _as_float(pred, "pred")
    if r.shape != p.shape:
        raise MetricError(
            f"ref and pred must have the same shape, got {r.shape} and {p.shape}; "
            "pass the median column of a quantile forecast, not the whole [N,H,Q] array"
        )
    r = r.ravel()
    p = p.ravel()
    keep = np.isfinite(r)
    bad = keep & ~np.isfinite(p)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise MetricError(
            f"{int(bad.sum())} prediction(s) are not finite where a reference reading exists "
            f"(first at flat index {i}: pred={p[i]!r}, ref={r[i]!r}); fix the forecaster, "
            "metrics never skip a real reading"
        )
    return r[keep], p[keep]


def json_safe(obj: Any) -> Any:
    """Copy of `obj` with non-finite floats replaced by None and numpy scalars made Python.

    `json.dumps(..., allow_nan=False)` (what `forecast.cli.emit_json` uses) refuses NaN; call
    this on any metric dict before printing it.
    """
    if isinstance(obj, Mapping):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return [json_safe(v) for v in obj.tolist()]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        f = float(obj)
        return f if math.isfinite(f) else None
    return obj


# --------------------------------------------------------------------------- point errors


def rmse(ref: Any, pred: Any) -> float:
    """Root mean squared error (mg/dL) over real readings; NaN when there are none."""
    r, p = _pairs(ref, pred)
    if r.size == 0:
        return math.nan
    return float(np.sqrt(np.mean((p - r) ** 2)))


def mae(ref: Any, pred: Any) -> float:
    """Mean absolute error (mg/dL) over real readings; NaN when there are none."""
    r, p = _pairs(ref, pred)
    if r.size == 0:
        return math.nan
    return float(np.mean(np.abs(p - r)))


def mard(ref: Any, pred: Any) -> float:
    """Mean absolute relative difference in %: mean(|pred - ref| / ref) x 100."""
    r, p = _pairs(ref, pred)
    if r.size == 0:
        return math.nan
    if (r <= 0).any():
        raise MetricError(
            f"MARD needs positive reference glucose, got {r[r <= 0][0]!r} mg/dL; "
            "references must be in mg/dL (20-600)"
        )
    return float(np.mean(np.abs(p - r) / r) * 100.0)


def bias(ref: Any, pred: Any) -> float:
    """Mean signed error pred - ref (mg/dL); positive = the forecast reads high."""
    r, p = _pairs(ref, pred)
    if r.size == 0:
        return math.nan
    return float(np.mean(p - r))


def errors_by_range(ref: Any, pred: Any) -> dict[str, dict[str, float | int]]:
    """n, RMSE, MAE, MARD and bias for reference < 70, 70-180 (inclusive) and > 180 mg/dL."""
    r, p = _pairs(ref, pred)
    out: dict[str, dict[str, float | int]] = {}
    masks = {"<70": r < 70.0, "70-180": (r >= 70.0) & (r <= 180.0), ">180": r > 180.0}
    for name, m in masks.items():
        rr, pp = r[m], p[m]
        out[name] = {
            "n": int(m.sum()),
            "rmse": rmse(rr, pp),
            "mae": mae(rr, pp),
            "mard": mard(rr, pp),
            "bias": bias(rr, pp),
        }
    return out


# --------------------------------------------------------------------------- error grids


def _zone_array(ref: Any, pred: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Broadcast ref/pred; the mask of finite pairs; an output array of "" zones."""
    r = _as_float(ref, "ref")
    p = _as_float(pred, "pred")
    try:
        r, p = np.broadcast_arrays(r, p)
    except ValueError as e:
        raise MetricError(f"ref and pred shapes {r.shape} and {p.shape} do not match") from e
    valid = np.isfinite(r) & np.isfinite(p)
    out = np.full(r.shape, "", dtype="<U1")
    return r, p, valid, out


def clarke_zones(ref: Any, pred: Any) -> np.ndarray:
    """Clarke (1987) error-grid zone per pair: an array of "A".."E" ("" where either is NaN).

    Vectorised; see the module docstring for the exact (inclusive) zone lines.
    """
    r, p, valid, out = _zone_array(ref, pred)
    with np.errstate(invalid="ignore"):
        a = ((r <= 70) & (p <= 70)) | ((p <= 1.2 * r) & (p >= 0.8 * r))
        e = ((r >= 180) & (p <= 70)) | ((r <= 70) & (p >= 180))
        c = ((r >= 70) & (r <= 290) & (p >= r + 110)) | (
            (r >= 130) & (r <= 180) & (p <= 7.0 / 5.0 * r - 182.0)
        )
        d = (
            ((r >= 240) & (p >= 70) & (p <= 180))
            | ((r <= 175.0 / 3.0) & (p >= 70) & (p <= 180))
            | ((r >= 175.0 / 3.0) & (r <= 70) & (p >= 6.0 / 5.0 * r))
        )
    out[valid] = "B"
    for zone, m in (("D", d), ("C", c), ("E", e), ("A", a)):  # reverse order: first match wins
        out[valid & m] = zone
    return out


# Parkes consensus grid borders (x = reference, y = test, mg/dL), Pfützner et al. 2013 Table 1.
# "upper" borders bound a zone from above (left of the diagonal), "lower" ones from below.
PARKES_BORDERS: dict[int, dict[str, tuple[tuple[float, float], ...]]] = {
    1: {
        "A_upper": ((0, 50), (30, 50), (140, 170), (280, 380), (430, 550)),
        "A_lower": ((50, 0), (50, 30), (170, 145), (385, 300), (550, 450)),
        "B_upper": ((0, 60), (30, 60), (50, 80), (70, 110), (260, 550)),
        "B_lower": ((120, 0), (120, 30), (260, 130), (550, 250)),
        "C_upper": ((0, 100), (25, 100), (50, 125), (80, 215), (125, 550)),
        "C_lower": ((250, 0), (250, 40), (550, 150)),
        "D_upper": ((0, 150), (35, 155), (50, 550)),
    },
    2: {
        "A_upper": ((0, 50), (30, 50), (230, 330), (440, 550)),
        "A_lower": ((50, 0), (50, 30), (90, 80), (330, 230), (550, 450)),
        "B_upper": ((0, 60), (30, 60), (280, 550)),
        "B_lower": ((90, 0), (260, 130), (550, 250)),
        "C_upper": ((0, 80), (25, 80), (35, 90), (125, 550)),
        "C_lower": ((250, 0), (250, 40), (410, 110), (550, 160)),
        "D_upper": ((0, 200), (35, 200), (50, 550)),
    },
}


def _polyline(vertices: Sequence[tuple[float, float]]) -> tuple[np.ndarray, np.ndarray, float]:
    """x, y of an x-monotone border without its leading vertical foot, and the foot's x.

    A lower border such as (50,0)-(50,30)-... starts with a vertical segment: points with
    x <= 50 are never below it. The last segment is extended far to the right.
    """
    v = np.asarray(vertices, dtype=np.float64)
    x0 = v[0, 0]
    if len(v) > 1 and v[1, 0] == v[0, 0]:  # vertical foot
        v = v[1:]
    (xa, ya), (xb, yb) = v[-2], v[-1]
    slope = (yb - ya) / (xb - xa)
    far = 1.0e6
    v = np.vstack([v, [far, yb + slope * (far - xb)]])
    return v[:, 0], v[:, 1], x0


def _above(r: np.ndarray, p: np.ndarray, border: Sequence[tuple[float, float]]) -> np.ndarray:
    x, y, _ = _polyline(border)
    return p > np.interp(r, x, y)


def _below(r: np.ndarray, p: np.ndarray, border: Sequence[tuple[float, float]]) -> np.ndarray:
    x, y, x0 = _polyline(border)
    return (r > x0) & (p < np.interp(r, x, y))


def parkes_zones(ref: Any, pred: Any, diabetes_type: int = 1) -> np.ndarray:
    """Parkes consensus error-grid zone per pair ("A".."E"; "" where either is NaN).

    `diabetes_type` 1 (the default, what glucast evaluates) or 2. Vectorised point-in-region
    tests against the published border polylines (`PARKES_BORDERS`): a pair is in zone B if it
    lies strictly outside the A borders, C if strictly outside the B borders, and so on; on a
    border it stays in the inner zone. Type 1 has no lower E zone.
    """
    if diabetes_type not in PARKES_BORDERS:
        raise MetricError(f"diabetes_type must be 1 or 2, got {diabetes_type!r}")
    borders = PARKES_BORDERS[diabetes_type]
    r, p, valid, out = _zone_array(ref, pred)
    rr = np.where(valid, r, 0.0)
    pp = np.where(valid, p, 0.0)
    out[valid] = "A"
    for inner, outer in (("A", "B"), ("B", "C"), ("C", "D")):
        m = _above(rr, pp, borders[f"{inner}_upper"]) | _below(rr, pp, borders[f"{inner}_lower"])
        out[valid & m] = outer
    out[valid & _above(rr, pp, borders["D_upper"])] = "E"
    return out


def zone_shares(zones: Iterable[str] | np.ndarray) -> dict[str, float]:
    """Share (%) of pairs in each zone A..E; pairs with zone "" (no reading) are skipped.

    All five keys are always present; NaN when no pair was scored.
    """
    z = np.asarray(list(zones) if not isinstance(zones, np.ndarray) else zones).ravel()
    z = z[z != ""]
    n = z.size
    return {k: (float(np.count_nonzero(z == k)) * 100.0 / n if n else math.nan) for k in ZONES}


# --------------------------------------------------------------------------- intervals


def interval_coverage(target: Any, lo: Any, hi: Any) -> float:
    """Share (%) of real readings with lo <= target <= hi; NaN when there are none."""
    t = _as_float(target, "target")
    lo_ = _as_float(lo, "lo")
    hi_ = _as_float(hi, "hi")
    if not (t.shape == lo_.shape == hi_.shape):
        raise MetricError(f"target, lo, hi shapes differ: {t.shape}, {lo_.shape}, {hi_.shape}")
    _pairs(t, lo_)
    _pairs(t, hi_)
    m = np.isfinite(t)
    if not m.any():
        return math.nan
    inside = (lo_[m] <= t[m]) & (t[m] <= hi_[m])
    return float(inside.mean() * 100.0)


def interval_width(target: Any, lo: Any, hi: Any) -> float:
    """Mean width hi - lo (mg/dL) at the real readings of `target`; NaN when there are none."""
    t = _as_float(target, "target")
    lo_, hi_ = _as_float(lo, "lo"), _as_float(hi, "hi")
    if not (t.shape == lo_.shape == hi_.shape):
        raise MetricError(f"target, lo, hi shapes differ: {t.shape}, {lo_.shape}, {hi_.shape}")
    _, w = _pairs(t, hi_ - lo_)
    return float(w.mean()) if w.size else math.nan


# --------------------------------------------------------------------------- time lag


def _ns(times: Any) -> np.ndarray:
    """int64 nanoseconds since the epoch of datetime-like values (naive taken as UTC)."""
    import pandas as pd

    idx = pd.DatetimeIndex(pd.to_datetime(pd.Series(times).reset_index(drop=True), utc=True))
    return idx.as_unit("ns").asi8


def _slot_positions(
    n: int,
    origins: Any = None,
    subject_ids: Any = None,
    slot_minutes: int = 5,
    gap: int = 1,
) -> np.ndarray:
    """Positions on one regular slot axis for each row; subjects are separated by `gap` slots."""
    if origins is None:
        pos = np.arange(n, dtype=np.int64)
        if subject_ids is not None:
            sid = np.asarray(subject_ids)
            if sid.shape != (n,):
                raise MetricError(f"subject_ids has shape {sid.shape}, expected ({n},)")
            # new block at each change of subject: push later blocks `gap` further on
            change = np.r_[False, sid[1:] != sid[:-1]]
            pos = pos + np.cumsum(change) * gap
        return pos
    import pandas as pd

    o = _ns(origins)
    if o.shape[0] != n:
        raise MetricError(f"origins has {o.shape[0]} rows, the forecasts {n}")
    if subject_ids is None:
        codes, n_groups = np.zeros(n, dtype=np.int64), 1
    else:
        sid = np.asarray(subject_ids)
        if sid.shape != (n,):
            raise MetricError(f"subject_ids has shape {sid.shape}, expected ({n},)")
        codes_, uniq = pd.factorize(pd.Series(sid.astype(str)))
        codes, n_groups = np.asarray(codes_, dtype=np.int64), len(uniq)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    slot_ns = int(slot_minutes) * 60 * 10**9
    first = np.full(n_groups, np.iinfo(np.int64).max)
    np.minimum.at(first, codes, o)
    rel = (o - first[codes]) // slot_ns
    span = np.zeros(n_groups, dtype=np.int64)
    np.maximum.at(span, codes, rel)
    offset = np.r_[0, np.cumsum(span + 1 + gap)[:-1]]
    return rel + offset[codes]


def _dot(x: np.ndarray, y: np.ndarray) -> float:
    # einsum's own loop, not BLAS: a threaded BLAS is slow on busy shared cores
    return float(np.einsum("i,i->", x, y))


def _best_shift(ty: np.ndarray, py: np.ndarray, k_max: int, min_pairs: int) -> int | None:
    """The shift k maximising corr(ty[i], py[i + k]) over pairs where both are finite.

    Exact pairwise-complete Pearson correlation for every shift from six dot products of
    zero-filled arrays and their masks (no per-shift masking or copying).
    """
    length = ty.size
    k_max = min(k_max, length - 1)
    ma = np.isfinite(ty).astype(np.float64)
    mb = np.isfinite(py).astype(np.float64)
    if not ma.any() or not mb.any():
        return None
    # centre on the global means: correlation is shift-invariant, cancellation is smaller
    a = np.where(ma > 0, ty - np.nanmean(ty), 0.0)
    b = np.where(mb > 0, py - np.nanmean(py), 0.0)
    a2, b2 = a * a, b * b
    best_k, best_c = None, -math.inf
    for k in sorted(range(-k_max, k_max + 1), key=lambda v: (abs(v), v)):
        sa = slice(0, length - k) if k >= 0 else slice(-k, length)
        sb = slice(k, length) if k >= 0 else slice(0, length + k)
        n = _dot(ma[sa], mb[sb])
        if n < max(min_pairs, 2):
            continue
        s_a, s_b = _dot(a[sa], mb[sb]), _dot(ma[sa], b[sb])
        s_aa, s_bb = _dot(a2[sa], mb[sb]), _dot(ma[sa], b2[sb])
        s_ab = _dot(a[sa], b[sb])
        cov = s_ab - s_a * s_b / n
        var_a, var_b = s_aa - s_a * s_a / n, s_bb - s_b * s_b / n
        if var_a <= 1e-9 * max(s_aa, 1e-300) or var_b <= 1e-9 * max(s_bb, 1e-300):
            continue
        c = cov / math.sqrt(var_a * var_b)
        if c > best_c + 1e-12:
            best_k, best_c = k, c
    return best_k


def _lag_on_grid(
    t: np.ndarray, p: np.ndarray, pos: np.ndarray, k_max: int, min_pairs: int
) -> int | None:
    if pos.size == 0:
        return None
    length = int(pos.max()) + 1
    ty = np.full(length, np.nan)
    py = np.full(length, np.nan)
    ty[pos] = t
    py[pos] = p  # forecasts exist even where no reading does
    py[~np.isfinite(py)] = np.nan
    return _best_shift(ty, py, k_max, min_pairs)


def time_lag_min(
    target: Any,
    pred: Any,
    slot_minutes: int = 5,
    *,
    max_lag_slots: int | None = None,
    origins: Any = None,
    subject_ids: Any = None,
    min_pairs: int = 3,
) -> float:
    """Delay (minutes) of a forecast series behind its reference series.

    Definition: with ``y[i]`` the reference and ``yhat[i]`` the forecast for one horizon at
    consecutive forecast origins i (one slot apart), the lag is ``k x slot_minutes`` for the
    shift ``k`` in ``[-max_lag_slots, max_lag_slots]`` (default 24 slots) that maximises the
    Pearson correlation of ``y[i]`` with ``yhat[i + k]`` over the i where both exist. A
    perfect forecast has lag 0; the persistence forecast at horizon h has lag h (it repeats
    the reading h minutes late). Ties go to the smallest |k|. NaN when no shift has
    `min_pairs` finite pairs.

    Without `origins`, rows are taken to be consecutive slots (stride-1 windows); with
    `origins` (datetime64, the forecast origins) rows are placed on the slot grid, so skipped
    windows leave holes instead of shortening time. `subject_ids` keeps subjects apart.
    """
    t = _as_float(target, "target").ravel()
    p = _as_float(pred, "pred").ravel()
    if t.shape != p.shape:
        raise MetricError(f"target and pred shapes differ: {t.shape} vs {p.shape}")
    _pairs(t, p)
    k_max = 24 if max_lag_slots is None else int(max_lag_slots)
    if k_max < 0:
        raise MetricError(f"max_lag_slots must be >= 0, got {max_lag_slots}")
    pos = _slot_positions(t.size, origins, subject_ids, slot_minutes, gap=k_max + 1)
    k = _lag_on_grid(t, p, pos, k_max, min_pairs)
    return math.nan if k is None else float(k * slot_minutes)


# --------------------------------------------------------------------------- the report


def _lag_minutes(t: np.ndarray, p: np.ndarray, pos: np.ndarray, k_max: int, slot: int) -> float:
    k = _lag_on_grid(t, p, pos, k_max, 3)
    return math.nan if k is None else float(k * slot)


def median_index(quantiles: Sequence[float]) -> int:
    """Index of the quantile nearest 0.5 (the point forecast of a quantile model)."""
    q = np.asarray(quantiles, dtype=np.float64)
    if q.ndim != 1 or q.size == 0:
        raise MetricError(f"quantiles must be a non-empty 1-D sequence, got {quantiles!r}")
    return int(np.argmin(np.abs(q - 0.5)))


def _check_forecast(
    target: Any, pred: Any, quantiles: Sequence[float] | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    t = _as_float(target, "target")
    p = _as_float(pred, "pred")
    if p.ndim == 2:
        p = p[..., None]
        if quantiles is None:
            quantiles = (0.5,)
    if t.ndim != 2 or p.ndim != 3 or p.shape[:2] != t.shape:
        raise MetricError(
            f"expected target [N,H] and pred [N,H,Q] with the same N and H, got {t.shape} and "
            f"{p.shape}"
        )
    if quantiles is None:
        raise MetricError("pass the quantiles of pred's last axis, e.g. (0.05, 0.5, 0.95)")
    q = np.asarray(quantiles, dtype=np.float64)
    if q.shape != (p.shape[2],):
        raise MetricError(f"{q.size} quantiles given for a pred with Q={p.shape[2]} columns")
    if ((q <= 0) | (q >= 1)).any():
        raise MetricError(f"quantiles must lie strictly between 0 and 1, got {q.tolist()}")
    return t, p, q


def _horizon_slots(horizons: Iterable[int] | None, n_h: int, slot_minutes: int) -> list[int]:
    if horizons is None:
        return list(range(n_h))
    out = []
    for h in horizons:
        h = int(h)
        if h <= 0 or h % slot_minutes or h // slot_minutes > n_h:
            raise MetricError(
                f"horizon {h} min is not a multiple of the {slot_minutes}-min slot within "
                f"{slot_minutes}..{n_h * slot_minutes} min"
            )
        out.append(h // slot_minutes - 1)
    return out


def evaluate_forecast(
    target: Any,
    pred: Any,
    quantiles: Sequence[float] | None,
    slot_minutes: int = 5,
    horizons: Iterable[int] | None = None,
    *,
    origins: Any = None,
    subject_ids: Any = None,
) -> dict[str, Any]:
    """Per-horizon accuracy of a quantile forecast, the report `glucast evaluate` prints.

    target [N,H] mg/dL (NaN where no real reading: skipped), pred [N,H,Q] (or [N,H] for a
    point forecast), `quantiles` the Q levels. Horizon index j is ``(j+1) x slot_minutes``
    minutes ahead; `horizons` (minutes) picks a subset. The median column (quantile nearest
    0.5) is the point forecast; the outermost quantiles form the interval. `origins` and
    `subject_ids` (per row) place rows on the time axis for the lag; without them rows are
    taken to be consecutive stride-1 windows.

    Returns ``{"horizons": {"30": {"rmse", "mae", "mard", "bias", "clarke": {A..E %},
    "parkes": {A..E %}, "coverage" (%), "width" (mg/dL), "n", "lag_min",
    "by_range": {"<70"|"70-180"|">180": {n, rmse, mae, mard, bias}}}, ...}, "quantiles",
    "interval", "slot_minutes"}``. Undefined values (no readings) are None, so the dict is
    JSON-ready.
    """
    t, p, q = _check_forecast(target, pred, quantiles)
    n_h = t.shape[1]
    mi = median_index(q)
    lo_i, hi_i = int(np.argmin(q)), int(np.argmax(q))
    has_interval = lo_i != hi_i
    out: dict[str, Any] = {}
    slots = _horizon_slots(horizons, n_h, slot_minutes)

    def lag_slots(j: int) -> int:  # search up to twice the horizon, at least an hour
        return max(60 // slot_minutes, 2 * (j + 1))

    gap = max(lag_slots(j) for j in slots) + 1 if slots else 1
    pos = _slot_positions(t.shape[0], origins, subject_ids, slot_minutes, gap=gap)
    for j in slots:
        tj, pj = t[:, j], p[:, j, mi]
        r, pp = _pairs(tj, pj)
        entry: dict[str, Any] = {
            "n": int(r.size),
            "rmse": rmse(r, pp),
            "mae": mae(r, pp),
            "mard": mard(r, pp),
            "bias": bias(r, pp),
            "clarke": zone_shares(clarke_zones(r, pp)),
            "parkes": zone_shares(parkes_zones(r, pp)),
            "coverage": interval_coverage(tj, p[:, j, lo_i], p[:, j, hi_i])
            if has_interval
            else math.nan,
            "width": interval_width(tj, p[:, j, lo_i], p[:, j, hi_i]) if has_interval else math.nan,
            "lag_min": _lag_minutes(tj, pj, pos, lag_slots(j), slot_minutes),
            "by_range": errors_by_range(r, pp),
        }
        out[str((j + 1) * slot_minutes)] = entry
    return json_safe(
        {
            "horizons": out,
            "quantiles": q.tolist(),
            "median_quantile": float(q[mi]),
            "interval": [float(q[lo_i]), float(q[hi_i])] if has_interval else None,
            "slot_minutes": int(slot_minutes),
        }
    )


#: The rules `bglp_scores` implements (printed with the scores).
BGLP_RULES = (
    "OhioT1DM Blood Glucose Level Prediction (BGLP) challenge, KDH@IJCAI 2018 and KDH@ECAI "
    "2020: (1) horizons 30 and 60 min; (2) a prediction is scored only at test time points "
    "where the target CGM reading exists in the data (no interpolated ground truth); "
    "(3) every such point must have a prediction (a missing one is an error, not skipped); "
    "(4) predictions may use only data up to their origin (guaranteed by forecast.windows); "
    "(5) RMSE and MAE in mg/dL per patient; the overall score is the mean over patients of "
    "the per-patient scores (as in the challenge's result tables), pooled values given too."
)


def bglp_scores(
    target: Any,
    pred: Any,
    quantiles: Sequence[float] | None = None,
    *,
    subject_ids: Any = None,
    slot_minutes: int = 5,
    horizons_min: Sequence[int] = (30, 60),
) -> dict[str, Any]:
    """RMSE and MAE at 30 and 60 min under the OhioT1DM BGLP challenge rules (`BGLP_RULES`).

    target [N,H], pred [N,H,Q] (with `quantiles`; the median column is scored) or [N,H].
    Returns ``{"30": {"rmse", "mae", "n", "rmse_pooled", "mae_pooled"}, "60": {...},
    "subjects": {id: {"30": {"rmse", "mae", "n"}, ...}}, "rules": BGLP_RULES}``.
    """
    t, p, q = _check_forecast(target, pred, quantiles)
    mi = median_index(q)
    sid = (
        np.full(t.shape[0], "all", dtype=object)
        if subject_ids is None
        else np.asarray(subject_ids).astype(str)
    )
    if sid.shape != (t.shape[0],):
        raise MetricError(f"subject_ids has shape {sid.shape}, expected ({t.shape[0]},)")
    subjects = sorted(set(sid.tolist()))
    out: dict[str, Any] = {"subjects": {s: {} for s in subjects}, "rules": BGLP_RULES}
    for j in _horizon_slots(horizons_min, t.shape[1], slot_minutes):
        key = str((j + 1) * slot_minutes)
        tj, pj = t[:, j], p[:, j, mi]
        per_rmse, per_mae = [], []
        for s in subjects:
            m = sid == s
            r, pp = _pairs(tj[m], pj[m])
            sr, sm = rmse(r, pp), mae(r, pp)
            out["subjects"][s][key] = {"rmse": sr, "mae": sm, "n": int(r.size)}
            if r.size:
                per_rmse.append(sr)
                per_mae.append(sm)
        r, pp = _pairs(tj, pj)
        out[key] = {
            "rmse": float(np.mean(per_rmse)) if per_rmse else math.nan,
            "mae": float(np.mean(per_mae)) if per_mae else math.nan,
            "n": int(r.size),
            "rmse_pooled": rmse(r, pp),
            "mae_pooled": mae(r, pp),
        }
    return json_safe(out)


__all__ = [
    "BGLP_RULES",
    "PARKES_BORDERS",
    "ZONES",
    "MetricError",
    "bglp_scores",
    "bias",
    "clarke_zones",
    "errors_by_range",
    "evaluate_forecast",
    "interval_coverage",
    "interval_width",
    "json_safe",
    "mae",
    "mard",
    "median_index",
    "parkes_zones",
    "rmse",
    "time_lag_min",
    "zone_shares",
]
