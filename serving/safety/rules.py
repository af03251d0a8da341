"""The supervisor: the only road to the pump.

Two halves, kept apart on purpose:

* **the decision** (`assess_cgm`, `decide`, `Supervisor.check`, `check_batch`) is a pure
  function of the patient's state and a controller's proposal. `decide` works on numpy arrays
  (one element per patient) so a cohort trial checks every patient in one call and a property
  test can throw millions of random states at it. It enforces, whatever the controller says:

  - max basal = min(max basal setting, 3 × max daily basal, 4 × scheduled basal) (oref0);
  - max bolus; max IOB (a bolus is cut to the headroom; a temp above scheduled basal may only
    add the insulin that still fits, including any bolus whose delivery is unconfirmed);
  - predictive low-glucose suspend: within 30 min the predicted median below `low_suspend`
    or the lowest predicted quantile below 54 mg/dL (a level-2 low), or the current reading
    below `low_suspend` → zero temp basal, no bolus;
  - CGM that is stale (> 12 min), from the future (> 5 min), an error/warm-up/no-data code, out
    of range, jumping (> 40 mg/dL per 5 min) or flat-lined → scheduled basal, or zero basal if
    the last valid reading was low (< 70 mg/dL, within the last 2 h like pumps' low suspend);
    the one exception: a *rising* jump whose both readings are above the low-suspend level
    still lets a bolus through up to the carb-ratio bolus of the carbs announced this cycle
    (`SafetyState.meal_bolus_u`, no correction): that insulin is justified by the announced
    carbs, not by the suspicious reading, which is what a pump's bolus calculator would give
    a person whose CGM looks wrong;
  - temp basals last at most 30 min, so a dead loop falls back to the scheduled basal;
  - a faulted or user-suspended pump gets no insulin command.

* **the action** (`Supervisor.apply`) turns a verdict into pump commands, each with an
  idempotency key derived from (patient, cycle time, kind), writes the intent to the journal
  *before* calling the pump, records the acknowledgement after, and journals every veto. A
  pump that times out or does not acknowledge is asked about the same key once (a query,
  never a second command); what stays unknown blocks further boluses until it is resolved.

"Suspend" in a verdict means a zero temp basal of at most 30 min, renewed each cycle, never
the pump's open-ended suspend: if the loop dies, insulin delivery resumes by itself.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import IntFlag
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from forecast.schema import GLUCOSE_MAX_MGDL, GLUCOSE_MIN_MGDL, GlucastError
from serving.hal.pump import (
    MAX_TEMP_MINUTES,
    Ack,
    Command,
    CommandKind,
    Pump,
    PumpError,
    PumpStatus,
    resolve_command,
    send,
)
from serving.types import CGMStatus, PatientSettings, Proposal, Reading, Verdict

if TYPE_CHECKING:  # the journal imports nothing from here; avoid a cycle at runtime
    from serving.journal import Journal

STALE_MIN = 12.0  # oref0
FUTURE_MIN = 5.0  # oref0
JUMP_MGDL_PER_5MIN = 40.0  # Loop
JUMP_MAX_GAP_MIN = 15.0  # beyond this, two readings are too far apart to call a jump
FLAT_READINGS = 9  # 45 min of identical values: a sensor that stopped measuring
LOW_MGDL = 70.0
LOW_FALLBACK_MAX_AGE_MIN = 120.0  # pumps' suspend-on-low lasts at most 2 h
PLGS_HORIZON_MIN = 30.0
LEVEL2_LOW_MGDL = 54.0  # the lowest predicted quantile may not reach a level-2 low
MIN_TEMP_MINUTES = 5
SLOT_MIN = 5.0


class SafetyError(GlucastError):
    """Settings the supervisor cannot work with (they would make a limit meaningless)."""


class Veto(IntFlag):
    """Why the supervisor changed a proposal; one bit each so a batch carries them in an int."""

    NON_FINITE_PROPOSAL = 1 << 0
    NEGATIVE_PROPOSAL = 1 << 1
    MAX_BASAL = 1 << 2
    MAX_DURATION = 1 << 3
    MAX_BOLUS = 1 << 4
    MAX_IOB = 1 << 5
    PREDICTED_LOW = 1 << 6
    LOW_GLUCOSE = 1 << 7
    PREDICTION_INVALID = 1 << 8
    CGM_UNUSABLE = 1 << 9
    PUMP_FAULT = 1 << 10
    PUMP_SUSPENDED = 1 << 11
    UNCONFIRMED_BOLUS = 1 << 12
    JOURNAL_UNAVAILABLE = 1 << 13

    @property
    def label(self) -> str:
        return (self.name or "").lower()


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


FALLBACK_NONE, FALLBACK_SCHEDULED, FALLBACK_SUSPEND = 0, 1, 2
_FALLBACK_NAMES = {
    FALLBACK_NONE: "",
    FALLBACK_SCHEDULED: "scheduled_basal",
    FALLBACK_SUSPEND: "suspend",
}


# --------------------------------------------------------------------------- CGM


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
    now_ns = pd.Timestamp(now).value
    ahead_min = [(r.time.value - now_ns) / 60e9 for r in readings]
    future = [a for a in ahead_min if a > FUTURE_MIN]
    if future:
        problem |= CGMProblem.FUTURE
        details.append(f"{len(future)} reading(s) up to {max(future):.0f} min in the future")
    by_time: dict[int, Reading] = {}
    for r, a in zip(readings, ahead_min):  # last reported wins for a repeated timestamp
        if a <= FUTURE_MIN:
            by_time[r.time.value] = r
    ordered = [by_time[t] for t in sorted(by_time)]
    valid = [r for r in ordered if r.status == CGMStatus.OK and _in_range(r.glucose_mgdl)]
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


# --------------------------------------------------------------------------- limits


def max_basal(
    setting: np.ndarray | float, max_daily: np.ndarray | float, scheduled: np.ndarray | float
) -> np.ndarray:
    """oref0's cap: min(max basal setting, 3 × max daily basal, 4 × current scheduled basal)."""
    return np.minimum(np.minimum(setting, 3.0 * np.asarray(max_daily)), 4.0 * np.asarray(scheduled))


