"""The insulin pump as the loop sees it: a protocol, its records, its errors, and its firmware.

A driver for a real pump implements `Pump`. Every command carries an *idempotency key*: a
pump that has acknowledged a key answers a repeat of that key with the original
acknowledgement and delivers nothing more. That is what lets a restarted loop ask "did my
bolus go through?" without risking a second bolus.

`PumpFirmware` is the command/state logic a pump runs (temp basals that expire by
themselves, a reservoir that runs dry, an occlusion alarm), kept free of I/O and of any
particular patient model so the simulated pumps (one patient or a whole cohort) share it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any, Protocol, runtime_checkable

import pandas as pd

from forecast.schema import GlucastError

MAX_TEMP_MINUTES = 30  # every temp basal expires on its own: a dead loop → scheduled basal
BOLUS_INCREMENT_U = 0.05  # pump resolution (Medtronic/Omnipod: 0.05 U; Dexcom-era pumps alike)
BASAL_INCREMENT_U_PER_H = 0.05


class CommandKind(StrEnum):
    TEMP_BASAL = "temp_basal"
    CANCEL_TEMP = "cancel_temp"
    BOLUS = "bolus"
    SUSPEND = "suspend"
    RESUME = "resume"


class PumpFault(StrEnum):
    NONE = ""
    OCCLUSION = "occlusion"
    RESERVOIR_EMPTY = "reservoir_empty"


# --------------------------------------------------------------------------- errors


class PumpError(GlucastError):
    """A pump command whose outcome the loop could not learn from the pump."""


class PumpTimeout(PumpError):
    """The pump did not answer in time: the command may or may not have been received."""


class PumpNoAck(PumpError):
    """The pump was reached but sent no acknowledgement: the command may have been applied."""


class PumpCommandError(PumpError, ValueError):
    """A command the pump cannot even parse (negative amount, over-long temp, empty key)."""


# --------------------------------------------------------------------------- records


@dataclass(frozen=True)
class Command:
    """One command as sent; `key` makes it idempotent."""

    key: str
    kind: CommandKind
    amount: float = 0.0  # U for a bolus, U/h for a temp basal, 0 otherwise
    duration_min: int = 0  # temp basal only

    def validate(self) -> None:
        if not self.key:
            raise PumpCommandError("a pump command needs a non-empty idempotency key")
        if not (self.amount >= 0.0) or self.amount != self.amount:
            raise PumpCommandError(
                f"{self.kind} amount must be a finite value >= 0, got {self.amount}"
            )
        if self.kind is CommandKind.TEMP_BASAL and not 0 < self.duration_min <= MAX_TEMP_MINUTES:
            raise PumpCommandError(
                f"a temp basal lasts 1..{MAX_TEMP_MINUTES} min, got {self.duration_min}"
            )


@dataclass(frozen=True)
class Ack:
    """The pump's answer to a command: accepted or refused (with why), and what it will do."""

    key: str
    kind: CommandKind
    accepted: bool
    amount: float  # what the pump will actually deliver/run (after rounding), 0 if refused
    time: pd.Timestamp
    detail: str = ""

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["kind"] = str(self.kind)
        d["time"] = self.time.isoformat()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Ack:
        return cls(
            key=d["key"],
            kind=CommandKind(d["kind"]),
            accepted=bool(d["accepted"]),
            amount=float(d["amount"]),
            time=pd.Timestamp(d["time"]),
            detail=d.get("detail", ""),
        )


@dataclass(frozen=True)
class Delivery:
    """Insulin that went in (as the pump measured it), numbered in delivery order."""

    seq: int
    time: pd.Timestamp  # start of the delivery interval
    kind: str  # "basal" | "bolus"
    units: float
    key: str = ""  # the bolus's idempotency key; "" for basal
    minutes: float = 0.0  # length of a basal interval (0 for a bolus)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["time"] = self.time.isoformat()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Delivery:
        return cls(
            seq=int(d["seq"]),
            time=pd.Timestamp(d["time"]),
            kind=str(d["kind"]),
            units=float(d["units"]),
            key=str(d.get("key", "")),
            minutes=float(d.get("minutes", 0.0)),
        )


@dataclass(frozen=True)
class TempBasal:
    rate_u_per_h: float
    start: pd.Timestamp
    end: pd.Timestamp


@dataclass(frozen=True)
class PumpStatus:
    """What the pump reports about itself."""

    time: pd.Timestamp
    reservoir_u: float
    suspended: bool
    scheduled_basal_u_per_h: float
    temp_basal: TempBasal | None = None
    last_delivery: Delivery | None = None
    fault: PumpFault = PumpFault.NONE
    pending_bolus_u: float = 0.0  # acknowledged, not yet delivered

    @property
    def current_rate_u_per_h(self) -> float:
        if self.suspended or self.fault:
            return 0.0
        if self.temp_basal is not None and self.temp_basal.end > self.time:
            return self.temp_basal.rate_u_per_h
        return self.scheduled_basal_u_per_h


