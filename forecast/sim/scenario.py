"""Meal scenarios: what each patient eats, when, and what they tell the controller about it.

A scenario is an immutable description (`FixedScenario`, `RandomScenario`, plus an
`AnnouncementConfig`); `Scenario.planner(patients, start, seed)` makes the stateful
`MealPlanner` a simulator queries for the meals in a window of minutes. Meals are planned per
calendar day of the run's clock, from random streams keyed on (seed, patient id, purpose), so
a patient's meals do not depend on which other patients are simulated nor on how the run is
chopped into steps.

`RandomScenario` is simglucose's RandomScenario (six candidate meals a day, truncated-normal
times, normal amounts): with ``per_patient=False`` every patient draws from
``RandomState(seed)`` exactly as simglucose does; by default each patient has its own stream.

Announcements: a meal is eaten at `minute` (its grams go on the plate; the patient eats at
5 g/min); the controller is told `announced_g` at `announce_minute`. `AnnouncementConfig`
adds carb-counting errors, missed boluses (meal never announced), late boluses and extra
unannounced snacks.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import numpy as np
import pandas as pd

from forecast.sim.errors import ScenarioError, SimInputError
from forecast.sim.patient import Patients
from forecast.sim.rng import STREAM_ANNOUNCE, STREAM_MEALS, stream_seeds

MINUTES_PER_DAY = 1440

# simglucose's RandomScenario (UVA_PADOVA_MODEL.md §12): breakfast, snack, lunch, snack,
# dinner, snack.
RANDOM_MEALS = {
    "prob": (0.95, 0.3, 0.95, 0.3, 0.95, 0.3),
    "time_lb": (5 * 60, 9 * 60, 10 * 60, 14 * 60, 16 * 60, 20 * 60),
    "time_ub": (9 * 60, 10 * 60, 14 * 60, 16 * 60, 20 * 60, 23 * 60),
    "time_mu": (7 * 60, 9.5 * 60, 12 * 60, 15 * 60, 18 * 60, 21.5 * 60),
    "time_sd": (60, 30, 60, 30, 60, 30),
    "amount_mu": (45, 10, 70, 10, 80, 10),
    "amount_sd": (10, 5, 10, 5, 10, 5),
}
# The oracle runs' meals (hours of the day, grams); `--scenario fixed` repeats them daily.
DEFAULT_DAILY_MEALS: tuple[tuple[float, float], ...] = (
    (7.0, 45.0),
    (12.0, 70.0),
    (18.5, 80.0),
    (22.0, 15.0),
)


def to_timestamp(start: datetime | str | pd.Timestamp | None) -> pd.Timestamp:
    """Run start as a tz-aware Timestamp on a whole minute (naive input is taken as UTC)."""
    ts = pd.Timestamp("2018-01-01 00:00") if start is None else pd.Timestamp(start)
    if ts.tzinfo is None:
        ts = ts.tz_localize("UTC")
    if ts != ts.floor("min"):
        raise SimInputError(f"simulation start {ts} must be on a whole minute")
    return ts


def minute_of_day(ts: pd.Timestamp) -> int:
    """Minutes since local midnight on the timestamp's own clock."""
    return ts.hour * 60 + ts.minute


@dataclass
class MealPlan:
    """Meals of a cohort, one entry per meal (arrays of equal length M)."""

    patient: np.ndarray  # [M] int, index into the cohort
    minute: np.ndarray  # [M] int, minutes since the run start when eating begins
    carbs_g: np.ndarray  # [M] grams eaten
    announced: np.ndarray  # [M] bool, the controller is told about this meal
    announced_g: np.ndarray  # [M] grams announced (carb-count error applied; 0 if not announced)
    announce_minute: np.ndarray  # [M] int, when the announcement is made

    @classmethod
    def empty(cls) -> MealPlan:
        i = np.empty(0, dtype=np.int64)
        f = np.empty(0, dtype=np.float64)
        return cls(i, i.copy(), f, np.empty(0, dtype=bool), f.copy(), i.copy())

    @classmethod
    def concat(cls, plans: Sequence[MealPlan]) -> MealPlan:
        if not plans:
            return cls.empty()
        return cls(
            *(np.concatenate([getattr(p, f) for p in plans]) for f in cls.__dataclass_fields__)
        )

    def __len__(self) -> int:
        return len(self.minute)

    def select(self, mask: np.ndarray) -> MealPlan:
        return MealPlan(*(getattr(self, f)[mask] for f in self.__dataclass_fields__))

    def sorted(self) -> MealPlan:
        order = np.lexsort((self.patient, self.minute))
        return self.select(order)


