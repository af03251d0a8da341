"""The supervisor: the one road to the pump.

`Supervisor.check` asks the pure rules (`serving.safety.rules`) for a verdict;
`Supervisor.apply` turns a verdict into pump commands, each with an idempotency key derived
from (patient, cycle time, kind), writes the intent to the journal *before* calling the pump,
records the acknowledgement after, and journals every veto. A pump that times out or does
not acknowledge is asked about the same key once (a query, never a second command); what
stays unknown blocks further boluses until it is resolved. When the journal cannot record an
intent, only commands that reduce insulin are sent.

May import: the standard library, numpy, pandas, `forecast.schema`, `serving.types`,
`serving.hal.pump` (the pump protocol and its commands) and `serving.safety.rules`. The
journal is handed in as an object that has the methods of `SupervisorJournal`; this module
never imports `serving.journal` (it sits above the supervisor, not below it). The journal's
failures are `serving.types.JournalError`.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Protocol, runtime_checkable

import numpy as np
import pandas as pd

from serving.hal.pump import (
    BASAL_INCREMENT_U_PER_H,
    Ack,
    Command,
    CommandKind,
    Pump,
    PumpError,
    PumpStatus,
    resolve_command,
    send,
)
from serving.safety.rules import (
    SafetyError,
    SafetyState,
    check_batch,
    max_basal,
    validate_settings,
)
from serving.types import JournalError, PatientSettings, Proposal, Verdict


class CommandOutcome(Protocol):
    """What the supervisor reads of a command the journal already holds."""

    @property
    def status(self) -> str: ...  # "pending" | "acked" | "failed" | "unknown"

    @property
    def ack(self) -> Ack | None: ...


@runtime_checkable
class SupervisorJournal(Protocol):
    """What the supervisor calls on a journal (`serving.journal.Journal` is one). Each method
    raises `JournalError` when the journal cannot do it; the supervisor then withholds insulin
    it cannot record, never the insulin-reducing commands."""

    def begin_command(self, cmd: Command, *, patient: str, cycle_time: pd.Timestamp) -> None:
        """Record the intent (pending) before the pump is called; a known key raises."""
        ...

    def finish_command(
        self, key: str, status: str, ack: Ack | None = None, detail: str = ""
    ) -> None:
        """Record a command's outcome and the pump's acknowledgement."""
        ...

    def command(self, key: str) -> CommandOutcome | None:
        """The command recorded under `key`, if any."""
        ...

    def event(
        self,
        kind: str,
        detail: dict[str, Any],
        *,
        patient: str | None = None,
        time: pd.Timestamp | None = None,
    ) -> None: ...

    def event_many(
        self,
        events: Sequence[tuple[str, dict[str, Any]]],
        *,
        patient: str | None = None,
        time: pd.Timestamp | None = None,
    ) -> None: ...


def command_key(patient: str, cycle_time: pd.Timestamp, kind: CommandKind | str) -> str:
    """Idempotency key: one command of each kind per patient per cycle, ever."""
    t = cycle_time if isinstance(cycle_time, pd.Timestamp) else pd.Timestamp(cycle_time)
    return f"{patient}/{_utc_stamp(t.value)}/{kind}"


@lru_cache(maxsize=64)
def _utc_stamp(ns: int) -> str:
    """A cycle time (UTC ns; a naive time counts as UTC) as the keys write it: the same
    string for every patient of a cycle, so it is formatted once."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ns // 1_000_000_000))  # (whole s)


@dataclass
class CommandResult:
    """What happened to one command: acknowledged, refused, or unknown (never retried)."""

    command: Command
    ack: Ack | None
    status: str  # "acked" | "failed" | "unknown" | "skipped"
    detail: str = ""


def pump_rate(rate: float, cap_u_per_h: float, increment: float = BASAL_INCREMENT_U_PER_H) -> float:
    """The temp basal a pump is sent: the nearest increment it can run (oref0's
    round_basal), never above the cap (then the increment below it)."""
    near = float(np.round(rate / increment) * increment)
    if near > cap_u_per_h + 1e-9:
        return float(np.floor(cap_u_per_h / increment + 1e-9) * increment)
    return near


