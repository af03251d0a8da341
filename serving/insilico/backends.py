"""The loop's device backends in the lab: simulated patients and recorded data.

`SimBackend` gives the runtime loop (`serving.loop.ControlLoop`) the devices of a
`serving.insilico.simulated.SimulatedCohort`, optionally wrapped in fault injectors;
`ReplayBackend` replays one recorded patient (`serving.insilico.replay.ReplayCGM`) with a
virtual pump. Both implement `serving.loop.Backend`, the protocol a real device driver
would implement; they live here because they exist to study the runtime.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from forecast.schema import SLOT, SLOT_MINUTES
from forecast.windows import PROFILE_FEATURES, WindowConfig
from serving.hal.cgm import CGM
from serving.hal.pump import Pump
from serving.loop import LoopError
from serving.types import PatientSettings, constant_profile


def _wrap(device: Any, specs: Sequence[str], target: str, clock) -> Any:
    from serving.insilico.faults import build_fault, fault_target

    for spec in specs:
        if fault_target(spec) == target:
            device = build_fault(spec, device, clock)
    return device


class SimBackend:
    """Patients of a `SimulatedCohort`, their devices optionally wrapped in fault injectors."""

    kind = "sim"

    def __init__(self, world, faults: Sequence[str] = ()) -> None:
        self.world = world
        self.names = list(world.names)
        self._cgms = [_wrap(world.cgm(i), faults, "cgm", world) for i in range(world.n)]
        self._pumps = [_wrap(world.pump(i), faults, "pump", world) for i in range(world.n)]

    def now(self) -> pd.Timestamp:
        return self.world.now()

    def cgm(self, i: int) -> CGM:
        return self._cgms[i]

    def pump(self, i: int) -> Pump:
        return self._pumps[i]

    def settings(self, i: int) -> PatientSettings:
        return self.world.settings(i)

    def announced_carbs(self, i: int, t0: pd.Timestamp, t1: pd.Timestamp) -> float:
        return self.world.announced_carbs(i, t0, t1)

    def profile(self, i: int, times: pd.DatetimeIndex) -> dict[str, np.ndarray]:
        return constant_profile(self.settings(i), len(times))

    def prior_daily_dose_u(self, i: int) -> float | None:
        return float(self.world.sim.patients.tdi[i])  # as the trial counts it

    def advance(self, minutes: int) -> None:
        self.world.advance(minutes)

    def describe(self) -> dict[str, Any]:
        return {"backend": "sim", "world": self.world.config.to_json()}


class ReplayBackend:
    """One recorded patient: a `ReplayCGM` over the frame and a `VirtualPump`.

    The recording cannot respond to insulin, so this answers "what would the loop have
    done": every decision is journaled, the pump's deliveries are the loop's own commands.
    """

    kind = "replay"

    def __init__(
        self,
        frame: pd.DataFrame,
        subject_id: str,
        settings: PatientSettings | None = None,
        *,
        window: WindowConfig | None = None,
        faults: Sequence[str] = (),
    ) -> None:
        from serving.insilico.replay import ReplayCGM
        from serving.insilico.simulated import ManualClock, VirtualPump

        w = window or WindowConfig()
        unknown = [c for c in PROFILE_FEATURES if c in w.past_features and c not in frame.columns]
        if settings is None and unknown:  # population defaults must not pose as the profile
            raise LoopError(
                f"the model takes the therapy profile {list(PROFILE_FEATURES)} as inputs and "
                f"the recording has no {unknown} column(s): add the person's settings to the "
                "frame (a Nightscout export with profile.json has them), pass PatientSettings, "
                "or use a model trained with data.profile: off"
            )
        probe = ReplayCGM(frame, subject_id, ManualClock("2000-01-01"))
        start = (probe.start + SLOT * w.past_slots).ceil(SLOT)
        self.clock = ManualClock(start)
        self._settings = settings or settings_from_frame(frame, subject_id)
        self.replay = ReplayCGM(frame, subject_id, self.clock)
        # the recorded profile (a schedule may change over the day), where the frame has it
        sub = frame[frame["subject_id"].astype(str) == str(subject_id)]
        known = [c for c in PROFILE_FEATURES if c in sub.columns] if settings is None else []
        self._profile_times = pd.DatetimeIndex(sub["time"]).tz_convert("UTC")
        self._profile = {c: sub[c].to_numpy(dtype=float) for c in known}
        self.vpump = VirtualPump(self._settings.basal_u_per_h, self.clock)
        self.names = [str(subject_id)]
        self._cgm = _wrap(self.replay, faults, "cgm", self.clock)
        self._pump = _wrap(self.vpump, faults, "pump", self.clock)

    @property
    def end(self) -> pd.Timestamp:
        """The recording's last reading."""
        return self.replay.end

    @property
    def until(self) -> pd.Timestamp:
        """When a replay is over: after the cycle of the last reading."""
        return self.replay.end.floor(SLOT) + SLOT

    def now(self) -> pd.Timestamp:
        return self.clock.now()

    def cgm(self, i: int) -> CGM:
        return self._cgm

    def pump(self, i: int) -> Pump:
        return self._pump

    def settings(self, i: int) -> PatientSettings:
        return self._settings

    def announced_carbs(self, i: int, t0: pd.Timestamp, t1: pd.Timestamp) -> float:
        return self.replay.announced_carbs(t0, t1)

    def profile(self, i: int, times: pd.DatetimeIndex) -> dict[str, np.ndarray]:
        """The recording's profile at each time (its last row at or before it; the first row
        before the recording starts), else the settings'."""
        out = constant_profile(self._settings, len(times))
        if self._profile:
            at = self._profile_times.searchsorted(
                pd.DatetimeIndex(times).tz_convert("UTC"), "right"
            )
            row = np.clip(at - 1, 0, len(self._profile_times) - 1)
            out.update({c: v[row] for c, v in self._profile.items()})
        return out

    def prior_daily_dose_u(self, i: int) -> float | None:
        return None  # a recording's insulin before its first row is not known

    def advance(self, minutes: int) -> None:
        self.vpump.advance(minutes)

    def describe(self) -> dict[str, Any]:
        return {"backend": "replay", "subject": self.names[0]}


def settings_from_frame(frame: pd.DataFrame, subject_id: str) -> PatientSettings:
    """Conservative settings for a recorded patient whose therapy settings are not given.

    Scheduled basal = the median delivered basal rate; carb ratio and ISF from the frame's
    therapy-profile columns (their latest values) where it has them, else population values
    (10 g/U, 40 mg/dL/U); limits as the trial's (4 × basal, a modest bolus and IOB cap).
    """
    sub = frame[frame["subject_id"].astype(str) == str(subject_id)]
    rates = sub["basal_u"].to_numpy(dtype=float) * 60.0 / SLOT_MINUTES
    rates = rates[np.isfinite(rates) & (rates > 0)]
    basal = float(np.median(rates)) if len(rates) else 1.0

    def latest(column: str, default: float) -> float:
        return float(sub[column].iloc[-1]) if column in sub.columns and len(sub) else default

    return PatientSettings(
        name=str(subject_id),
        basal_u_per_h=basal,
        carb_ratio_g_per_u=latest("carb_ratio_g_per_u", 10.0),
        isf_mgdl_per_u=latest("isf_mgdl_per_u", 40.0),
        max_basal_u_per_h=4.0 * basal,
        max_bolus_u=10.0,
        max_iob_u=10.0 + 3.0 * basal,
        max_daily_basal_u_per_h=basal,
    )