@dataclass(frozen=True)
class AnnouncementConfig:
    """How what the controller is told differs from what is eaten.

    carb_error_sd / carb_error_bias: announced = eaten · (1 + bias + sd·z), z ~ N(0, 1),
    floored at 0 and rounded to `round_to_g`. missed_bolus_prob: a meal is never announced.
    late_bolus_prob: the announcement comes `late_bolus_minutes` (uniform range) after eating
    starts. unannounced_snacks_per_day: extra snacks (Poisson count, times uniform in
    09:00–22:00, `snack_g` uniform range) that are eaten but never announced.
    """

    carb_error_sd: float = 0.0
    carb_error_bias: float = 0.0
    missed_bolus_prob: float = 0.0
    late_bolus_prob: float = 0.0
    late_bolus_minutes: tuple[float, float] = (15.0, 60.0)
    unannounced_snacks_per_day: float = 0.0
    snack_g: tuple[float, float] = (10.0, 30.0)
    round_to_g: float = 1.0

    def __post_init__(self) -> None:
        for f in ("missed_bolus_prob", "late_bolus_prob"):
            if not 0.0 <= getattr(self, f) <= 1.0:
                raise SimInputError(f"{f} must be a probability, got {getattr(self, f)!r}")
        if self.carb_error_sd < 0 or self.unannounced_snacks_per_day < 0:
            raise SimInputError("carb_error_sd and unannounced_snacks_per_day must be >= 0")
        lo, hi = self.late_bolus_minutes
        if not 0 <= lo <= hi:
            raise SimInputError(f"late_bolus_minutes must be 0 <= lo <= hi, got {(lo, hi)}")
        lo, hi = self.snack_g
        if not 0 <= lo <= hi:
            raise SimInputError(f"snack_g must be 0 <= lo <= hi, got {(lo, hi)}")

    @property
    def active(self) -> bool:
        return bool(
            self.carb_error_sd or self.carb_error_bias or self.missed_bolus_prob
            or self.late_bolus_prob or self.unannounced_snacks_per_day
        )  # fmt: skip

    @classmethod
    def realistic(cls) -> AnnouncementConfig:
        """Typical self-management errors: ±20 % carb counts (under-counting by 10 %), 5 %
        missed and 10 % late boluses, one unannounced snack every other day."""
        return cls(0.2, -0.1, 0.05, 0.10, (15.0, 60.0), 0.5)


class Scenario:
    """Base class: subclasses give each patient's base meals for a calendar day of the run."""

    announcement: AnnouncementConfig

    def planner(self, patients: Patients, start: datetime | None, seed: int) -> MealPlanner:
        return MealPlanner(self, patients, to_timestamp(start), seed)

    def check_run(self, patients: Patients, start: datetime | None, duration_min: int) -> None:
        """Raise ScenarioError when a meal of this scenario falls outside the run."""

    # Subclass hook: meals of patient i on run-calendar day `day` (0 = the start's date):
    # (minutes of the day [K], grams [K]); `state` is the planner's per-scenario state.
    def _day(self, state: dict, i: int, day: int) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def _init_state(self, patients: Patients, start: pd.Timestamp, seed: int) -> dict:
        return {}


