"""Dosing policies for data generation: basal–bolus, and basal–bolus with excitation.

These are not the closed-loop controllers of `serving.controllers` (those go through the
supervisor); they are the simple, vectorised policies that generate training data.

`BasalBolusController` is simglucose's BBController in consistent units: basal u2ss·BW/6000
U/min (as U/h), a meal bolus of announced grams / CR, plus (CGM − target)/CF when CGM > 150.
The bolus is given when the meal is announced, not one env step later.

`ExcitationPolicy` adds what a forecaster needs to learn how glucose answers insulin: random
temp basals (0–250 % of basal, in 30-minute blocks) and small extra boluses, with safety
rules (no extra insulin when CGM is low or missing) so that runs stay physiological.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from forecast.insulin import bolus_calculator
from forecast.sim.errors import SimInputError
from forecast.sim.patient import Patients
from forecast.sim.rng import STREAM_EXCITATION, PerPatientDraws, stream_seeds


@dataclass
class BasalBolusController:
    """simglucose-like basal–bolus therapy for N patients (U/h basal, U bolus)."""

    patients: Patients
    target_mgdl: float = 140.0
    correction_above_mgdl: float = 150.0
    correction_scale: float = 1.0  # simglucose: 1 (full correction (BG - target) / CF)

    def __post_init__(self) -> None:
        self._basal = self.patients.basal_u_per_h
        self._zeros = np.zeros(len(self.patients))

    def basal_u_per_h(self) -> np.ndarray:
        """[N] the basal that holds each patient at steady state (u2ss·BW/6000 U/min, as U/h)."""
        return self._basal

    def bolus_u(self, cgm: np.ndarray, announced_carbs_g: np.ndarray) -> np.ndarray:
        """[N] bolus for the meals announced now: carbs/CR + correction above 150 mg/dL."""
        carbs = np.asarray(announced_carbs_g, dtype=np.float64)
        if not (carbs > 0).any():
            return self._zeros
        return bolus_calculator(
            carbs,
            cgm,
            carb_ratio_g_per_u=self.patients.cr,
            isf_mgdl_per_u=self.patients.cf,
            target_mgdl=self.target_mgdl,
            correct_above_mgdl=self.correction_above_mgdl,
            correction_scale=self.correction_scale,
        )

    def act(
        self, minute: int, cgm: np.ndarray, announced_carbs_g: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """(basal U/h [N], bolus U [N]) for the cycle starting at `minute`."""
        return self.basal_u_per_h(), self.bolus_u(cgm, announced_carbs_g)


@dataclass(frozen=True)
class ExcitationConfig:
    """Random perturbations on top of basal–bolus therapy.

    Every `block_minutes` a patient gets, with probability `temp_basal_prob`, a temp basal of
    a multiple of its basal drawn uniformly from `temp_basal_range`; otherwise the scheduled
    basal. Extra boluses arrive as a Poisson process (`extra_boluses_per_day`), sized as a
    fraction of total daily insulin drawn from `extra_bolus_tdi_fraction`. Safety: below
    `low_mgdl` (or without a reading) temp basals never exceed the scheduled basal and no
    extra bolus is given and the meal bolus is scaled by `meal_bolus_scale_when_low` (what a
    person eating while low does); below `suspend_below_mgdl` basal is suspended and no meal
    bolus is given. Without these guards the simglucose carb ratios of some children
    (child#003, child#008) drive plasma BG to zero within days, and such trajectories teach a
    forecaster nothing about a living patient.
    """

    block_minutes: int = 30
    temp_basal_prob: float = 0.5
    temp_basal_range: tuple[float, float] = (0.0, 2.0)  # mean 1: excites without drifting low
    extra_boluses_per_day: float = 2.0
    extra_bolus_tdi_fraction: tuple[float, float] = (0.01, 0.04)
    low_mgdl: float = 100.0
    suspend_below_mgdl: float = 70.0
    meal_bolus_scale_when_low: float = 0.5

    def __post_init__(self) -> None:
        if self.block_minutes < 1 or not 0 <= self.temp_basal_prob <= 1:
            raise SimInputError("block_minutes must be >= 1 and temp_basal_prob in [0, 1]")
        lo, hi = self.temp_basal_range
        if not 0 <= lo <= hi:
            raise SimInputError(f"temp_basal_range must satisfy 0 <= lo <= hi, got {(lo, hi)}")
        lo, hi = self.extra_bolus_tdi_fraction
        if not 0 <= lo <= hi < 1 or self.extra_boluses_per_day < 0:
            raise SimInputError("extra_bolus_tdi_fraction must be 0 <= lo <= hi < 1, rate >= 0")


class ExcitationPolicy:
    """Basal–bolus with random temp basals and small extra boluses (per-patient streams)."""

    def __init__(
        self,
        patients: Patients,
        seed: int = 0,
        config: ExcitationConfig | None = None,
        base: BasalBolusController | None = None,
    ):
        self.patients = patients
        self.config = config or ExcitationConfig()
        # Gentler corrections than simglucose's: with the S2008 children's correction factors,
        # a full correction above 150 after a rebound drives BG to zero within days (measured,
        # 14 days, seed 1: 7 of 30 patients below 10 mg/dL; with 30 % above 200: median time
        # < 70 of 1.9 %, none below 10). The extra boluses excite insulin instead.
        self.base = base or BasalBolusController(
            patients, correction_above_mgdl=200.0, correction_scale=0.3
        )
        self._draws = PerPatientDraws(stream_seeds(seed, patients.ids, STREAM_EXCITATION), 4)
        self._multiplier = np.ones(len(patients))
        self._block = -1

    def act(
        self, minute: int, cgm: np.ndarray, announced_carbs_g: np.ndarray, step_minutes: int = 5
    ) -> tuple[np.ndarray, np.ndarray]:
        """(basal U/h [N], bolus U [N]) for the cycle [minute, minute + step_minutes)."""
        c = self.config
        u = self._draws.next()  # [N, 4] one row per cycle, used or not (keeps streams aligned)
        block = minute // c.block_minutes
        if block != self._block:
            self._block = block
            lo, hi = c.temp_basal_range
            self._multiplier = np.where(u[:, 0] < c.temp_basal_prob, lo + (hi - lo) * u[:, 1], 1.0)
        g = np.asarray(cgm, dtype=np.float64)
        ok = g >= c.low_mgdl  # False for NaN (no reading)
        suspend = g < c.suspend_below_mgdl
        mult = np.where(ok, self._multiplier, np.minimum(self._multiplier, 1.0))
        mult = np.where(suspend, 0.0, mult)
        basal = self.base.basal_u_per_h() * mult
        bolus = self.base.bolus_u(g, announced_carbs_g)
        bolus = bolus * np.where(ok, 1.0, np.where(suspend, 0.0, c.meal_bolus_scale_when_low))
        p_extra = c.extra_boluses_per_day * step_minutes / 1440.0
        lo, hi = c.extra_bolus_tdi_fraction
        extra = np.where(
            ok & (u[:, 2] < p_extra), self.patients.tdi * (lo + (hi - lo) * u[:, 3]), 0.0
        )
        return basal, bolus + extra
