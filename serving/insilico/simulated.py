"""Simulated devices: CGMs and pumps over `forecast.sim.Simulator`, one patient or a cohort.

`SimulatedCohort` owns one vectorised simulator for N virtual patients; `cohort.cgm(i)` and
`cohort.pump(i)` are that patient's devices, views onto the same simulator, implementing the
`serving.hal` protocols. Time passes only through `cohort.advance(minutes)`: each pump's
firmware (`PumpFirmware`) says what it infuses (scheduled basal, a temp basal until it
expires, a bolus), the simulator steps all patients together, and each pump books what it
pushed. `simulated_patient(name)` is the one-patient case.

With `state_path`, the simulated hardware survives its process, as real hardware survives a
crash of the phone running the loop: every acknowledged command and every step is committed
to a SQLite file (separate from the loop's journal — the pump is not the loop) before the
call returns. The simulator itself is restored by replaying the logged steps from the start
(it is deterministic given its seed and inputs; no pickle), and the replay is verified
against the logged clock. A killed process therefore finds, on restart, exactly the pump
history and patient the previous process left behind.

`VirtualPump` is a pump without a patient (for the replay backend and tests): the same
firmware over a `ManualClock`.
"""

from __future__ import annotations

import json
import math
import sqlite3
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from forecast.schema import GlucastError
from serving.hal.cgm import no_data
from serving.hal.pump import Ack, Delivery, FirmwarePump, PumpFirmware
from serving.insilico.cohort import SENSORS, make_simulator, settings_for
from serving.types import CGMStatus, PatientSettings, Reading

DEFAULT_START = "2018-01-01 00:00"


class DeviceStateError(GlucastError):
    """The simulated hardware's state file is unusable or belongs to another world."""


# --------------------------------------------------------------------------- clocks


class ManualClock:
    """A clock that moves only when told to (simulated and replayed time)."""

    def __init__(self, start: pd.Timestamp | str) -> None:
        t = pd.Timestamp(start)
        self.t = t.tz_localize("UTC") if t.tzinfo is None else t.tz_convert("UTC")

    def now(self) -> pd.Timestamp:
        return self.t

    def advance(self, minutes: float) -> None:
        self.t = self.t + pd.Timedelta(minutes=minutes)


# --------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class WorldConfig:
    """Everything that defines a simulated world; a state file holds exactly one."""

    patients: str = "adult#001"  # forecast.sim.load_patients selection
    seed: int = 0
    start: str = DEFAULT_START  # UTC, on the 5-minute grid
    sensor: str = "dexcom"  # see SENSORS
    sim_pump: str = "ideal"  # the infusion mechanism; the HAL firmware does the rounding
    carb_error: float = 0.0  # SD of the relative error of announced carbs
    unannounced: bool = False
    reservoir_u: float = 300.0

    def __post_init__(self) -> None:
        if self.sensor not in SENSORS:
            raise DeviceStateError(f"unknown sensor {self.sensor!r}; choose from {SENSORS}")
        t = pd.Timestamp(self.start)
        if t.minute % 5 or t.second or t.microsecond:
            raise DeviceStateError(f"start {self.start} is not on the 5-minute grid")

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, s: str) -> WorldConfig:
        return cls(**json.loads(s))


def world_simulator(config: WorldConfig):
    """The world's simulator (`serving.insilico.cohort.make_simulator`; no fixed length)."""
    from forecast.sim import load_patients

    return make_simulator(
        load_patients(config.patients),
        seed=config.seed,
        start=pd.Timestamp(config.start, tz="UTC"),
        sensor=config.sensor,
        carb_error=config.carb_error,
        unannounced=config.unannounced,
        pump=config.sim_pump,
    )


# --------------------------------------------------------------------------- state file


