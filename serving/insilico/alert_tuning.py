"""Tuning a predicted-low rule for real people: personal calibration and a rule search.

Two tools, both used on *validation* days only (the test days stay untouched until the rule
is fixed — `benchmarks/alert_real.py` and `glucast alerts evaluate --calibrate`):

* `calibrate_low`: the person's own lower forecast line. On their validation days, for each
  forecast step k, the ``alpha`` quantile of log(real reading / median forecast) over the
  origins where glucose was near a low (below ``near_mgdl``: the calibration is for the
  region where a predicted low matters, not for post-meal peaks whose errors are larger).
  The offsets become `AlertThresholds.predicted_low_log_offsets`: the predicted-low line is
  the median × exp(offset[k]), a split-conformal lower bound at level ``alpha`` (Romano et
  al., NeurIPS 2019, with the model's median as the score's centre; a record with no origin
  below ``near_mgdl`` is calibrated on all its origins). A subject with few
  near-low origins is shrunk towards everybody's offsets (``prior_windows`` pseudo-origins).
* `search_rules` / `choose_rule`: every candidate rule replayed on the same forecasts and
  scored against the same episodes; the chosen one is the most sensitive with at most
  ``max_false_per_day`` false alerts a day and a median lead of at least ``min_lead_min``
  (ties: longer lead, then fewer false alerts). When no rule keeps to both, `choose_rule`
  returns None and the caller says so (nothing is silently substituted).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import pandas as pd

from serving.alerts import AlertThresholds
from serving.insilico.alert_eval import AlertEvalError, ForecastTable, evaluate_table

POOLED = "*"  # key of everybody's offsets in `calibrate_low`'s result


def median_forecast(table: ForecastTable) -> np.ndarray:
    """[N, H] the median column of a forecast table (interpolated if the table lacks 0.5)."""
    q = np.asarray(table.quantiles, dtype=float)
    order = np.argsort(q, kind="stable")
    pos = float(np.interp(0.5, q[order], np.arange(len(q))))
    a = int(pos)
    w = pos - a
    g = table.glucose.astype(float)
    if w == 0.0:
        return g[..., order[a]]
    return (1 - w) * g[..., order[a]] + w * g[..., order[a + 1]]


def future_readings(frame: pd.DataFrame, table: ForecastTable) -> tuple[np.ndarray, np.ndarray]:
    """([N, H] the real readings at each forecast step, NaN where none; [N] the reading at the
    origin) — what each forecast of `table` is checked against."""
    n, h = table.glucose.shape[:2]
    out = np.full((n, h), np.nan)
    now = np.full(n, np.nan)
    step_ns = int(table.slot_minutes * 60e9)
    org = table.origin.astype("datetime64[ns]").astype(np.int64)
    sid = np.asarray(table.subject_id).astype(str)
    for s, sub in frame.groupby("subject_id", sort=False, observed=True):
        rows = np.flatnonzero(sid == str(s))
        if len(rows) == 0:
            continue
        t = pd.DatetimeIndex(sub["time"]).tz_localize(None).as_unit("ns").asi8
        g = sub["glucose"].to_numpy(dtype=float)
        order = np.argsort(t, kind="stable")
        t, g = t[order], g[order]

        o = org[rows]
        now[rows] = _readings_at(t, g, o)
        for k in range(h):
            out[rows, k] = _readings_at(t, g, o + (k + 1) * step_ns)
    return out, now


def _readings_at(t: np.ndarray, g: np.ndarray, times: np.ndarray) -> np.ndarray:
    """The reading of slot time `times` (ns, sorted `t`), NaN where the frame has no slot."""
    i = np.clip(np.searchsorted(t, times), 0, len(t) - 1)
    return np.where(t[i] == times, g[i], np.nan)


def _fill_steps(offsets: np.ndarray) -> np.ndarray:
    """Steps without readings (a 15-minute sensor has none at +5 and +10 min) take the
    offsets of the steps around them (linear in the step; the nearest beyond the ends)."""
    ok = np.isfinite(offsets)
    if ok.all() or not ok.any():
        return offsets
    k = np.arange(len(offsets))
    return np.interp(k, k[ok], offsets[ok])


def calibrate_low(
    frame: pd.DataFrame,
    table: ForecastTable,
    alpha: float,
    *,
    near_mgdl: float = 140.0,
    prior_windows: int = 300,
) -> dict[str, tuple[float, ...]]:
    """{subject_id: per-step log offsets} (and `POOLED`: everybody's), see the module docstring.

    ``frame`` and ``table`` are the *validation* split and its forecasts.
    """
    if not 0.0 < alpha < 1.0:
        raise AlertEvalError(f"calibration level alpha must lie in (0, 1), got {alpha}")
    y, now = future_readings(frame, table)
    med = median_forecast(table)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.log(y) - np.log(np.maximum(med, 1.0))  # [N, H]
    near = np.isfinite(now) & (now < near_mgdl)
    sid = np.asarray(table.subject_id).astype(str)

    def level(rows: np.ndarray) -> np.ndarray:
        x = r[rows]
        out = np.full(x.shape[1], np.nan)
        for k in range(x.shape[1]):
            v = x[:, k][np.isfinite(x[:, k])]
            if len(v):
                out[k] = np.quantile(v, alpha)
        return out

    if not (near[:, None] & np.isfinite(r)).any():
        near = np.isfinite(now)  # no origin near a low (a short record): calibrate on all
    pooled = _fill_steps(level(near))
    if not np.isfinite(pooled).all():
        raise AlertEvalError("no forecasts with real readings after them to calibrate on")
    out: dict[str, tuple[float, ...]] = {POOLED: tuple(float(x) for x in pooled)}
    for s in sorted(set(sid)):
        rows = near & (sid == s)
        ok = np.isfinite(r[rows]).sum(0)
        n = int(ok[ok > 0].min()) if rows.any() and ok.any() else 0
        own = _fill_steps(level(rows)) if n else pooled
        own = np.where(np.isfinite(own), own, pooled)
        w = n / (n + prior_windows)
        out[s] = tuple(float(x) for x in w * own + (1 - w) * pooled)
    return out


def personal_thresholds(
    base: AlertThresholds, offsets: Mapping[str, Sequence[float]], subjects: Iterable[str]
) -> dict[str, AlertThresholds]:
    """Each subject's settings with their calibrated offsets (`POOLED` for a newcomer)."""
    return {
        str(s): replace(base, predicted_low_log_offsets=tuple(offsets.get(str(s), offsets[POOLED])))
        for s in subjects
    }


@dataclass(frozen=True)
class Rule:
    """One candidate predicted-low rule: settings over the base, and optionally a personal
    calibration level (``alpha``; None: the population quantile in the settings)."""

    name: str
    changes: Mapping[str, Any] = field(default_factory=dict)
    alpha: float | None = None

    def describe(self) -> dict[str, Any]:
        return {"rule": self.name, "alpha": self.alpha, **dict(self.changes)}


def rule_thresholds(
    rule: Rule,
    base: AlertThresholds,
    calibration: Mapping[str, Sequence[float]] | None,
    subjects: Iterable[str],
) -> tuple[AlertThresholds, dict[str, AlertThresholds]]:
    """(population settings, per-subject settings) of `rule`; ``calibration`` is
    `calibrate_low`'s result at the rule's alpha (needed when it has one)."""
    th = replace(base, **dict(rule.changes))
    if rule.alpha is None:
        return th, {}
    if calibration is None:
        raise AlertEvalError(f"rule {rule.name!r} needs a calibration at alpha {rule.alpha}")
    return th, personal_thresholds(th, calibration, subjects)


def search_rules(
    frame: pd.DataFrame,
    table: ForecastTable,
    rules: Sequence[Rule],
    *,
    base: AlertThresholds | None = None,
    calibrations: Mapping[float, Mapping[str, Sequence[float]]] | None = None,
    **scoring: Any,
) -> pd.DataFrame:
    """Score every rule on the same forecasts and episodes: one row per rule with
    sensitivity, lead_min, false_per_day, episodes, warned, false_alerts (predicted low) and
    the rule's settings. ``calibrations`` {alpha: `calibrate_low` result} for rules that have
    an alpha; ``scoring`` goes to `evaluate_table` (``past_slots``, ``low``, ...)."""
    base = base if base is not None else AlertThresholds()
    subjects = sorted(set(frame["subject_id"].astype(str)))
    rows = []
    for rule in rules:
        cal = None if rule.alpha is None else (calibrations or {}).get(rule.alpha)
        th, personal = rule_thresholds(rule, base, cal, subjects)
        res = evaluate_table(frame, table, thresholds=th, subject_thresholds=personal, **scoring)
        p = res["predicted_low"]
        rows.append(
            {
                **rule.describe(),
                "sensitivity": p["sensitivity"],
                "lead_min": p["lead_min"],
                "false_per_day": p["false_per_day"],
                "episodes": p["episodes"],
                "warned": p["warned"],
                "false_alerts": p["false_alerts"],
            }
        )
    out = pd.DataFrame(rows)
    for col in ("sensitivity", "lead_min", "false_per_day"):
        out[col] = out[col].astype(float)
    return out


def choose_rule(
    results: pd.DataFrame, max_false_per_day: float, min_lead_min: float = 0.0
) -> int | None:
    """Row index (of `search_rules`' frame) of the most sensitive rule with at most
    ``max_false_per_day`` false alerts a day and a median lead of at least ``min_lead_min``;
    ties go to the longer lead, then to fewer false alerts. None when no rule qualifies."""
    if not max_false_per_day >= 0:
        raise AlertEvalError(f"max_false_per_day must be >= 0, got {max_false_per_day}")
    ok = results[
        (results["false_per_day"] <= max_false_per_day + 1e-12)
        & (results["lead_min"].fillna(-math.inf) >= min_lead_min - 1e-9)
        & np.isfinite(results["sensitivity"])
    ]
    if ok.empty:
        return None
    ranked = ok.sort_values(
        ["sensitivity", "lead_min", "false_per_day"],
        ascending=[False, False, True],
        kind="stable",
    )
    return int(ranked.index[0])


__all__ = [
    "POOLED",
    "Rule",
    "calibrate_low",
    "choose_rule",
    "future_readings",
    "median_forecast",
    "personal_thresholds",
    "rule_thresholds",
    "search_rules",
]
