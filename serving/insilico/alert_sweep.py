"""Choosing a predicted-low alert: the sensitivity / lead / false-alert trade-off of one forecast.

A predicted low fires when a lower quantile of the forecast falls below 70 mg/dL within the
alert horizon. Which quantile is a choice a person (or their clinician) makes: a lower one
warns of more lows and earlier, at the price of more alarms that come to nothing. This module
replays the *same* forecasts through the alert engine once per candidate quantile and scores
every rule against the same episodes (`serving.insilico.alert_eval`), so the trade-off is a table —
and `choose_quantile` picks the most sensitive rule within a false-alert budget.

Pick on the validation split and report on the test split (`glucast alerts evaluate --split
val --sweep ... --max-false-per-day 1`, then `--split test --quantile Q`): a quantile chosen
on the data it is scored on flatters itself.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import pandas as pd

from serving.alerts import AlertThresholds
from serving.insilico.alert_eval import AlertEvalError, ForecastTable, evaluate_table

# glucast's target for predicted-low alerts (with at most 1 false alert a day): warn of at
# least 90 % of CGM lows, a median of at least 20 minutes before they begin.
GOAL_SENSITIVITY = 0.9
GOAL_LEAD_MIN = 20.0

SWEEP_COLUMNS = (
    "rule",
    "quantile",
    "sensitivity",
    "lead_min",
    "false_per_day",
    "episodes",
    "warned",
    "false_alerts",
)


def check_quantiles(quantiles: Sequence[float]) -> tuple[float, ...]:
    """The sweep's quantiles, sorted and unique; each strictly between 0 and 1."""
    qs = tuple(sorted({float(q) for q in quantiles}))
    if not qs:
        raise AlertEvalError("a sweep needs at least one quantile, e.g. 0.2,0.3,0.4,0.5")
    bad = [q for q in qs if not (0.0 < q < 1.0) or not math.isfinite(q)]
    if bad:
        raise AlertEvalError(f"sweep quantiles must lie strictly between 0 and 1, got {bad}")
    return qs


def sweep_quantiles(
    frame: pd.DataFrame,
    table: ForecastTable,
    quantiles: Sequence[float],
    *,
    thresholds: AlertThresholds | None = None,
    **scoring: Any,
) -> pd.DataFrame:
    """One row per predicted-low quantile, then one for the threshold-only low alarm.

    Every row is scored on the same forecasts (`table`) and the same episodes; ``scoring``
    goes to `evaluate_table` (``past_slots``, ``low``, ``window_min``, ``episodes_from``...).
    Columns: `SWEEP_COLUMNS` (``quantile`` is NaN on the threshold row, ``lead_min`` NaN
    where nothing was warned).
    """
    if table is None:
        raise AlertEvalError("a sweep needs forecasts: give a model, not the threshold alone")
    base = thresholds if thresholds is not None else AlertThresholds()
    rows: list[dict[str, Any]] = []
    threshold_row: dict[str, Any] = {}
    for q in check_quantiles(quantiles):
        res = evaluate_table(
            frame, table, thresholds=replace(base, predicted_low_quantile=q), **scoring
        )
        rows.append({"rule": "predicted_low", "quantile": q, **res["predicted_low"]})
        threshold_row = {"rule": "threshold_low", "quantile": math.nan, **res["threshold_low"]}
    rows.append(threshold_row)  # the threshold alarm does not depend on the quantile
    out = pd.DataFrame(rows)[list(SWEEP_COLUMNS)]
    for col in ("sensitivity", "lead_min", "false_per_day"):
        out[col] = out[col].astype(float)  # None (nothing to score) → NaN
    return out


def choose_quantile(sweep: pd.DataFrame, max_false_per_day: float = 1.0) -> float | None:
    """The predicted-low quantile to use: the most sensitive one with at most
    ``max_false_per_day`` false alerts a day; ties go to the longer median lead, then to
    fewer false alerts. None when no quantile of the sweep keeps to the budget."""
    if not (max_false_per_day >= 0):
        raise AlertEvalError(f"max_false_per_day must be >= 0, got {max_false_per_day}")
    pred = sweep[(sweep["rule"] == "predicted_low") & (sweep["false_per_day"] <= max_false_per_day)]
    pred = pred[np.isfinite(pred["sensitivity"])]
    if pred.empty:
        return None
    ranked = pred.assign(lead=pred["lead_min"].fillna(-1.0)).sort_values(
        ["sensitivity", "lead", "false_per_day"], ascending=[False, False, True], kind="stable"
    )
    return float(ranked["quantile"].iloc[0])


__all__ = [
    "GOAL_LEAD_MIN",
    "GOAL_SENSITIVITY",
    "SWEEP_COLUMNS",
    "check_quantiles",
    "choose_quantile",
    "sweep_quantiles",
]