_STORE_SCHEMA = """
CREATE TABLE IF NOT EXISTS world(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS steps(
    n INTEGER PRIMARY KEY, minute INTEGER NOT NULL, k INTEGER NOT NULL,
    basal TEXT NOT NULL, bolus TEXT NOT NULL, occlusion TEXT NOT NULL, carried TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS firmware(patient INTEGER PRIMARY KEY, state TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS acks(key TEXT PRIMARY KEY, patient INTEGER NOT NULL, ack TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS deliveries(
    patient INTEGER NOT NULL, seq INTEGER NOT NULL, delivery TEXT NOT NULL,
    PRIMARY KEY (patient, seq));
"""


class DeviceStore:
    """The simulated hardware's durable memory (SQLite, WAL).

    ``synchronous=NORMAL``: a commit survives the death of the process (what crash tests
    exercise); a simulated device need not survive a power cut of the machine simulating it.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            self.con = sqlite3.connect(str(self.path), isolation_level=None, timeout=5.0)
            self.con.execute("PRAGMA journal_mode=WAL")
            self.con.execute("PRAGMA synchronous=NORMAL")
            self.con.executescript(_STORE_SCHEMA)
        except sqlite3.Error as e:
            raise DeviceStateError(f"device state {self.path}: {e}") from e

    def close(self) -> None:
        self.con.close()

    def tx(self, statements: Sequence[tuple[str, Sequence[Any]]]) -> None:
        try:
            self.con.execute("BEGIN IMMEDIATE")
            try:
                for sql, params in statements:
                    self.con.execute(sql, params)
                self.con.execute("COMMIT")
            except BaseException:
                if self.con.in_transaction:
                    self.con.execute("ROLLBACK")
                raise
        except sqlite3.Error as e:
            raise DeviceStateError(f"device state {self.path}: {e}") from e

    def get(self, key: str) -> str | None:
        row = self.con.execute("SELECT value FROM world WHERE key = ?", (key,)).fetchone()
        return None if row is None else row[0]

    def rows(self, sql: str, params: Sequence[Any] = ()) -> list[tuple]:
        return self.con.execute(sql, params).fetchall()


# --------------------------------------------------------------------------- the cohort


class SimulatedCohort:
    """N virtual patients with a CGM and a pump each, over one vectorised simulator."""

    def __init__(
        self, config: WorldConfig = WorldConfig(), *, state_path: str | Path | None = None
    ):
        self.config = config
        self.sim = world_simulator(config)
        self.names = [str(n) for n in self.sim.patients.names]
        self.n = len(self.names)
        self.firmware = [
            PumpFirmware(float(b), reservoir_u=config.reservoir_u)
            for b in self.sim.patients.basal_u_per_h
        ]
        self._steps = 0
        self._settings: list[PatientSettings] | None = None
        self.store = None if state_path is None else DeviceStore(state_path)
        if self.store is not None:
            self._restore()

    @classmethod
    def open(cls, state_path: str | Path) -> SimulatedCohort:
        """Reopen the world a state file holds (its own configuration)."""
        store = DeviceStore(state_path)
        raw = store.get("config")
        store.close()
        if raw is None:
            raise DeviceStateError(f"{state_path} holds no simulated world")
        return cls(WorldConfig.from_json(raw), state_path=state_path)

    # ---- persistence
    def _restore(self) -> None:
        assert self.store is not None
        raw = self.store.get("config")
        if raw is None:
            self.store.tx(
                [("INSERT INTO world(key, value) VALUES ('config', ?)", (self.config.to_json(),))]
                + [self._fw_stmt(i) for i in range(self.n)]
            )
            return
        if WorldConfig.from_json(raw) != self.config:
            raise DeviceStateError(
                f"{self.store.path} holds another simulated world ({raw}); "
                f"asked for {self.config.to_json()}"
            )
        pump = self.sim.pump
        for n, minute, k, basal, bolus, occl, carried in self.store.rows(
            "SELECT n, minute, k, basal, bolus, occlusion, carried FROM steps ORDER BY n"
        ):
            if n != self._steps or minute != self.sim.minute:
                raise DeviceStateError(
                    f"{self.store.path}: step log broken at step {n} (minute {minute}, "
                    f"simulator at {self.sim.minute})"
                )
            pump.occlusion[:] = json.loads(occl)
            pump.pending_bolus_u[:] = json.loads(carried)
            self.sim.step(int(k), np.array(json.loads(basal)), np.array(json.loads(bolus)))
            self._steps += 1
        acks: dict[int, list[Ack]] = {i: [] for i in range(self.n)}
        for patient, a in self.store.rows("SELECT patient, ack FROM acks"):
            acks[int(patient)].append(Ack.from_dict(json.loads(a)))
        hist: dict[int, list[Delivery]] = {i: [] for i in range(self.n)}
        for patient, d in self.store.rows(
            "SELECT patient, delivery FROM deliveries ORDER BY patient, seq"
        ):
            hist[int(patient)].append(Delivery.from_dict(json.loads(d)))
        for patient, state in self.store.rows("SELECT patient, state FROM firmware"):
            i = int(patient)
            self.firmware[i] = PumpFirmware.from_state(json.loads(state), acks[i], hist[i])

    def _fw_stmt(self, i: int) -> tuple[str, Sequence[Any]]:
        return (
            "INSERT OR REPLACE INTO firmware(patient, state) VALUES (?, ?)",
            (i, json.dumps(self.firmware[i].state_dict())),
        )

    def _commit_command(self, i: int, ack: Ack) -> None:
        if self.store is not None:
            self.store.tx(
                [
                    self._fw_stmt(i),
                    (
                        "INSERT INTO acks(key, patient, ack) VALUES (?, ?, ?)",
                        (ack.key, i, json.dumps(ack.to_dict())),
                    ),
                ]
            )

    def _commit_firmware(self, i: int) -> None:
        if self.store is not None:
            self.store.tx([self._fw_stmt(i)])

    def close(self) -> None:
        if self.store is not None:
            self.store.close()

    # ---- time and the world
    def now(self) -> pd.Timestamp:
        return self.sim.time

    @property
    def patients(self):
        return self.sim.patients

    def index(self, who: int | str) -> int:
        if isinstance(who, str):
            try:
                return self.names.index(who)
            except ValueError:
                raise DeviceStateError(f"no patient {who!r} in this world ({self.names})") from None
        if not 0 <= who < self.n:
            raise DeviceStateError(f"patient index {who} out of range 0..{self.n - 1}")
        return int(who)

    def settings(self, who: int | str) -> PatientSettings:
        """Therapy settings and supervisor limits (the trial's, so loop and trial agree)."""
        if self._settings is None:
            self._settings = settings_for(self.sim.patients)
        return self._settings[self.index(who)]

    def announced_carbs(self, who: int | str, t0: pd.Timestamp, t1: pd.Timestamp) -> float:
        """Grams announced for patient `who` in [t0, t1)."""
        return float(self.sim.announced_carbs(t0, t1)[self.index(who)])

    def true_bg(self) -> np.ndarray:
        """[N] plasma glucose now (the truth a CGM approximates)."""
        return self.sim.bg.copy()

    def cgm(self, who: int | str) -> SimulatedCGM:
        return SimulatedCGM(self, self.index(who))

    def pump(self, who: int | str) -> SimulatedPump:
        return SimulatedPump(self, self.index(who))

    def advance(self, minutes: int = 5) -> None:
        """Let `minutes` of simulated time pass: every pump infuses, every patient lives.

        The interval is cut where a temp basal ends by itself, so each pump runs exactly the
        rate its firmware says at every minute. The whole advance is committed at once.
        """
        k = int(minutes)
        if k != minutes or k < 1:
            raise DeviceStateError(f"advance needs a whole number of minutes >= 1, got {minutes}")
        t0 = self.now()
        t1 = t0 + pd.Timedelta(minutes=k)
        cuts = sorted({t for fw in self.firmware for t in fw.breakpoints(t0, t1)})
        edges = [t0, *[c.ceil("min") for c in cuts if t0 < c.ceil("min") < t1], t1]
        steps: list[tuple[str, Sequence[Any]]] = []
        booked: list[tuple[int, Delivery]] = []
        pump = self.sim.pump
        for a, b in zip(edges[:-1], edges[1:]):
            seg = int(round((b - a).total_seconds() / 60.0))
            if seg < 1:
                continue
            for i, fw in enumerate(
                self.firmware
            ):  # the firmware stopped a bolus: so does the motor
                if fw.bolus_left_u <= 0 and fw.bolus_queued_u <= 0:
                    pump.pending_bolus_u[i] = 0.0
            rate = np.array([self._rate(fw, a, seg) for fw in self.firmware])
            bolus = np.array([fw.take_bolus() for fw in self.firmware])
            occl, carried = pump.occlusion.copy(), pump.pending_bolus_u.copy()
            self.sim.step(seg, rate, bolus)
            d = self.sim.last_delivery
            pushed_bolus = carried + d.commanded_bolus_u - pump.pending_bolus_u
            missed = (d.commanded_basal_u - d.basal_u) + (pushed_bolus - d.bolus_u)
            for i, fw in enumerate(self.firmware):
                for rec in fw.record(
                    a, seg, float(d.commanded_basal_u[i]), float(pushed_bolus[i]), float(missed[i])
                ):
                    booked.append((i, rec))
            steps.append(
                (
                    "INSERT INTO steps(n, minute, k, basal, bolus, occlusion, carried) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (self._steps, self.sim.minute - seg, seg, json.dumps(rate.tolist()), json.dumps(bolus.tolist()),
                     json.dumps(occl.tolist()), json.dumps(carried.tolist())),
                )
            )  # fmt: skip
            self._steps += 1
        if self.store is not None:
            self.store.tx(
                steps
                + [self._fw_stmt(i) for i in range(self.n)]
                + [
                    (
                        "INSERT INTO deliveries(patient, seq, delivery) VALUES (?, ?, ?)",
                        (i, d.seq, json.dumps(d.to_dict())),
                    )
                    for i, d in booked
                ]
            )

    @staticmethod
    def _rate(fw: PumpFirmware, t: pd.Timestamp, minutes: int) -> float:
        rate = fw.rate_at(t)
        return min(rate, fw.reservoir_u * 60.0 / minutes) if rate > 0 else 0.0

    # ---- what a device sees
    def _readings(self, i: int, since_minute: int) -> list[Reading]:
        out: list[Reading] = []
        start = self.sim.start
        for minute, r in self.sim.readings_since(since_minute):
            g = float(r[i])
            if math.isfinite(g):  # a dropped reading is never reported
                out.append(Reading(start + pd.Timedelta(minutes=minute), g, CGMStatus.OK))
        return out


