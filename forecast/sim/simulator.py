"""Closed-loop stepping: N patients, their meals, pumps and sensors, advanced k minutes at a time.

This is the API the closed-loop runtime and in-silico trials drive (docs/interfaces.md):

    sim = Simulator(load_patients("adults"), scenario=RandomScenario(), seed=1)
    while ...:
        g = sim.read_cgm()                                   # [N] mg/dL, NaN = no reading
        carbs = sim.announced_carbs(sim.minute, sim.minute + 5)
        sim.step(5, basal_u_per_h, bolus_u)                  # meals come from the scenario

A step costs one numba call plus a few NumPy operations on [N] arrays, whatever N is: no
pandas and no per-patient Python. `copy()` gives an independent simulator in the same state
(same future meals and sensor noise) for what-if re-simulation.
"""

from __future__ import annotations

import copy
import warnings
from datetime import datetime

import numpy as np
import pandas as pd

from forecast.sim import model
from forecast.sim.errors import PhysiologyWarning, SimInputError
from forecast.sim.patient import Patients
from forecast.sim.pump import Delivery, Pump, PumpConfig
from forecast.sim.replay import BG_HIGH_LIMIT, BG_LOW_LIMIT, check_inputs
from forecast.sim.rng import STREAM_PUMP, stream_seeds
from forecast.sim.scenario import MealPlan, RandomScenario, Scenario, minute_of_day, to_timestamp
from forecast.sim.sensor import CGM, SensorConfig
from forecast.sim.variability import CHUNK_MINUTES, Variability, VariabilityConfig

PLAN_AHEAD_MIN = 1440  # meals are planned this far beyond the current step
_NO_STATES = np.empty((0, 0, 13))