# --------------------------------------------------------------------------- protocol


@runtime_checkable
class Pump(Protocol):
    """What the loop (through the supervisor only) may ask of a pump."""

    def status(self) -> PumpStatus: ...

    def temp_basal(self, rate_u_per_h: float, duration_min: int, key: str) -> Ack: ...

    def cancel_temp_basal(self, key: str) -> Ack: ...

    def bolus(self, units: float, key: str) -> Ack: ...

    def suspend(self, key: str) -> Ack: ...

    def resume(self, key: str) -> Ack: ...

    def ack_for(self, key: str) -> Ack | None:
        """The acknowledgement the pump gave for `key`, or None if it never received it."""
        ...

    def deliveries(self, after_seq: int = 0) -> list[Delivery]:
        """Delivery history, in order, with seq > after_seq."""
        ...


def send(pump: Pump, command: Command) -> Ack:
    """Dispatch a `Command` to the matching pump method."""
    command.validate()
    match command.kind:
        case CommandKind.TEMP_BASAL:
            return pump.temp_basal(command.amount, command.duration_min, command.key)
        case CommandKind.CANCEL_TEMP:
            return pump.cancel_temp_basal(command.key)
        case CommandKind.BOLUS:
            return pump.bolus(command.amount, command.key)
        case CommandKind.SUSPEND:
            return pump.suspend(command.key)
        case CommandKind.RESUME:
            return pump.resume(command.key)
    raise PumpCommandError(f"unknown command kind {command.kind!r}")


# --------------------------------------------------------------------------- firmware


def round_down(x: float, step: float) -> float:
    """Pumps deliver whole increments; rounding down never gives more than asked."""
    return round(int(x / step + 1e-9) * step, 10)