def _with_trend(readings: list[Reading]) -> list[Reading]:
    """Each reading with its least-squares trend over the readings before it (forecast.trend)."""
    from forecast.trend import trend_at

    minutes = np.array([r.time.value / 60e9 for r in readings])
    glucose = np.array([r.glucose_mgdl for r in readings])
    out = []
    for j, r in enumerate(readings):
        lo = max(0, j - 4)
        roc = trend_at(minutes[lo : j + 1], glucose[lo : j + 1]).roc_mgdl_min
        out.append(Reading(r.time, r.glucose_mgdl, r.status, roc))
    return out


class SimulatedCGM:
    """Patient i's CGM: the simulator's sensor readings, with trends, as a device reports them."""

    def __init__(self, cohort: SimulatedCohort, i: int) -> None:
        self.cohort, self.i = cohort, i

    def recent(self, minutes: float = 60.0) -> list[Reading]:
        since = self.cohort.sim.minute - int(math.ceil(minutes))
        return _with_trend(self.cohort._readings(self.i, since))

    def latest(self) -> Reading:
        rs = self.recent(30.0)
        return rs[-1] if rs else no_data(self.cohort.now())


class SimulatedPump(FirmwarePump):
    """Patient i's pump: `PumpFirmware` over the simulator's infusion, durable when stored."""

    def __init__(self, cohort: SimulatedCohort, i: int) -> None:
        self.cohort, self.i = cohort, i

    @property
    def firmware(self) -> PumpFirmware:  # type: ignore[override]
        return self.cohort.firmware[self.i]

    def _now(self) -> pd.Timestamp:
        return self.cohort.now()

    def _persist(self, ack: Ack) -> None:
        self.cohort._commit_command(self.i, ack)

    # ---- physical events (what fault injectors and users do to the device)
    def occlude(self, fraction: float = 0.0) -> None:
        """The infusion line blocks: only `fraction` of what the pump pushes gets through."""
        mask = np.zeros(self.cohort.n, dtype=bool)
        mask[self.i] = True
        self.cohort.sim.pump.occlude(mask, fraction)

    def clear_occlusion(self) -> None:
        mask = np.zeros(self.cohort.n, dtype=bool)
        mask[self.i] = True
        self.cohort.sim.pump.clear_occlusion(mask)

    def set_reservoir(self, units: float) -> None:
        self.firmware.reservoir_u = float(units)
        self.cohort._commit_firmware(self.i)

    def clear_fault(self, reservoir_u: float | None = None) -> None:
        """A new cartridge / infusion set after an alarm."""
        self.clear_occlusion()
        self.firmware.clear_fault(reservoir_u)
        self.cohort._commit_firmware(self.i)