class Simulator:
    """N virtual patients in closed loop. Times are minutes since `start` (`minute`)."""

    def __init__(
        self,
        patients: Patients,
        *,
        scenario: Scenario | None = None,
        sensor: SensorConfig | str | None = "dexcom",
        pump: PumpConfig | str = "Insulet",
        seed: int = 0,
        start: datetime | str | pd.Timestamp | None = None,
        duration_min: int | None = None,
        model_config: model.ModelConfig | None = None,
        noise_seeds: np.ndarray | None = None,
        variability: VariabilityConfig | None = None,
    ):
        """
        scenario: meals (default: simglucose's random daily meals, per-patient streams).
        sensor: a SensorConfig, a name ('dexcom', 'none', 'simglucose') or None (no CGM).
        pump: a PumpConfig or a pump name ('Insulet', 'Cozmo', 'ideal').
        duration_min: if given, meals of the scenario must fall inside the run and stepping
        past the end is an error. noise_seeds: [N] explicit simglucose noise seeds (e.g. all
        1 to reproduce simglucose's shared sensor), else derived per patient from `seed`.
        variability: intra-patient variability (`forecast.sim.variability`; None or all off:
        the constant S2008 patients, bit-identical to a run without it).
        """
        if not isinstance(patients, Patients) or len(patients) == 0:
            raise SimInputError("Simulator needs a non-empty Patients (see load_patients)")
        self.patients = patients
        self.n = len(patients)
        self.seed = int(seed)
        self.start = to_timestamp(start)
        self.duration_min = None if duration_min is None else int(duration_min)
        if self.duration_min is not None and self.duration_min < 1:
            raise SimInputError(f"duration_min must be >= 1, got {duration_min}")
        self.model_config = model_config or model.ModelConfig()
        self.scenario = scenario if scenario is not None else RandomScenario()
        if self.duration_min is not None:
            self.scenario.check_run(patients, self.start, self.duration_min)
        self._planner = self.scenario.planner(patients, self.start, self.seed)
        self._meals = MealPlan.empty()
        self._planned_until = 0
        self.minute = 0
        self._ensure_planned(1)

        if isinstance(pump, str):
            pump = PumpConfig.named(pump)
        self.pump = Pump(pump, self.n, stream_seeds(seed, patients.ids, STREAM_PUMP))
        if isinstance(sensor, str):
            sensor = SensorConfig.named(sensor)
        self.sensor_config = sensor
        self.cgm = (
            None
            if sensor is None
            else CGM(
                sensor,
                patients.ids,
                self.seed,
                noise_seeds=noise_seeds,
                start_minute_of_day=minute_of_day(self.start),
            )  # fmt: skip
        )

        self.variability_config = variability or VariabilityConfig()
        self.variability = (
            Variability(self.variability_config, patients.ids, self.seed, minute_of_day(self.start))
            if self.variability_config.active
            else None
        )
        self.state = patients.x0.copy()  # [N, 13]
        self.meal_state = model.initial_meal_state(self.n)  # [N, 4]
        self.meal_state[:, model.MEAL_QLAST] = self.state[:, 0] + self.state[:, 1]
        vg = patients.vg
        self.bg = self.state[:, 3] / vg  # [N] plasma glucose, mg/dL
        self.gsub = self.state[:, 12] / vg  # [N] subcutaneous glucose, mg/dL
        self.delivered_basal_u = np.zeros(self.n)
        self.delivered_bolus_u = np.zeros(self.n)
        self.last_delivery: Delivery | None = None
        self.eaten_g = np.zeros(self.n)  # g eaten in the last step
        self.last_eaten = np.zeros((self.n, 0))  # [N, k] g/min eaten in the last step
        self.last_bg = self.bg[:, None].copy()  # [N, k+1] per-minute BG of the last step
        self.last_gsub = self.gsub[:, None].copy()
        self.out_of_range = np.zeros(self.n, dtype=bool)  # cumulative flag per patient
        self._bg_range = np.column_stack([self.bg, self.bg])  # [N, 2] running min, max
        self._readings: list[tuple[int, np.ndarray]] = []
        self._reading = np.full(self.n, np.nan)
        self._reading_minute = -1
        if self.cgm is not None:
            self._take_reading(0, self.gsub)

    # ------------------------------------------------------------------ time and state

    @property
    def time(self) -> pd.Timestamp:
        """The simulation clock (start + minute)."""
        return self.start + pd.Timedelta(minutes=self.minute)

    @property
    def delivered_u(self) -> np.ndarray:
        """[N] insulin that reached each patient in the last step (basal + bolus, U)."""
        return self.delivered_basal_u + self.delivered_bolus_u

    def copy(self) -> Simulator:
        """An independent simulator in the same state, with the same future meals and noise."""
        return copy.deepcopy(self, memo={id(self.patients): self.patients})

    # ------------------------------------------------------------------ meals

    def _to_minute(self, t: int | float | datetime | pd.Timestamp) -> int:
        if isinstance(t, (datetime, pd.Timestamp)):
            ts = pd.Timestamp(t)
            if ts.tzinfo is None:
                ts = ts.tz_localize(self.start.tzinfo)
            return int(round((ts - self.start).total_seconds() / 60.0))
        return int(t)

    def _ensure_planned(self, t: int) -> None:
        if t <= self._planned_until:
            return
        upto = t + PLAN_AHEAD_MIN
        new = self._planner.meals(self._planned_until, upto)
        keep = self._meals.minute >= self.minute - PLAN_AHEAD_MIN  # forget old meals
        self._meals = MealPlan.concat([self._meals.select(keep), new])
        self._planner.forget_before(self.minute)
        self._planned_until = upto
        m = self._meals
        order = np.argsort(np.where(m.announced, m.announce_minute, -1), kind="stable")
        order = order[m.announced[order]]
        self._ann_minute = m.announce_minute[order]  # announcements sorted by minute
        self._ann_patient = m.patient[order]
        self._ann_g = m.announced_g[order]

    def meals(self, t0: int | datetime, t1: int | datetime) -> MealPlan:
        """The meals (eaten and announced grams, times) whose eating starts in [t0, t1)."""
        a, b = self._to_minute(t0), self._to_minute(t1)
        self._ensure_planned(b)
        m = self._meals
        return m.select((m.minute >= a) & (m.minute < b))

    def announced_carbs(self, t0: int | datetime, t1: int | datetime) -> np.ndarray:
        """[N] grams announced to the controller in [t0, t1) (minutes since start or times).

        Announcements carry the scenario's carb-count errors, late and missed boluses. A
        closed-loop controller asks for [now, now + cycle) before it doses; asking further
        ahead is allowed (what-if experiments) and returns what *will* be announced.
        """
        a, b = self._to_minute(t0), self._to_minute(t1)
        self._ensure_planned(b)
        i0, i1 = np.searchsorted(self._ann_minute, (a, b))
        if i1 <= i0:
            return np.zeros(self.n)
        return np.bincount(
            self._ann_patient[i0:i1], weights=self._ann_g[i0:i1], minlength=self.n
        ).astype(np.float64)

    def eaten_carbs(self, t0: int | datetime, t1: int | datetime) -> np.ndarray:
        """[N] grams of meals whose eating starts in [t0, t1) (the truth, announced or not)."""
        m = self.meals(t0, t1)
        return np.bincount(m.patient, weights=m.carbs_g, minlength=self.n)

    # ------------------------------------------------------------------ sensor

    def _take_reading(self, minute: int, gsub: np.ndarray) -> None:
        r = self.cgm.read(minute, gsub)
        self._reading = r
        self._reading_minute = minute
        self._readings.append((minute, r))

    def read_cgm(self) -> np.ndarray:
        """[N] the most recent CGM reading (mg/dL); NaN where it is missing or no sensor."""
        return self._reading.copy()

    @property
    def cgm_minute(self) -> int:
        """Minute of the most recent sensor reading (-1 without a sensor)."""
        return self._reading_minute

    def readings_since(self, t0: int) -> list[tuple[int, np.ndarray]]:
        """Readings taken at minutes >= t0 (kept for about the last day), oldest first."""
        return [(m, r) for m, r in self._readings if m >= t0]

    def last_reading_in(self, t0: int, t1: int) -> np.ndarray:
        """[N] the last reading taken at a minute in [t0, t1), NaN if none (or no sensor)."""
        for m, r in reversed(self._readings):
            if m < t0:
                break
            if m < t1:
                return r.copy()
        return np.full(self.n, np.nan)

    # ------------------------------------------------------------------ stepping

    def step(
        self, minutes: int, basal_u_per_h: np.ndarray | float, bolus_u: np.ndarray | float = 0.0
    ) -> None:
        """Advance every patient `minutes` minutes with this basal (U/h) and bolus (U).

        The basal rate holds for the whole step; the bolus starts at the beginning of the
        step (delivered at the pump's speed, the rest carries over). Meals come from the
        scenario. Commands pass through the pump (rounding, limits, occlusions); what
        reached the patient is in `delivered_basal_u`, `delivered_bolus_u`, `last_delivery`.
        """
        k = int(minutes)
        if k != minutes or k < 1:
            raise SimInputError(f"step minutes must be a positive integer, got {minutes!r}")
        if self.duration_min is not None and self.minute + k > self.duration_min:
            raise SimInputError(
                f"step to minute {self.minute + k} goes past the end of the run "
                f"({self.duration_min} min)"
            )
        basal = check_inputs("basal_u_per_h", basal_u_per_h, self.n)
        bolus = check_inputs("bolus_u", bolus_u, self.n)
        t0, t1 = self.minute, self.minute + k
        self._ensure_planned(t1)
        m = self._meals
        i0, i1 = np.searchsorted(m.minute, (t0, t1))  # meals are sorted by minute
        food = np.zeros((self.n, k))
        if i1 > i0:
            np.add.at(food, (m.patient[i0:i1], m.minute[i0:i1] - t0), m.carbs_g[i0:i1])
        d = self.pump.deliver(k, basal, bolus)
        bg = np.empty((self.n, k + 1))
        gsub = np.empty((self.n, k + 1))
        eaten = np.empty((self.n, k))
        cfg = self.model_config
        if self.variability is None:
            model.run_minutes(
                self.state, self.meal_state, self.patients.params, food, d.insulin_u_per_min,
                cfg.eat_rate_g_per_min, cfg.substeps, cfg.meal_substeps, cfg.stomach_fraction,
                bg, gsub, eaten, _NO_STATES, self._bg_range,
            )  # fmt: skip
        else:
            self._run_varying(t0, food, d.insulin_u_per_min, m, i0, i1, bg, gsub, eaten)
        self.minute = t1
        self.bg = bg[:, -1].copy()
        self.gsub = gsub[:, -1].copy()
        self.last_bg, self.last_gsub = bg, gsub
        self.last_eaten = eaten
        self.eaten_g = eaten.sum(axis=1)
        self.last_delivery = d
        self.delivered_basal_u = d.basal_u
        self.delivered_bolus_u = d.bolus_u
        self._check_range()
        if self.cgm is not None:
            st = self.cgm.config.sample_minutes
            first = -(-(t0 + 1) // st) * st
            for mm in range(first, t1 + 1, st):
                self._take_reading(mm, gsub[:, mm - t0])
            if len(self._readings) > 1440:
                self._readings = self._readings[-720:]

    def _run_varying(self, t0, food, insulin, m, i0, i1, bg, gsub, eaten) -> None:
        """`run_minutes` in chunks of at most `CHUNK_MINUTES`, cut at each meal's first minute,
        with the variability's parameters fixed per chunk (the ODE state carries over
        exactly: splitting a run into chunks changes nothing by itself)."""
        cfg = self.model_config
        k = food.shape[1]
        cuts = set(range(0, k, CHUNK_MINUTES)) | {int(x) - t0 for x in m.minute[i0:i1]}
        edges = sorted(c for c in cuts if 0 <= c < k) + [k]
        bg[:, 0], gsub[:, 0] = (
            self.state[:, 3] / self.patients.vg,
            self.state[:, 12] / self.patients.vg,
        )
        for a, b in zip(edges[:-1], edges[1:]):
            starting = np.flatnonzero(m.minute[i0:i1] == t0 + a) + i0
            if len(starting):
                self.variability.start_meals(m.patient[starting], m.minute[starting])
            q = self.variability.params(self.patients.params, t0 + a + (b - a) / 2.0)
            cb, cg = np.empty((self.n, b - a + 1)), np.empty((self.n, b - a + 1))
            ce = np.empty((self.n, b - a))
            model.run_minutes(
                self.state, self.meal_state, q, np.ascontiguousarray(food[:, a:b]),
                np.ascontiguousarray(insulin[:, a:b]), cfg.eat_rate_g_per_min, cfg.substeps,
                cfg.meal_substeps, cfg.stomach_fraction, cb, cg, ce, _NO_STATES, self._bg_range,
            )  # fmt: skip
            bg[:, a + 1 : b + 1], gsub[:, a + 1 : b + 1], eaten[:, a:b] = cb[:, 1:], cg[:, 1:], ce

    def params_at(self, minute: float) -> np.ndarray:
        """[N, P] the model parameters in force at `minute` (the patients' own without
        variability; with it, what the next chunk starting there would use)."""
        if self.variability is None:
            return self.patients.params.copy()
        return self.variability.params(self.patients.params, minute)

    @property
    def bg_min(self) -> np.ndarray:
        """[N] lowest plasma BG so far (per minute), mg/dL."""
        return self._bg_range[:, 0].copy()

    @property
    def bg_max(self) -> np.ndarray:
        """[N] highest plasma BG so far (per minute), mg/dL."""
        return self._bg_range[:, 1].copy()

    def _check_range(self) -> None:
        lo, hi = self._bg_range[:, 0], self._bg_range[:, 1]
        bad = ~((lo >= BG_LOW_LIMIT) & (hi <= BG_HIGH_LIMIT))
        if not bad.any():
            return
        new = bad & ~self.out_of_range
        if new.any():
            self.out_of_range |= bad
            names = ", ".join(
                f"{n} (BG {a:.1f}..{b:.1f} so far)"
                for n, a, b in zip(self.patients.names[new], lo[new], hi[new], strict=True)
            )
            warnings.warn(
                f"at {self.time}: BG left [{BG_LOW_LIMIT:g}, {BG_HIGH_LIMIT:g}] mg/dL for "
                f"{names}; the run goes on, flagged in Simulator.out_of_range",
                PhysiologyWarning,
                stacklevel=3,
            )
