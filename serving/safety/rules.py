"""The supervisor's decision rules: pure functions of a patient's state and a proposal.

Every insulin command passes `decide` (through `check_batch`, or `Supervisor.check` for one
patient) before `serving.safety.supervisor` may send it. `decide` works on numpy arrays (one
element per patient) so a cohort trial checks every patient in one call and a property test
can throw millions of random states at it. Whatever the controller says, it enforces, in the
order the clamp in `decide` reads:

- a proposal that is not a finite, non-negative number is no instruction;
- temp basals last at most 30 min, so a dead loop falls back to the scheduled basal;
- max basal = min(max basal setting, 3 × max daily basal, 4 × scheduled basal) (oref0);
- max bolus; no new bolus while one is unconfirmed; max IOB (a bolus is cut to the headroom;
  a temp above scheduled basal may only add the insulin that still fits, including any bolus
  whose delivery is unconfirmed);
- then the fallbacks, which win over everything the controller asked for:
  - predictive low-glucose suspend: within 30 min the predicted median below `low_suspend`
    or the lowest predicted quantile below 54 mg/dL (a level-2 low), or the current reading
    below `low_suspend` → zero temp basal, no bolus;
  - CGM that is stale (> 12 min), from the future (> 5 min), an error/warm-up/no-data code, out
    of range, jumping (> 40 mg/dL per 5 min) or flat-lined (`serving.safety.cgm`) → scheduled
    basal, or zero basal if the last valid reading was low (< 70 mg/dL, within the last 2 h
    like pumps' low suspend); the one exception: a *rising* jump whose both readings are
    above the low-suspend level still lets a bolus through up to the carb-ratio bolus of the
    carbs announced this cycle (`SafetyState.meal_bolus_u`, no correction): that insulin is
    justified by the announced carbs, not by the suspicious reading, which is what a pump's
    bolus calculator would give a person whose CGM looks wrong;
  - a non-finite rate or prediction, or a journal that cannot record → scheduled basal;
  - a faulted or user-suspended pump gets no insulin (suspend).

"Suspend" in a verdict means a zero temp basal of at most 30 min, renewed each cycle, never
the pump's open-ended suspend: if the loop dies, insulin delivery resumes by itself.

May import: the standard library, numpy, pandas (timestamps), `forecast.schema`,
`serving.types`, `serving.safety.cgm`, and constants and types from `serving.hal.pump` (never
a pump object). No I/O, no journal, no controller: nothing here can send a command.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntFlag
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from forecast.schema import GlucastError
from serving.hal.pump import MAX_TEMP_MINUTES
from serving.safety.cgm import SLOT_MIN, CGMCheck, CGMProblem, assess_cgm
from serving.types import PatientSettings, Proposal, Reading, Verdict

if TYPE_CHECKING:
    from serving.hal.pump import PumpStatus

PLGS_HORIZON_MIN = 30.0
LEVEL2_LOW_MGDL = 54.0  # the lowest predicted quantile may not reach a level-2 low
MIN_TEMP_MINUTES = 5


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


FALLBACK_NONE, FALLBACK_SCHEDULED, FALLBACK_SUSPEND = 0, 1, 2
_FALLBACK_NAMES = {
    FALLBACK_NONE: "",
    FALLBACK_SCHEDULED: "scheduled_basal",
    FALLBACK_SUSPEND: "suspend",
}


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


# --------------------------------------------------------------------------- the clamp
# One short function per rule, applied by `decide` in the order below. Each takes and returns
# [N] arrays and sets its `Veto` bit in `vetoes` wherever it changed the proposal.


def _mark(vetoes: np.ndarray, mask: np.ndarray, v: Veto) -> None:
    np.bitwise_or(vetoes, int(v), out=vetoes, where=mask)  # vetoes[mask] |= v, in one call


def _sanitise(
    rate: np.ndarray,
    bolus: np.ndarray,
    duration: np.ndarray,
    scheduled: np.ndarray,
    vetoes: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """NaN/inf is no instruction and insulin cannot be taken back: a non-finite bolus becomes
    none, a non-finite duration the longest temp, a non-finite rate the scheduled basal (it
    also falls back, see `_fallback`); a negative rate or bolus becomes zero. Returns the new
    (rate, bolus, duration) and the masks of non-finite rates and boluses."""
    bad_rate = ~np.isfinite(rate)
    bad_bolus = ~np.isfinite(bolus)
    bad_dur = ~np.isfinite(duration)
    _mark(vetoes, bad_rate | bad_bolus | bad_dur, Veto.NON_FINITE_PROPOSAL)
    bolus = np.where(bad_bolus, 0.0, bolus)
    duration = np.where(bad_dur, MAX_TEMP_MINUTES, duration)
    _mark(vetoes, (rate < 0) | (bolus < 0), Veto.NEGATIVE_PROPOSAL)  # (a -inf rate is both)
    rate = np.where(bad_rate, scheduled, np.maximum(rate, 0.0))
    bolus = np.maximum(bolus, 0.0)
    return rate, bolus, duration, bad_rate, bad_bolus


def _short_temp(duration: np.ndarray, vetoes: np.ndarray) -> np.ndarray:
    """Whole minutes, at most 30: a temp basal expires by itself, so a dead loop falls back."""
    _mark(vetoes, duration > MAX_TEMP_MINUTES, Veto.MAX_DURATION)
    return np.clip(np.round(duration), MIN_TEMP_MINUTES, MAX_TEMP_MINUTES)


def _at_most(x: np.ndarray, limit: np.ndarray, v: Veto, vetoes: np.ndarray) -> np.ndarray:
    """A hard limit (max basal, max bolus, IOB headroom): cut to it, never refuse outright."""
    _mark(vetoes, x > limit, v)
    return np.minimum(x, limit)


def _no_bolus_while_unconfirmed(
    bolus: np.ndarray, unconfirmed: np.ndarray, vetoes: np.ndarray
) -> np.ndarray:
    """A bolus the pump has not confirmed may still be delivered: never stack another on it."""
    _mark(vetoes, (bolus > 0) & (unconfirmed > 0), Veto.UNCONFIRMED_BOLUS)
    return np.where(unconfirmed > 0, 0.0, bolus)


def _temp_within_iob(
    rate: np.ndarray,
    scheduled: np.ndarray,
    room_u: np.ndarray,
    duration: np.ndarray,
    vetoes: np.ndarray,
) -> np.ndarray:
    """A temp above scheduled adds insulin on board: only what still fits under max IOB
    (`room_u`: the headroom the bolus left), spread over the temp's duration."""
    extra_allowed = room_u * 60.0 / duration  # U/h above scheduled that still fits
    over = rate > scheduled + extra_allowed
    _mark(vetoes, over, Veto.MAX_IOB)
    return np.where(over, np.minimum(rate, scheduled + extra_allowed), rate)


