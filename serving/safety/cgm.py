"""Can this cycle's CGM be trusted? (stale, from the future, error codes, out of range,
jumping, flat-lined).

`assess_cgm` judges the readings a CGM driver reported against the loop's clock and returns a
`CGMCheck`; the decision rules (`serving.safety.rules`) turn an untrusted CGM into scheduled
basal, or into a zero temp basal when the last valid reading was low.

May import: the standard library, pandas (timestamps), `forecast.schema` and `serving.types`.
Nothing else from serving: no pump, no journal, no controller.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntFlag

import pandas as pd

from forecast.schema import GLUCOSE_MAX_MGDL, GLUCOSE_MIN_MGDL
from serving.types import CGMStatus, Reading

STALE_MIN = 12.0  # oref0
FUTURE_MIN = 5.0  # oref0
JUMP_MGDL_PER_5MIN = 40.0  # Loop
JUMP_MAX_GAP_MIN = 15.0  # beyond this, two readings are too far apart to call a jump
FLAT_READINGS = 9  # 45 min of identical values: a sensor that stopped measuring
LOW_MGDL = 70.0
LOW_FALLBACK_MAX_AGE_MIN = 120.0  # pumps' suspend-on-low lasts at most 2 h
SLOT_MIN = 5.0


class CGMProblem(IntFlag):
    """Why the CGM cannot be trusted this cycle (0 = usable)."""

    NONE = 0
    NO_DATA = 1 << 0
    ERROR = 1 << 1
    WARMUP = 1 << 2
    STALE = 1 << 3
    FUTURE = 1 << 4
    JUMP = 1 << 5
    FLAT = 1 << 6
    OUT_OF_RANGE = 1 << 7

    @property
    def label(self) -> str:
        return "|".join((m.name or "").lower() for m in CGMProblem if m and m in self) or "ok"


@dataclass(frozen=True)
class CGMCheck:
    """The supervisor's judgement of the CGM this cycle."""

    problem: CGMProblem
    glucose_mgdl: float  # the latest trusted reading (NaN when problem)
    last_valid_mgdl: float  # newest in-range OK reading, trusted or not (NaN if none)
    last_valid_age_min: float  # its age (inf if none)
    readings: tuple[Reading, ...]  # in-range OK readings, oldest first, one per time, none future
    detail: str = ""
    # signed rate between the two newest valid readings, mg/dL per 5 min (NaN: fewer than two
    # within JUMP_MAX_GAP_MIN), and the lower of the two: a meal bolus may pass a rising jump
    jump_rate_mgdl: float = math.nan
    jump_floor_mgdl: float = math.nan

    @property
    def rising_jump_only(self) -> bool:
        """The CGM's only problem is a rising jump (the meal-bolus exception applies)."""
        return self.problem == CGMProblem.JUMP and self.jump_rate_mgdl > 0

    @property
    def usable(self) -> bool:
        return not self.problem

    @property
    def last_valid_low(self) -> bool:
        """The fallback chooses suspend over scheduled basal when this is true."""
        return (
            math.isfinite(self.last_valid_mgdl)
            and self.last_valid_mgdl < LOW_MGDL
            and self.last_valid_age_min <= LOW_FALLBACK_MAX_AGE_MIN
        )


def _in_range(g: float) -> bool:
    return math.isfinite(g) and GLUCOSE_MIN_MGDL <= g <= GLUCOSE_MAX_MGDL


