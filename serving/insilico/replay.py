"""A CGM that replays a recorded canonical glucose frame, reading by reading, on a clock.

For running the loop against real recorded data (OhioT1DM, Nightscout exports...): at each
moment the CGM reports the frame's readings whose slot has started, never one from the
future, so the loop sees the data the way it arrived. Insulin cannot change a recording, so
the replay backend pairs this CGM with a `VirtualPump`: decisions are what the loop *would*
have done (and journaled as such).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from forecast.schema import SchemaError, validate_frame
from serving.hal.cgm import Clock, no_data
from serving.types import CGMStatus, Reading


class ReplayCGM:
    """Patient `subject_id`'s readings from `frame`, released as `clock` passes their time."""

    def __init__(self, frame: pd.DataFrame, subject_id: str, clock: Clock) -> None:
        f = validate_frame(frame)
        sub = f[f["subject_id"].astype(str) == str(subject_id)]
        if not len(sub):
            known = sorted(f["subject_id"].astype(str).unique())[:10]
            raise SchemaError(f"subject {subject_id!r} is not in the frame (it holds {known}...)")
        sub = sub[np.isfinite(sub["glucose"].to_numpy(dtype=float))]
        self.subject_id = str(subject_id)
        self.times = pd.DatetimeIndex(sub["time"]).tz_convert("UTC")
        self.glucose = sub["glucose"].to_numpy(dtype=float)
        self.carbs = frame_carbs(f, subject_id)
        self.clock = clock

    @property
    def start(self) -> pd.Timestamp:
        return self.times[0]

    @property
    def end(self) -> pd.Timestamp:
        return self.times[-1]

    def recent(self, minutes: float = 60.0) -> list[Reading]:
        from forecast.trend import trend_at

        now = self.clock.now()
        hi = int(self.times.searchsorted(now, side="right"))
        lo = int(self.times.searchsorted(now - pd.Timedelta(minutes=minutes), side="left"))
        out = []
        for j in range(lo, hi):
            a = max(0, j - 4)
            tr = trend_at(self.times[a : j + 1], self.glucose[a : j + 1]).roc_mgdl_min
            out.append(Reading(self.times[j], float(self.glucose[j]), CGMStatus.OK, tr))
        return out

    def latest(self) -> Reading:
        rs = self.recent(30.0)
        return rs[-1] if rs else no_data(self.clock.now())

    def announced_carbs(self, t0: pd.Timestamp, t1: pd.Timestamp) -> float:
        """Carbs the recording logs in [t0, t1): the meal announcements the loop would get."""
        t, g = self.carbs
        sel = (t >= t0) & (t < t1)
        return float(np.nansum(g[sel]))


def frame_carbs(frame: pd.DataFrame, subject_id: str) -> tuple[pd.DatetimeIndex, np.ndarray]:
    sub = frame[frame["subject_id"].astype(str) == str(subject_id)]
    c = sub["carbs_g"].to_numpy(dtype=float)
    keep = np.isfinite(c) & (c > 0)
    return pd.DatetimeIndex(sub["time"][keep]).tz_convert("UTC"), c[keep]
