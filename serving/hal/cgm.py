"""The CGM as the loop sees it: the latest readings with the sensor's own timestamps.

A reading's time comes from the sensor's clock, which is not the loop's clock: it can be
stale, ahead (a wrong time zone, a daylight-saving jump), duplicated or out of order. The
protocol reports readings *as the device gives them*; judging them is the supervisor's job
(`serving.safety.assess_cgm`), so a driver never hides a fault by tidying its output.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import pandas as pd

from forecast.schema import GlucastError
from serving.types import CGMStatus, Reading

__all__ = ["CGM", "CGMError", "Clock", "CGMStatus", "Reading", "SystemClock", "no_data"]


class CGMError(GlucastError):
    """The CGM could not be read at all (lost connection, driver failure)."""


@runtime_checkable
class CGM(Protocol):
    """A continuous glucose monitor."""

    def latest(self) -> Reading:
        """The most recent reading; status NO_DATA (and NaN glucose) when there is none."""
        ...

    def recent(self, minutes: float = 60.0) -> list[Reading]:
        """Readings from roughly the last `minutes`, in the order the device reports them."""
        ...


@runtime_checkable
class Clock(Protocol):
    """The loop's clock (UTC). Simulated devices share theirs with the loop."""

    def now(self) -> pd.Timestamp: ...


class SystemClock:
    """Wall-clock time in UTC, for real devices."""

    def now(self) -> pd.Timestamp:
        return pd.Timestamp.now(tz="UTC")


def no_data(time: pd.Timestamp) -> Reading:
    """The reading a CGM gives when it has nothing to give."""
    return Reading(time=time, glucose_mgdl=float("nan"), status=CGMStatus.NO_DATA)