def predicted_low(
    predicted: np.ndarray | None, slot_min: float = SLOT_MIN
) -> tuple[float, float, bool]:
    """Lowest predicted median and lowest predicted quantile within 30 min, and validity.

    `predicted` is [H, Q] with quantiles ascending (or [H] for a point forecast); the median
    is the middle column ((Q-1)//2, the lower one of two). No prediction → (NaN, NaN, True):
    the supervisor relies on the current reading alone. NaN/inf inside the first 30 min →
    (NaN, NaN, False): such a prediction must not drive insulin.
    """
    if predicted is None:
        return math.nan, math.nan, True
    p = np.asarray(predicted, dtype=float)
    if p.ndim == 1:
        p = p[:, None]
    return _lows(p[None], slot_min)[0]


def _lows(p: np.ndarray, slot_min: float = SLOT_MIN) -> list[tuple[float, float, bool]]:
    """`predicted_low` of a stack of like forecasts [N, H, Q] in one vectorised pass."""
    n = max(1, int(PLGS_HORIZON_MIN // slot_min))
    head = p[:, :n]  # [N, n, Q]
    if head.shape[1] == 0 or head.shape[2] == 0:
        return [(math.nan, math.nan, False)] * len(p)
    ok = np.isfinite(head).all(axis=(1, 2))  # [N]
    med = head[:, :, (head.shape[2] - 1) // 2].min(axis=1)  # [N]
    lowest = head.min(axis=(1, 2))  # [N]
    return [
        (float(m), float(lo), True) if good else (math.nan, math.nan, False)
        for m, lo, good in zip(med, lowest, ok)
    ]


@dataclass
class Decision:
    """`decide`'s output: arrays of shape [N]."""

    rate: np.ndarray
    duration: np.ndarray
    bolus: np.ndarray
    suspend: np.ndarray
    fallback: np.ndarray  # FALLBACK_* codes
    vetoes: np.ndarray  # Veto bitmask
    max_basal: np.ndarray


def decide(
    *,
    rate: np.ndarray,
    duration: np.ndarray,
    bolus: np.ndarray,
    scheduled: np.ndarray,
    max_basal_setting: np.ndarray,
    max_daily_basal: np.ndarray,
    max_bolus: np.ndarray,
    max_iob: np.ndarray,
    low_suspend: np.ndarray,
    iob: np.ndarray,
    glucose: np.ndarray,
    cgm_problem: np.ndarray,
    last_valid_low: np.ndarray,
    pred_median_low: np.ndarray,
    pred_lowest: np.ndarray,
    pred_valid: np.ndarray,
    unconfirmed_bolus: np.ndarray | float = 0.0,
    pump_fault: np.ndarray | bool = False,
    pump_suspended: np.ndarray | bool = False,
    journal_ok: np.ndarray | bool = True,
    meal_bolus: np.ndarray | float = 0.0,
    rising_jump: np.ndarray | bool = False,
) -> Decision:
    """The supervisor's rules on arrays (one element per patient). Pure; no I/O.

    `glucose` is the trusted current reading (NaN if none); `pred_median_low` and `pred_lowest`
    the lowest predicted median and lowest predicted quantile within 30 min (NaN if no
    prediction; see `predicted_low`); `unconfirmed_bolus` boluses sent whose
    delivery the pump has not confirmed (counted as on board, and they block a new bolus).
    `meal_bolus` is the carb-ratio bolus of the carbs announced this cycle and `rising_jump`
    marks a CGM whose only problem is a rising jump with both readings at or above
    `low_suspend`: there the scheduled-basal fallback keeps a bolus up to `meal_bolus`.
    """
    arrays = np.broadcast_arrays(
        *(np.asarray(a, dtype=float) for a in (rate, duration, bolus, scheduled, max_basal_setting,
                                               max_daily_basal, max_bolus, max_iob, low_suspend, iob,
                                               glucose, pred_median_low, pred_lowest,
                                               unconfirmed_bolus))
    )  # fmt: skip
    (
        rate,
        duration,
        bolus,
        scheduled,
        mb_set,
        mdaily,
        mbolus,
        miob,
        low_s,
        iob,
        glucose,
        pmed,
        plowest,
        unconf,
    ) = (a.astype(float, copy=True) for a in arrays)
    shape = rate.shape
    cgm_problem = np.broadcast_to(np.asarray(cgm_problem, dtype=np.int64), shape)
    last_low = np.broadcast_to(np.asarray(last_valid_low, dtype=bool), shape)
    pred_valid = np.broadcast_to(np.asarray(pred_valid, dtype=bool), shape)
    pump_fault = np.broadcast_to(np.asarray(pump_fault, dtype=bool), shape)
    pump_susp = np.broadcast_to(np.asarray(pump_suspended, dtype=bool), shape)
    journal_ok = np.broadcast_to(np.asarray(journal_ok, dtype=bool), shape)
    meal_bolus = np.broadcast_to(np.asarray(meal_bolus, dtype=float), shape)
    meal_bolus = np.where(np.isfinite(meal_bolus) & (meal_bolus > 0), meal_bolus, 0.0)
    rising_jump = np.broadcast_to(np.asarray(rising_jump, dtype=bool), shape)
    iob = np.where(np.isfinite(iob), iob, np.inf)  # unknown IOB: assume the worst
    unconf = np.where(np.isnan(unconf) | (unconf < 0), 0.0, unconf)  # inf: unknown, blocks all
    vetoes = np.zeros(shape, dtype=np.int64)

    def veto(mask: np.ndarray, v: Veto) -> None:
        vetoes[mask] |= int(v)

    # 1. sanitise the proposal
    bad_rate = ~np.isfinite(rate)
    bad_bolus = ~np.isfinite(bolus)
    bad_dur = ~np.isfinite(duration)
    veto(bad_rate | bad_bolus | bad_dur, Veto.NON_FINITE_PROPOSAL)
    bolus = np.where(bad_bolus, 0.0, bolus)
    duration = np.where(bad_dur, MAX_TEMP_MINUTES, duration)
    veto((rate < 0) | (bolus < 0), Veto.NEGATIVE_PROPOSAL)
    rate = np.where(bad_rate, scheduled, np.maximum(rate, 0.0))
    bolus = np.maximum(bolus, 0.0)

    # 2. temp basal length
    veto(duration > MAX_TEMP_MINUTES, Veto.MAX_DURATION)
    duration = np.clip(np.round(duration), MIN_TEMP_MINUTES, MAX_TEMP_MINUTES)

    # 3. hard limits
    cap = max_basal(mb_set, mdaily, scheduled)
    veto(rate > cap, Veto.MAX_BASAL)
    rate = np.minimum(rate, cap)
    veto(bolus > mbolus, Veto.MAX_BOLUS)
    bolus = np.minimum(bolus, mbolus)
    veto((bolus > 0) & (unconf > 0), Veto.UNCONFIRMED_BOLUS)
    bolus = np.where(unconf > 0, 0.0, bolus)
    headroom = np.maximum(miob - iob - unconf, 0.0)
    veto(bolus > headroom, Veto.MAX_IOB)
    bolus = np.minimum(bolus, headroom)
    extra_allowed = (headroom - bolus) * 60.0 / duration  # U/h above scheduled that still fits
    over = rate > scheduled + extra_allowed
    veto(over, Veto.MAX_IOB)
    rate = np.where(over, np.minimum(rate, scheduled + extra_allowed), rate)

    # 4. overrides: the fallbacks win over everything the controller asked for
    fallback = np.full(shape, FALLBACK_NONE, dtype=np.int64)

    def fall(mask: np.ndarray, code: int, v: Veto) -> None:
        veto(mask, v)
        # suspend beats scheduled basal where both apply
        fallback[mask] = np.maximum(fallback[mask], code)

    fall(~journal_ok, FALLBACK_SCHEDULED, Veto.JOURNAL_UNAVAILABLE)
    fall(bad_rate, FALLBACK_SCHEDULED, Veto.NON_FINITE_PROPOSAL)
    fall(~pred_valid, FALLBACK_SCHEDULED, Veto.PREDICTION_INVALID)
    cgm_bad = cgm_problem != 0
    fall(cgm_bad & ~last_low, FALLBACK_SCHEDULED, Veto.CGM_UNUSABLE)
    fall(cgm_bad & last_low, FALLBACK_SUSPEND, Veto.CGM_UNUSABLE)
    fall(~cgm_bad & np.isfinite(glucose) & (glucose < low_s), FALLBACK_SUSPEND, Veto.LOW_GLUCOSE)
    plgs = (np.isfinite(pmed) & (pmed < low_s)) | (
        np.isfinite(plowest) & (plowest < LEVEL2_LOW_MGDL)
    )
    fall(pred_valid & plgs, FALLBACK_SUSPEND, Veto.PREDICTED_LOW)
    fall(pump_fault, FALLBACK_SUSPEND, Veto.PUMP_FAULT)
    fall(pump_susp & ~pump_fault, FALLBACK_SUSPEND, Veto.PUMP_SUSPENDED)

    sched_fb = fallback == FALLBACK_SCHEDULED
    susp_fb = fallback == FALLBACK_SUSPEND
    # scheduled basal can itself exceed the oref0 cap only with inconsistent settings, which
    # Supervisor refuses; np.minimum keeps the invariant even for raw callers
    rate = np.where(sched_fb, np.minimum(scheduled, cap), rate)
    rate = np.where(susp_fb, 0.0, rate)
    duration = np.where(fallback != FALLBACK_NONE, float(MAX_TEMP_MINUTES), duration)
    # A rising jump (> 40 mg/dL in 5 min) is what a sensor artefact looks like, but also what a
    # fast meal rise looks like in a CGM with noise (child#008 rises > 100 mg/dL in 15 min). The
    # reading must not drive insulin, so the fallback stays scheduled basal; the announced
    # carbs' own bolus (no correction) does not depend on the reading and still goes through,
    # within every limit applied above (max bolus, max IOB, unconfirmed boluses). Any other
    # fallback (journal, prediction, pump, a low, a falling jump, other CGM faults) blocks it.
    meal_ok = (
        (fallback == FALLBACK_SCHEDULED)
        & rising_jump
        & (cgm_problem == int(CGMProblem.JUMP))
        & journal_ok
        & pred_valid
        & ~bad_rate
        & ~bad_bolus
    )
    bolus = np.where(
        fallback == FALLBACK_NONE, bolus, np.where(meal_ok, np.minimum(bolus, meal_bolus), 0.0)
    )
    return Decision(
        rate=rate,
        duration=duration.astype(np.int64),
        bolus=bolus,
        suspend=susp_fb,
        fallback=fallback,
        vetoes=vetoes,
        max_basal=cap,
    )


# --------------------------------------------------------------------------- scalar API


@dataclass(frozen=True)
class SafetyState:
    """What the supervisor knows about one patient at one cycle."""

    now: pd.Timestamp
    iob_u: float
    cgm: CGMCheck
    pump: PumpStatus | None = None
    unconfirmed_bolus_u: float = 0.0
    journal_ok: bool = True
    # the carb-ratio bolus of the carbs announced this cycle (no correction); only used to let
    # a meal bolus through a rising CGM jump (see `decide`)
    meal_bolus_u: float = 0.0

    @classmethod
    def from_readings(
        cls, now: pd.Timestamp, readings: Sequence[Reading], iob_u: float, **kw
    ) -> SafetyState:
        return cls(now=now, iob_u=iob_u, cgm=assess_cgm(readings, now), **kw)


def validate_settings(s: PatientSettings) -> None:
    """Refuse settings under which a limit would be meaningless or contradictory."""
    for name in (
        "basal_u_per_h",
        "max_basal_u_per_h",
        "max_bolus_u",
        "max_iob_u",
        "low_suspend_mgdl",
    ):
        v = getattr(s, name)
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
            raise SafetyError(f"setting {name} of {s.name} must be a finite number >= 0, got {v!r}")
    if s.max_basal_u_per_h < s.basal_u_per_h:
        raise SafetyError(
            f"{s.name}: max basal {s.max_basal_u_per_h} U/h is below the scheduled basal "
            f"{s.basal_u_per_h} U/h"
        )
    md = s.max_daily_basal_u_per_h
    if md is not None and md < s.basal_u_per_h:
        raise SafetyError(f"{s.name}: max daily basal {md} is below the scheduled basal")


def _settings_arrays(settings: Sequence[PatientSettings]) -> dict[str, np.ndarray]:
    def arr(f) -> np.ndarray:
        return np.array([f(s) for s in settings], dtype=float)

    return {
        "scheduled": arr(lambda s: s.basal_u_per_h),
        "max_basal_setting": arr(lambda s: s.max_basal_u_per_h),
        "max_daily_basal": arr(
            lambda s: (
                s.basal_u_per_h if s.max_daily_basal_u_per_h is None else s.max_daily_basal_u_per_h
            )
        ),
        "max_bolus": arr(lambda s: s.max_bolus_u),
        "max_iob": arr(lambda s: s.max_iob_u),
        "low_suspend": arr(lambda s: s.low_suspend_mgdl),
    }


def check_batch(
    settings: Sequence[PatientSettings],
    proposals: Sequence[Proposal],
    states: Sequence[SafetyState],
) -> list[Verdict]:
    """`Supervisor.check` for many patients at once (one `decide` call)."""
    if not len(settings) == len(proposals) == len(states):
        raise SafetyError(
            f"check_batch needs equal lengths, got {len(settings)}, {len(proposals)}, {len(states)}"
        )
    for s in settings:
        validate_settings(s)
    preds = _predicted_lows([p.predicted_mgdl for p in proposals])
    pumps = [st.pump for st in states]
    d = decide(
        rate=np.array([p.temp_basal_u_per_h for p in proposals], dtype=float),
        duration=np.array([p.duration_min for p in proposals], dtype=float),
        bolus=np.array([p.bolus_u for p in proposals], dtype=float),
        iob=np.array([st.iob_u for st in states], dtype=float),
        glucose=np.array([st.cgm.glucose_mgdl for st in states], dtype=float),
        cgm_problem=np.array([int(st.cgm.problem) for st in states], dtype=np.int64),
        last_valid_low=np.array([st.cgm.last_valid_low for st in states]),
        pred_median_low=np.array([p[0] for p in preds], dtype=float),
        pred_lowest=np.array([p[1] for p in preds], dtype=float),
        pred_valid=np.array([p[2] for p in preds]),
        unconfirmed_bolus=np.array([st.unconfirmed_bolus_u for st in states], dtype=float),
        pump_fault=np.array([bool(p is not None and p.fault) for p in pumps]),
        pump_suspended=np.array([bool(p is not None and p.suspended) for p in pumps]),
        journal_ok=np.array([st.journal_ok for st in states]),
        meal_bolus=np.array([st.meal_bolus_u for st in states], dtype=float),
        rising_jump=np.array(
            [
                st.cgm.rising_jump_only and st.cgm.jump_floor_mgdl >= s.low_suspend_mgdl
                for st, s in zip(states, settings)
            ]
        ),
        **_settings_arrays(settings),
    )
    return [
        _verdict(d, i, proposals[i], states[i], settings[i], preds[i]) for i in range(len(settings))
    ]


def _predicted_lows(preds: Sequence[np.ndarray | None]) -> list[tuple[float, float, bool]]:
    """`predicted_low` of many forecasts; one vectorised pass when they are all [H, Q] alike
    (the MPC's case: 30 per-patient calls cost more than the rest of the supervisor)."""
    arrays = [p for p in preds if isinstance(p, np.ndarray) and p.ndim == 2]
    if not preds or len(arrays) != len(preds) or len({a.shape for a in arrays}) != 1:
        return [predicted_low(p) for p in preds]
    return _lows(np.stack(arrays).astype(float))


def _verdict(
    d: Decision,
    i: int,
    p: Proposal,
    st: SafetyState,
    s: PatientSettings,
    pred: tuple[float, float, bool],
) -> Verdict:
    fb = _FALLBACK_NAMES[int(d.fallback[i])]
    raw = int(d.vetoes[i])
    if not raw:  # the common case: nothing to explain (building the explanations is costly)
        return Verdict(
            temp_basal_u_per_h=float(d.rate[i]),
            duration_min=int(d.duration[i]),
            bolus_u=float(d.bolus[i]),
            suspend=bool(d.suspend[i]),
            vetoes=[],
            fallback=fb,
        )
    reasons: list[str] = []
    bits = Veto(raw)
    explain = {
        Veto.NON_FINITE_PROPOSAL: lambda: (
            f"non-finite proposal (rate {p.temp_basal_u_per_h}, "
            f"bolus {p.bolus_u}, duration {p.duration_min})"
        ),
        Veto.NEGATIVE_PROPOSAL: lambda: "negative insulin proposed",
        Veto.MAX_BASAL: lambda: (
            f"{p.temp_basal_u_per_h:.2f} U/h above max basal {d.max_basal[i]:.2f} U/h"
        ),
        Veto.MAX_DURATION: lambda: (
            f"temp basal {p.duration_min} min longer than {MAX_TEMP_MINUTES} min"
        ),
        Veto.MAX_BOLUS: lambda: f"bolus {p.bolus_u:.2f} U above max bolus {s.max_bolus_u:.2f} U",
        Veto.MAX_IOB: lambda: (
            f"IOB {st.iob_u:.2f} U (+{st.unconfirmed_bolus_u:.2f} unconfirmed) would "
            f"exceed max IOB {s.max_iob_u:.2f} U"
        ),
        Veto.PREDICTED_LOW: lambda: (
            f"predicted median {pred[0]:.0f} (lowest quantile {pred[1]:.0f}) "
            f"mg/dL within {PLGS_HORIZON_MIN:.0f} min; limits {s.low_suspend_mgdl:.0f} / {LEVEL2_LOW_MGDL:.0f}"
        ),
        Veto.LOW_GLUCOSE: lambda: (
            f"glucose {st.cgm.glucose_mgdl:.0f} mg/dL < {s.low_suspend_mgdl:.0f}"
        ),
        Veto.PREDICTION_INVALID: lambda: "prediction non-finite within 30 min",
        Veto.CGM_UNUSABLE: lambda: (
            f"CGM {st.cgm.problem.label}: {st.cgm.detail}"
            + (
                f"; last valid {st.cgm.last_valid_mgdl:.0f} mg/dL is low"
                if st.cgm.last_valid_low
                else ""
            )
        ),
        Veto.PUMP_FAULT: lambda: f"pump fault {st.pump.fault if st.pump else ''}",
        Veto.PUMP_SUSPENDED: lambda: "pump suspended (not by the loop; it will not resume it)",
        Veto.UNCONFIRMED_BOLUS: lambda: f"{st.unconfirmed_bolus_u:.2f} U bolus not yet confirmed",
        Veto.JOURNAL_UNAVAILABLE: lambda: "journal unavailable: no insulin above scheduled basal",
    }
    for v in Veto:
        if v in bits:
            reasons.append(f"{v.label}: {explain[v]()}")
    return Verdict(
        temp_basal_u_per_h=float(d.rate[i]),
        duration_min=int(d.duration[i]),
        bolus_u=float(d.bolus[i]),
        suspend=bool(d.suspend[i]),
        vetoes=reasons,
        fallback=fb,
    )


# --------------------------------------------------------------------------- the action


def command_key(patient: str, cycle_time: pd.Timestamp, kind: CommandKind | str) -> str:
    """Idempotency key: one command of each kind per patient per cycle, ever."""
    t = pd.Timestamp(cycle_time)
    t = t.tz_localize("UTC") if t.tzinfo is None else t.tz_convert("UTC")
    return f"{patient}/{t.strftime('%Y-%m-%dT%H:%M:%SZ')}/{kind}"


@dataclass
class CommandResult:
    """What happened to one command: acknowledged, refused, or unknown (never retried)."""

    command: Command
    ack: Ack | None
    status: str  # "acked" | "failed" | "unknown" | "skipped"
    detail: str = ""


@dataclass
class Supervisor:
    """Checks proposals for one patient and is the only code that commands its pump.

    `pump` and `journal` are optional so the pure `check` can be used on its own (trials,
    property tests); `apply` needs the pump.
    """

    settings: PatientSettings
    pump: Pump | None = None
    journal: Journal | None = None
    patient: str = ""
    log: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        validate_settings(self.settings)
        self.patient = self.patient or self.settings.name

    def check(self, proposal: Proposal, state: SafetyState) -> Verdict:
        """Pure: the verdict for one proposal (see module docstring for the rules)."""
        return check_batch([self.settings], [proposal], [state])[0]

    def commands_for(
        self, verdict: Verdict, cycle_time: pd.Timestamp, pump: PumpStatus | None
    ) -> list[Command]:
        """The pump commands that carry out a verdict (pure)."""

        def key(kind: CommandKind) -> str:
            return command_key(self.patient, cycle_time, kind)

        if pump is not None and (pump.fault or pump.suspended):
            return []  # nothing a faulted or user-suspended pump should be asked to deliver
        cmds: list[Command] = []
        sched = self.settings.basal_u_per_h
        rate = verdict.temp_basal_u_per_h
        if verdict.fallback == "scheduled_basal" or (
            not verdict.suspend and abs(rate - sched) < 0.025
        ):
            if pump is None or pump.temp_basal is not None:
                cmds.append(Command(key(CommandKind.CANCEL_TEMP), CommandKind.CANCEL_TEMP))
        else:
            r = 0.0 if verdict.suspend else rate
            cmds.append(
                Command(
                    key(CommandKind.TEMP_BASAL), CommandKind.TEMP_BASAL, r, verdict.duration_min
                )
            )
        if verdict.bolus_u > 0 and not verdict.suspend:
            cmds.append(Command(key(CommandKind.BOLUS), CommandKind.BOLUS, verdict.bolus_u))
        return cmds

    def apply(
        self, verdict: Verdict, cycle_time: pd.Timestamp, *, journal_vetoes: bool = True
    ) -> list[CommandResult]:
        """Journal the vetoes, then send the verdict's commands with write-ahead intent.

        A command whose key the journal already holds is not sent again (a restarted cycle):
        its recorded outcome is returned, after asking the pump about it if it was unresolved.
        When the journal cannot record an intent, only commands that reduce insulin (cancel
        temp, zero temp) are sent; a bolus or a raise is skipped. On a pump error the same key
        is queried once and nothing further is sent this cycle.
        """
        if self.pump is None:
            raise SafetyError("Supervisor.apply needs a pump")
        from serving.journal import JournalError

        if journal_vetoes and verdict.vetoes:  # (the loop journals them with its cycle record)
            self._journal_events(
                [("veto", {"reason": r, "fallback": verdict.fallback}) for r in verdict.vetoes],
                cycle_time,
            )
        try:
            status = self.pump.status()
        except PumpError as e:
            self._journal_event(
                "fault", cycle_time, {"pump": "status unavailable", "error": str(e)}
            )
            status = None
        results: list[CommandResult] = []
        for cmd in self.commands_for(verdict, cycle_time, status):
            known = self._known(cmd)
            if known is not None:
                results.append(known)
                if known.status == "unknown":
                    break
                continue
            journaled = True
            if self.journal is not None:
                try:
                    self.journal.begin_command(cmd, patient=self.patient, cycle_time=cycle_time)
                except JournalError as e:
                    journaled = False
                    if not _reduces_insulin(cmd, self.settings):
                        self._warn(f"journal unavailable ({e}); not sending {cmd.kind} {cmd.key}")
                        results.append(
                            CommandResult(cmd, None, "skipped", f"journal unavailable: {e}")
                        )
                        continue
                    self._warn(
                        f"journal unavailable ({e}); sending insulin-reducing {cmd.kind} anyway"
                    )
            res = self._send(cmd)
            results.append(res)
            if journaled:
                self._finish(res, cycle_time)
            if res.status == "unknown":
                break  # no blind retry, and nothing more to a pump we cannot hear
        return results

    # -- helpers
    def _known(self, cmd: Command) -> CommandResult | None:
        if self.journal is None:
            return None
        from serving.journal import JournalError

        try:
            rec = self.journal.command(cmd.key)
        except JournalError:
            return None
        if rec is None:
            return None
        if rec.status in ("acked", "failed"):
            return CommandResult(cmd, rec.ack, rec.status, "already resolved in the journal")
        # pending/unknown: ask the pump about this key (a query, not a resend)
        res = self._query(cmd)
        if res.status != "unknown":
            self._finish(res, None)
            return res
        return res

    def _query(self, cmd: Command) -> CommandResult:
        assert self.pump is not None
        status, ack, detail = resolve_command(self.pump, cmd.key)
        return CommandResult(cmd, ack, status, detail)

    def _send(self, cmd: Command) -> CommandResult:
        assert self.pump is not None
        try:
            ack = send(self.pump, cmd)
        except PumpError as e:
            q = self._query(cmd)
            if q.status == "failed" and q.ack is None:
                # the pump says it never got it: this command failed, and it stays failed —
                # the next cycle decides afresh under a new key
                q.detail = f"{type(e).__name__}: {e}; pump has no record of the key"
            elif q.status == "unknown":
                q.detail = f"{type(e).__name__}: {e}; {q.detail}"
            self._journal_event("fault", None, {"command": cmd.key, "error": f"{type(e).__name__}: {e}",
                                                "resolved": q.status})  # fmt: skip
            return q
        return CommandResult(cmd, ack, "acked" if ack.accepted else "failed", ack.detail)

    def _finish(self, res: CommandResult, cycle_time: pd.Timestamp | None) -> None:
        if self.journal is None:
            return
        from serving.journal import JournalError

        try:
            self.journal.finish_command(res.command.key, res.status, res.ack, res.detail)
            if res.status == "failed" and res.ack is not None and not res.ack.accepted:
                self._journal_event(
                    "fault", cycle_time, {"command": res.command.key, "refused": res.ack.detail}
                )
        except JournalError as e:
            self._warn(f"journal unavailable ({e}); outcome of {res.command.key} not recorded")

    def _journal_events(self, events: list[tuple[str, dict]], time: pd.Timestamp | None) -> None:
        if self.journal is None:
            self.log.extend(f"{k}: {d}" for k, d in events)
            return
        from serving.journal import JournalError

        try:
            self.journal.event_many(events, patient=self.patient, time=time)
        except JournalError as e:
            self._warn(f"journal unavailable ({e}); {events}")

    def _journal_event(self, kind: str, time: pd.Timestamp | None, detail: dict) -> None:
        if self.journal is None:
            self.log.append(f"{kind}: {detail}")
            return
        from serving.journal import JournalError

        try:
            self.journal.event(kind, detail, patient=self.patient, time=time)
        except JournalError as e:
            self._warn(f"journal unavailable ({e}); {kind} {detail}")

    def _warn(self, msg: str) -> None:
        self.log.append(msg)
        print(f"glucast supervisor [{self.patient}]: warning: {msg}", file=sys.stderr)


def _reduces_insulin(cmd: Command, settings: PatientSettings) -> bool:
    if cmd.kind in (CommandKind.CANCEL_TEMP, CommandKind.SUSPEND):
        return True
    return cmd.kind is CommandKind.TEMP_BASAL and cmd.amount <= settings.basal_u_per_h


__all__ = [
    "CGMCheck",
    "CGMProblem",
    "CommandResult",
    "Decision",
    "SafetyError",
    "SafetyState",
    "Supervisor",
    "Veto",
    "assess_cgm",
    "check_batch",
    "command_key",
    "decide",
    "max_basal",
    "predicted_low",
    "validate_settings",
]
