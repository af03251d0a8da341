"""What a run leaves behind for the checks: one record per cycle, one run per (case, patient)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from serving.hal.pump import Delivery
from serving.insilico.faultmatrix.cases import FaultCase
from serving.insilico.faults import Window
from serving.journal import Journal
from serving.loop import PatientCycle
from serving.types import PatientSettings, Reading


@dataclass
class CycleRecord:
    """One cycle of one patient, with the truth the loop could not see."""

    time: pd.Timestamp
    bg: float  # simulator plasma glucose at the cycle
    cycle: PatientCycle | None  # None: the cycle was not run (journal already had it)
    reported: Reading | None  # newest reading the (faulty) CGM reported
    true: dict[int, float]  # the sensor's own recent readings, by time (ns)
    fault_on: bool


@dataclass
class CaseRun:
    """Everything one (case, patient) pair left behind, for the checks."""

    case: FaultCase
    patient: str  # virtual patient
    name: str  # the loop's name for it (journal key)
    settings: PatientSettings
    windows: list[Window]
    records: list[CycleRecord]
    journal: Journal
    history: list[Delivery]
    acks: dict[str, Any]
    run_start: pd.Timestamp
    notes: dict[str, Any] = field(default_factory=dict)

    def on(self, t: pd.Timestamp) -> bool:
        return any(w.active(t) for w in self.windows)

    def fault_cycles(self, after_min: float = 0.0) -> list[tuple[CycleRecord, PatientCycle]]:
        """(record, cycle) of every cycle that ran while the fault was on, at least
        `after_min` minutes into its occurrence: what most checks look at."""
        return [
            (r, r.cycle)
            for r in self.records
            if r.cycle is not None
            and r.fault_on
            and (after_min <= 0 or self.since_start(r.time) >= after_min)
        ]

    def since_start(self, t: pd.Timestamp) -> float:
        """Minutes since the start of the fault occurrence covering t (inf if none)."""
        return min(((t - w.start).total_seconds() / 60 for w in self.windows if w.active(t)),
                   default=math.inf)  # fmt: skip

    def after(self, t: pd.Timestamp, within_min: float) -> bool:
        """t lies in the `within_min` minutes after some fault occurrence ended."""
        return any(w.end is not None and w.end <= t < w.end + pd.Timedelta(minutes=within_min)
                   for w in self.windows)  # fmt: skip

    def events(self, kind: str | None = None) -> pd.DataFrame:
        ev = self.journal.events(kind)
        return ev[ev["patient"] == self.name]

    def cycles(self) -> pd.DataFrame:
        return self.journal.cycles(self.name)


@dataclass
class CaseResult:
    name: str
    passed: bool
    violations: int
    detail: dict[str, Any]
