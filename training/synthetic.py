"""A small open-loop simulated cohort straight from `forecast.sim.replay`, for tests,
benchmarks and examples that must not depend on the closed-loop scenario machinery.

Each patient eats three meals a day (random size and time, announced), boluses for them by
carb ratio, and — because a forecaster can only learn the effect of insulin from data where
insulin varies independently of meals — gets random "excitation": temp basals between 0 and
200 % and occasional small correction boluses. CGM = subcutaneous glucose + Gaussian noise,
sampled at each slot start, with occasional dropouts; `bg_true` is plasma glucose.

For cohorts with Dexcom-like sensor noise and the real scenario use
`glucast simulate` (forecast.sim.simulate_cohort).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from forecast.schema import DatasetMeta, set_meta, sort_frame, validate_frame


def replay_cohort(
    selection: str = "adult#001,adult#002,adolescent#001",
    days: float = 2.0,
    *,
    seed: int = 0,
    noise_mgdl: float = 4.0,
    dropout: float = 0.01,
    start: str = "2024-01-01T00:00:00Z",
) -> pd.DataFrame:
    """A canonical frame of `days` days for the selected virtual patients."""
    from forecast.sim import load_patients, replay

    rng = np.random.default_rng(seed)
    patients = load_patients(selection)
    n = len(patients)
    slot = 5
    slots = int(days * 24 * 60 // slot)
    basal = np.repeat(patients.basal_u_per_min[:, None], slots, axis=1)  # [N, S] U/min
    # temp basals: hold a random factor in [0, 2] for 30-120 minutes at a time
    factor = np.ones((n, slots))
    for i in range(n):
        s = 0
        while s < slots:
            dur = int(rng.integers(6, 25))
            factor[i, s : s + dur] = rng.choice([1.0, rng.uniform(0.0, 2.0)], p=[0.4, 0.6])
            s += dur
    basal_slot = basal * factor * slot  # [N, S] U per slot
    bolus_slot = np.zeros((n, slots))
    carbs_slot = np.zeros((n, slots))
    n_days = int(np.ceil(days))
    for i in range(n):
        for d in range(n_days):
            for hour, grams in ((7.5, 50.0), (12.5, 70.0), (19.0, 80.0)):
                t_min = (d * 24 + hour) * 60 + rng.normal(0, 30)
                s = int(t_min // slot)
                if 0 <= s < slots:
                    g = max(10.0, grams * rng.uniform(0.5, 1.4))
                    carbs_slot[i, s] += round(g)
                    bolus_slot[i, s] += round(g / patients.cr[i] * rng.uniform(0.7, 1.2), 1)
        # correction/excitation boluses a few times a day, independent of meals
        k = rng.random(slots) < 3.0 / (24 * 60 / slot)
        bolus_slot[i, k] += np.round(rng.uniform(0.3, 2.0, k.sum()), 1)
    # Meals go on the plate at the slot start and are eaten at the simulator's 5 g/min.
    from training.interventional import eaten_per_minute

    plate = np.zeros((n, slots * slot))
    plate[:, ::slot] = carbs_slot
    cho = np.stack([eaten_per_minute(row) for row in plate])  # [N, T] g/min
    ins = np.repeat((basal_slot + bolus_slot) / slot, slot, axis=1)  # [N, T] U/min
    r = replay(patients, cho, ins, return_states=False)
    read = np.arange(slots) * slot
    gsub = r.gsub[:, read]  # [N, S]
    bg = r.bg[:, read]
    cgm = gsub + rng.normal(0, noise_mgdl, gsub.shape)
    cgm[rng.random(cgm.shape) < dropout] = np.nan
    cgm = np.where(np.isfinite(cgm), np.clip(cgm, 40.0, 400.0), np.nan)
    times = pd.date_range(pd.Timestamp(start), periods=slots, freq=f"{slot}min")
    frames = []
    for i, name in enumerate(patients.names):
        frames.append(
            pd.DataFrame(
                {
                    "subject_id": str(name),
                    "time": times,
                    "glucose": cgm[i],
                    "basal_u": basal_slot[i],
                    "bolus_u": bolus_slot[i],
                    "carbs_g": carbs_slot[i],
                    "bg_true": bg[i],
                }
            )
        )
    out = sort_frame(pd.concat(frames, ignore_index=True))
    out = validate_frame(out)
    set_meta(out, DatasetMeta(source="glucast-replay", device="simulated CGM", timezone="UTC"))
    return out