@dataclass
class Supervisor:
    """Checks proposals for one patient and is the only code that commands its pump.

    `pump` and `journal` are optional so the pure `check` can be used on its own (trials,
    property tests); `apply` needs the pump.
    """

    settings: PatientSettings
    pump: Pump | None = None
    journal: SupervisorJournal | None = None
    patient: str = ""
    log: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        validate_settings(self.settings)
        self.patient = self.patient or self.settings.name
        s = self.settings
        self.cap_u_per_h = float(
            max_basal(s.max_basal_u_per_h, s.max_daily_basal_u_per_h or s.basal_u_per_h,
                      s.basal_u_per_h)
        )  # fmt: skip

    def check(self, proposal: Proposal, state: SafetyState) -> Verdict:
        """Pure: the verdict for one proposal (the rules: `serving.safety.rules`)."""
        return check_batch([self.settings], [proposal], [state])[0]

    def commands_for(
        self, verdict: Verdict, cycle_time: pd.Timestamp, pump: PumpStatus | None
    ) -> list[Command]:
        """The pump commands that carry out a verdict (pure)."""

        def key(kind: CommandKind) -> str:
            return command_key(self.patient, cycle_time, kind)

        if pump is not None and (pump.fault or pump.suspended):
            return []  # nothing a faulted or user-suspended pump should be asked to deliver
        cmds: list[Command] = []
        sched = self.settings.basal_u_per_h
        rate = verdict.temp_basal_u_per_h
        if verdict.fallback == "scheduled_basal" or (
            not verdict.suspend and abs(rate - sched) < 0.025
        ):
            if pump is None or pump.temp_basal is not None:
                cmds.append(Command(key(CommandKind.CANCEL_TEMP), CommandKind.CANCEL_TEMP))
        else:
            r = 0.0 if verdict.suspend else pump_rate(rate, self.cap_u_per_h)
            cmds.append(
                Command(
                    key(CommandKind.TEMP_BASAL), CommandKind.TEMP_BASAL, r, verdict.duration_min
                )
            )
        if verdict.bolus_u > 0 and not verdict.suspend:
            cmds.append(Command(key(CommandKind.BOLUS), CommandKind.BOLUS, verdict.bolus_u))
        return cmds

    def apply(
        self, verdict: Verdict, cycle_time: pd.Timestamp, *, journal_vetoes: bool = True
    ) -> list[CommandResult]:
        """Journal the vetoes, then send the verdict's commands with write-ahead intent.

        A command whose key the journal already holds is not sent again (a restarted cycle):
        its recorded outcome is returned, after asking the pump about it if it was unresolved.
        When the journal cannot record an intent, only commands that reduce insulin (cancel
        temp, zero temp) are sent; a bolus or a raise is skipped. On a pump error the same key
        is queried once and nothing further is sent this cycle.
        """
        if self.pump is None:
            raise SafetyError("Supervisor.apply needs a pump")
        if journal_vetoes and verdict.vetoes:  # (the loop journals them with its cycle record)
            self._journal_events(
                [("veto", {"reason": r, "fallback": verdict.fallback}) for r in verdict.vetoes],
                cycle_time,
            )
        try:
            status = self.pump.status()
        except PumpError as e:
            self._journal_event(
                "fault", cycle_time, {"pump": "status unavailable", "error": str(e)}
            )
            status = None
        results: list[CommandResult] = []
        for cmd in self.commands_for(verdict, cycle_time, status):
            known = self._known(cmd)
            if known is not None:
                results.append(known)
                if known.status == "unknown":
                    break
                continue
            journaled = True
            if self.journal is not None:
                try:
                    self.journal.begin_command(cmd, patient=self.patient, cycle_time=cycle_time)
                except JournalError as e:
                    journaled = False
                    if not _reduces_insulin(cmd, self.settings):
                        self._warn(f"journal unavailable ({e}); not sending {cmd.kind} {cmd.key}")
                        results.append(
                            CommandResult(cmd, None, "skipped", f"journal unavailable: {e}")
                        )
                        continue
                    self._warn(
                        f"journal unavailable ({e}); sending insulin-reducing {cmd.kind} anyway"
                    )
            res = self._send(cmd)
            results.append(res)
            if journaled:
                self._finish(res, cycle_time)
            if res.status == "unknown":
                break  # no blind retry, and nothing more to a pump we cannot hear
        return results

    # -- helpers
    def _known(self, cmd: Command) -> CommandResult | None:
        if self.journal is None:
            return None
        try:
            rec = self.journal.command(cmd.key)
        except JournalError:
            return None
        if rec is None:
            return None
        if rec.status in ("acked", "failed"):
            return CommandResult(cmd, rec.ack, rec.status, "already resolved in the journal")
        # pending/unknown: ask the pump about this key (a query, not a resend)
        res = self._query(cmd)
        if res.status != "unknown":
            self._finish(res, None)
            return res
        return res

    def _query(self, cmd: Command) -> CommandResult:
        assert self.pump is not None
        status, ack, detail = resolve_command(self.pump, cmd.key)
        return CommandResult(cmd, ack, status, detail)

    def _send(self, cmd: Command) -> CommandResult:
        assert self.pump is not None
        try:
            ack = send(self.pump, cmd)
        except PumpError as e:
            q = self._query(cmd)
            if q.status == "failed" and q.ack is None:
                # the pump says it never got it: this command failed, and it stays failed —
                # the next cycle decides afresh under a new key
                q.detail = f"{type(e).__name__}: {e}; pump has no record of the key"
            elif q.status == "unknown":
                q.detail = f"{type(e).__name__}: {e}; {q.detail}"
            self._journal_event("fault", None, {"command": cmd.key, "error": f"{type(e).__name__}: {e}",
                                                "resolved": q.status})  # fmt: skip
            return q
        return CommandResult(cmd, ack, "acked" if ack.accepted else "failed", ack.detail)

    def _finish(self, res: CommandResult, cycle_time: pd.Timestamp | None) -> None:
        if self.journal is None:
            return
        try:
            self.journal.finish_command(res.command.key, res.status, res.ack, res.detail)
            if res.status == "failed" and res.ack is not None and not res.ack.accepted:
                self._journal_event(
                    "fault", cycle_time, {"command": res.command.key, "refused": res.ack.detail}
                )
        except JournalError as e:
            self._warn(f"journal unavailable ({e}); outcome of {res.command.key} not recorded")

    def _journal_events(self, events: list[tuple[str, dict]], time: pd.Timestamp | None) -> None:
        if self.journal is None:
            self.log.extend(f"{k}: {d}" for k, d in events)
            return
        try:
            self.journal.event_many(events, patient=self.patient, time=time)
        except JournalError as e:
            self._warn(f"journal unavailable ({e}); {events}")

    def _journal_event(self, kind: str, time: pd.Timestamp | None, detail: dict) -> None:
        if self.journal is None:
            self.log.append(f"{kind}: {detail}")
            return
        try:
            self.journal.event(kind, detail, patient=self.patient, time=time)
        except JournalError as e:
            self._warn(f"journal unavailable ({e}); {kind} {detail}")

    def _warn(self, msg: str) -> None:
        self.log.append(msg)
        print(f"glucast supervisor [{self.patient}]: warning: {msg}", file=sys.stderr)


def _reduces_insulin(cmd: Command, settings: PatientSettings) -> bool:
    if cmd.kind in (CommandKind.CANCEL_TEMP, CommandKind.SUSPEND):
        return True
    return cmd.kind is CommandKind.TEMP_BASAL and cmd.amount <= settings.basal_u_per_h


__all__ = [
    "CommandOutcome",
    "CommandResult",
    "Supervisor",
    "SupervisorJournal",
    "command_key",
]