def _as_minutes(t: float | timedelta | datetime | pd.Timestamp, start: pd.Timestamp) -> int:
    """A meal time as minutes after start: float hours, timedelta, or absolute datetime."""
    if isinstance(t, (datetime, pd.Timestamp)) and not isinstance(t, timedelta):
        ts = pd.Timestamp(t)
        if ts.tzinfo is None:
            ts = ts.tz_localize(start.tzinfo)
        return int(round((ts - start).total_seconds() / 60.0))
    if isinstance(t, (timedelta, pd.Timedelta)):
        return int(round(pd.Timedelta(t).total_seconds() / 60.0))
    h = float(t)
    if not math.isfinite(h):
        raise ScenarioError(f"meal time {t!r} is not finite")
    return int(round(h * 60.0))


MealList = Sequence[tuple[float | timedelta | datetime, float]]


@dataclass(frozen=True)
class FixedScenario(Scenario):
    """A fixed meal list: [(time, grams), ...] for everyone, or {patient name: list}.

    time is hours after the start (float), a timedelta after the start, or an absolute
    datetime (simglucose's CustomScenario rules, rounded to the minute). With ``daily=True``
    times are hours of the day on the run's clock and the list repeats every day.
    """

    meals: MealList | Mapping[str, MealList] = DEFAULT_DAILY_MEALS
    daily: bool = False
    announcement: AnnouncementConfig = field(default_factory=AnnouncementConfig)

    def __post_init__(self) -> None:
        for name, lst in self._lists():
            for item in lst:
                try:
                    t, g = item
                    g = float(g)
                except (TypeError, ValueError):
                    raise ScenarioError(
                        f"meal {item!r}{' of ' + name if name else ''} is not a (time, grams) pair"
                    ) from None
                if not math.isfinite(g) or g < 0:
                    raise ScenarioError(f"meal at {t!r} has invalid grams {g!r}; need >= 0")
                if self.daily:
                    if isinstance(t, (datetime, timedelta)) or not 0 <= float(t) < 24:
                        raise ScenarioError(
                            f"daily meal time {t!r} must be an hour of the day in [0, 24)"
                        )

    @classmethod
    def daily_default(cls, announcement: AnnouncementConfig | None = None) -> FixedScenario:
        """The oracle's meals (07:00 45 g, 12:00 70 g, 18:30 80 g, 22:00 15 g) every day."""
        return cls(
            DEFAULT_DAILY_MEALS, daily=True, announcement=announcement or AnnouncementConfig()
        )

    def _lists(self) -> list[tuple[str, MealList]]:
        if isinstance(self.meals, Mapping):
            return [(str(k), v) for k, v in self.meals.items()]
        return [("", self.meals)]

    def _for(self, name: str) -> MealList:
        if isinstance(self.meals, Mapping):
            return self.meals.get(name, ())
        return self.meals

    def _init_state(self, patients: Patients, start: pd.Timestamp, seed: int) -> dict:
        if isinstance(self.meals, Mapping):
            unknown = sorted(set(self.meals) - set(patients.names))
            if unknown:
                raise ScenarioError(f"meals given for patients not in the cohort: {unknown}")
        sod = minute_of_day(start)
        per: list[tuple[np.ndarray, np.ndarray]] = []
        for name in patients.names:
            lst = self._for(str(name))
            if self.daily:
                mins = np.array([int(round(float(t) * 60.0)) for t, _ in lst], dtype=np.int64)
            else:
                mins = np.array([_as_minutes(t, start) for t, _ in lst], dtype=np.int64)
                if (mins < 0).any():
                    raise ScenarioError(
                        f"a meal of {name} is {-mins.min()} min before the simulation start {start}"
                    )
                mins = mins + sod  # minutes since midnight of day 0
            grams = np.array([float(g) for _, g in lst], dtype=np.float64)
            per.append((mins, grams))
        return {"per": per}

    def _day(self, state: dict, i: int, day: int) -> tuple[np.ndarray, np.ndarray]:
        mins, grams = state["per"][i]
        if self.daily:
            return mins, grams
        lo = day * MINUTES_PER_DAY
        m = (mins >= lo) & (mins < lo + MINUTES_PER_DAY)
        return mins[m] - lo, grams[m]

    def check_run(self, patients: Patients, start: datetime | None, duration_min: int) -> None:
        st = to_timestamp(start)
        state = self._init_state(patients, st, 0)  # raises for meals before the start
        if self.daily:
            return
        for name, (mins, _) in zip(patients.names, state["per"], strict=True):
            rel = mins - minute_of_day(st)
            if (rel >= duration_min).any():
                raise ScenarioError(
                    f"a meal of {name} is at {int(rel.max())} min after the start, beyond the "
                    f"run's {duration_min} min; lengthen the run or drop the meal"
                )


