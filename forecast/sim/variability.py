"""Intra-patient variability: the same virtual patient, not the same every day.

The S2008 patients have constant parameters: every day with the same meals and insulin is the
same day. Real people are not (a controller tuned on a clockwork patient is flattered). Three
effects, each off by default and each seeded on its own random stream (`forecast.sim.rng`), so
switching one on changes no other draw and a run with all of them off is bit-identical to one
without this module:

* **circadian insulin sensitivity** — insulin sensitivity (SI) follows a daily sinusoid with
  its lowest point in the early morning (the dawn phenomenon: more insulin is needed before
  and after waking):

      SI(t) / SI = 1 − A · cos(2π (h(t) − h_low) / 24)

  with `circadian_amplitude` A (default when on 0.25: SI from 0.75× at ``h_low`` to 1.25×
  twelve hours later) and `circadian_low_hour` h_low (default 06:00), h(t) the hour of day of
  the simulation clock. Over a day the factor averages 1, so a patient's daily insulin need
  is unchanged; only its timing moves. The UVA/Padova S2017 simulator models the same
  phenomenon with time-varying, per-subject SI profiles fitted to T1D data, lower at
  breakfast than at lunch and dinner, plus a dawn-phenomenon model (Visentin et al., "The
  UVA/Padova Type 1 Diabetes Simulator Goes From Single Meal to Single Day", J Diabetes Sci
  Technol 12(2):273-281, 2018; Visentin et al., "Circadian variability of insulin
  sensitivity: physiological input for in silico artificial pancreas", Diabetes Technol Ther
  17(1):1-7, 2015). Here the shape is a plain sinusoid and the amplitude a setting: not
  S2017's fitted profiles.
* **day-to-day sensitivity** — each day (midnight to midnight, simulation clock) SI is further
  multiplied by a log-normal factor exp(σ·z − σ²/2), z ~ N(0, 1) (mean 1), σ =
  `daily_si_cv` (default when on 0.2), drawn per patient and day.
* **per-meal absorption** — each meal is absorbed faster or slower: the gastric-emptying and
  gut-absorption rate constants ``kmax``, ``kmin`` and ``kabs`` are multiplied by one
  log-normal factor exp(σ·z − σ²/2) per meal (σ = `meal_absorption_cv`, default when on 0.3),
  from the minute the meal starts until the next meal starts (digestion states are shared
  between overlapping meals, so a meal's factor applies to what is in the gut). Scaling the
  three rates together stretches or compresses the meal's rate of appearance in time without
  changing how much glucose appears (bioavailability ``f`` is left alone). Meal-to-meal
  variation of absorption is what Dalla Man et al. (IEEE TBME 54(10):1740-1749, 2007) and
  Herrero et al. (bolus advisors evaluated on the UVA/Padova simulator with intra-day
  variability, IEEE JBHI 19(3):1087-1096, 2015) vary through these parameters.

How SI enters the model: through the two insulin-dependent parameters of the S2008 equations,
``Vmx`` (insulin-dependent glucose utilisation) and ``kp3`` (insulin-dependent suppression of
endogenous glucose production), both multiplied by the SI factor, which is how the
UVA/Padova simulator's own time-varying SI acts. Nothing else changes: meals, announcements,
sensor noise and the pump are the same draws.

The factors are held for at most 5 minutes (the simulator integrates in chunks of ≤ 5 minutes
with parameters fixed per chunk; a meal's factor switches at its first minute). The default
magnitudes are round values of the size such studies use, not fitted ones; they are settings.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import numpy as np

from forecast.sim import model
from forecast.sim.errors import SimInputError
from forecast.sim.rng import STREAM_DAILY_SI, STREAM_MEAL_ABSORPTION

EFFECTS = ("circadian", "daily", "meals")
DEFAULTS = {"circadian": 0.25, "daily": 0.2, "meals": 0.3}  # amplitude / σ when switched on
CHUNK_MINUTES = 5  # the longest a factor is held


@dataclass(frozen=True)
class VariabilityConfig:
    """Which intra-patient variability is on, and how strong (0 = off; see the module doc)."""

    circadian_amplitude: float = 0.0  # relative SI swing around 1 (0.25: 0.75..1.25)
    circadian_low_hour: float = 6.0  # hour of day of the lowest SI (dawn)
    daily_si_cv: float = 0.0  # σ of the log-normal day-to-day SI factor
    meal_absorption_cv: float = 0.0  # σ of the log-normal per-meal absorption-rate factor

    def __post_init__(self) -> None:
        for k in ("circadian_amplitude", "daily_si_cv", "meal_absorption_cv"):
            v = getattr(self, k)
            if not (isinstance(v, int | float) and math.isfinite(v) and 0.0 <= v):
                raise SimInputError(
                    f"VariabilityConfig.{k} must be a finite number >= 0, got {v!r}"
                )
        if self.circadian_amplitude >= 1.0:
            raise SimInputError(
                "VariabilityConfig.circadian_amplitude must be < 1 (SI must stay positive), got "
                f"{self.circadian_amplitude}"
            )
        if self.daily_si_cv > 1.0 or self.meal_absorption_cv > 1.0:
            raise SimInputError(
                "VariabilityConfig: daily_si_cv and meal_absorption_cv are log-normal σ in "
                f"[0, 1], got {self.daily_si_cv}, {self.meal_absorption_cv}"
            )
        if not (math.isfinite(self.circadian_low_hour) and 0.0 <= self.circadian_low_hour < 24.0):
            raise SimInputError(
                f"VariabilityConfig.circadian_low_hour must be in [0, 24), got "
                f"{self.circadian_low_hour}"
            )

    @property
    def active(self) -> bool:
        return bool(self.circadian_amplitude or self.daily_si_cv or self.meal_absorption_cv)

    def effects(self) -> list[str]:
        """The names of the effects that are on (`EFFECTS` order)."""
        on = {
            "circadian": self.circadian_amplitude > 0,
            "daily": self.daily_si_cv > 0,
            "meals": self.meal_absorption_cv > 0,
        }
        return [k for k in EFFECTS if on[k]]

    def describe(self) -> str:
        """One line for reports: which effects are on, with their magnitudes."""
        parts = []
        if self.circadian_amplitude > 0:
            parts.append(
                f"circadian SI ±{100 * self.circadian_amplitude:g} % (lowest at "
                f"{self.circadian_low_hour:g} h)"
            )
        if self.daily_si_cv > 0:
            parts.append(f"day-to-day SI σ {self.daily_si_cv:g}")
        if self.meal_absorption_cv > 0:
            parts.append(f"per-meal absorption σ {self.meal_absorption_cv:g}")
        return ", ".join(parts) if parts else "none"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def parse(cls, spec: str | None) -> VariabilityConfig:
        """From the CLI form: ``none``, ``all``, or a comma list of ``circadian``, ``daily``,
        ``meals``, each optionally ``=value`` (amplitude or σ), e.g. ``circadian=0.3,meals``."""
        out = cls()
        if spec is None or spec.strip() in ("", "none"):
            return out
        items = [x.strip() for x in spec.split(",") if x.strip()]
        if items == ["all"]:
            items = list(EFFECTS)
        fields = {
            "circadian": "circadian_amplitude",
            "daily": "daily_si_cv",
            "meals": "meal_absorption_cv",
        }
        for item in items:
            name, _, value = item.partition("=")
            if name not in fields:
                raise SimInputError(
                    f"unknown variability {name!r} in {spec!r}; use none, all or a comma list of "
                    f"{', '.join(EFFECTS)} (each optionally =value)"
                )
            try:
                v = float(value) if value else DEFAULTS[name]
            except ValueError:
                raise SimInputError(f"variability {name}: {value!r} is not a number") from None
            out = replace(out, **{fields[name]: v})
        return out


def circadian_factor(config: VariabilityConfig, hour_of_day: np.ndarray | float) -> np.ndarray:
    """SI multiplier of the circadian profile at the given hour(s) of day."""
    h = np.asarray(hour_of_day, np.float64)
    a = config.circadian_amplitude
    return 1.0 - a * np.cos(2.0 * np.pi * (h - config.circadian_low_hour) / 24.0)


def lognormal_factor(seed: int, patient_id: int, stream: int, key: int, sigma: float) -> float:
    """One mean-1 log-normal factor, seeded by (run seed, patient, stream, key): the same
    day or meal gets the same factor whatever else is simulated."""
    if sigma <= 0:
        return 1.0
    z = np.random.default_rng(
        np.random.SeedSequence([int(seed), int(patient_id), int(stream), int(key)])
    ).standard_normal()
    return float(math.exp(sigma * z - 0.5 * sigma * sigma))


class Variability:
    """The run-time side: the factors of N patients over a run (the `Simulator` owns one)."""

    def __init__(self, config: VariabilityConfig, patient_ids: np.ndarray, seed: int,
                 start_minute_of_day: float) -> None:  # fmt: skip
        self.config = config
        self.ids = np.asarray(patient_ids, np.int64)
        self.seed = int(seed)
        self.start_mod = float(start_minute_of_day)
        n = len(self.ids)
        self.meal_factor = np.ones(n)  # the current meal's absorption factor, per patient
        self._day_cache: dict[int, np.ndarray] = {}

    def si_factor(self, minute: float) -> np.ndarray:
        """[N] SI multiplier at `minute` since the start (circadian × day-to-day)."""
        c = self.config
        abs_min = self.start_mod + minute
        f = np.ones(len(self.ids))
        if c.circadian_amplitude > 0:
            f = f * circadian_factor(c, (abs_min / 60.0) % 24.0)
        if c.daily_si_cv > 0:
            f = f * self.day_factor(int(abs_min // 1440))
        return f

    def day_factor(self, day: int) -> np.ndarray:
        """[N] the day-to-day SI factor of day `day` (0 = the start's calendar day)."""
        got = self._day_cache.get(day)
        if got is None:
            got = np.array(
                [
                    lognormal_factor(self.seed, i, STREAM_DAILY_SI, day, self.config.daily_si_cv)
                    for i in self.ids
                ]
            )
            self._day_cache = {
                day: got,
                **{d: v for d, v in self._day_cache.items() if d >= day - 1},
            }
        return got

    def start_meals(self, patients: np.ndarray, minutes: np.ndarray) -> None:
        """Meals of these patients (row indices) start at these minutes: their factors apply."""
        if self.config.meal_absorption_cv <= 0:
            return
        for i, m in zip(patients, minutes):
            self.meal_factor[i] = lognormal_factor(
                self.seed,
                self.ids[i],
                STREAM_MEAL_ABSORPTION,
                int(m),
                self.config.meal_absorption_cv,
            )

    def params(self, base: np.ndarray, minute: float) -> np.ndarray:
        """[N, P] the model parameters in force at `minute` (a copy of `base`, scaled)."""
        q = base.copy()
        si = self.si_factor(minute)
        q[:, model.VMX] *= si
        q[:, model.KP3] *= si
        mf = self.meal_factor
        for col in (model.KABS, model.KMAX, model.KMIN):
            q[:, col] *= mf
        return q


__all__ = [
    "CHUNK_MINUTES",
    "DEFAULTS",
    "EFFECTS",
    "Variability",
    "VariabilityConfig",
    "circadian_factor",
    "lognormal_factor",
]