def _fallback(
    causes: Sequence[tuple[np.ndarray, int, Veto]], shape: tuple[int, ...], vetoes: np.ndarray
) -> np.ndarray:
    """The FALLBACK_* code per patient: the strongest of its causes (suspend beats scheduled
    basal where both apply); each cause marks its veto."""
    fallback = np.full(shape, FALLBACK_NONE, dtype=np.int64)
    for mask, code, v in causes:
        _mark(vetoes, mask, v)
        fallback[mask] = np.maximum(fallback[mask], code)
    return fallback


def _fallback_rate(
    rate: np.ndarray, fallback: np.ndarray, scheduled: np.ndarray, cap: np.ndarray
) -> np.ndarray:
    """Scheduled basal or zero where a fallback applies. Scheduled basal can itself exceed the
    oref0 cap only with inconsistent settings, which Supervisor refuses; np.minimum keeps the
    invariant even for raw callers."""
    rate = np.where(fallback == FALLBACK_SCHEDULED, np.minimum(scheduled, cap), rate)
    return np.where(fallback == FALLBACK_SUSPEND, 0.0, rate)


def _fallback_bolus(
    bolus: np.ndarray, fallback: np.ndarray, meal_ok: np.ndarray, meal_bolus: np.ndarray
) -> np.ndarray:
    """No bolus under a fallback, except the announced meal's own bolus through a rising CGM
    jump (`meal_ok`, see `decide`), within every limit already applied."""
    return np.where(
        fallback == FALLBACK_NONE, bolus, np.where(meal_ok, np.minimum(bolus, meal_bolus), 0.0)
    )


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
    arrays = [
        np.asarray(a, dtype=float) for a in (rate, duration, bolus, scheduled, max_basal_setting,
                                             max_daily_basal, max_bolus, max_iob, low_suspend, iob,
                                             glucose, pred_median_low, pred_lowest,
                                             unconfirmed_bolus)
    ]  # fmt: skip
    if any(a.shape != arrays[0].shape for a in arrays):  # (a batch's arrays are alike)
        arrays = np.broadcast_arrays(*arrays)
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

    def like(a, dtype) -> np.ndarray:  # [N] of dtype (np.broadcast_to only where needed)
        a = np.asarray(a, dtype=dtype)
        return a if a.shape == shape else np.broadcast_to(a, shape)

    cgm_problem = like(cgm_problem, np.int64)
    last_low = like(last_valid_low, bool)
    pred_valid = like(pred_valid, bool)
    pump_fault = like(pump_fault, bool)
    pump_susp = like(pump_suspended, bool)
    journal_ok = like(journal_ok, bool)
    meal_bolus = like(meal_bolus, float)
    meal_bolus = np.where(np.isfinite(meal_bolus) & (meal_bolus > 0), meal_bolus, 0.0)
    rising_jump = like(rising_jump, bool)
    iob = np.where(np.isfinite(iob), iob, np.inf)  # unknown IOB: assume the worst
    unconf = np.where(np.isnan(unconf) | (unconf < 0), 0.0, unconf)  # inf: unknown, blocks all
    vetoes = np.zeros(shape, dtype=np.int64)

    # 1. the clamp: every proposal passes every limit, in this order
    rate, bolus, duration, bad_rate, bad_bolus = _sanitise(rate, bolus, duration, scheduled, vetoes)
    duration = _short_temp(duration, vetoes)
    cap = max_basal(mb_set, mdaily, scheduled)
    rate = _at_most(rate, cap, Veto.MAX_BASAL, vetoes)
    bolus = _at_most(bolus, mbolus, Veto.MAX_BOLUS, vetoes)
    bolus = _no_bolus_while_unconfirmed(bolus, unconf, vetoes)
    headroom = np.maximum(miob - iob - unconf, 0.0)  # insulin that may still go on board
    bolus = _at_most(bolus, headroom, Veto.MAX_IOB, vetoes)
    rate = _temp_within_iob(rate, scheduled, headroom - bolus, duration, vetoes)

    # 2. the fallbacks win over everything the controller asked for
    cgm_bad = cgm_problem != 0
    plgs = (np.isfinite(pmed) & (pmed < low_s)) | (
        np.isfinite(plowest) & (plowest < LEVEL2_LOW_MGDL)
    )
    fallback = _fallback(
        [
            # no record of intent, no insulin above scheduled basal
            (~journal_ok, FALLBACK_SCHEDULED, Veto.JOURNAL_UNAVAILABLE),
            # a controller that produced NaN/inf has no plan worth following
            (bad_rate, FALLBACK_SCHEDULED, Veto.NON_FINITE_PROPOSAL),
            # a broken forecast must not drive insulin
            (~pred_valid, FALLBACK_SCHEDULED, Veto.PREDICTION_INVALID),
            # an untrusted CGM: scheduled basal, or zero if the last valid reading was low
            (cgm_bad & ~last_low, FALLBACK_SCHEDULED, Veto.CGM_UNUSABLE),
            (cgm_bad & last_low, FALLBACK_SUSPEND, Veto.CGM_UNUSABLE),
            # low now, or a low predicted within 30 min: suspend
            (~cgm_bad & np.isfinite(glucose) & (glucose < low_s), FALLBACK_SUSPEND, Veto.LOW_GLUCOSE),
            (pred_valid & plgs, FALLBACK_SUSPEND, Veto.PREDICTED_LOW),
            # a faulted or user-suspended pump is asked for nothing
            (pump_fault, FALLBACK_SUSPEND, Veto.PUMP_FAULT),
            (pump_susp & ~pump_fault, FALLBACK_SUSPEND, Veto.PUMP_SUSPENDED),
        ],
        shape,
        vetoes,
    )  # fmt: skip
    rate = _fallback_rate(rate, fallback, scheduled, cap)
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
    bolus = _fallback_bolus(bolus, fallback, meal_ok, meal_bolus)
    return Decision(
        rate=rate,
        duration=duration.astype(np.int64),
        bolus=bolus,
        suspend=fallback == FALLBACK_SUSPEND,
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


_CHECKED: list[tuple[tuple[PatientSettings, ...], dict[str, np.ndarray]]] = []


def _checked_settings(settings: Sequence[PatientSettings]) -> dict[str, np.ndarray]:
    """`validate_settings` of each and `_settings_arrays` of the batch, remembered for the
    last few batches of the very same (frozen) settings objects: a loop or trial asks about
    the same cohort every cycle."""
    key = tuple(settings)
    for held, arrays in _CHECKED:
        if len(held) == len(key) and all(a is b for a, b in zip(held, key)):
            return arrays
    for s in key:
        validate_settings(s)
    arrays = _settings_arrays(key)
    for a in arrays.values():
        a.setflags(write=False)
    _CHECKED.insert(0, (key, arrays))
    del _CHECKED[4:]
    return arrays


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
    limits = _checked_settings(settings)
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
        **limits,
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


__all__ = [
    "FALLBACK_NONE",
    "FALLBACK_SCHEDULED",
    "FALLBACK_SUSPEND",
    "LEVEL2_LOW_MGDL",
    "MIN_TEMP_MINUTES",
    "PLGS_HORIZON_MIN",
    "Decision",
    "SafetyError",
    "SafetyState",
    "Veto",
    "check_batch",
    "decide",
    "max_basal",
    "predicted_low",
    "validate_settings",
]