@dataclass(frozen=True)
class RandomScenario(Scenario):
    """simglucose's random daily meals, one seeded stream per patient (or one shared stream).

    per_patient=False reproduces simglucose exactly: every patient draws day after day from
    ``RandomState(seed)``. simglucose_midnight_quirk: when the run starts at midnight,
    simglucose throws away the plan drawn at reset and uses a second draw for day 0.
    """

    per_patient: bool = True
    simglucose_midnight_quirk: bool = False
    announcement: AnnouncementConfig = field(default_factory=AnnouncementConfig)

    def _init_state(self, patients: Patients, start: pd.Timestamp, seed: int) -> dict:
        if self.per_patient:
            seeds = stream_seeds(seed, patients.ids, STREAM_MEALS)
        else:
            seeds = np.full(len(patients), int(seed), dtype=np.int64)
        skip = self.simglucose_midnight_quirk and minute_of_day(start) == 0
        rngs = []
        for s in seeds:
            r = np.random.RandomState(int(s))
            if skip:
                random_day_plan(r)
            rngs.append(r)
        return {"rngs": rngs, "days": [[] for _ in seeds]}

    def _day(self, state: dict, i: int, day: int) -> tuple[np.ndarray, np.ndarray]:
        days = state["days"][i]
        while len(days) <= day:
            days.append(random_day_plan(state["rngs"][i]))
        return days[day]


def random_day_plan(rng: np.random.RandomState) -> tuple[np.ndarray, np.ndarray]:
    """One day of simglucose's RandomScenario from `rng`: (minute of day [K], grams [K]).

    Same draws in the same order as ``RandomScenario.create_scenario``: per candidate meal a
    uniform (taken?), then, if taken, one uniform for the truncated-normal time (scipy's
    truncnorm.rvs inverts the CDF of one uniform) and one normal for the amount.
    """
    from scipy.special import ndtr, ndtri

    r = RANDOM_MEALS
    mins: list[float] = []
    grams: list[float] = []
    for k in range(6):
        if rng.rand() < r["prob"][k]:
            u = rng.uniform()
            mu, sd = r["time_mu"][k], r["time_sd"][k]
            a = (r["time_lb"][k] - mu) / sd
            b = (r["time_ub"][k] - mu) / sd
            pa, pb = ndtr(a), ndtr(b)
            t = mu + sd * ndtri(pa + u * (pb - pa))
            mins.append(float(np.round(t)))
            grams.append(float(max(round(rng.normal(r["amount_mu"][k], r["amount_sd"][k])), 0)))
    m = np.array(mins, dtype=np.int64)
    g = np.array(grams, dtype=np.float64)
    # simglucose fires the first meal listed at a minute (list.index); drop later duplicates.
    _, first = np.unique(m, return_index=True)
    keep = np.zeros(len(m), bool)
    keep[first] = True
    return m[keep], g[keep]