def simulated_patient(
    name: str = "adult#001", *, state_path: str | Path | None = None, **config: Any
) -> tuple[SimulatedCohort, SimulatedCGM, SimulatedPump]:
    """One virtual patient: (world, CGM, pump)."""
    world = SimulatedCohort(WorldConfig(patients=name, **config), state_path=state_path)
    return world, world.cgm(0), world.pump(0)


# --------------------------------------------------------------------------- a pump alone


class VirtualPump(FirmwarePump):
    """A pump with no patient behind it: the firmware, a clock, and instant delivery.

    For the replay backend (the recorded patient cannot respond to insulin) and for tests of
    the pump road. `advance(minutes)` books the insulin the pump would have pushed.
    """

    def __init__(
        self, scheduled_basal_u_per_h: float, clock: ManualClock, *, reservoir_u: float = 300.0
    ):
        self.firmware = PumpFirmware(float(scheduled_basal_u_per_h), reservoir_u=reservoir_u)
        self.clock = clock
        self._patency = 1.0

    def _now(self) -> pd.Timestamp:
        return self.clock.now()

    def set_reservoir(self, units: float) -> None:
        self.firmware.reservoir_u = float(units)

    def occlude(self, fraction: float = 0.0) -> None:
        self._patency = float(fraction)

    def clear_occlusion(self) -> None:
        self._patency = 1.0

    def advance(self, minutes: int = 5) -> list[Delivery]:
        """Book `minutes` of infusion (cut where a temp basal ends) and move the clock."""
        fw, out = self.firmware, []
        t0 = self.clock.now()
        t1 = t0 + pd.Timedelta(minutes=minutes)
        edges = [t0, *fw.breakpoints(t0, t1), t1]
        for a, b in zip(edges[:-1], edges[1:]):
            m = (b - a).total_seconds() / 60.0
            basal = min(fw.rate_at(a) * m / 60.0, fw.reservoir_u)
            bolus = fw.take_bolus()
            out += fw.record(a, m, basal, bolus, (basal + bolus) * (1.0 - self._patency))
        self.clock.advance(minutes)
        return out
