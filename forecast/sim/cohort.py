"""Cohort data: closed-loop runs of many patients written as the canonical glucose frame.

`simulate_cohort` runs a `Simulator` in 5-minute cycles with a dosing policy and records,
per subject and slot:

| column | meaning |
|---|---|
| glucose | the CGM reading taken in the slot (NaN = dropout / no sensor) |
| bg_true | plasma glucose at the slot start (Gp/Vg), mg/dL |
| gsub | subcutaneous glucose at the slot start (Gs/Vg): the noise-free sensor signal |
| basal_u, bolus_u | insulin that reached the patient in the slot (after pump rounding, limits, occlusions; a bolus longer than a slot is spread) |
| carbs_g | grams *announced* (logged) in the slot, as a controller or a diary sees them: carb-count errors applied, 0 for missed boluses and unannounced snacks; late boluses land in their late slot |
| meal_announced | True in the slots where carbs_g holds an announcement |
| carbs_eaten_g | grams actually eaten, in the slot where eating starts (the truth) |
| carb_ratio_g_per_u, isf_mgdl_per_u | the patient's therapy profile (Quest.csv CR, CF): what the policy doses with, and a forecaster's static inputs |

Without announcement errors (the default) carbs_g equals carbs_eaten_g slot by slot: a meal is
announced in the slot where eating starts. The frame's DatasetMeta says how it was made
(source ``uva_padova_s2008``, seed, scenario, policy, sensor, pump) and lists the patients
whose BG left 10-600 mg/dL (`extra["out_of_range"]`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from datetime import datetime
from typing import Protocol

import numpy as np
import pandas as pd

from forecast.schema import (
    GLUCOSE_MAX_MGDL,
    GLUCOSE_MIN_MGDL,
    SLOT_MINUTES,
    DatasetMeta,
    set_meta,
    sort_frame,
)
from forecast.sim.controller import BasalBolusController, ExcitationPolicy
from forecast.sim.errors import SimInputError
from forecast.sim.model import ModelConfig
from forecast.sim.patient import Patients, load_patients
from forecast.sim.pump import PumpConfig
from forecast.sim.scenario import (
    AnnouncementConfig,
    FixedScenario,
    MealPlan,
    RandomScenario,
    Scenario,
)
from forecast.sim.sensor import SensorConfig
from forecast.sim.simulator import Simulator
from forecast.sim.variability import VariabilityConfig

SOURCE = "uva_padova_s2008"
LICENCE = (
    "UVA/Padova S2008 virtual-patient parameters as distributed with simglucose 0.2.11 "
    "(MIT, (c) 2017 Jinyu Xie); research use only"
)
POLICIES = ("basal-bolus", "excitation")


class Policy(Protocol):
    def act(
        self, minute: int, cgm: np.ndarray, announced_carbs_g: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]: ...


def make_scenario(
    scenario: Scenario | str, announcement: AnnouncementConfig | None = None
) -> Scenario:
    """'random' (simglucose's daily meals), 'fixed' (the oracle's four meals every day)."""
    if isinstance(scenario, Scenario):
        return scenario
    ann = announcement or AnnouncementConfig()
    if scenario == "random":
        return RandomScenario(announcement=ann)
    if scenario == "fixed":
        return FixedScenario.daily_default(ann)
    raise SimInputError(f"unknown scenario {scenario!r}; use 'random' or 'fixed'")


def make_policy(policy: Policy | str, patients: Patients, seed: int) -> Policy:
    if not isinstance(policy, str):
        return policy
    if policy == "basal-bolus":
        return BasalBolusController(patients)
    if policy == "excitation":
        return ExcitationPolicy(patients, seed=seed)
    raise SimInputError(f"unknown policy {policy!r}; use one of {POLICIES}")


def simulate_cohort(
    patients: Patients | str = "all",
    days: float = 1.0,
    scenario: Scenario | str = "random",
    seed: int = 0,
    policy: Policy | str = "basal-bolus",
    sensor: SensorConfig | str | None = "dexcom",
    pump: PumpConfig | str = "Insulet",
    *,
    start: datetime | str | pd.Timestamp | None = None,
    announcement: AnnouncementConfig | None = None,
    model_config: ModelConfig | None = None,
    progress: Callable[[int, int], None] | None = None,
    variability: VariabilityConfig | None = None,
) -> pd.DataFrame:
    """Simulate `days` of closed-loop therapy for a cohort; return the canonical frame.

    The cohort runs vectorised in 5-minute cycles: read CGM, look up announced carbs,
    ask the policy for basal (U/h) and bolus (U), step. `progress(done, total)` is called
    every few cycles. `variability`: intra-patient variability (`forecast.sim.variability`).
    See the module docstring for the columns.
    """
    if isinstance(patients, str):
        patients = load_patients(patients)
    days = float(days)
    if not np.isfinite(days) or days <= 0:
        raise SimInputError(f"days must be > 0, got {days!r}")
    n_slots = int(round(days * 1440 / SLOT_MINUTES))
    if n_slots < 1:
        raise SimInputError(f"days={days} is shorter than one {SLOT_MINUTES}-minute slot")
    sc = make_scenario(scenario, announcement)
    sim = Simulator(
        patients,
        scenario=sc,
        sensor=sensor,
        pump=pump,
        seed=seed,
        start=start,
        duration_min=n_slots * SLOT_MINUTES,
        model_config=model_config,
        variability=variability,
    )
    pol = make_policy(policy, patients, seed)
    n = len(patients)
    shape = (n, n_slots)
    glucose, bg, gsub = np.empty(shape), np.empty(shape), np.empty(shape)
    basal_u, bolus_u = np.empty(shape), np.empty(shape)
    carbs, eaten = np.zeros(shape), np.zeros(shape)
    announced = np.zeros(shape, dtype=bool)

    every = max(1, n_slots // 200)
    end = n_slots * SLOT_MINUTES
    plans = []
    for s in range(n_slots):
        m = s * SLOT_MINUTES
        if m % 1440 == 0:  # the simulator forgets meals older than a day: collect daily
            plans.append(sim.meals(m, min(m + 1440, end)))
        cgm = sim.read_cgm()
        ann = sim.announced_carbs(m, m + SLOT_MINUTES)
        basal, bolus = pol.act(m, cgm, ann)
        bg[:, s] = sim.bg
        gsub[:, s] = sim.gsub
        carbs[:, s] = ann
        sim.step(SLOT_MINUTES, basal, bolus)
        glucose[:, s] = sim.last_reading_in(m, m + SLOT_MINUTES)
        basal_u[:, s] = sim.delivered_basal_u
        bolus_u[:, s] = sim.delivered_bolus_u
        if progress is not None and (s % every == 0 or s == n_slots - 1):
            progress(s + 1, n_slots)

    plan = MealPlan.concat(plans)
    slot = plan.minute // SLOT_MINUTES
    np.add.at(eaten, (plan.patient, slot), plan.carbs_g)
    ann_slot = plan.announce_minute // SLOT_MINUTES
    ok = plan.announced & (ann_slot < n_slots)
    announced[plan.patient[ok], ann_slot[ok]] = True

    # A reading outside the frame's plausible range (only possible with a custom sensor range)
    # is a sensor artefact, not a glucose value.
    glucose[~((glucose >= GLUCOSE_MIN_MGDL) & (glucose <= GLUCOSE_MAX_MGDL))] = np.nan
    t0_ns = sim.start.tz_convert("UTC").value
    times_ns = t0_ns + np.arange(n_slots, dtype=np.int64) * SLOT_MINUTES * 60_000_000_000
    frame = pd.DataFrame(
        {
            "subject_id": pd.array(np.repeat(patients.names.astype(str), n_slots), dtype="string"),
            "time": pd.to_datetime(np.tile(times_ns, n), utc=True).as_unit("ns"),
            "glucose": glucose.ravel(),
            "basal_u": basal_u.ravel(),
            "bolus_u": bolus_u.ravel(),
            "carbs_g": carbs.ravel(),
            "bg_true": bg.ravel(),
            "gsub": gsub.ravel(),
            "meal_announced": announced.ravel(),
            "carbs_eaten_g": eaten.ravel(),
            # the therapy profile the policy doses with (Quest.csv's CR and CF)
            "carb_ratio_g_per_u": np.repeat(patients.cr.astype(np.float64), n_slots),
            "isf_mgdl_per_u": np.repeat(patients.cf.astype(np.float64), n_slots),
        }
    )
    sensor_cfg = sim.sensor_config
    meta = DatasetMeta(
        source=SOURCE,
        device=(
            f"simulated CGM ({'none' if sensor_cfg is None else describe_sensor(sensor_cfg)}), "
            f"pump {sim.pump.config.name}"
        ),
        sampling_minutes=SLOT_MINUTES,
        timezone=str(sim.start.tz),
        units_seen=["mg/dL"],
        licence=LICENCE,
        extra={
            "seed": int(seed),
            "days": days,
            "start": sim.start.isoformat(),
            "patients": [str(x) for x in patients.names],
            "scenario": type(sc).__name__ if not isinstance(scenario, str) else scenario,
            "policy": policy if isinstance(policy, str) else type(policy).__name__,
            "sensor": None if sensor_cfg is None else asdict(sensor_cfg),
            "pump": asdict(sim.pump.config),
            "announcement": asdict(sc.announcement),
            "model_config": asdict(sim.model_config),  # with the rest: the run can be re-made
            "variability": sim.variability_config.to_dict(),
            "out_of_range": [str(x) for x in patients.names[sim.out_of_range]],
            "bg_min": {str(k): float(v) for k, v in zip(patients.names, sim.bg_min, strict=True)},
            "bg_max": {str(k): float(v) for k, v in zip(patients.names, sim.bg_max, strict=True)},
            "carbs_g": "announced grams in the announcement slot; truth in carbs_eaten_g",
        },
    )
    # Built with the canonical dtypes, on the grid, one row per slot (tests check it against
    # validate_frame; validating here would cost more than simulating a patient-day).
    if list(patients.names) != sorted(patients.names):
        frame = sort_frame(frame)
    return set_meta(frame, meta)


def describe_sensor(c: SensorConfig) -> str:
    parts = [f"{c.sample_minutes}-min"]
    parts.append(f"{c.noise_model} noise" if c.noise else "noise-free")
    parts += [name for name in ("dropout", "compression", "drift") if getattr(c, name)]
    return ", ".join(parts)
