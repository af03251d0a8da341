"""The virtual cohort of the lab: its simulator and the therapy settings of its patients.

One factory for every in-silico run (the trial steps it directly, the simulated devices of
`serving.insilico.simulated` put a pump HAL in front of it), so a trial and a journaled
loop on the same seed live in the same world: same meals, announcements, sensor noise.
"""

from __future__ import annotations

import pandas as pd

from forecast.insulin import basal_iob_u
from forecast.schema import SLOT_MINUTES
from serving.types import PatientSettings

PATIENT_GROUPS = ("all", "adults", "adolescents", "children")
SENSORS = ("dexcom", "dexcom-noise", "simglucose", "none")


def settings_for(patients, *, target_mgdl: float = 110.0) -> list[PatientSettings]:
    """Therapy settings and supervisor limits for simulated patients.

    Basal, carb ratio and ISF are the simulator's own (the basal that holds each patient at
    steady state; Quest CR and CF). The limits follow clinical practice scaled by total daily
    insulin (TDI): max bolus 35 % of TDI; max basal 4 × scheduled (oref0 then caps it at
    3 × max daily basal); max IOB (absolute, as the supervisor counts it) = the steady IOB of
    scheduled basal + one max bolus + 3 h of basal.
    """
    out = []
    for i, name in enumerate(patients.names):
        basal = float(patients.basal_u_per_h[i])
        tdi = float(patients.tdi[i])
        max_bolus = round(max(1.0, 0.35 * tdi) * 2) / 2
        steady = float(basal_iob_u(basal, include_current=True))
        out.append(
            PatientSettings(
                name=str(name),
                basal_u_per_h=basal,
                carb_ratio_g_per_u=float(patients.cr[i]),
                isf_mgdl_per_u=float(patients.cf[i]),
                max_basal_u_per_h=4.0 * basal,
                max_bolus_u=max_bolus,
                max_iob_u=round(steady + max_bolus + 3.0 * basal, 2),
                max_daily_basal_u_per_h=basal,
                target_mgdl=float(target_mgdl),
            )
        )
    return out


def make_simulator(
    patients,
    *,
    seed: int,
    start: str | pd.Timestamp,
    sensor: str = "dexcom",
    carb_error: float = 0.0,
    unannounced: bool = False,
    pump: str = "Insulet",
    duration_min: int | None = None,
    variability=None,
):
    """The vectorised simulator of a virtual cohort: random meals (announced with a relative
    carb-count error of SD `carb_error`, or never when `unannounced`), a CGM read every slot
    with the named sensor model, the named pump mechanism (`forecast.sim.pump`), and the
    patients' intra-patient `variability` (a `forecast.sim.variability.VariabilityConfig`;
    None: none)."""
    from forecast.sim.scenario import AnnouncementConfig, RandomScenario
    from forecast.sim.sensor import SensorConfig
    from forecast.sim.simulator import Simulator

    ann = AnnouncementConfig(
        carb_error_sd=float(carb_error),
        missed_bolus_prob=1.0 if unannounced else 0.0,
    )
    return Simulator(
        patients,
        scenario=RandomScenario(announcement=ann),
        sensor=SensorConfig.named(sensor, sample_minutes=SLOT_MINUTES),
        pump=pump,
        seed=seed,
        start=start,
        duration_min=duration_min,
        variability=variability,
    )