def assess_cgm(readings: Sequence[Reading], now: pd.Timestamp) -> CGMCheck:
    """Judge the readings a CGM reported, against the loop's clock `now`.

    Readings are sorted by their timestamps and de-duplicated (the last reported wins), so a
    backfill that arrives out of order is used, not feared. What makes the CGM unusable: no
    reading; the newest reading carrying an error/warm-up/no-data status or an out-of-range
    value; any reading stamped > 5 min ahead (the sensor clock is wrong, so none of its times
    can be trusted); the newest valid reading > 12 min old; a jump > 40 mg/dL per 5 min
    between the two newest readings; 9 identical readings in a row (a flat line).
    """
    problem = CGMProblem.NONE
    details: list[str] = []
    now_ns = now.value if isinstance(now, pd.Timestamp) else pd.Timestamp(now).value
    stamps = [r.time.value for r in readings]
    ahead_min = [(t - now_ns) / 60e9 for t in stamps]
    future = [a for a in ahead_min if a > FUTURE_MIN]
    if future:
        problem |= CGMProblem.FUTURE
        details.append(f"{len(future)} reading(s) up to {max(future):.0f} min in the future")
    if not future and all(a < b for a, b in zip(stamps, stamps[1:])):
        ordered = list(
            readings
        )  # the usual case: already in order, one per time (a cycle's hot path)
    else:
        by_time: dict[int, Reading] = {}
        for r, t, a in zip(readings, stamps, ahead_min):  # last reported wins for a repeated time
            if a <= FUTURE_MIN:
                by_time[t] = r
        ordered = [by_time[t] for t in sorted(by_time)]
    ok, lo, hi = CGMStatus.OK, GLUCOSE_MIN_MGDL, GLUCOSE_MAX_MGDL  # `_in_range`, inlined
    valid = [r for r in ordered if r.status == ok and lo <= r.glucose_mgdl <= hi]
    if not ordered:
        problem |= CGMProblem.NO_DATA
        details.append("no readings")
    else:
        newest = ordered[-1]
        if newest.status != CGMStatus.OK:
            problem |= {
                CGMStatus.ERROR: CGMProblem.ERROR,
                CGMStatus.WARMUP: CGMProblem.WARMUP,
            }.get(newest.status, CGMProblem.NO_DATA)
            details.append(f"newest reading status {newest.status}")
        elif not _in_range(newest.glucose_mgdl):
            problem |= CGMProblem.OUT_OF_RANGE
            details.append(f"newest reading {newest.glucose_mgdl} mg/dL out of range")
    if not valid:
        if ordered:
            problem |= CGMProblem.NO_DATA
        return CGMCheck(problem, math.nan, math.nan, math.inf, (), "; ".join(details))
    last = valid[-1]
    age = (now_ns - last.time.value) / 60e9
    if age > STALE_MIN:
        problem |= CGMProblem.STALE
        details.append(f"newest valid reading {age:.0f} min old")
    jump_rate = jump_floor = math.nan
    if len(valid) >= 2:
        prev = valid[-2]
        gap = (last.time.value - prev.time.value) / 60e9
        if 0 < gap <= JUMP_MAX_GAP_MIN:
            jump_rate = (last.glucose_mgdl - prev.glucose_mgdl) / max(gap, SLOT_MIN) * SLOT_MIN
            jump_floor = min(last.glucose_mgdl, prev.glucose_mgdl)
            rate = abs(jump_rate)
            if rate > JUMP_MGDL_PER_5MIN:
                problem |= CGMProblem.JUMP
                details.append(
                    f"jump {prev.glucose_mgdl:.0f} → {last.glucose_mgdl:.0f} mg/dL in {gap:.0f} min"
                )
    if len(valid) >= FLAT_READINGS:
        tail = [r.glucose_mgdl for r in valid[-FLAT_READINGS:]]
        if max(tail) - min(tail) == 0.0:
            problem |= CGMProblem.FLAT
            details.append(f"{FLAT_READINGS} identical readings ({tail[0]:.0f} mg/dL)")
    glucose = last.glucose_mgdl if not problem else math.nan
    return CGMCheck(
        problem,
        glucose,
        last.glucose_mgdl,
        age,
        tuple(valid),
        "; ".join(details),
        jump_rate,
        jump_floor,
    )


__all__ = [
    "FLAT_READINGS",
    "FUTURE_MIN",
    "JUMP_MAX_GAP_MIN",
    "JUMP_MGDL_PER_5MIN",
    "LOW_FALLBACK_MAX_AGE_MIN",
    "LOW_MGDL",
    "SLOT_MIN",
    "STALE_MIN",
    "CGMCheck",
    "CGMProblem",
    "assess_cgm",
]
