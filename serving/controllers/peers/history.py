"""The raw record both adapters read: a checked `SlotHistory` and its insulin as pump events.

Both peers want what a pump and a CGM report, not glucast's 5-minute grid: glucose readings
with their times, temp basals as (start, rate, duration), boluses as (time, units), carb
entries as (time, grams). `basal_runs` turns the delivered basal per slot back into temp
basals: consecutive slots at one rate are one temp (what the pump would have logged, and
far fewer records for the peer to integrate), and runs at the scheduled rate are left out
(a pump logs no temp while it runs its schedule; both peers count insulin net of it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from forecast.schema import SLOT_MINUTES
from serving.controllers.peers.process import PeerInputError
from serving.types import ControlInput, SlotHistory

RATE_DECIMALS = 6  # U/h: a slot's U × 12 carries float noise; the pump's increment is 0.05
SAME_RATE_U_PER_H = 1e-6


@dataclass(frozen=True)
class BasalRun:
    start_ns: int  # UTC, ns since the epoch
    minutes: int
    rate_u_per_h: float
    index: int = 0  # its first slot in the history (the adapters' vectorised time stamps)

    @property
    def start(self) -> pd.Timestamp:
        return pd.Timestamp(self.start_ns, tz="UTC")


def checked_history(inp: ControlInput, peer: str, *, max_hours: float) -> SlotHistory:
    """The input's history, verified and cut to its last `max_hours` (typed errors name the
    patient, the field, the slot and the value)."""
    h = inp.history
    who = f"{peer} ({inp.settings.name} at {inp.time})"
    if h is None:
        raise PeerInputError(
            f"{who}: ControlInput.history is None; the {peer} controller needs the engine's "
            "SlotHistory (the raw 5-minute record: glucose, basal, bolus, carbs)",
            peer=peer,
        )
    t = np.asarray(h.time)
    n = len(t)
    if n == 0:
        raise PeerInputError(f"{who}: SlotHistory is empty", peer=peer)
    for name in ("glucose", "basal_u", "bolus_u", "carbs_g"):
        if len(getattr(h, name)) != n:
            raise PeerInputError(
                f"{who}: SlotHistory.{name} has {len(getattr(h, name))} slots, time has {n}",
                peer=peer,
            )
    times = utc_index(t)
    steps = np.diff(times.asi8)
    bad = np.flatnonzero(steps != SLOT_MINUTES * 60 * 10**9)
    if len(bad):
        i = int(bad[0]) + 1
        raise PeerInputError(
            f"{who}: SlotHistory.time[{i}] = {times[i]} does not follow {times[i - 1]} by "
            f"{SLOT_MINUTES} min (the history must be the contiguous 5-minute grid)",
            peer=peer,
        )
    now = pd.Timestamp(inp.time)
    now = now.tz_localize("UTC") if now.tzinfo is None else now.tz_convert("UTC")
    if times[-1] != now:
        raise PeerInputError(
            f"{who}: SlotHistory ends at {times[-1]}, the cycle is at {now} (it must end at the "
            "current slot)",
            peer=peer,
        )
    for name in ("basal_u", "bolus_u", "carbs_g"):
        v = np.asarray(getattr(h, name), np.float64)
        wrong = np.flatnonzero(~np.isfinite(v) | (v < 0))
        if len(wrong):
            i = int(wrong[0])
            raise PeerInputError(
                f"{who}: SlotHistory.{name}[{i}] at {times[i]} = {v[i]} (must be a finite "
                f"amount >= 0; {len(wrong)} such slot(s))",
                peer=peer,
            )
    g = np.asarray(h.glucose, np.float64)
    if np.isinf(g).any():
        i = int(np.flatnonzero(np.isinf(g))[0])
        raise PeerInputError(f"{who}: SlotHistory.glucose[{i}] at {times[i]} = {g[i]}", peer=peer)
    announced = float(inp.carbs_announced_g or 0.0)
    last_carbs = float(np.asarray(h.carbs_g, np.float64)[-1])
    if announced > 0 and abs(announced - last_carbs) > 1e-6:
        raise PeerInputError(
            f"{who}: carbs_announced_g = {announced} but SlotHistory.carbs_g of the current slot "
            f"= {last_carbs}; the adapter reads meals from the history, which must hold the "
            "announcement",
            peer=peer,
        )
    keep = min(n, int(round(max_hours * 60 / SLOT_MINUTES)) + 1)
    return SlotHistory(
        time=times[-keep:].asi8.astype("datetime64[ns]"),  # naive UTC, as the engine gives it
        glucose=g[-keep:],
        basal_u=np.asarray(h.basal_u, np.float64)[-keep:],
        bolus_u=np.asarray(h.bolus_u, np.float64)[-keep:],
        carbs_g=np.asarray(h.carbs_g, np.float64)[-keep:],
    )


def basal_runs(h: SlotHistory, scheduled_u_per_h: float) -> list[BasalRun]:
    """Delivered basal as temp basals, oldest first (runs at the scheduled rate left out)."""
    rates = np.round(np.asarray(h.basal_u, np.float64) * 60.0 / SLOT_MINUTES, RATE_DECIMALS)
    ns = utc_index(h.time).asi8.tolist()
    r = rates.tolist()  # plain floats: the scan below runs per slot, every cycle, per patient
    out: list[BasalRun] = []
    i, n = 0, len(r)
    while i < n:
        j = i + 1
        while j < n and abs(r[j] - r[i]) < SAME_RATE_U_PER_H:
            j += 1
        if abs(r[i] - scheduled_u_per_h) >= SAME_RATE_U_PER_H:
            out.append(BasalRun(ns[i], (j - i) * SLOT_MINUTES, float(r[i]), i))
        i = j
    return out


def utc_index(t: np.ndarray | pd.DatetimeIndex) -> pd.DatetimeIndex:
    """Slot times as a UTC DatetimeIndex in nanoseconds (naive times are taken as UTC)."""
    if isinstance(t, pd.DatetimeIndex) and t.tz is not None and str(t.tz) == "UTC":
        return t.as_unit("ns")  # already one (the adapters pass it around: no re-parsing)
    a = np.asarray(t)
    if a.dtype == np.dtype("datetime64[ns]"):  # the engine's form: naive UTC slot starts
        return pd.DatetimeIndex(a).tz_localize("UTC")
    return pd.DatetimeIndex(pd.to_datetime(a, utc=True)).as_unit("ns")


def on_grid(x: float, increment: float) -> float:
    """`x` floored to the pump's increment: a pump's max basal setting lies on its rate grid,
    and a peer that rounds its rate to the nearest increment could otherwise round above an
    off-grid maximum (Loop does; the supervisor would then trim every capped temp)."""
    return round(math.floor(x / increment + 1e-9) * increment, 6) if increment > 0 else x


def iso(t: pd.Timestamp | np.datetime64, *, zulu: bool = True) -> str:
    """UTC time as ISO 8601: "...Z" (oref0's zoned-clock check wants a zone) or "...+00:00"
    (what `datetime.fromisoformat` reads on every Python pyloopkit supports)."""
    ts = pd.Timestamp(t)
    ts = ts.tz_localize("UTC") if ts.tzinfo is None else ts.tz_convert("UTC")
    return ts.strftime("%Y-%m-%dT%H:%M:%S") + ("Z" if zulu else "+00:00")


def iso_many(times: pd.DatetimeIndex, *, zulu: bool = True) -> np.ndarray:
    """`iso` of every time at once (numpy's formatting: a cohort's 24 h of entries cost
    microseconds, not the milliseconds of one pandas Timestamp per entry)."""
    ns = utc_index(times).asi8.astype("datetime64[ns]")
    return np.char.add(np.datetime_as_string(ns, unit="s"), "Z" if zulu else "+00:00")


def epoch_ms_many(times: pd.DatetimeIndex) -> np.ndarray:
    """`epoch_ms` of every time at once."""
    return utc_index(times).asi8 // 10**6


def epoch_ms(t: pd.Timestamp | np.datetime64) -> int:
    ts = pd.Timestamp(t)
    ts = ts.tz_localize("UTC") if ts.tzinfo is None else ts.tz_convert("UTC")
    return int(ts.value // 10**6)
