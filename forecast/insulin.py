"""Insulin and carbohydrate kinetics: activity, insulin on board (IOB), carbs on board (COB).

Insulin follows oref0's "exponential" curve for rapid-acting analogues (Dragan Maksimovic's
model, used by OpenAPS, AndroidAPS, Trio and Loop). With peak time ``tp`` and duration of
insulin action ``td`` (both minutes)::

    tau = tp * (1 - tp / td) / (1 - 2 * tp / td)       time constant of the decay
    a   = 2 * tau / td                                 rise-time factor
    S   = 1 / (1 - a + (1 + a) * exp(-td / tau))       scale so that the activity integrates to 1

    activity(t)     = (S / tau**2) * t * (1 - t / td) * exp(-t / tau)          per minute
    iob_fraction(t) = 1 - S * (1 - a) * ((t**2 / (tau * td * (1 - a)) - t / tau - 1)
                                         * exp(-t / tau) + 1)

for ``0 <= t <= td``; ``iob_fraction`` is 1 at t = 0 and 0 at t = td, and ``activity`` is its
negative derivative. The curve needs ``tp < td / 2`` (otherwise tau is not positive).

Carbohydrate absorption is triangular over ``absorption_min``: the absorption rate rises
linearly to its peak at half the absorption time and falls linearly back to zero, the same
shape Loop's "linear" absorption uses in spirit and the simplest one that starts and ends at
rate 0. Its COB fraction has a closed form, so meals are conserved exactly.

Per-slot quantities (the canonical frame has one row per 5-minute slot) are built from the
closed forms, never from a sampled rate: a dose delivered in slot ``k`` is treated as given at
the start of that slot, and the amount acting in slot ``k + m`` is
``iob_fraction(m * slot) - iob_fraction((m + 1) * slot)``. The per-slot activity therefore
telescopes to the dose exactly and ``IOB[j + 1] = IOB[j] - activity[j] + dose[j + 1]`` holds
slot by slot. The convolution with the dose history is a causal FIR filter along the last axis
(a shift-and-add over the kernel's taps): exact for any history length (nothing is truncated
except what the curve itself ends), vectorised over any leading axes, bit-identical for a row
alone or in a batch, and — because every kernel tap and every dose is non-negative — never
negative.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from forecast.schema import SLOT_MINUTES, GlucastError

__all__ = [
    "CarbCurve",
    "InsulinCurve",
    "KineticsError",
    "carb_absorption",
    "carbs_on_board",
    "insulin_activity",
    "insulin_on_board",
]


class KineticsError(GlucastError, ValueError):
    """Curve parameters or dose arrays that the kinetics cannot use."""


# --------------------------------------------------------------------------- curves


@dataclass(frozen=True)
class InsulinCurve:
    """oref0's exponential action curve of a rapid-acting analogue (defaults: Novorapid/Humalog).

    `peak_min` is the time of peak activity and `dia_min` the duration of insulin action, both
    in minutes after the dose. oref0 uses 75/360 for "rapid-acting" and 55/360 for Fiasp/Lyumjev
    ("ultra-rapid").
    """

    peak_min: float = 75.0
    dia_min: float = 360.0

    def __post_init__(self) -> None:
        if not (np.isfinite(self.peak_min) and np.isfinite(self.dia_min)):
            raise KineticsError("InsulinCurve peak_min and dia_min must be finite numbers")
        if self.dia_min <= 0 or self.peak_min <= 0:
            raise KineticsError(
                f"InsulinCurve needs positive peak_min and dia_min, got peak_min={self.peak_min}, "
                f"dia_min={self.dia_min}"
            )
        if 2 * self.peak_min >= self.dia_min:
            raise KineticsError(
                f"InsulinCurve peak_min={self.peak_min} must be less than half of "
                f"dia_min={self.dia_min} (the exponential model's time constant is undefined "
                "otherwise); lengthen dia_min or shorten peak_min"
            )

    @property
    def tau(self) -> float:
        """Time constant of the exponential decay (minutes)."""
        tp, td = self.peak_min, self.dia_min
        return tp * (1 - tp / td) / (1 - 2 * tp / td)

    @property
    def _a(self) -> float:
        return 2 * self.tau / self.dia_min

    @property
    def _s(self) -> float:
        a, tau, td = self._a, self.tau, self.dia_min
        return 1 / (1 - a + (1 + a) * np.exp(-td / tau))

    def iob_fraction(self, t_min: np.ndarray) -> np.ndarray:
        """Fraction of a dose still on board `t_min` minutes after it was given.

        1 for t <= 0 (nothing has acted yet), decreasing, exactly 0 from `dia_min` on.
        """
        t = np.asarray(t_min, dtype=np.float64)
        tc = np.clip(t, 0.0, self.dia_min)
        tau, td, a, s = self.tau, self.dia_min, self._a, self._s
        f = 1 - s * (1 - a) * (
            (tc**2 / (tau * td * (1 - a)) - tc / tau - 1) * np.exp(-tc / tau) + 1
        )
        f = np.clip(f, 0.0, 1.0)
        return np.where(t >= td, 0.0, np.where(t <= 0, 1.0, f))

    def activity(self, t_min: np.ndarray) -> np.ndarray:
        """Fraction of a dose acting per minute `t_min` minutes after it (0 outside [0, dia])."""
        t = np.asarray(t_min, dtype=np.float64)
        tau, td, s = self.tau, self.dia_min, self._s
        inside = (t >= 0) & (t <= td)
        tc = np.where(inside, t, 0.0)
        act = (s / tau**2) * tc * (1 - tc / td) * np.exp(-tc / tau)
        return np.where(inside, np.maximum(act, 0.0), 0.0)

    def iob_kernel(self, slot_minutes: float = SLOT_MINUTES) -> np.ndarray:
        """IOB fraction at the start of each slot after a dose: ``[K]``, ``K*slot > dia``."""
        return _kernels("insulin", self.peak_min, self.dia_min, float(slot_minutes))[0].copy()

    def activity_kernel(self, slot_minutes: float = SLOT_MINUTES) -> np.ndarray:
        """Fraction of a dose acting during each slot after it: ``[K]``, sums to 1 exactly."""
        return _kernels("insulin", self.peak_min, self.dia_min, float(slot_minutes))[1].copy()


@dataclass(frozen=True)
class CarbCurve:
    """Triangular carbohydrate absorption over `absorption_min` minutes (default 3 h)."""

    absorption_min: float = 180.0

    def __post_init__(self) -> None:
        if not np.isfinite(self.absorption_min) or self.absorption_min <= 0:
            raise KineticsError(
                f"CarbCurve absorption_min must be a positive number of minutes, "
                f"got {self.absorption_min}"
            )

    def cob_fraction(self, t_min: np.ndarray) -> np.ndarray:
        """Fraction of a meal not yet absorbed `t_min` minutes after it (1 → 0 at absorption)."""
        t = np.asarray(t_min, dtype=np.float64)
        big_t = self.absorption_min
        tc = np.clip(t, 0.0, big_t)
        first = 1 - 2 * tc**2 / big_t**2  # rising half: absorbed = 2 t² / T²
        second = 2 * (big_t - tc) ** 2 / big_t**2  # falling half
        f = np.where(tc < big_t / 2, first, second)
        return np.where(t >= big_t, 0.0, np.where(t <= 0, 1.0, np.clip(f, 0.0, 1.0)))

    def absorption(self, t_min: np.ndarray) -> np.ndarray:
        """Fraction of a meal absorbed per minute `t_min` minutes after it (triangle, area 1)."""
        t = np.asarray(t_min, dtype=np.float64)
        big_t = self.absorption_min
        rate = np.where(t < big_t / 2, 4 * t / big_t**2, 4 * (big_t - t) / big_t**2)
        return np.where((t >= 0) & (t <= big_t), np.maximum(rate, 0.0), 0.0)

    def cob_kernel(self, slot_minutes: float = SLOT_MINUTES) -> np.ndarray:
        """COB fraction at the start of each slot after a meal: ``[K]``."""
        return _kernels("carbs", self.absorption_min, 0.0, float(slot_minutes))[0].copy()

    def absorption_kernel(self, slot_minutes: float = SLOT_MINUTES) -> np.ndarray:
        """Fraction of a meal absorbed during each slot after it: ``[K]``, sums to 1 exactly."""
        return _kernels("carbs", self.absorption_min, 0.0, float(slot_minutes))[1].copy()


@lru_cache(maxsize=64)
def _kernels(kind: str, p1: float, p2: float, slot_minutes: float) -> tuple[np.ndarray, np.ndarray]:
    """(on-board kernel, per-slot action kernel) for a curve, cached (they are tiny).

    The on-board kernel is made monotone (a running minimum) so that the per-slot action,
    its negative difference, is never negative even where rounding would say -1e-17.
    """
    if not np.isfinite(slot_minutes) or slot_minutes <= 0:
        raise KineticsError(f"slot_minutes must be a positive number, got {slot_minutes}")
    if kind == "insulin":
        curve_end = p2
        frac = InsulinCurve(p1, p2).iob_fraction
    else:
        curve_end = p1
        frac = CarbCurve(p1).cob_fraction
    n = int(np.ceil(curve_end / slot_minutes)) + 1  # last tap is past the end: exactly 0
    on_board = np.minimum.accumulate(frac(np.arange(n + 1) * slot_minutes))  # [K+1]
    action = on_board[:-1] - on_board[1:]  # [K], telescopes to on_board[0] - 0 = 1
    on_board = on_board[:-1]
    on_board.setflags(write=False)
    action.setflags(write=False)
    return on_board, action


# --------------------------------------------------------------------------- convolutions


def _doses(x: np.ndarray | list, what: str) -> np.ndarray:
    """Validate a dose array at the boundary: finite (NaN allowed for carbs → 0), non-negative."""
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim == 0:
        raise KineticsError(f"{what} must be an array whose last axis is time slots, got a scalar")
    if np.isinf(arr).any():
        raise KineticsError(f"{what} has infinite values")
    if (arr[np.isfinite(arr)] < 0).any():
        raise KineticsError(f"{what} has negative values; doses are amounts delivered (>= 0)")
    return arr


def _causal_filter(x: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """y[..., j] = sum_m kernel[m] * x[..., j - m] along the last axis (zeros before the start).

    A shift-and-add over the taps: vectorised over every leading axis, O(size × taps), and
    the terms are summed in the same order whatever the array's shape, so a row gives the
    same bits alone or inside a batch (training, evaluation and serving agree exactly). Taps
    beyond the array's length cannot contribute and are skipped.
    """
    y = np.zeros_like(x)
    n = x.shape[-1]
    for m in range(min(len(kernel), n)):
        if kernel[m] != 0.0:
            y[..., m:] += kernel[m] * x[..., : n - m]
    return y


def insulin_on_board(
    insulin_u: np.ndarray, slot_minutes: float = SLOT_MINUTES, curve: InsulinCurve = InsulinCurve()
) -> np.ndarray:
    """Insulin on board (U) at the start of every slot, after that slot's dose.

    `insulin_u` holds units delivered per slot on its last axis (any leading axes); NaN is not
    accepted (write 0 where nothing was delivered). IOB of a single dose is the dose at its own
    slot and 0 from `dia_min` on.
    """
    u = _doses(insulin_u, "insulin_u")
    if np.isnan(u).any():
        raise KineticsError("insulin_u has NaN; write 0 where no insulin was delivered")
    return _causal_filter(
        u, _kernels("insulin", curve.peak_min, curve.dia_min, float(slot_minutes))[0]
    )


def insulin_activity(
    insulin_u: np.ndarray, slot_minutes: float = SLOT_MINUTES, curve: InsulinCurve = InsulinCurve()
) -> np.ndarray:
    """Units of insulin acting during every slot (the slot's share of each earlier dose).

    Summed over a long enough horizon it equals the total delivered: no insulin is lost.
    """
    u = _doses(insulin_u, "insulin_u")
    if np.isnan(u).any():
        raise KineticsError("insulin_u has NaN; write 0 where no insulin was delivered")
    return _causal_filter(
        u, _kernels("insulin", curve.peak_min, curve.dia_min, float(slot_minutes))[1]
    )


def carbs_on_board(
    carbs_g: np.ndarray, slot_minutes: float = SLOT_MINUTES, curve: CarbCurve = CarbCurve()
) -> np.ndarray:
    """Carbohydrate on board (g) at the start of every slot, after that slot's meal.

    NaN (a meal whose size is unknown) counts as 0 g: it cannot be absorbed by a known amount.
    """
    c = np.nan_to_num(_doses(carbs_g, "carbs_g"), nan=0.0)
    return _causal_filter(c, _kernels("carbs", curve.absorption_min, 0.0, float(slot_minutes))[0])


def carb_absorption(
    carbs_g: np.ndarray, slot_minutes: float = SLOT_MINUTES, curve: CarbCurve = CarbCurve()
) -> np.ndarray:
    """Grams absorbed during every slot; over a long enough horizon it sums to the grams eaten.

    NaN carbs count as 0 g (see `carbs_on_board`).
    """
    c = np.nan_to_num(_doses(carbs_g, "carbs_g"), nan=0.0)
    return _causal_filter(c, _kernels("carbs", curve.absorption_min, 0.0, float(slot_minutes))[1])


# --------------------------------------------------------------------------- what a controller counts


def iob_before(dose_u: np.ndarray, kernel: np.ndarray) -> np.ndarray | float:
    """Insulin on board at the start of the last slot, before its own dose.

    ``Σ_{m≥1} kernel[m]·dose[−1−m]``: `dose_u` is U per slot on the last axis, oldest first,
    the last slot being the current one (its dose still to decide); `kernel` is
    `InsulinCurve.iob_kernel` (kernel[0] = 1). What `serving.types.ControlInput.iob_u` holds
    and what the supervisor counts, for one patient (a float) or a cohort (``[N, T]`` → ``[N]``).
    A history shorter than the kernel counts only what it has.
    """
    d = np.asarray(dose_u, dtype=np.float64)[..., :-1][..., ::-1][..., : len(kernel) - 1]
    out = d @ np.asarray(kernel, dtype=np.float64)[1 : 1 + d.shape[-1]]
    return float(out) if np.ndim(out) == 0 else out


def basal_iob_u(
    basal_u_per_h: float | np.ndarray,
    *,
    slot_minutes: float = SLOT_MINUTES,
    curve: InsulinCurve | None = None,
    include_current: bool = False,
) -> float | np.ndarray:
    """Insulin on board of a patient who has had only scheduled basal for a whole DIA.

    IOB from steady scheduled basal is not "extra" insulin: bolus calculators and oref0
    reason with *net* IOB (IOB above this), so a patient resting on basal has none.
    `include_current=False` gives the IOB before the current slot's dose (`iob_before`'s
    convention); True counts the current slot's dose too (`insulin_on_board`'s).
    """
    kernel = (curve or InsulinCurve()).iob_kernel(slot_minutes)  # [K], kernel[0] = 1
    per_slot = np.asarray(basal_u_per_h, dtype=np.float64) * slot_minutes / 60.0
    total = float(kernel.sum()) if include_current else float(kernel[1:].sum())
    return per_slot * total


def net_iob_u(iob_u: float, basal_u_per_h: float, *, slot_minutes: float = SLOT_MINUTES) -> float:
    """IOB above steady scheduled basal, before this cycle's dose (negative after a
    suspension): what a bolus calculator subtracts."""
    return float(iob_u) - float(basal_iob_u(basal_u_per_h, slot_minutes=slot_minutes))


def bolus_calculator(
    carbs_g: np.ndarray | float,
    glucose_mgdl: np.ndarray | float,
    *,
    carb_ratio_g_per_u: np.ndarray | float,
    isf_mgdl_per_u: np.ndarray | float,
    target_mgdl: np.ndarray | float,
    correct_above_mgdl: float,
    correction_scale: float = 1.0,
    net_iob_u: np.ndarray | float = 0.0,
) -> np.ndarray:
    """A pump's bolus calculator at announced meals, for one patient or many.

    carbs / carb ratio, plus — when glucose is above `correct_above_mgdl` — a correction of
    `correction_scale` · (glucose − target) / ISF less the positive net IOB, never negative.
    No meal (0 g, or an unknown size), no bolus: corrections between meals are a controller's
    business. Used by the simulator's dosing policies and by the runtime's basal–bolus
    controller, so the two cannot disagree on what "basal–bolus therapy" doses.
    """
    carbs = np.asarray(carbs_g, dtype=np.float64)
    g = np.asarray(glucose_mgdl, dtype=np.float64)
    meal = np.isfinite(carbs) & (carbs > 0)
    high = np.isfinite(g) & (g > correct_above_mgdl)
    corr = np.where(
        high,
        correction_scale * (g - target_mgdl) / isf_mgdl_per_u - np.maximum(0.0, net_iob_u),
        0.0,
    )
    return np.where(
        meal, np.where(meal, carbs, 0.0) / carb_ratio_g_per_u + np.maximum(corr, 0.0), 0.0
    )