@dataclass
class PumpFirmware:
    """The state machine of one pump, without I/O: commands in, rates and boluses out.

    The owner (a simulated pump) calls `command` for each command; to infuse, it asks
    `rate_at` for the basal rate and `take_bolus` for an acknowledged bolus to start, then
    books what went in with `record`. A bolus is *queued* when acknowledged, *infusing* once
    taken, and done when `record` has booked all of it (possibly over several intervals, at
    the pump's speed). Everything here is plain data, checkpointed as JSON
    (`state_dict`/`from_state`), never pickled.
    """

    scheduled_basal_u_per_h: float
    reservoir_u: float = 300.0
    max_bolus_u: float = 25.0  # the pump's own hard cap (a second line behind the supervisor)
    max_basal_u_per_h: float = 35.0
    occlusion_alarm_u: float = 1.0  # missed insulin before the occlusion alarm (≈ real pumps)
    suspended: bool = False
    temp_rate: float | None = None
    temp_start: pd.Timestamp | None = None
    temp_end: pd.Timestamp | None = None
    bolus_queued_u: float = 0.0  # acknowledged, not yet started
    bolus_left_u: float = 0.0  # started, not yet booked as delivered
    bolus_key: str = ""
    missed_u: float = 0.0
    fault: PumpFault = PumpFault.NONE
    acks: dict[str, Ack] = field(default_factory=dict)
    history: list[Delivery] = field(default_factory=list)
    next_seq: int = 1

    # ---- commands
    def command(self, cmd: Command, now: pd.Timestamp) -> Ack:
        """Apply one command; a key seen before returns its first acknowledgement unchanged."""
        cmd.validate()
        if cmd.key in self.acks:
            return self.acks[cmd.key]
        ack = self._apply(cmd, now)
        self.acks[cmd.key] = ack
        return ack

    def _refuse(self, cmd: Command, now: pd.Timestamp, why: str) -> Ack:
        return Ack(cmd.key, cmd.kind, False, 0.0, now, why)

    def _apply(self, cmd: Command, now: pd.Timestamp) -> Ack:
        if self.fault and cmd.kind in (CommandKind.BOLUS, CommandKind.TEMP_BASAL):
            return self._refuse(cmd, now, f"pump fault: {self.fault}")
        match cmd.kind:
            case CommandKind.TEMP_BASAL:
                if self.suspended:
                    return self._refuse(cmd, now, "pump suspended")
                if cmd.amount > self.max_basal_u_per_h:
                    return self._refuse(
                        cmd, now, f"rate above pump maximum {self.max_basal_u_per_h}"
                    )
                rate = round_down(cmd.amount, BASAL_INCREMENT_U_PER_H)
                self.temp_rate = rate
                self.temp_start = now
                self.temp_end = now + pd.Timedelta(minutes=cmd.duration_min)
                return Ack(cmd.key, cmd.kind, True, rate, now)
            case CommandKind.CANCEL_TEMP:
                self.temp_rate = self.temp_start = self.temp_end = None
                return Ack(cmd.key, cmd.kind, True, 0.0, now)
            case CommandKind.BOLUS:
                if self.suspended:
                    return self._refuse(cmd, now, "pump suspended")
                if self.bolus_in_progress:
                    return self._refuse(cmd, now, "a bolus is already in progress")
                if cmd.amount > self.max_bolus_u:
                    return self._refuse(cmd, now, f"bolus above pump maximum {self.max_bolus_u}")
                units = min(
                    round_down(cmd.amount, BOLUS_INCREMENT_U),
                    round_down(self.reservoir_u, BOLUS_INCREMENT_U),
                )
                if units <= 0:
                    return self._refuse(cmd, now, "bolus rounds to zero or reservoir empty")
                self.bolus_queued_u = units
                self.bolus_key = cmd.key
                return Ack(cmd.key, cmd.kind, True, units, now)
            case CommandKind.SUSPEND:
                self.suspended = True
                self.temp_rate = self.temp_start = self.temp_end = None
                self.stop_bolus()
                return Ack(cmd.key, cmd.kind, True, 0.0, now)
            case CommandKind.RESUME:
                self.suspended = False
                return Ack(cmd.key, cmd.kind, True, 0.0, now)
        return self._refuse(cmd, now, "unknown command")

    # ---- delivery
    @property
    def bolus_in_progress(self) -> bool:
        return self.bolus_queued_u > 0 or self.bolus_left_u > 0

    @property
    def pending_bolus_u(self) -> float:
        """Acknowledged bolus insulin not yet delivered."""
        return self.bolus_queued_u + self.bolus_left_u

    def stop_bolus(self) -> None:
        """A suspend or an alarm stops a bolus; what was not delivered never will be."""
        self.bolus_queued_u = self.bolus_left_u = 0.0
        self.bolus_key = ""

    def take_bolus(self) -> float:
        """Start the queued bolus: the units the infusion mechanism should now deliver."""
        u, self.bolus_queued_u = self.bolus_queued_u, 0.0
        self.bolus_left_u += u
        return u

    def rate_at(self, t: pd.Timestamp) -> float:
        """The basal rate the pump would run at instant t (U/h)."""
        if self.suspended or self.fault:
            return 0.0
        if self.temp_rate is not None and self.temp_end is not None and t < self.temp_end:
            return self.temp_rate
        return self.scheduled_basal_u_per_h

    def breakpoints(self, t0: pd.Timestamp, t1: pd.Timestamp) -> list[pd.Timestamp]:
        """Instants inside (t0, t1) where the rate changes by itself (a temp basal ending)."""
        if self.temp_end is not None and t0 < self.temp_end < t1:
            return [self.temp_end]
        return []

    def record(
        self,
        t0: pd.Timestamp,
        minutes: float,
        basal_u: float,
        bolus_u: float,
        missed_u: float = 0.0,
    ) -> list[Delivery]:
        """Book what the pump pushed over [t0, t0+minutes] (basal, and bolus of the infusing key).

        `basal_u` and `bolus_u` are what the pump believes it delivered — its history, like a
        real pump's, is its own view. `missed_u` is the part that did not reach the patient
        (an occlusion); enough of it raises the occlusion alarm, as a real pump's pressure
        sensor would. The reservoir is drawn down by what was pushed and empties into a fault.
        """
        out: list[Delivery] = []
        if basal_u > 0 or minutes > 0:
            out.append(self._book(t0, "basal", basal_u, "", minutes))
        if bolus_u > 0:
            out.append(self._book(t0, "bolus", bolus_u, self.bolus_key, 0.0))
            self.bolus_left_u = max(0.0, self.bolus_left_u - bolus_u)
            if self.bolus_left_u <= 1e-9 and self.bolus_queued_u <= 0:
                self.bolus_left_u, self.bolus_key = 0.0, ""
        self.reservoir_u = max(0.0, self.reservoir_u - basal_u - bolus_u)
        self.missed_u += max(0.0, missed_u)
        if self.reservoir_u <= 1e-9:
            self.fault = PumpFault.RESERVOIR_EMPTY
        elif self.missed_u >= self.occlusion_alarm_u:
            self.fault = PumpFault.OCCLUSION
        if self.fault:
            self.temp_rate = self.temp_start = self.temp_end = None
            self.stop_bolus()
        return out

    def _book(
        self, t0: pd.Timestamp, kind: str, units: float, key: str, minutes: float
    ) -> Delivery:
        d = Delivery(self.next_seq, t0, kind, float(units), key, float(minutes))
        self.next_seq += 1
        self.history.append(d)
        return d

    def clear_fault(self, reservoir_u: float | None = None) -> None:
        """What a user does after an alarm: a new cartridge / a new infusion set."""
        if reservoir_u is not None:
            self.reservoir_u = reservoir_u
        self.fault = PumpFault.NONE
        self.missed_u = 0.0

    def status(self, now: pd.Timestamp) -> PumpStatus:
        temp = None
        if self.temp_rate is not None and self.temp_end is not None and self.temp_end > now:
            temp = TempBasal(self.temp_rate, self.temp_start or now, self.temp_end)
        return PumpStatus(
            time=now,
            reservoir_u=self.reservoir_u,
            suspended=self.suspended,
            scheduled_basal_u_per_h=self.scheduled_basal_u_per_h,
            temp_basal=temp,
            last_delivery=self.history[-1] if self.history else None,
            fault=self.fault,
            pending_bolus_u=self.pending_bolus_u,
        )

    def deliveries(self, after_seq: int = 0) -> list[Delivery]:
        # history is in seq order and seq starts at 1, so seq - 1 is the list index
        return self.history[max(0, after_seq) :]

    # ---- checkpoint (JSON, never pickle)
    _SCALARS = (
        "scheduled_basal_u_per_h", "reservoir_u", "max_bolus_u", "max_basal_u_per_h",
        "occlusion_alarm_u", "suspended", "temp_rate", "bolus_queued_u", "bolus_left_u",
        "bolus_key", "missed_u", "next_seq",
    )  # fmt: skip

    def state_dict(self) -> dict[str, Any]:
        """Everything but the append-only acks and history (those are stored row by row)."""
        d: dict[str, Any] = {k: getattr(self, k) for k in self._SCALARS}
        d["temp_start"] = None if self.temp_start is None else self.temp_start.isoformat()
        d["temp_end"] = None if self.temp_end is None else self.temp_end.isoformat()
        d["fault"] = str(self.fault)
        return d

    @classmethod
    def from_state(
        cls, d: dict[str, Any], acks: Sequence[Ack] = (), history: Sequence[Delivery] = ()
    ) -> PumpFirmware:
        kw = {k: d[k] for k in cls._SCALARS}
        fw = cls(**kw)
        fw.temp_start = None if d["temp_start"] is None else pd.Timestamp(d["temp_start"])
        fw.temp_end = None if d["temp_end"] is None else pd.Timestamp(d["temp_end"])
        fw.fault = PumpFault(d["fault"])
        fw.acks = {a.key: a for a in acks}
        fw.history = sorted(history, key=lambda x: x.seq)
        return fw


