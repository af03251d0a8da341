"""Fault injectors: wrappers around real (simulated) devices that misbehave on schedule.

Each wrapper implements the same protocol as the device it wraps and is active during a
`Window` of the loop's clock. CGM faults transform what the sensor reports (dropouts,
compression lows, spikes, late, future-stamped, duplicated, shuffled or flat readings, a
sensor clock jump, error codes); pump faults disturb the command road (timeouts that lose
the command or only its answer, missing acknowledgements, an unreachable pump) or the
device itself (an occluded line, an empty reservoir — through the simulated pump's own
physical hooks, so the firmware's alarms fire as they would), and `PowerLoss` kills the
process running the loop in the middle of a command (for crash-restart tests).

`build_fault("dropout:start=30,minutes=60", device, clock)` builds one from the CLI's
``--fault`` syntax; `FAULTS` lists them.
"""

from __future__ import annotations

import os
import random
import signal
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from forecast.schema import GlucastError
from serving.hal.cgm import CGM, Clock, no_data
from serving.hal.pump import Ack, Delivery, Pump, PumpNoAck, PumpStatus, PumpTimeout
from serving.types import CGMStatus, Reading


class FaultSpecError(GlucastError, ValueError):
    """A --fault specification that cannot be built."""


@dataclass(frozen=True)
class Window:
    """When a fault is active: [start, end) on the loop's clock (None = open-ended)."""

    start: pd.Timestamp | None = None
    end: pd.Timestamp | None = None

    def active(self, t: pd.Timestamp) -> bool:
        return (self.start is None or t >= self.start) and (self.end is None or t < self.end)

    def covers(self, t: pd.Timestamp) -> bool:
        """Whether a reading stamped `t` was taken while the fault was on."""
        return self.active(t)

    @classmethod
    def after(cls, clock: Clock, start_min: float = 0.0, minutes: float | None = None) -> Window:
        s = clock.now() + pd.Timedelta(minutes=start_min)
        return cls(s, None if minutes is None else s + pd.Timedelta(minutes=minutes))


# --------------------------------------------------------------------------- CGM faults


class CGMFault:
    """Base: reports the wrapped CGM's readings through `transform` while active."""

    name = "cgm-fault"

    def __init__(self, inner: CGM, clock: Clock, window: Window = Window()) -> None:
        self.inner, self.clock, self.window = inner, clock, window

    def transform(self, readings: list[Reading], now: pd.Timestamp) -> list[Reading]:
        return readings

    def recent(self, minutes: float = 60.0) -> list[Reading]:
        rs = self.inner.recent(minutes)
        return self.transform(rs, self.clock.now())

    def latest(self) -> Reading:
        rs = self.recent(30.0)
        return max(rs, key=lambda r: r.time) if rs else no_data(self.clock.now())


class Dropout(CGMFault):
    """No readings are received while active (and none are backfilled)."""

    name = "dropout"

    def transform(self, readings, now):
        return [r for r in readings if not self.window.covers(r.time)]


class CompressionLow(CGMFault):
    """Lying on the sensor: readings sag by `depth_mgdl` (a false low)."""

    name = "compression-low"

    def __init__(self, inner, clock, window=Window(), depth_mgdl: float = 60.0) -> None:
        super().__init__(inner, clock, window)
        self.depth = float(depth_mgdl)

    def transform(self, readings, now):
        return [
            Reading(r.time, max(40.0, r.glucose_mgdl - self.depth), r.status, r.trend_mgdl_per_min)
            if self.window.covers(r.time)
            else r
            for r in readings
        ]


