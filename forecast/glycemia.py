"""Glycaemic outcomes: TIR/TBR/TAR, mean, SD, CV, GMI, LBGI/HBGI, coverage, CVGA, AGP.

Definitions used
----------------
- Ranges (Battelino T et al., "Clinical targets for CGM data interpretation: recommendations
  from the international consensus on time in range", Diabetes Care 2019;42:1593-1603):
  TIR = 70 <= BG <= 180, TBR70 = BG < 70 (includes < 54), TBR54 = BG < 54,
  TAR180 = BG > 180 (includes > 250), TAR250 = BG > 250; in percent, so
  TBR70 + TIR + TAR180 = 100.
- SD is the sample SD (ddof = 1); CV = 100 x SD / mean (%).
- GMI (%) = 3.31 + 0.02392 x mean glucose in mg/dL (Bergenstal RM et al., Diabetes Care
  2018;41:2275-2280).
- LBGI/HBGI (Kovatchev BP et al., Diabetes Care 1997;20:1655-1658 and 1998;21:1870-1875):
  f(BG) = 1.509 x ((ln BG)^1.084 - 5.381), BG in mg/dL; r(BG) = 10 f^2; rl = r where f < 0
  else 0, rh = r where f > 0 else 0; LBGI = mean(rl), HBGI = mean(rh) over ALL readings (a
  reading on the other side of 112.5 mg/dL contributes 0). f(112.5) ~ 0 and r(20) ~ r(600)
  ~ 100: the transform makes the glucose scale symmetric.
- CGM coverage = readings / expected readings x 100 (%).
- CVGA: Magni L et al., "Model predictive control of type 1 diabetes: an in silico trial",
  J Diabetes Sci Technol 2007;1(6):804-812, and Magni L et al., "Evaluating the efficacy of
  closed-loop glucose regulation via control-variability grid analysis", J Diabetes Sci
  Technol 2008;2(4):630-635. x = minimum BG (axis reversed, 110 -> 50 mg/dL), y = maximum BG
  (110 -> 400 mg/dL); lines at min 90 and 70, max 180 and 300 (see `cvga_zone`).
- AGP: percentiles 5/25/50/75/95 of glucose per time-of-day bin in the subject's local time
  (Bergenstal RM et al., "Recommendations for standardizing glucose reporting and analysis
  to optimize clinical decision making in diabetes: the Ambulatory Glucose Profile",
  J Diabetes Sci Technol 2013;7(2):562-578).

Time weighting
--------------
The frame has one row per 5-minute slot and glucose only where a real reading landed; gaps
are never filled. By default every reading counts once, which is the consensus practice and
equals the share of *time* whenever sampling is uniform (a 5-min or a 15-min CGM alike).
With ``time_weighted=True`` (`outcomes_frame`) or explicit ``weights`` (`outcomes`), each
reading stands for the time until the subject's next reading, capped at `max_gap_min`
(default 15 min), so a frame mixing 5-min and 15-min sensors weighs each by time, and a
long gap counts for at most `max_gap_min` instead of being interpolated.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal

import numpy as np
import pandas as pd

from forecast.schema import SLOT_MINUTES, GlucastError, SchemaError, get_meta

OUTCOME_KEYS: tuple[str, ...] = (
    "mean",
    "sd",
    "cv",
    "gmi",
    "tir",
    "tbr70",
    "tbr54",
    "tar180",
    "tar250",
    "lbgi",
    "hbgi",
    "coverage",
    "n",
)

AGP_PERCENTILES: tuple[float, ...] = (5.0, 25.0, 50.0, 75.0, 95.0)


class GlycemiaError(GlucastError, ValueError):
    """Inputs to an outcome metric are unusable (wrong shape, units, missing columns)."""


# --------------------------------------------------------------------------- risk


def risk_transform(glucose: Any) -> np.ndarray:
    """Kovatchev's symmetrising transform f(BG) = 1.509 ((ln BG)^1.084 - 5.381), BG mg/dL."""
    g = np.asarray(glucose, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return 1.509 * (np.log(g) ** 1.084 - 5.381)


def risk(glucose: Any) -> np.ndarray:
    """Kovatchev risk r(BG) = 10 f(BG)^2 (0 at 112.5 mg/dL, ~100 at 20 and at 600 mg/dL)."""
    return 10.0 * risk_transform(glucose) ** 2


# --------------------------------------------------------------------------- outcomes


def _glucose_array(glucose: Any) -> np.ndarray:
    try:
        g = np.asarray(glucose, dtype=np.float64).ravel()
    except (TypeError, ValueError) as e:
        raise GlycemiaError(f"glucose must be numeric mg/dL values: {e}") from e
    if np.isinf(g).any():
        raise GlycemiaError("glucose has infinite values; use NaN for a missing reading")
    fin = g[np.isfinite(g)]
    if fin.size and (fin <= 0).any():
        raise GlycemiaError(
            f"glucose {fin[fin <= 0][0]!r} is not positive; values must be mg/dL readings"
        )
    if fin.size and np.median(fin) < 20.0:
        raise GlycemiaError(
            f"median glucose {np.median(fin):g} is below 20: these look like mmol/L values. "
            "Convert to mg/dL (x 18.0182) first"
        )
    return g


def outcomes(
    glucose: Any,
    expected_slots: float | None = None,
    *,
    weights: Any = None,
) -> dict[str, float]:
    """Glycaemic outcomes of one glucose series (mg/dL; NaN = no reading, skipped).

    Returns mean, sd, cv (%), gmi (%), tir, tbr70, tbr54, tar180, tar250 (% of readings, or of
    weight with `weights`), lbgi, hbgi, coverage (% = n / expected_slots x 100, NaN without
    `expected_slots`) and n (readings). Undefined values are NaN (see
    `forecast.metrics.json_safe` before printing JSON). `weights` (same shape as glucose,
    e.g. minutes each reading stands for) make every statistic time-weighted.
    """
    g = _glucose_array(glucose)
    if weights is None:
        w = np.ones_like(g)
    else:
        w = np.asarray(weights, dtype=np.float64).ravel()
        if w.shape != g.shape:
            raise GlycemiaError(f"weights has shape {w.shape}, glucose {g.shape}")
        if (w[np.isfinite(w)] < 0).any():
            raise GlycemiaError("weights must be non-negative")
    m = np.isfinite(g) & np.isfinite(w)
    g, w = g[m], w[m]
    n = int(g.size)
    out: dict[str, float] = dict.fromkeys(OUTCOME_KEYS, math.nan)
    out["n"] = n
    if expected_slots is not None:
        if expected_slots < 0:
            raise GlycemiaError(f"expected_slots must be >= 0, got {expected_slots}")
        out["coverage"] = 100.0 * n / expected_slots if expected_slots > 0 else math.nan
    wsum = float(w.sum())
    if n == 0 or wsum <= 0:
        return out

    def share(mask: np.ndarray) -> float:
        return float(w[mask].sum() / wsum * 100.0)

    mean = float((w * g).sum() / wsum)
    out["mean"] = mean
    if n > 1:
        # weighted sample variance with "frequency weights" normalised to n readings
        var = float((w * (g - mean) ** 2).sum() / wsum) * n / (n - 1)
        out["sd"] = math.sqrt(var)
        out["cv"] = 100.0 * out["sd"] / mean
    out["gmi"] = 3.31 + 0.02392 * mean
    out["tir"] = share((g >= 70.0) & (g <= 180.0))
    out["tbr70"] = share(g < 70.0)
    out["tbr54"] = share(g < 54.0)
    out["tar180"] = share(g > 180.0)
    out["tar250"] = share(g > 250.0)
    f = risk_transform(g)
    r = 10.0 * f**2
    out["lbgi"] = float((w * np.where(f < 0, r, 0.0)).sum() / wsum)
    out["hbgi"] = float((w * np.where(f > 0, r, 0.0)).sum() / wsum)
    return out


def _check_frame(frame: pd.DataFrame, need: tuple[str, ...] = ("subject_id", "time", "glucose")):
    if not isinstance(frame, pd.DataFrame):
        raise GlycemiaError(f"expected a canonical glucose frame (DataFrame), got {type(frame)}")
    missing = [c for c in need if c not in frame.columns]
    if missing:
        raise SchemaError(
            f"frame lacks column(s) {missing}; outcomes need {list(need)} (see forecast.schema)"
        )


def _local_times(frame: pd.DataFrame, timezone: str | None = None) -> pd.Series:
    tz = timezone or get_meta(frame).timezone or "UTC"
    t = pd.to_datetime(frame["time"], utc=True)
    try:
        return t.dt.tz_convert(tz)
    except Exception as e:  # unknown zone name
        raise GlycemiaError(
            f"unknown time zone {tz!r} in the frame metadata; set DatasetMeta.timezone to an "
            "IANA name such as 'Europe/Paris'"
        ) from e


def _ns(times: Any) -> np.ndarray:
    """int64 nanoseconds since the epoch (UTC) of any datetime-like 1-D input."""
    idx = pd.DatetimeIndex(pd.to_datetime(pd.Series(times).reset_index(drop=True), utc=True))
    return idx.as_unit("ns").asi8


def reading_weights(
    times: Any, glucose: Any, subject_ids: Any = None, *, max_gap_min: float = 15.0
) -> np.ndarray:
    """Minutes each reading stands for: time to the subject's next reading, capped.

    Rows without a reading get 0; the last reading of a subject gets the median of its other
    weights (or `max_gap_min` if it is alone). Used for time-weighted outcomes.
    """
    t = _ns(times)
    g = np.asarray(glucose, dtype=np.float64)
    sid = (
        np.zeros(g.size, dtype=np.int64)
        if subject_ids is None
        else pd.factorize(pd.Series(np.asarray(subject_ids)))[0]
    )
    w = np.zeros(g.size)
    has = np.flatnonzero(np.isfinite(g))
    if has.size == 0:
        return w
    order = has[np.lexsort((t[has], sid[has]))]
    gaps = np.diff(t[order]) / 6.0e10  # ns -> minutes
    same = sid[order][1:] == sid[order][:-1]
    ww = np.full(order.size, np.nan)
    ww[:-1] = np.where(same, np.minimum(gaps, max_gap_min), np.nan)
    # last reading of each subject: median of the subject's other weights
    for s in np.unique(sid[order]):
        m = sid[order] == s
        sub = ww[m]
        fill = np.nanmedian(sub) if np.isfinite(sub).any() else max_gap_min
        sub[~np.isfinite(sub)] = fill
        ww[m] = sub
    w[order] = ww
    return w


def _expected_by_group(
    frame: pd.DataFrame, local: pd.Series, by: str | None, sampling_minutes: float
) -> pd.Series:
    """Expected readings per group: 5-min slots from each subject's first to last row."""
    parts = []
    for sid, t in local.groupby(frame["subject_id"].astype(str).to_numpy(), sort=False):
        grid = pd.date_range(t.min(), t.max(), freq=f"{SLOT_MINUTES}min")
        if by == "day":
            days = pd.Series(grid.date)
            counts = days.value_counts()
            for d, c in counts.items():
                parts.append(((sid, d), c))
        elif by == "subject":
            parts.append((sid, len(grid)))
        else:
            parts.append(("all", len(grid)))
    ratio = SLOT_MINUTES / float(sampling_minutes)
    s: dict[Any, float] = {}
    for k, c in parts:
        s[k] = s.get(k, 0.0) + c * ratio
    return pd.Series(s, dtype=float)


def outcomes_frame(
    frame: pd.DataFrame,
    by: Literal["subject", "day"] | None = "subject",
    *,
    time_weighted: bool = False,
    max_gap_min: float = 15.0,
    timezone: str | None = None,
) -> pd.DataFrame:
    """`outcomes` over a canonical frame, per subject, per subject-day, or for the whole frame.

    by="subject": one row per subject_id (index ``subject_id``); by="day": one row per
    (subject_id, local calendar day) where the day is taken in the frame's local time zone
    (`forecast.schema.get_meta(frame).timezone`, or `timezone`); by=None: one row ``all``.
    Coverage compares the readings with the expected readings: the 5-minute slots from each
    subject's first to last row, scaled by the device's sampling period
    (`DatasetMeta.sampling_minutes`, so a 15-min CGM with every reading scores 100 %).
    Columns: `OUTCOME_KEYS` plus ``expected``.
    """
    _check_frame(frame)
    if by not in ("subject", "day", None):
        raise GlycemiaError(f'by must be "subject", "day" or None, got {by!r}')
    meta = get_meta(frame)
    sampling = float(meta.sampling_minutes or SLOT_MINUTES)
    if sampling <= 0:
        raise GlycemiaError(f"DatasetMeta.sampling_minutes must be > 0, got {sampling}")
    if len(frame) == 0:
        return pd.DataFrame(columns=[*OUTCOME_KEYS, "expected"])
    local = _local_times(frame, timezone)
    g = frame["glucose"].to_numpy(dtype=np.float64)
    sid = frame["subject_id"].astype(str).to_numpy()
    w = (
        reading_weights(frame["time"], g, sid, max_gap_min=max_gap_min)
        if time_weighted
        else np.ones(g.size)
    )
    expected = _expected_by_group(frame, local, by, sampling)
    if by == "subject":
        keys = pd.Series(sid)
    elif by == "day":
        keys = pd.Series(list(zip(sid, local.dt.date.to_numpy(), strict=True)))
    else:
        keys = pd.Series(["all"] * len(frame))
    rows = {}
    for key, idx in keys.groupby(keys, sort=True).indices.items():
        exp = float(expected.get(key, np.nan))
        res = outcomes(g[idx], exp if np.isfinite(exp) else None, weights=w[idx])
        res["expected"] = exp
        rows[key] = res
    out = pd.DataFrame.from_dict(rows, orient="index")[[*OUTCOME_KEYS, "expected"]]
    if by == "day":
        out.index = pd.MultiIndex.from_tuples(out.index, names=["subject_id", "day"])
    else:
        out.index.name = "subject_id" if by == "subject" else None
    out["n"] = out["n"].astype(int)
    return out


# --------------------------------------------------------------------------- CVGA

#: CVGA detailed zone per (min-BG column, max-BG row); columns: min > 90, 70..90, < 70;
#: rows: max < 180, 180..300, > 300 (Magni 2007/2008).
CVGA_ZONES: tuple[tuple[str, str, str], ...] = (
    ("A", "Lower B", "Lower C"),
    ("Upper B", "B", "Lower D"),
    ("Upper C", "Upper D", "E"),
)


def cvga_zone(min_bg: Any, max_bg: Any) -> tuple[np.ndarray, np.ndarray]:
    """CVGA zone letter ("A".."E") and detailed name ("Lower B", ...) per (min, max) pair.

    Columns by minimum BG: > 90, 70-90 (inclusive), < 70 mg/dL; rows by maximum BG: < 180,
    180-300 (inclusive), > 300 mg/dL. A point on a line falls in the worse zone.
    """
    lo = np.asarray(min_bg, dtype=np.float64)
    hi = np.asarray(max_bg, dtype=np.float64)
    col = np.where(lo > 90, 0, np.where(lo >= 70, 1, 2))
    row = np.where(hi < 180, 0, np.where(hi <= 300, 1, 2))
    table = np.array(CVGA_ZONES, dtype=object)
    detail = table[row, col].astype(str)
    detail = np.where(np.isfinite(lo) & np.isfinite(hi), detail, "")
    letter = np.array([d[-1] if d else "" for d in detail.ravel()], dtype="<U1").reshape(
        detail.shape
    )
    return letter, detail


def cvga(
    glucose_by_subject: Mapping[str, Any] | pd.DataFrame | np.ndarray,
    *,
    percentiles: tuple[float, float] = (0.0, 100.0),
) -> pd.DataFrame:
    """Control-variability grid analysis: per subject min and max BG and its CVGA zone.

    `glucose_by_subject`: a mapping id -> glucose array, a canonical frame (grouped by
    subject_id), or an array [N, T] (one row per subject, ids 0..N-1). `percentiles` replace
    the extremes (Magni 2008 uses the 2.5th and 97.5th to damp sensor outliers; the default
    (0, 100) is the plain min and max). Returns a DataFrame indexed by subject with columns
    min, max, zone ("A".."E"), zone_detail ("Lower B"...), x, y (plot coordinates clipped to
    the grid: x in [50, 110], y in [110, 400]).
    """
    if isinstance(glucose_by_subject, pd.DataFrame):
        _check_frame(glucose_by_subject, ("subject_id", "glucose"))
        f = glucose_by_subject
        series = {
            str(k): v.to_numpy(dtype=np.float64)
            for k, v in f.groupby(f["subject_id"].astype(str), sort=True)["glucose"]
        }
    elif isinstance(glucose_by_subject, Mapping):
        series = {str(k): np.asarray(v, dtype=np.float64) for k, v in glucose_by_subject.items()}
    else:
        arr = np.asarray(glucose_by_subject, dtype=np.float64)
        if arr.ndim != 2:
            raise GlycemiaError(f"expected glucose [N subjects, T], got shape {arr.shape}")
        series = {str(i): arr[i] for i in range(arr.shape[0])}
    lo_p, hi_p = percentiles
    if not 0.0 <= lo_p < hi_p <= 100.0:
        raise GlycemiaError(f"percentiles must satisfy 0 <= low < high <= 100, got {percentiles}")
    rows = {}
    for k, g in series.items():
        g = _glucose_array(g)
        g = g[np.isfinite(g)]
        if g.size == 0:
            rows[k] = (math.nan, math.nan)
        else:
            rows[k] = (float(np.percentile(g, lo_p)), float(np.percentile(g, hi_p)))
    out = pd.DataFrame.from_dict(rows, orient="index", columns=["min", "max"])
    out.index.name = "subject_id"
    letter, detail = cvga_zone(out["min"].to_numpy(), out["max"].to_numpy())
    out["zone"] = letter
    out["zone_detail"] = detail
    out["x"] = out["min"].clip(50.0, 110.0)
    out["y"] = out["max"].clip(110.0, 400.0)
    return out


def cvga_shares(table: pd.DataFrame) -> dict[str, float]:
    """Share (%) of subjects in each CVGA zone A..E (subjects without readings skipped)."""
    z = table["zone"].to_numpy()
    z = z[z != ""]
    n = z.size
    return {k: (100.0 * float((z == k).sum()) / n if n else math.nan) for k in "ABCDE"}


# --------------------------------------------------------------------------- AGP


def agp(
    data: pd.DataFrame | Any,
    times: Any = None,
    *,
    bin_minutes: int = 15,
    percentiles: tuple[float, ...] = AGP_PERCENTILES,
    timezone: str | None = None,
) -> pd.DataFrame:
    """Ambulatory glucose profile: glucose percentiles per time-of-day bin (local time).

    `data` is a canonical frame (local time from its `DatasetMeta.timezone`, or `timezone`;
    all subjects pooled — subset the frame for one subject's AGP) or a glucose array with
    `times` (datetime-like, tz-aware taken to `timezone`, naive taken as local already).
    Readings only (NaN skipped), each reading counted once. Returns a DataFrame indexed by
    the bin's start in minutes after local midnight (0, 15, ...; every bin present) with
    columns p5, p25, p50, p75, p95 (named after `percentiles`) and n; NaN in bins without
    readings.
    """
    if bin_minutes <= 0 or 1440 % bin_minutes:
        raise GlycemiaError(f"bin_minutes must divide 1440 (a day), got {bin_minutes}")
    if isinstance(data, pd.DataFrame):
        _check_frame(data, ("time", "glucose"))
        local = _local_times(data, timezone)
        g = data["glucose"].to_numpy(dtype=np.float64)
    else:
        if times is None:
            raise GlycemiaError("pass `times` with a glucose array (or pass a glucose frame)")
        g = np.asarray(data, dtype=np.float64).ravel()
        t = pd.Series(pd.to_datetime(np.asarray(times).ravel()))
        if t.size != g.size:
            raise GlycemiaError(f"{t.size} times for {g.size} glucose values")
        if t.dt.tz is not None:
            t = t.dt.tz_convert(timezone or "UTC")
        local = t
    g = _glucose_array(g)
    minute = (local.dt.hour * 60 + local.dt.minute).to_numpy()
    b = (minute // bin_minutes) * bin_minutes
    m = np.isfinite(g)
    df = pd.DataFrame({"bin": b[m], "g": g[m]})
    names = [f"p{p:g}" for p in percentiles]
    grp = df.groupby("bin")["g"]
    res = pd.DataFrame(
        {name: grp.quantile(p / 100.0) for name, p in zip(names, percentiles, strict=True)}
    )
    res["n"] = grp.size()
    res = res.reindex(np.arange(0, 1440, bin_minutes))
    res["n"] = res["n"].fillna(0).astype(int)
    res.index.name = "minute_of_day"
    return res


__all__ = [
    "AGP_PERCENTILES",
    "CVGA_ZONES",
    "OUTCOME_KEYS",
    "GlycemiaError",
    "agp",
    "cvga",
    "cvga_shares",
    "cvga_zone",
    "outcomes",
    "outcomes_frame",
    "reading_weights",
    "risk",
    "risk_transform",
]