def resolve_command(pump: Pump, key: str) -> tuple[str, Ack | None, str]:
    """Ask the pump what became of `key`: ("acked"|"failed"|"unknown", ack, detail).

    This is a query, never a resend: "failed" with no ack means the pump never received the
    command, "unknown" that the pump could not be asked. Used when a command timed out and
    when a restarted loop reconciles the commands its journal left pending.
    """
    try:
        ack = pump.ack_for(key)
    except PumpError as e:
        return "unknown", None, f"pump unreachable on query: {type(e).__name__}: {e}"
    if ack is None:
        return "failed", None, "pump has no record of the key (never received)"
    return ("acked" if ack.accepted else "failed"), ack, ack.detail


class FirmwarePump:
    """A `Pump` driven by a `PumpFirmware`: the command surface every simulated pump shares.

    Subclasses say what time it is (`_now`) and how an acknowledgement is made durable
    (`_persist`, called once per new key before the acknowledgement is returned).
    """

    firmware: PumpFirmware

    def _now(self) -> pd.Timestamp:
        raise NotImplementedError

    def _persist(self, ack: Ack) -> None:
        """Make a new acknowledgement (and the firmware state it changed) durable."""

    def _command(self, cmd: Command) -> Ack:
        known = cmd.key in self.firmware.acks
        ack = self.firmware.command(cmd, self._now())
        if not known:
            self._persist(ack)
        return ack

    def status(self) -> PumpStatus:
        return self.firmware.status(self._now())

    def temp_basal(self, rate_u_per_h: float, duration_min: int, key: str) -> Ack:
        return self._command(Command(key, CommandKind.TEMP_BASAL, rate_u_per_h, duration_min))

    def cancel_temp_basal(self, key: str) -> Ack:
        return self._command(Command(key, CommandKind.CANCEL_TEMP))

    def bolus(self, units: float, key: str) -> Ack:
        return self._command(Command(key, CommandKind.BOLUS, units))

    def suspend(self, key: str) -> Ack:
        return self._command(Command(key, CommandKind.SUSPEND))

    def resume(self, key: str) -> Ack:
        return self._command(Command(key, CommandKind.RESUME))

    def ack_for(self, key: str) -> Ack | None:
        return self.firmware.acks.get(key)

    def deliveries(self, after_seq: int = 0) -> list[Delivery]:
        return self.firmware.deliveries(after_seq)