class NoiseSpikes(CGMFault):
    """Every `every`-th reading while active jumps by ±`size_mgdl` (a glitch)."""

    name = "noise-spikes"

    def __init__(
        self, inner, clock, window=Window(), size_mgdl: float = 80.0, every: int = 3
    ) -> None:
        super().__init__(inner, clock, window)
        self.size, self.every = float(size_mgdl), max(1, int(every))

    def transform(self, readings, now):
        out = []
        for r in readings:
            slot = int(r.time.value // (300 * 10**9))
            if self.window.covers(r.time) and slot % self.every == 0:
                sign = 1.0 if (slot // self.every) % 2 else -1.0
                g = float(np.clip(r.glucose_mgdl + sign * self.size, 40.0, 400.0))
                r = Reading(r.time, g, r.status, float("nan"))
            out.append(r)
        return out


class StaleReadings(CGMFault):
    """Readings arrive `lag_min` late (a receiver that stopped syncing on time)."""

    name = "stale"

    def __init__(self, inner, clock, window=Window(), lag_min: float = 20.0) -> None:
        super().__init__(inner, clock, window)
        self.lag = pd.Timedelta(minutes=lag_min)

    def recent(self, minutes: float = 60.0) -> list[Reading]:
        now = self.clock.now()
        rs = self.inner.recent(minutes + self.lag.total_seconds() / 60.0)
        if not self.window.active(now):
            return rs
        return [r for r in rs if r.time <= now - self.lag]


class FutureTimestamps(CGMFault):
    """Readings stamped `ahead_min` in the future (a receiver in the wrong time zone)."""

    name = "future"

    def __init__(self, inner, clock, window=Window(), ahead_min: float = 15.0) -> None:
        super().__init__(inner, clock, window)
        self.ahead = pd.Timedelta(minutes=ahead_min)

    def transform(self, readings, now):
        return [
            Reading(r.time + self.ahead, r.glucose_mgdl, r.status, r.trend_mgdl_per_min)
            if self.window.covers(r.time)
            else r
            for r in readings
        ]


class ClockJump(FutureTimestamps):
    """The sensor's clock jumps by `offset_min` (±60: daylight saving) for readings from then on."""

    name = "clock-jump"

    def __init__(self, inner, clock, window=Window(), offset_min: float = 60.0) -> None:
        super().__init__(inner, clock, window, ahead_min=offset_min)


class Duplicated(CGMFault):
    """Every reading reported twice."""

    name = "duplicated"

    def transform(self, readings, now):
        out = []
        for r in readings:
            out += [r, r] if self.window.covers(r.time) else [r]
        return out


class OutOfOrder(CGMFault):
    """Readings reported in a shuffled order (a backfill after a connection loss)."""

    name = "out-of-order"

    def transform(self, readings, now):
        if not self.window.active(now):
            return readings
        rng = random.Random(int(now.value // 10**9))
        out = list(readings)
        rng.shuffle(out)
        return out


class FlatLine(CGMFault):
    """The sensor keeps reporting the same value with fresh timestamps (it stopped measuring)."""

    name = "flat"

    def __init__(self, inner, clock, window=Window()) -> None:
        super().__init__(inner, clock, window)
        self.value: float | None = None

    def transform(self, readings, now):
        out = []
        for r in sorted(readings, key=lambda x: x.time):
            if self.window.covers(r.time):
                if self.value is None:
                    self.value = r.glucose_mgdl
                r = Reading(r.time, self.value, r.status, 0.0)
            out.append(r)
        return out


class SensorError(CGMFault):
    """The sensor reports an error code (or `status`, e.g. warm-up) instead of a value."""

    name = "sensor-error"

    def __init__(self, inner, clock, window=Window(), status: str = "error") -> None:
        super().__init__(inner, clock, window)
        self.status = CGMStatus(status)

    def transform(self, readings, now):
        return [
            Reading(r.time, float("nan"), self.status) if self.window.covers(r.time) else r
            for r in readings
        ]


# --------------------------------------------------------------------------- pump faults


class PumpFaultWrapper:
    """Base: forwards everything to the wrapped pump; subclasses disturb it while active."""

    name = "pump-fault"

    def __init__(self, inner: Pump, clock: Clock, window: Window = Window()) -> None:
        self.inner, self.clock, self.window = inner, clock, window

    def on(self) -> bool:
        return self.window.active(self.clock.now())

    def _cmd(self, kind: str, call: Callable[[], Ack], key: str) -> Ack:
        return call()

    def status(self) -> PumpStatus:
        return self.inner.status()

    def temp_basal(self, rate_u_per_h: float, duration_min: int, key: str) -> Ack:
        return self._cmd(
            "temp_basal", lambda: self.inner.temp_basal(rate_u_per_h, duration_min, key), key
        )

    def cancel_temp_basal(self, key: str) -> Ack:
        return self._cmd("cancel_temp", lambda: self.inner.cancel_temp_basal(key), key)

    def bolus(self, units: float, key: str) -> Ack:
        return self._cmd("bolus", lambda: self.inner.bolus(units, key), key)

    def suspend(self, key: str) -> Ack:
        return self._cmd("suspend", lambda: self.inner.suspend(key), key)

    def resume(self, key: str) -> Ack:
        return self._cmd("resume", lambda: self.inner.resume(key), key)

    def ack_for(self, key: str) -> Ack | None:
        return self.inner.ack_for(key)

    def deliveries(self, after_seq: int = 0) -> list[Delivery]:
        return self.inner.deliveries(after_seq)

    def __getattr__(self, name: str) -> Any:  # physical hooks (occlude, set_reservoir...)
        return getattr(self.inner, name)


class CommandTimeout(PumpFaultWrapper):
    """Commands time out. `lost=True`: the pump never got them; False: only the answer is lost."""

    name = "timeout"

    def __init__(
        self, inner, clock, window=Window(), kinds: str = "all", lost: bool = True
    ) -> None:
        super().__init__(inner, clock, window)
        self.kinds = None if kinds == "all" else set(kinds.split("+"))
        self.lost = bool(lost)

    def _cmd(self, kind, call, key):
        if not self.on() or (self.kinds is not None and kind not in self.kinds):
            return call()
        if not self.lost:
            call()
        raise PumpTimeout(f"{kind} {key}: no answer from the pump")


class NoAck(PumpFaultWrapper):
    """The pump applies commands but never acknowledges them."""

    name = "no-ack"

    def _cmd(self, kind, call, key):
        if not self.on():
            return call()
        call()
        raise PumpNoAck(f"{kind} {key}: applied but not acknowledged")


class Unreachable(PumpFaultWrapper):
    """The pump cannot be reached at all: commands, status and queries all time out."""

    name = "unreachable"

    def _cmd(self, kind, call, key):
        if self.on():
            raise PumpTimeout(f"{kind} {key}: pump unreachable")
        return call()

    def status(self) -> PumpStatus:
        if self.on():
            raise PumpTimeout("status: pump unreachable")
        return self.inner.status()

    def ack_for(self, key: str) -> Ack | None:
        if self.on():
            raise PumpTimeout(f"query {key}: pump unreachable")
        return self.inner.ack_for(key)

    def deliveries(self, after_seq: int = 0) -> list[Delivery]:
        if self.on():
            raise PumpTimeout("history: pump unreachable")
        return self.inner.deliveries(after_seq)


class _PhysicalFault(PumpFaultWrapper):
    """Applies a physical change to the device once when the window opens (checked on every call)."""

    def __init__(self, inner, clock, window=Window()) -> None:
        super().__init__(inner, clock, window)
        self.applied = self.cleared = False

    def apply(self) -> None: ...

    def clear(self) -> None: ...

    def _tick(self) -> None:
        if not self.applied and self.on():
            self.applied = True
            self.apply()
        elif self.applied and not self.cleared and not self.on():
            self.cleared = True
            self.clear()

    def status(self) -> PumpStatus:
        self._tick()
        return self.inner.status()

    def _cmd(self, kind, call, key):
        self._tick()
        return call()


class Occlusion(_PhysicalFault):
    """The infusion line blocks: only `fraction` of the insulin gets through (the alarm follows)."""

    name = "occlusion"

    def __init__(self, inner, clock, window=Window(), fraction: float = 0.0) -> None:
        super().__init__(inner, clock, window)
        self.fraction = float(fraction)

    def apply(self) -> None:
        self.inner.occlude(self.fraction)  # type: ignore[attr-defined]

    def clear(self) -> None:
        self.inner.clear_occlusion()  # type: ignore[attr-defined]


class EmptyReservoir(_PhysicalFault):
    """The reservoir is (nearly) empty from the window's start."""

    name = "empty-reservoir"

    def __init__(self, inner, clock, window=Window(), units: float = 0.2) -> None:
        super().__init__(inner, clock, window)
        self.units = float(units)

    def apply(self) -> None:
        self.inner.set_reservoir(self.units)  # type: ignore[attr-defined]


class PowerLoss(PumpFaultWrapper):
    """The device running the loop dies (SIGKILL to this process) around a pump command.

    With probability `prob` per command while active, at `point` "before" (the intent is
    journaled, the pump never hears), "after" (the pump acted, the loop never learns) or
    "either". For crash-restart tests: nothing after the kill runs, as with a real power loss.
    """

    name = "power-loss"

    def __init__(
        self,
        inner,
        clock,
        window=Window(),
        prob: float = 0.2,
        point: str = "either",
        seed: int | None = None,
    ) -> None:
        super().__init__(inner, clock, window)
        if point not in ("before", "after", "either"):
            raise FaultSpecError(f"power-loss point must be before, after or either, got {point!r}")
        self.prob, self.point = float(prob), point
        self.rng = random.Random(seed)

    def _die(self) -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    def _cmd(self, kind, call, key):
        if not self.on() or self.rng.random() >= self.prob:
            return call()
        point = self.point if self.point != "either" else self.rng.choice(("before", "after"))
        if point == "before":
            self._die()
        call()
        self._die()
        raise AssertionError("unreachable")  # pragma: no cover


# --------------------------------------------------------------------------- registry


FAULTS: dict[str, tuple[str, type]] = {
    c.name: (target, c)
    for target, classes in (
        ("cgm", (Dropout, CompressionLow, NoiseSpikes, StaleReadings, FutureTimestamps, ClockJump,
                 Duplicated, OutOfOrder, FlatLine, SensorError)),
        ("pump", (CommandTimeout, NoAck, Unreachable, Occlusion, EmptyReservoir, PowerLoss)),
    )
    for c in classes
}  # fmt: skip


def _value(v: str) -> Any:
    low = v.lower()
    if low in ("true", "false"):
        return low == "true"
    try:
        return int(v)
    except ValueError:
        pass
    try:
        return float(v)
    except ValueError:
        return v


def parse_fault(spec: str) -> tuple[str, dict[str, Any]]:
    """ "name:key=value,key=value" → (name, params); `start`/`minutes` are minutes from now."""
    name, _, rest = spec.partition(":")
    name = name.strip()
    if name not in FAULTS:
        raise FaultSpecError(f"unknown fault {name!r}; known: {', '.join(sorted(FAULTS))}")
    params: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in rest.split(","))):
        k, eq, v = part.partition("=")
        if not eq:
            raise FaultSpecError(f"fault {name}: expected key=value, got {part!r}")
        params[k.strip()] = _value(v.strip())
    return name, params


def fault_target(spec: str) -> str:
    """ "cgm" or "pump": which device a spec wraps."""
    return FAULTS[parse_fault(spec)[0]][0]


def build_fault(spec: str, device: Any, clock: Clock) -> Any:
    """Wrap `device` in the fault a spec names, active from `start` for `minutes` (from now)."""
    name, params = parse_fault(spec)
    cls = FAULTS[name][1]
    window = Window.after(clock, float(params.pop("start", 0.0)), params.pop("minutes", None))
    try:
        return cls(device, clock, window, **params)
    except TypeError as e:
        raise FaultSpecError(f"fault {name}: {e}") from e