class MealPlanner:
    """A scenario bound to a cohort, a start time and a seed: hands out meals by window."""

    def __init__(self, scenario: Scenario, patients: Patients, start: pd.Timestamp, seed: int):
        self.scenario = scenario
        self.patients = patients
        self.start = start
        self.seed = int(seed)
        self.sod = minute_of_day(start)
        self._state = scenario._init_state(patients, start, int(seed))
        self._ann_seeds = stream_seeds(seed, patients.ids, STREAM_ANNOUNCE)
        self._days: dict[int, MealPlan] = {}

    def copy(self) -> MealPlanner:
        return copy.deepcopy(self)

    def _plan_day(self, day: int) -> MealPlan:
        """All meals of calendar day `day` (0 = start date), minutes relative to the start."""
        ann = self.scenario.announcement
        plans = []
        for i in range(len(self.patients)):
            mins, grams = self.scenario._day(self._state, i, day)
            mins = np.asarray(mins, dtype=np.int64)
            grams = np.asarray(grams, dtype=np.float64)
            announced = np.ones(len(mins), dtype=bool)
            ann_g = grams.copy()
            ann_min = mins.copy()
            if ann.active:
                rng = np.random.default_rng([int(self._ann_seeds[i]), day])
                z = rng.standard_normal(len(mins))
                ann_g = grams * (1.0 + ann.carb_error_bias + ann.carb_error_sd * z)
                if ann.round_to_g > 0:
                    ann_g = np.round(ann_g / ann.round_to_g) * ann.round_to_g
                ann_g = np.maximum(ann_g, 0.0)
                announced = rng.random(len(mins)) >= ann.missed_bolus_prob
                late = rng.random(len(mins)) < ann.late_bolus_prob
                lo, hi = ann.late_bolus_minutes
                delay = np.round(rng.uniform(lo, hi, len(mins))).astype(np.int64)
                ann_min = mins + np.where(late, delay, 0)
                n_snack = rng.poisson(ann.unannounced_snacks_per_day)
                if n_snack:
                    s_min = rng.integers(9 * 60, 22 * 60, n_snack)
                    s_g = np.round(rng.uniform(*ann.snack_g, n_snack))
                    mins = np.concatenate([mins, s_min])
                    grams = np.concatenate([grams, s_g])
                    announced = np.concatenate([announced, np.zeros(n_snack, bool)])
                    ann_g = np.concatenate([ann_g, np.zeros(n_snack)])
                    ann_min = np.concatenate([ann_min, s_min])
            ann_g = np.where(announced, ann_g, 0.0)
            keep = grams > 0  # a 0 g "meal" is not eaten and not announced (as in simglucose)
            mins, grams, announced = mins[keep], grams[keep], announced[keep]
            ann_g, ann_min = ann_g[keep], ann_min[keep]
            offset = day * MINUTES_PER_DAY - self.sod
            plans.append(
                MealPlan(
                    np.full(len(mins), i, dtype=np.int64),
                    mins + offset,
                    grams,
                    announced,
                    ann_g,
                    ann_min + offset,
                )  # fmt: skip
            )
        return MealPlan.concat(plans)

    def meals(self, t0: int, t1: int) -> MealPlan:
        """Meals whose eating starts in [t0, t1) minutes after the start, sorted by minute."""
        t0 = max(int(t0), 0)  # nothing is eaten before the run starts
        if t1 <= t0:
            return MealPlan.empty()
        d0 = (t0 + self.sod) // MINUTES_PER_DAY
        d1 = (t1 - 1 + self.sod) // MINUTES_PER_DAY
        parts = []
        for d in range(d0, d1 + 1):
            if d not in self._days:
                self._days[d] = self._plan_day(d)
            parts.append(self._days[d])
        plan = MealPlan.concat(parts)
        plan = plan.select((plan.minute >= t0) & (plan.minute < t1) & (plan.minute >= 0))
        return plan.sorted()

    def forget_before(self, t: int) -> None:
        """Drop cached days that end before minute t (long runs stay small in memory)."""
        last = (t + self.sod) // MINUTES_PER_DAY - 2
        for d in [d for d in self._days if d < last]:
            del self._days[d]
