"""The matrix's `serving.loop.Backend`: one simulated cohort, each patient with its own faults."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from serving.insilico.faults import build_fault, fault_target
from serving.types import PatientSettings, constant_profile


class MatrixBackend:
    """`serving.loop.Backend` over one simulated cohort where each patient has its own faults.

    The loop sees patient i as ``"<case>/<virtual patient>"`` so one journal tells the cases
    apart; the devices are the cohort's, wrapped by `serving.insilico.faults.build_fault`.
    """

    kind = "sim"

    def __init__(
        self, world, names: Sequence[str], patients: Sequence[str], specs: Sequence[Sequence[str]]
    ) -> None:
        self.world = world
        self.names = list(names)
        self.index = [world.index(p) for p in patients]  # the cohort orders patients its way
        self._cgms, self._pumps, self.windows = [], [], []
        for j, patient_specs in zip(self.index, specs):
            cgm, pump, wins = world.cgm(j), world.pump(j), []
            for spec in patient_specs:
                if fault_target(spec) == "cgm":
                    cgm = build_fault(spec, cgm, world)
                    wins.append(cgm.window)
                else:
                    pump = build_fault(spec, pump, world)
                    wins.append(pump.window)
            self._cgms.append(cgm)
            self._pumps.append(pump)
            self.windows.append(wins)

    def now(self) -> pd.Timestamp:
        return self.world.now()

    def cgm(self, i: int):
        return self._cgms[i]

    def pump(self, i: int):
        return self._pumps[i]

    def settings(self, i: int) -> PatientSettings:
        return self.world.settings(self.index[i])

    def announced_carbs(self, i: int, t0: pd.Timestamp, t1: pd.Timestamp) -> float:
        return self.world.announced_carbs(self.index[i], t0, t1)

    def profile(self, i: int, times: pd.DatetimeIndex) -> dict[str, np.ndarray]:
        return constant_profile(self.settings(i), len(times))

    def prior_daily_dose_u(self, i: int) -> float | None:
        return float(self.world.sim.patients.tdi[self.index[i]])

    def advance(self, minutes: int) -> None:
        self.world.advance(minutes)

    def describe(self) -> dict[str, Any]:
        return {"backend": "faultmatrix", "world": self.world.config.to_json()}
