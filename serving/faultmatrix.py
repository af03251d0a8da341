"""The fault matrix: every fault the closed loop must survive, injected while the real loop runs.

Each case injects one fault into simulated patients — through the HAL fault wrappers of
`serving.hal.faults` around the real simulated devices, through a forecaster that
misbehaves inside the real `FallbackPredictor`, through a damaged model directory, or
through SQLite itself refusing writes — while `serving.loop.ControlLoop.cycle` (the
supervisor and the journal included) runs every 5 minutes. Nothing is mocked: the
simulated patient's glucose responds to whatever insulin actually reached it.

For every case the matrix asserts, from the records the devices and the journal keep (not
from what the loop says about itself):

* **limits never exceeded** — the pump's own delivery history: no basal interval above the
  oref0 cap (min(max basal, 3 × max daily basal, 4 × scheduled)), no bolus above max bolus
  or above its acknowledgement, no bolus taking insulin on board (recomputed from the
  deliveries with the loop's IOB curve) above max IOB, no temp basal longer than 30 min;
  a cycle that fell back never raised insulin; the journal is consistent
  (`Journal.check`) and holds the pump's deliveries;
* **fallback engaged** and **the event journaled** — what each case expects (below);
* **glucose outcome** — min/mean plasma glucose and time < 70 mg/dL during and after the
  fault, from the simulator's true BG (reported, not asserted: a fault that stops insulin
  raises glucose, and that is the safe outcome).

Expected behaviour, and the peers it is measured against: oref0 refuses CGM data older
than 12 min or more than 5 min in the future and flat traces; Loop rejects glucose older
than 15 min and momentum across jumps > 40 mg/dL; Omnipod 5 enters limited mode after
20 min without CGM; CamAPS reverts to the programmed basal after about 30 min. glucast's
supervisor falls back to scheduled basal (or zero, after a recent low) once the newest
reading is > 12 min old, so every CGM outage must show the fallback by 15 min — stricter
than Omnipod's 20 and CamAPS's 30 — and every temp basal lasts ≤ 30 min, so a loop that
cannot reach the pump leaves it on its programmed basal within 30 min (CamAPS's rule).

`run_matrix()` runs the short matrix (each fault once, minutes to an hour or three of
simulated time); `run_matrix(long=True)` soaks every fault, recurring every few hours,
over several simulated days. Cases that share a length share one simulated cohort (one
patient per case) so the loop's batched cycle does the work once.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import shutil
import sqlite3
import tempfile
import time as _time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from forecast.schema import SLOT, GlucastError
from serving.hal.faults import Window, build_fault, fault_target
from serving.hal.pump import MAX_TEMP_MINUTES, Delivery
from serving.journal import Journal
from serving.loop import ControlLoop, PatientCycle
from serving.predictor import SettingsPhysio
from serving.safety import STALE_MIN, max_basal
from serving.types import PatientSettings, Reading

LEAD_MIN = 15  # closed loop before the fault starts (at least)
TAIL_MIN = 20  # after the fault: recovery is watched, outcome reported
MEAL_SEARCH_MIN = 90  # short matrix: look this far for a meal to put the fault in front of
LONG_DAYS = 2.0
LONG_PERIOD_H = 6.0  # --long: the fault recurs every 6 h
IOB_TOLERANCE_U = 0.1  # pump increments and rounding
LOW_MGDL = 70.0


class FaultMatrixError(GlucastError):
    """The matrix cannot be set up (unknown case or patient, unusable model directory)."""


# --------------------------------------------------------------------------- the cases


@dataclass(frozen=True)
class FaultCase:
    """One fault, how long it lasts in the short matrix, and what the loop must do."""

    name: str
    group: str  # "device" (HAL wrappers) | "predictor" | "model" | "journal"
    minutes: int
    expect: str
    spec: str = ""  # HAL fault spec without start/minutes, e.g. "stale:lag_min=20"
    check: str = ""  # name of the case-specific check (see CHECKS)
    patient: str = ""  # default patient (each case its own, so a cohort runs them together)
    clear_after: bool = False  # the user replaces the infusion set / cartridge at the end
    mode: str = ""  # predictor fault: nan | inf | raise; model fault: corrupt | mismatch
    before_meal: int = 5  # short matrix: the fault starts this long before a meal is announced
    tail: int = TAIL_MIN  # minutes watched after the fault


CASES: tuple[FaultCase, ...] = (
    FaultCase("cgm-dropout-30", "device", 30, "no CGM: scheduled basal (zero after a low) from "
              "12 min, no bolus; closed loop again when readings return", "dropout",
              "cgm_outage", "child#001", before_meal=20),
    FaultCase("cgm-dropout-60", "device", 60, "as dropout-30, held for the whole hour "
              "(Omnipod 5 would be in limited mode from 20 min)", "dropout", "cgm_outage",
              "adolescent#005", before_meal=20),
    FaultCase("cgm-dropout-180", "device", 180, "as dropout-30 for 3 h: the pump stays on "
              "the programmed basal, never a bolus without CGM", "dropout", "cgm_outage",
              "adolescent#004", before_meal=20),
    FaultCase("cgm-compression-low", "device", 30, "false low (-60 mg/dL): the drop and the "
              "rebound are jumps > 40 mg/dL/5 min (Loop) and are not acted on; no insulin is "
              "raised on the rebound", "compression-low:depth_mgdl=60", "compression",
              "adolescent#001"),
    FaultCase("cgm-noise-spikes", "device", 30, "±80 mg/dL spikes: a reading jumping > 40 "
              "mg/dL/5 min is not trusted (Loop's rule); no bolus on a spike",
              "noise-spikes:size_mgdl=80,every=3", "spikes", "adult#007"),
    FaultCase("cgm-stale", "device", 30, "readings 20 min late: stale (> 12 min, oref0) → "
              "scheduled basal for the whole fault", "stale:lag_min=20", "cgm_outage",
              "adolescent#009", before_meal=20),
    FaultCase("cgm-future-timestamps", "device", 30, "readings stamped 15 min ahead (> 5 min, "
              "oref0): not trusted → scheduled basal", "future:ahead_min=15", "cgm_outage",
              "adolescent#010", before_meal=20),
    FaultCase("cgm-duplicated", "device", 30, "every reading twice: de-duplicated, the loop "
              "keeps closed-loop control; the journal keeps what the device reported",
              "duplicated", "tolerated", "adolescent#004"),
    FaultCase("cgm-out-of-order", "device", 30, "shuffled readings (a backfill): sorted, the "
              "loop keeps closed-loop control", "out-of-order", "tolerated", "adolescent#005"),
    FaultCase("cgm-clock-jump-forward", "device", 60, "sensor clock +1 h (daylight saving): "
              "future readings not trusted → scheduled basal, until the future-stamped "
              "readings are in the past again (up to an hour after the clock is fixed)",
              "clock-jump:offset_min=60", "cgm_outage", "child#001", before_meal=20,
              tail=75),
    FaultCase("cgm-clock-jump-back", "device", 60, "sensor clock -1 h: readings look an hour "
              "old → stale → scheduled basal", "clock-jump:offset_min=-60", "cgm_outage",
              "adult#007", before_meal=20),
    FaultCase("cgm-flat-line", "device", 60, "a sensor stuck on one value: after 9 identical "
              "readings (45 min, oref0's flat rule) → scheduled basal", "flat", "flat",
              "adolescent#007", before_meal=50),
    FaultCase("cgm-sensor-error", "device", 30, "error codes instead of values → scheduled "
              "basal", "sensor-error", "cgm_outage", "child#003", before_meal=20),
    FaultCase("pump-timeout-lost", "device", 60, "commands time out and never arrive: each "
              "key sent once, the pump returns to its programmed basal within 30 min "
              "(temps expire; CamAPS's rule)", "timeout:lost=true", "pump_lost",
              "child#010"),
    FaultCase("pump-timeout-answer-lost", "device", 30, "the pump acts but its answer is "
              "lost: the key is queried, never resent; nothing delivered twice",
              "timeout:lost=false", "pump_answer", "child#010"),
    FaultCase("pump-no-ack", "device", 30, "applied, never acknowledged: resolved by query, "
              "no second delivery", "no-ack", "pump_answer", "child#006"),
    FaultCase("pump-unreachable", "device", 30, "no contact: commands stay unknown and block "
              "boluses; reconciled by query afterwards; programmed basal within 30 min",
              "unreachable", "pump_unreachable", "adult#006"),
    FaultCase("pump-occlusion", "device", 60, "delivered < commanded: the occlusion alarm "
              "fires, the supervisor sends a faulted pump nothing; set replaced at the end",
              "occlusion:fraction=0", "pump_fault", "adult#006", clear_after=True),
    FaultCase("pump-empty-reservoir", "device", 30, "reservoir runs dry: alarm, nothing sent "
              "to the faulted pump; cartridge replaced at the end",
              "empty-reservoir:units=0.2", "pump_fault", "adolescent#007", clear_after=True),
    FaultCase("predictor-nan", "predictor", 30, "model returns NaN: the physiological "
              "fallback answers (journaled), control goes on within limits", check="pred_fb",
              patient="child#006", mode="nan"),
    FaultCase("predictor-inf", "predictor", 30, "model returns ±inf: fallback forecaster, "
              "journaled", check="pred_fb", patient="child#006", mode="inf"),
    FaultCase("predictor-raises", "predictor", 30, "model raises (as onnxruntime does): "
              "fallback forecaster, journaled", check="pred_fb", patient="child#006",
              mode="raise"),
    FaultCase("predictor-dead", "predictor", 30, "model fails and no fallback: the "
              "controller fails → scheduled basal, prediction invalid, fault journaled",
              check="pred_dead", patient="child#006", mode="raise"),
    FaultCase("model-corrupt", "model", 30, "a model file whose sha256 is not the "
              "manifest's is refused at load; the loop runs on the fallback forecaster and "
              "journals why", check="model_refused", patient="adolescent#001", mode="corrupt"),
    FaultCase("model-mismatched", "model", 30, "a manifest whose window disagrees with the "
              "graph is refused; fallback forecaster, journaled", check="model_refused",
              patient="adolescent#001", mode="mismatch"),
    FaultCase("journal-read-only", "journal", 30, "journal cannot be written: no bolus, "
              "nothing above scheduled basal, a warning every cycle; recovery journaled and "
              "the pump history synced", check="journal_down", patient="adolescent#001",
              mode="query_only"),
    FaultCase("journal-disk-full", "journal", 30, "nearly full disk (SQLITE_FULL for every write "
              "that needs a new page; small ones may still fit): cycles that cannot be recorded "
              "are warned about, no insulin reaches the pump without its intent journaled, "
              "recovery journaled and the pump history synced", check="journal_down",
              patient="adolescent#001", mode="disk_full"),
)  # fmt: skip
CASE_NAMES = tuple(c.name for c in CASES)


# --------------------------------------------------------------------------- records


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


# --------------------------------------------------------------------------- faulty forecasters


class ForecasterFault:
    """When and how a forecaster misbehaves: NaN, ±inf or an exception, during `windows`."""

    def __init__(self, clock: Any, windows: Sequence[Window], mode: str) -> None:
        if mode not in ("nan", "inf", "raise"):
            raise FaultMatrixError(f"unknown forecaster fault {mode!r}")
        self.clock, self.windows, self.mode = clock, list(windows), mode
        self.calls = 0

    def wrap(self, run: Callable[[], np.ndarray], shape: tuple[int, ...]) -> np.ndarray:
        if not any(w.active(self.clock.now()) for w in self.windows):
            return run()
        self.calls += 1
        if self.mode == "raise":  # untyped, as onnxruntime's own failures are
            raise RuntimeError("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION (injected fault)")
        out = np.asarray(run(), dtype=np.float32).copy()
        if self.mode == "nan":
            out[:] = np.nan
        else:
            out[..., ::2] = np.inf
            out[..., 1::2] = -np.inf
        return out.reshape(shape)


class FaultySettingsPhysio(SettingsPhysio):
    """The settings-based physiological forecaster, misbehaving during a fault window.

    A subclass rather than a wrapper so `FallbackPredictor` still hands it each patient's
    parameters: the forecaster is the real one, only its answers are damaged.
    """

    def __init__(self, config, quantiles, fault: ForecasterFault) -> None:
        super().__init__(config, quantiles)
        self.fault = fault

    def predict(self, past, future, params=None):
        shape = (len(past), self.config.horizon_slots, len(self.quantiles))
        return self.fault.wrap(lambda: super(FaultySettingsPhysio, self).predict(past, future, params), shape)  # fmt: skip


class FaultyModel:
    """Any array forecaster (an ONNX model), misbehaving during a fault window."""

    def __init__(self, inner: Any, fault: ForecasterFault) -> None:
        self.inner, self.fault = inner, fault
        self.config, self.quantiles = inner.config, inner.quantiles

    def predict(self, past, future):
        shape = (len(past), self.config.horizon_slots, len(self.quantiles))
        return self.fault.wrap(lambda: self.inner.predict(past, future), shape)


# --------------------------------------------------------------------------- a real ONNX model


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(num: int, payload: bytes | int | str) -> bytes:
    if isinstance(payload, int):
        return _varint(num << 3) + _varint(payload)
    data = payload.encode() if isinstance(payload, str) else payload
    return _varint(num << 3 | 2) + _varint(len(data)) + data


def persistence_model_bytes(window, quantiles: Sequence[float] = (0.1, 0.5, 0.9)) -> bytes:
    """A small, real ONNX forecaster honouring the model contract, encoded by hand.

    glucose[b, h, q] = last past glucose − 30 mg/dL × planned bolus up to h + a band that
    widens with √h. `serving` may not import the `onnx` package, and the matrix needs a model
    whose corruption it can show being refused, so the protobuf is written directly
    (ModelProto/GraphProto/NodeProto/TensorProto field numbers from onnx.proto).
    """
    L, H = window.past_slots, window.horizon_slots
    Fp, Ff, Q = len(window.past_features), len(window.future_features), len(quantiles)
    sel = np.zeros((H, L))
    sel[:, L - 1] = 1.0  # picks the last past slot
    wg = np.zeros((Fp, Q))
    wg[window.past_index("glucose"), :] = 1.0  # ... its glucose, for every quantile
    cum = np.tril(np.ones((H, H)))  # planned insulin summed up to each horizon
    wf = np.zeros((Ff, Q))
    wf[window.future_index("bolus_u"), :] = -30.0
    z = np.linspace(-1.0, 1.0, Q)
    band = np.array([[10.0 * math.sqrt(h + 1) * zq for zq in z] for h in range(H)])

    def tensor(name: str, a: np.ndarray) -> bytes:
        a = np.ascontiguousarray(a, dtype=np.float32)
        return b"".join(_field(1, int(d)) for d in a.shape) + _field(2, 1) + _field(8, name) + _field(9, a.tobytes())  # fmt: skip

    def node(op: str, ins: Sequence[str], out: str) -> bytes:
        return b"".join(_field(1, i) for i in ins) + _field(2, out) + _field(3, out) + _field(4, op)  # fmt: skip

    def value(name: str, dims: Sequence[int | str]) -> bytes:
        shape = b"".join(_field(1, _field(2, d) if isinstance(d, str) else _field(1, d)) for d in dims)  # fmt: skip
        return _field(1, name) + _field(2, _field(1, _field(1, 1) + _field(2, shape)))

    nodes = [("MatMul", ("S", "past"), "last"), ("MatMul", ("last", "Wg"), "g"),
             ("MatMul", ("T", "future"), "cum"), ("MatMul", ("cum", "Wf"), "ins"),
             ("Add", ("g", "ins"), "gi"), ("Add", ("gi", "B"), "glucose")]  # fmt: skip
    graph = (
        b"".join(_field(1, node(*n)) for n in nodes)
        + _field(2, "glucast-faultmatrix-persistence")
        + b"".join(
            _field(5, tensor(n, a))
            for n, a in (("S", sel), ("Wg", wg), ("T", cum), ("Wf", wf), ("B", band))
        )  # fmt: skip
        + _field(11, value("past", ["batch", L, Fp]))
        + _field(11, value("future", ["batch", H, Ff]))
        + _field(12, value("glucose", ["batch", H, Q]))
    )
    return _field(1, 8) + _field(2, "glucast") + _field(7, graph) + _field(8, _field(1, "") + _field(2, 17))  # fmt: skip


def write_model_dir(path: Path, window=None, quantiles: Sequence[float] = (0.1, 0.5, 0.9)) -> Path:
    """model.onnx + manifest.json (the contract's format) in `path`."""
    from forecast.windows import WindowConfig

    window = window or WindowConfig()
    path.mkdir(parents=True, exist_ok=True)
    blob = persistence_model_bytes(window, quantiles)
    (path / "model.onnx").write_bytes(blob)
    manifest = {
        "format": "glucast-forecaster/1",
        "model": "persistence (glucast faults)",
        "sha256": hashlib.sha256(blob).hexdigest(),
        "window": window.to_dict(),
        "quantiles": list(quantiles),
    }
    (path / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return path


def damage_model_dir(src: Path, dst: Path, how: str) -> Path:
    """A copy of a model directory with a flipped byte (corrupt) or another window (mismatch)."""
    shutil.copytree(src, dst)
    manifest = json.loads((dst / "manifest.json").read_text())
    model = dst / (manifest.get("onnx_file") or manifest.get("model_file") or "model.onnx")
    if how == "corrupt":
        blob = bytearray(model.read_bytes())
        blob[len(blob) // 2] ^= 0xFF
        model.write_bytes(bytes(blob))
    elif how == "mismatch":  # the manifest of a model with a 3-hour past, beside this graph
        for key in ("window", "window_config", "config"):
            if isinstance(manifest.get(key), dict):
                manifest[key]["past_slots"] = 36
        if "past_slots" in manifest:
            manifest["past_slots"] = 36
        past = (manifest.get("inputs") or {}).get("past")
        if isinstance(past, dict) and isinstance(past.get("shape"), list):
            past["shape"][1] = 36
        (dst / "manifest.json").write_text(json.dumps(manifest))
    else:
        raise FaultMatrixError(f"unknown model damage {how!r}")
    return dst


# --------------------------------------------------------------------------- the backend


class MatrixBackend:
    """`serving.loop.Backend` over one simulated cohort where each patient has its own faults.

    The loop sees patient i as ``"<case>/<virtual patient>"`` so one journal tells the cases
    apart; the devices are the cohort's, wrapped by `serving.hal.faults.build_fault`.
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

    def advance(self, minutes: int) -> None:
        self.world.advance(minutes)

    def describe(self) -> dict[str, Any]:
        return {"backend": "faultmatrix", "world": self.world.config.to_json()}


# --------------------------------------------------------------------------- running


@dataclass(frozen=True)
class MatrixConfig:
    patients: tuple[str, ...] = ()  # () = each case on its own default patient
    long: bool = False
    days: float = LONG_DAYS
    period_h: float = LONG_PERIOD_H
    seed: int = 0
    sensor: str = "dexcom-noise"  # noise only: the faults under test are the injected ones
    start: str = "2018-01-01 06:45"  # UTC: faults begin at 07:00, around breakfast
    model_dir: str | None = None
    cases: tuple[str, ...] = ()  # () = all
    workdir: str | None = None


def occurrences(
    case: FaultCase, cfg: MatrixConfig, start: int = LEAD_MIN
) -> tuple[list[tuple[int, int]], int]:
    """[(start_min, minutes)] of the fault from the run's start, and the run's length (min).

    Short matrix: one occurrence from `start` (see `meal_start`); long: every `period_h`."""
    if cfg.long:
        total = int(round(cfg.days * 1440 / 5)) * 5
        if case.group == "model":  # a refused model stays refused: the whole run
            return [(0, total)], total
        period = int(cfg.period_h * 60)
        starts = range(LEAD_MIN + 60, total - case.minutes - case.tail, period)
        return [(s, case.minutes) for s in starts], total
    if case.group == "model":
        total = LEAD_MIN + case.minutes + case.tail
        return [(0, total)], total
    return [(start, case.minutes)], start + case.minutes + case.tail


def meal_start(case: FaultCase, world, j: int, cfg: MatrixConfig) -> int:
    """Short matrix: minutes from the start at which patient j's fault begins — `before_meal`
    minutes ahead of its first announced meal after the lead-in, so the fault meets a bolus
    decision (the moment it matters); the lead-in alone when no meal comes soon."""
    if cfg.long or case.group == "model":
        return LEAD_MIN
    t0 = world.now()
    first = LEAD_MIN + case.before_meal
    for m in range(first, first + MEAL_SEARCH_MIN, 5):
        a = t0 + pd.Timedelta(minutes=m)
        if world.announced_carbs(j, a, a + SLOT) > 0:
            return m - case.before_meal
    return LEAD_MIN


def _world(names: Sequence[str], cfg: MatrixConfig):
    from serving.hal.simulated import SimulatedCohort, WorldConfig

    return SimulatedCohort(
        WorldConfig(patients=",".join(names), seed=cfg.seed, sensor=cfg.sensor, start=cfg.start)
    )


def _controller(cfg: MatrixConfig, fault: ForecasterFault | None = None, *, dead: bool = False,
                model_dir: str | None = None):  # fmt: skip
    """(controller, predictor): the MPC over the checked predictor, its forecaster faulty
    when asked. Default: the settings-based physiological forecaster (no trained model)."""
    from serving.controllers.mpc import MPCController
    from serving.predictor import FallbackPredictor, Predictor, load_predictor, physio_fallback

    model_dir = model_dir or cfg.model_dir
    if model_dir is not None and fault is None:
        pred = load_predictor(model_dir, strict=False)
        return MPCController(pred, name="mpc"), pred
    if model_dir is not None:
        checked = Predictor(model_dir)
        primary = FaultyModel(checked.model, fault)
        fb = None if dead else checked.fallback
        pred = FallbackPredictor(primary, fb, rules=checked.rules)
        pred.manifest = checked.manifest  # the journal names the model by its hash
        return MPCController(pred, name="mpc"), pred
    from forecast.windows import WindowConfig

    w, q = WindowConfig(), (0.1, 0.5, 0.9)
    primary = FaultySettingsPhysio(w, q, fault) if fault is not None else physio_fallback(w, q)
    pred = FallbackPredictor(primary, None if dead else physio_fallback(w, q))
    return MPCController(pred, name="physio-mpc"), pred


@dataclass
class _Group:
    """Cases that run together in one cohort (same length, same loop configuration)."""

    key: tuple
    pairs: list[tuple[FaultCase, str]]  # (case, virtual patient)


def plan(cfg: MatrixConfig) -> list[_Group]:
    """Which (case, patient) pairs share a cohort: device cases of one length together (a
    patient at most once per cohort), every other case alone (it changes the whole loop)."""
    chosen = [c for c in CASES if not cfg.cases or c.name in cfg.cases]
    unknown = set(cfg.cases) - set(CASE_NAMES)
    if unknown:
        raise FaultMatrixError(f"unknown case(s) {sorted(unknown)}; known: {', '.join(CASE_NAMES)}")
    groups: list[_Group] = []
    soak = _soak_patients(chosen) if cfg.long and not cfg.patients else {}
    for c in chosen:
        patients = list(cfg.patients) or [soak.get(c.name, c.patient)]
        for p in patients:
            length = occurrences(c, cfg)[1] if cfg.long else c.minutes + c.tail
            key = ("device", length) if c.group == "device" else (c.name,)
            home = next((g for g in groups if g.key == key and p not in [q for _, q in g.pairs]), None)  # fmt: skip
            if home is None:
                groups.append(_Group(key, [(c, p)]))
            else:
                home.pairs.append((c, p))
    return groups


def _soak_patients(cases: Sequence[FaultCase]) -> dict[str, str]:
    """--long without --patients: one distinct virtual patient per device case, so all of
    them soak together in one cohort (the short matrix's choice kept where it is free)."""
    from forecast.sim import load_patients

    pool = [str(n) for n in load_patients("all").names]
    taken: set[str] = set()
    out: dict[str, str] = {}
    device = [c for c in cases if c.group == "device"]
    for c in device:  # first come, first served for the defaults
        if c.patient not in taken:
            out[c.name] = c.patient
            taken.add(c.patient)
    for c in device:
        if c.name not in out:
            spare = next((p for p in pool if p not in taken), c.patient)
            out[c.name] = spare
            taken.add(spare)
    return out


def run_group(group: _Group, cfg: MatrixConfig, workdir: Path, log: Callable[[str], None]) -> list[CaseRun]:  # fmt: skip
    """Run one cohort through its cases with the real loop; return one CaseRun per pair."""
    names = [p for _, p in group.pairs]
    world = _world(names, cfg)
    t0 = world.now()
    cases = [c for c, _ in group.pairs]
    first = cases[0]
    idx = [world.index(p) for p in names]
    occ = [occurrences(c, cfg, meal_start(c, world, j, cfg)) for c, j in zip(cases, idx)]
    total = max(tot for _, tot in occ)

    def spec_list(c: FaultCase, when: list[tuple[int, int]]) -> list[str]:
        if c.group != "device":
            return []
        sep = "," if ":" in c.spec else ":"
        return [f"{c.spec}{sep}start={s},minutes={m}" for s, m in when]

    loop_names = [f"{c.name}/{p}" for c, p in group.pairs]
    backend = MatrixBackend(world, loop_names, names, [spec_list(c, o) for c, (o, _) in zip(cases, occ)])  # fmt: skip
    windows = [
        w if w else [Window(t0 + pd.Timedelta(minutes=s), t0 + pd.Timedelta(minutes=s + m)) for s, m in o]
        for w, (o, _) in zip(backend.windows, occ)
    ]  # fmt: skip
    jpath = workdir / f"{'-'.join(map(str, group.key))}-{group.pairs[0][1]}.journal.db".replace(
        "#", ""
    )
    journal = Journal(jpath, sync="normal")
    notes: dict[str, Any] = {}
    fault = None
    model_dir = None
    if first.group == "predictor":
        fault = ForecasterFault(world, windows[0], first.mode)
        notes["forecaster_fault"] = fault
    if first.group == "model":
        src = Path(cfg.model_dir) if cfg.model_dir else write_model_dir(workdir / "model-ok")
        from serving.predictor import Predictor

        Predictor(src)  # the undamaged model loads: the refusal below is the damage's doing
        model_dir = str(damage_model_dir(src, workdir / f"model-{first.mode}", first.mode))
    controller, predictor = _controller(
        cfg, fault, dead=first.check == "pred_dead", model_dir=model_dir
    )
    notes["predictor"] = predictor
    lines: list[str] = []
    loop = ControlLoop(backend, journal, controller, predictor, log=lines.append)
    loop.start(describe=backend.describe())
    records: list[list[CycleRecord]] = [[] for _ in names]
    stderr = io.StringIO()
    down = False
    n_cycles = total // 5
    for k in range(n_cycles):
        t = world.now()
        if first.group == "journal":
            on = any(w.active(t) for w in windows[0])
            if on and not down:
                _break_journal(journal, first.mode)
                down = True
            elif down and not on:
                _mend_journal(journal, first.mode)
                down = False
        with contextlib.redirect_stderr(stderr):
            recs = {r.patient: r for r in loop.cycle()}
        bg = world.true_bg()
        for i, name in enumerate(loop_names):
            rec = recs.get(name)
            reported = max(rec.readings, key=lambda r: r.time) if rec and rec.readings else None
            true = {r.time.value: r.glucose_mgdl for r in world.cgm(idx[i]).recent(15)}
            on = any(w.active(t) for w in windows[i])
            records[i].append(CycleRecord(t, float(bg[idx[i]]), rec, reported, true, on))
        backend.advance(5)
        for i, c in enumerate(cases):  # the user replaces the set / cartridge after an alarm
            if c.clear_after and any(w.end == world.now() for w in windows[i]):
                world.pump(idx[i]).clear_fault(reservoir_u=300.0)
        if cfg.long and k and k % 288 == 0:
            log(f"  {group.key[0]}: day {k // 288} of {cfg.days:g}")
    if down:
        _mend_journal(journal, first.mode)
    with contextlib.redirect_stderr(stderr):
        loop.cycle()  # one more cycle syncs the last deliveries into the journal
    loop.stop("faultmatrix")
    notes["log"] = lines
    notes["stderr"] = stderr.getvalue().splitlines()
    out = []
    for i, (c, p) in enumerate(group.pairs):
        fw = world.firmware[idx[i]]
        out.append(CaseRun(c, p, loop_names[i], loop.settings[i], windows[i], records[i], journal,
                           list(fw.history), dict(fw.acks), t0, dict(notes)))  # fmt: skip
    return out


def _break_journal(journal: Journal, mode: str) -> None:
    """Make SQLite refuse writes as a read-only file system or a full disk would."""
    if mode == "query_only":
        journal.con.execute("PRAGMA query_only = ON")
    else:
        journal.con.execute("CREATE TABLE IF NOT EXISTS _ballast(x BLOB)")
        pages = journal.con.execute("PRAGMA page_count").fetchone()[0]
        journal.con.execute(f"PRAGMA max_page_count = {int(pages)}")
        for size in (4096, 1024, 256, 64, 16, 1):  # fill the free pages to the last byte
            while True:
                try:
                    journal.con.execute(f"INSERT INTO _ballast VALUES (zeroblob({size}))")
                except sqlite3.Error:
                    break


def _mend_journal(journal: Journal, mode: str) -> None:
    if mode == "query_only":
        journal.con.execute("PRAGMA query_only = OFF")
    else:
        journal.con.execute("PRAGMA max_page_count = 1073741823")


# --------------------------------------------------------------------------- checks


def _cap(s: PatientSettings) -> float:
    daily = s.max_daily_basal_u_per_h if s.max_daily_basal_u_per_h is not None else s.basal_u_per_h
    return float(max_basal(s.max_basal_u_per_h, daily, s.basal_u_per_h))


def common_checks(run: CaseRun) -> list[str]:
    """Limits and consistency, from the pump's history and the journal (every case)."""
    s, v = run.settings, []
    cap = _cap(s)
    for d in run.history:
        if d.kind == "basal" and d.minutes > 0 and d.units * 60 / d.minutes > cap + 1e-6:
            v.append(
                f"basal {d.units * 60 / d.minutes:.2f} U/h at {d.time} above the cap {cap:.2f}"
            )
    by_key: Counter = Counter()
    for d in run.history:
        if d.kind == "bolus":
            by_key[d.key] += d.units
    for key, u in by_key.items():
        ack = run.acks.get(key)
        if u > s.max_bolus_u + 1e-9:
            v.append(f"bolus {key} {u:.2f} U above max bolus {s.max_bolus_u}")
        if ack is None or u > ack.amount + 1e-9:
            v.append(f"bolus {key} delivered {u:.2f} U beyond its acknowledgement")
    v += _iob_check(run)
    for key, ack in run.acks.items():
        raises = ack.kind == "bolus" or (
            ack.kind == "temp_basal" and ack.amount > s.basal_u_per_h + 1e-9
        )
        if ack.accepted and raises and run.journal.command(key) is None:
            v.append(f"{ack.kind} {key} reached the pump without a journaled intent")
    for rec in run.journal.commands(patient=run.name):
        if rec.kind == "temp_basal" and rec.duration_min > MAX_TEMP_MINUTES:
            v.append(f"temp basal {rec.key} lasts {rec.duration_min} min")
    for r in run.records:
        c = r.cycle
        if c is None or not c.verdict.fallback:
            continue
        if c.verdict.bolus_u > 0 or c.verdict.temp_basal_u_per_h > s.basal_u_per_h + 1e-9:
            v.append(f"{r.time}: fallback {c.verdict.fallback} but insulin raised")
    problems = [p for p in run.journal.check() if run.name in p or "integrity" in p]
    v += [f"journal: {p}" for p in problems]
    seqs = list(run.journal.insulin_history(run.name)["seq"])
    pump = [d.seq for d in run.history]
    if seqs != pump:
        v.append(f"journal holds {len(seqs)} of the pump's {len(pump)} deliveries, or others")
    return v


def _iob_check(run: CaseRun) -> list[str]:
    """Every bolus: IOB before it (from the pump's deliveries) + bolus ≤ max IOB."""
    from forecast.insulin import InsulinCurve

    kernel = InsulinCurve().iob_kernel(5)
    if not run.records:
        return []
    t0 = run.run_start - SLOT * len(kernel)
    slots = pd.date_range(t0, run.records[-1].time + SLOT, freq=SLOT)
    dose = np.zeros(len(slots))
    bolus = np.zeros(len(slots))
    idx = (
        ((pd.DatetimeIndex([d.time for d in run.history]) - t0) // SLOT).to_numpy()
        if run.history
        else []
    )
    for k, d in zip(idx, run.history):
        if 0 <= k < len(slots):
            dose[k] += d.units
            if d.kind == "bolus":
                bolus[k] += d.units
    before = slots < run.run_start
    dose[before] = run.settings.basal_u_per_h * 5 / 60  # the pump's schedule before the loop
    out = []
    for k in np.flatnonzero(bolus > 0):
        past = dose[max(0, k - len(kernel) + 1) : k][::-1]
        iob = float(past @ kernel[1 : 1 + len(past)])
        if iob + bolus[k] > run.settings.max_iob_u + IOB_TOLERANCE_U:
            out.append(f"bolus {bolus[k]:.2f} U at {slots[k]} on IOB {iob:.2f} U > max IOB {run.settings.max_iob_u}")  # fmt: skip
    return out


def _vetoes(run: CaseRun, *, during: bool = True) -> Counter:
    """Veto labels (cgm_unusable, pump_fault...) journaled, during the fault or over the run."""
    c: Counter = Counter()
    for r in run.records:
        if r.cycle is None or (during and not r.fault_on):
            continue
        for reason in r.cycle.verdict.vetoes:
            c[reason.split(":")[0]] += 1
    return c


def _journaled_vetoes(run: CaseRun, label: str) -> int:
    ev = run.events("veto")
    return int(ev["detail"].str.contains(f'"reason":"{label}', regex=False).sum())


def check_cgm_outage(run: CaseRun) -> list[str]:
    """From 15 min into the outage (newest reading > 12 min old, oref0) until it ends: a
    fallback, no bolus; `cgm_unusable` journaled; closed loop again after the outage."""
    v = []
    grace = STALE_MIN + 5
    hit = 0
    for r in run.records:
        c = r.cycle
        if c is None or not r.fault_on or run.since_start(r.time) < grace:
            continue
        hit += 1
        if c.verdict.fallback not in ("scheduled_basal", "suspend") or c.verdict.bolus_u > 0:
            v.append(f"{r.time}: CGM out for {run.since_start(r.time):.0f} min but fallback "
                     f"{c.verdict.fallback!r}, bolus {c.verdict.bolus_u:.2f}")  # fmt: skip
    if not hit:
        v.append("no cycle late enough in the outage to judge")
    if _journaled_vetoes(run, "cgm_unusable") == 0:
        v.append("no cgm_unusable veto in the journal")
    resumed = [r for r in run.records if r.cycle and run.after(r.time, run.case.tail) and not r.cycle.verdict.fallback]  # fmt: skip
    if run.case.check == "cgm_outage" and not resumed and any(w.end for w in run.windows):
        v.append("closed-loop control never resumed after the fault")
    return v


def check_compression(run: CaseRun) -> list[str]:
    """A compression low: its sudden drop and its rebound are distrusted (jumps), and the
    cycle that sees the rebound raises no insulin; a jump veto is journaled."""
    v = []
    s = run.settings
    for w in run.windows:
        onset = [r for r in run.records if r.cycle and w.start <= r.time < w.start + 2 * SLOT]
        if onset and not any(r.cycle.verdict.fallback for r in onset):
            v.append(f"{w.start}: the sudden drop was acted on as real glucose")
        rebound = [r for r in run.records if r.cycle and w.end <= r.time < w.end + SLOT]
        for r in rebound:
            c = r.cycle
            if c.verdict.bolus_u > 0 or c.verdict.temp_basal_u_per_h > s.basal_u_per_h + 1e-9:
                v.append(f"{r.time}: insulin raised on the rebound of a compression low")
            if not c.verdict.fallback:
                v.append(f"{r.time}: the rebound jump was trusted")
    if not run.events("veto")["detail"].str.contains("jump", regex=False).any():
        v.append("no jump journaled")
    return v


def check_spikes(run: CaseRun) -> list[str]:
    """No insulin above scheduled on a cycle whose newest reading is a spike; jump journaled."""
    v, spiked = [], 0
    s = run.settings
    for r in run.records:
        c, rep = r.cycle, r.reported
        if c is None or rep is None or not r.fault_on:
            continue
        truth = r.true.get(rep.time.value)
        if truth is None or rep.glucose_mgdl - truth < 40:
            continue
        spiked += 1
        if c.verdict.bolus_u > 0 or c.verdict.temp_basal_u_per_h > s.basal_u_per_h + 1e-9:
            v.append(f"{r.time}: insulin raised on a +{rep.glucose_mgdl - truth:.0f} mg/dL spike")
    if not spiked:
        v.append("no upward spike reached a cycle")
    if not run.events("veto")["detail"].str.contains("jump", regex=False).any():
        v.append("no jump journaled")
    return v


def check_tolerated(run: CaseRun) -> list[str]:
    """Duplicates/shuffles are harmless: no CGM fallback because of them; the raw readings are
    journaled as the device gave them."""
    v = []
    for r in run.records:
        c = r.cycle
        if c is None or not r.fault_on:
            continue
        if any(x.startswith("cgm_unusable") for x in c.verdict.vetoes):
            v.append(f"{r.time}: CGM judged unusable ({c.verdict.vetoes[0][:80]})")
    cyc = run.cycles()
    during = cyc[[run.on(t) for t in cyc["time"]]]
    raw = [json.loads(x) for x in during["readings"]]
    if run.case.spec == "duplicated":
        if not any(len(rs) > len({x["time"] for x in rs}) for rs in raw):
            v.append("journal does not show the duplicated readings")
    elif not any([x["time"] for x in rs] != sorted(x["time"] for x in rs) for rs in raw):
        v.append("journal does not show the out-of-order readings")
    return v


def check_flat(run: CaseRun) -> list[str]:
    """After 9 identical readings (45 min): fallback until the sensor recovers; `flat` journaled."""
    v = []
    for r in run.records:
        c = r.cycle
        if c is None or not r.fault_on or run.since_start(r.time) < 45:
            continue
        if c.verdict.fallback not in ("scheduled_basal", "suspend"):
            v.append(f"{r.time}: flat for {run.since_start(r.time):.0f} min, no fallback")
    if not run.events("veto")["detail"].str.contains("flat", regex=False).any():
        v.append("no flat-line veto journaled")
    return v


def _acked_after(run: CaseRun, t: pd.Timestamp) -> list[Any]:
    return [a for a in run.acks.values() if a.time >= t]


def check_pump_lost(run: CaseRun) -> list[str]:
    """Lost commands: the pump hears nothing, its temp expires → programmed basal within
    30 min; failures journaled; no key sent twice (the pump saw none of them)."""
    v = []
    s = run.settings
    for w in run.windows:
        if w.start is None or w.end is None:
            continue
        if [a for a in run.acks.values() if w.start <= a.time < w.end]:
            v.append("the pump acknowledged a command that was lost")
        settle = w.start + pd.Timedelta(minutes=MAX_TEMP_MINUTES)
        for d in run.history:
            if d.kind == "basal" and settle <= d.time < w.end and d.minutes > 0:
                if abs(d.units * 60 / d.minutes - s.basal_u_per_h) > 0.051:
                    v.append(f"{d.time}: {d.units * 60 / d.minutes:.2f} U/h, not the programmed "
                             f"{s.basal_u_per_h:.2f}, {MAX_TEMP_MINUTES}+ min into the outage")  # fmt: skip
                    break
            if d.kind == "bolus" and settle <= d.time < w.end:
                v.append(f"{d.time}: bolus delivered during the outage")
    if not run.events("fault")["detail"].str.contains("PumpTimeout", regex=False).any():
        v.append("no PumpTimeout fault journaled")
    st = Counter(r.status for r in run.journal.commands(patient=run.name))
    if not st.get("failed"):
        v.append(f"no command journaled as failed ({dict(st)})")
    return v


def check_pump_answer(run: CaseRun) -> list[str]:
    """The pump acted, the answer was lost: resolved by query (acked), nothing resent."""
    v = []
    if not run.events("fault")["detail"].str.contains("resolved", regex=False).any():
        v.append("no fault journaled for the lost answers")
    unresolved = run.journal.unresolved(run.name)
    if unresolved:
        v.append(f"{len(unresolved)} command(s) left unresolved")
    recs = run.journal.commands(patient=run.name)
    during = [r for r in recs if run.on(r.cycle_time)]
    if during and not any(r.status == "acked" for r in during):
        v.append("no command of the fault window was resolved as acked by query")
    return v


def check_pump_unreachable(run: CaseRun) -> list[str]:
    """No contact: no bolus delivered while unreachable; afterwards every command resolved
    by query (reconcile events), and the pump on its programmed basal within 30 min."""
    v = []
    s = run.settings
    for w in run.windows:
        for d in run.history:
            if d.kind == "bolus" and w.active(d.time):
                v.append(f"{d.time}: bolus delivered while the pump was unreachable")
            settle = w.start + pd.Timedelta(minutes=MAX_TEMP_MINUTES)
            if d.kind == "basal" and d.minutes > 0 and settle <= d.time and w.active(d.time):
                if abs(d.units * 60 / d.minutes - s.basal_u_per_h) > 0.051:
                    v.append(f"{d.time}: not the programmed basal 30+ min into the outage")
                    break
    if run.journal.unresolved(run.name):
        v.append("commands left unresolved after contact came back")
    if not run.events("fault")["detail"].str.contains("unreachable", regex=False).any():
        v.append("no 'unreachable' fault journaled")
    return v


def _alarm_due(run: CaseRun, w: Window) -> bool:
    """Whether the pump pushed enough insulin early enough in the window to trip its alarm
    (1 U missed for an occlusion, the reservoir's last units) and tell the supervisor at a
    later cycle. A suspended pump or a low-basal child's occluded line can stay silent for
    hours, on real pumps as here — the loop then over-counts IOB, the safe direction — so
    the matrix reports such an occurrence instead of failing it."""
    if w.start is None or w.end is None:
        return True
    pushed = sum(d.units for d in run.history if w.start <= d.time < w.end - SLOT)
    if run.case.spec.startswith("occlusion"):
        need = 1.0  # PumpFirmware.occlusion_alarm_u
    else:
        need = float(run.case.spec.partition("units=")[2] or 0.2)
    return pushed >= 1.05 * need


def check_pump_fault(run: CaseRun) -> list[str]:
    """Occlusion / empty reservoir: the alarm fires, the supervisor commands a faulted pump
    nothing (no ack between the alarm and the fix), `pump_fault` journaled."""
    v = []
    alarms = [r.time for r in run.records if r.cycle and any(x.startswith("pump_fault") for x in r.cycle.verdict.vetoes)]  # fmt: skip
    silent = 0
    for w in run.windows:
        first = next((t for t in alarms if w.active(t)), None)
        if first is None:
            if _alarm_due(run, w):
                v.append(f"no alarm during the occurrence at {w.start}")
            else:
                silent += 1
            continue
        sent = [a for a in run.acks.values() if first <= a.time < w.end]
        if sent:
            v.append(f"{len(sent)} command(s) sent to a faulted pump ({sent[0].kind})")
        if not any(
            r.cycle and r.cycle.verdict.suspend for r in run.records if first <= r.time < w.end
        ):
            v.append("no suspend verdict while the pump was faulted")
    run.notes["silent_occurrences"] = silent
    if alarms and _journaled_vetoes(run, "pump_fault") == 0:
        v.append("no pump_fault veto journaled")
    return v


def check_pred_fallback(run: CaseRun) -> list[str]:
    """The damaged forecaster was asked and bypassed: the fallback's use is journaled and the
    loop kept deciding (no controller failure)."""
    v = []
    fault: ForecasterFault = run.notes["forecaster_fault"]
    if not fault.calls:
        v.append("the faulty forecaster was never called during the fault")
    ev = run.events("predictor")
    if not ev["detail"].str.contains("fallback", regex=False).any():
        v.append("no switch to the fallback forecaster journaled")
    if run.events("fault")["detail"].str.contains("controller", regex=False).any():
        v.append("the controller failed although a fallback forecaster was there")
    cyc = run.cycles()
    during = cyc[[run.on(t) for t in cyc["time"]]]
    if len(during) and not during["predictor"].str.contains("fallback").all():
        v.append("a cycle during the fault was not answered by the fallback forecaster")
    return v


def check_pred_dead(run: CaseRun) -> list[str]:
    """No forecaster at all: the controller fails → scheduled basal, no bolus; fault journaled."""
    v = []
    for r in run.records:
        c = r.cycle
        if c is None or not r.fault_on:
            continue
        if c.verdict.fallback != "scheduled_basal" or c.verdict.bolus_u > 0:
            v.append(f"{r.time}: fallback {c.verdict.fallback!r} with no forecaster")
    if not run.events("fault")["detail"].str.contains("controller", regex=False).any():
        v.append("the controller's failure was not journaled")
    return v


def check_model_refused(run: CaseRun) -> list[str]:
    """The damaged model was refused at load (typed reason kept), the loop ran on the
    fallback forecaster for every cycle, and the journal says so."""
    v = []
    pred = run.notes["predictor"]
    reason = getattr(pred, "degraded_reason", "")
    if getattr(pred, "primary", None) is not None or "model refused" not in reason:
        v.append(f"the damaged model was not refused ({reason!r})")
    if run.case.mode == "corrupt" and "sha256" not in reason:
        v.append(f"refusal does not name the hash mismatch ({reason[:120]!r})")
    if run.case.mode == "mismatch" and not ("manifest" in reason or "window" in reason):
        v.append(f"refusal does not name the manifest/window mismatch ({reason[:120]!r})")
    start = run.journal.events("start")
    if not start["detail"].str.contains("model refused", regex=False).any():
        v.append("the start event does not journal the refused model")
    cyc = run.cycles()
    if len(cyc) == 0 or not cyc["predictor"].str.startswith("fallback").all():
        v.append("cycles not journaled as answered by the fallback forecaster")
    return v


def check_journal_down(run: CaseRun) -> list[str]:
    """Unwritable journal: while the loop knows it (journal_unavailable veto) nothing above
    scheduled basal and no bolus; nothing that raises insulin reaches the pump without its
    intent journaled (common check); a warning each failing cycle; recovery journaled; the
    pump's history synced afterwards (common check)."""
    v = []
    failed = [r for r in run.records if r.cycle is not None and not r.cycle.journal_ok]
    if not failed:
        v.append("the journal never failed (the fault did not bite)")
    if run.case.mode == "query_only":  # every write fails: the supervisor must know it
        known = [r for r in run.records if r.cycle is not None
                 and any(x.startswith("journal_unavailable") for x in r.cycle.verdict.vetoes)]  # fmt: skip
        if not known:
            v.append("the supervisor never learnt that the journal was down")
        for w in run.windows:
            for d in run.history:
                if d.kind == "bolus" and w.active(d.time):
                    v.append(f"{d.time}: bolus delivered while the journal was read-only")
    warned = sum("journal unavailable" in line for line in run.notes["log"])
    if warned < len(failed):
        v.append(f"{warned} warnings for {len(failed)} cycles that could not be journaled")
    if not run.events("warning")["detail"].str.contains("journal_recovered", regex=False).any():
        v.append("no journal_recovered event after the journal came back")
    return v


CHECKS: dict[str, Callable[[CaseRun], list[str]]] = {
    "cgm_outage": check_cgm_outage,
    "compression": check_compression,
    "spikes": check_spikes,
    "tolerated": check_tolerated,
    "flat": check_flat,
    "pump_lost": check_pump_lost,
    "pump_answer": check_pump_answer,
    "pump_unreachable": check_pump_unreachable,
    "pump_fault": check_pump_fault,
    "pred_fb": check_pred_fallback,
    "pred_dead": check_pred_dead,
    "model_refused": check_model_refused,
    "journal_down": check_journal_down,
}


# --------------------------------------------------------------------------- outcome


def _outcome(bg: Sequence[float]) -> dict[str, Any]:
    a = np.asarray([x for x in bg if math.isfinite(x)], dtype=float)
    if not a.size:
        return {"n": 0}
    return {
        "n": int(a.size),
        "min_mgdl": round(float(a.min()), 1),
        "mean_mgdl": round(float(a.mean()), 1),
        "max_mgdl": round(float(a.max()), 1),
        "below70_pct": round(100.0 * float((a < LOW_MGDL).mean()), 1),
        "below54_pct": round(100.0 * float((a < 54.0).mean()), 1),
    }


def what_the_loop_did(run: CaseRun) -> dict[str, Any]:
    during = [r for r in run.records if r.fault_on and r.cycle is not None]
    fb = Counter(r.cycle.verdict.fallback or "closed-loop" for r in during)
    boluses = sum(1 for r in during if r.cycle.verdict.bolus_u > 0)
    cmds = Counter(r.status for r in run.journal.commands(patient=run.name) if run.on(r.cycle_time))
    preds = Counter(r.cycle.predictor.split(":")[-1] for r in during)
    return {
        "cycles_during": len(during),
        "decisions_during": dict(fb),
        "boluses_during": boluses,
        "vetoes_during": dict(_vetoes(run)),
        "commands_during": dict(cmds),
        "forecaster_during": dict(preds),
    }


def summarise(run: CaseRun) -> str:
    d = what_the_loop_did(run)
    fb = ", ".join(f"{k} {n}" for k, n in sorted(d["decisions_during"].items()))
    top = ", ".join(f"{k}×{n}" for k, n in Counter(d["vetoes_during"]).most_common(2))
    return f"{fb}; boluses {d['boluses_during']}" + (f"; {top}" if top else "")


def evaluate(runs: Sequence[CaseRun]) -> CaseResult:
    """One case's verdict over its patients."""
    case = runs[0].case
    violations: list[str] = []
    per_patient = []
    for run in runs:
        v = common_checks(run) + CHECKS[case.check](run)
        violations += [f"{run.patient}: {x}" for x in v]
        bg_during = [r.bg for r in run.records if r.fault_on]
        bg_after = [r.bg for r in run.records if not r.fault_on and run.after(r.time, case.tail)]
        per_patient.append({
            "patient": run.patient,
            "loop": what_the_loop_did(run),
            "summary": summarise(run),
            "glucose_during": _outcome(bg_during),
            "glucose_after": _outcome(bg_after),
            "violations": len(v),
            **({"undetected_occurrences": run.notes["silent_occurrences"]}
               if run.notes.get("silent_occurrences") else {}),
        })  # fmt: skip
    return CaseResult(
        name=case.name,
        passed=not violations,
        violations=len(violations),
        detail={
            "expect": case.expect,
            "fault": case.spec or case.mode,
            "minutes": case.minutes,
            "occurrences": len(runs[0].windows),
            "patients": per_patient,
            "problems": violations[:10],
        },
    )


def run_matrix(
    cfg: MatrixConfig = MatrixConfig(),
    *,
    log: Callable[[str], None] | None = None,
    runs_out: dict[str, list[CaseRun]] | None = None,
) -> list[CaseResult]:
    """Run every chosen case and return its result (in CASES order).

    `runs_out` receives the raw `CaseRun`s (journals open; give `cfg.workdir` so they are
    not deleted) for callers that inspect them further."""
    log = log or (lambda msg: None)
    own = cfg.workdir is None
    workdir = Path(cfg.workdir or tempfile.mkdtemp(prefix="glucast-faults-"))
    workdir.mkdir(parents=True, exist_ok=True)
    runs: dict[str, list[CaseRun]] = {}
    try:
        for g in plan(cfg):
            t = _time.monotonic()
            for run in run_group(g, cfg, workdir, log):
                runs.setdefault(run.case.name, []).append(run)
            log(f"ran {', '.join(c.name for c, _ in g.pairs)} in {_time.monotonic() - t:.1f} s")
        results = [evaluate(runs[c.name]) for c in CASES if c.name in runs]
        if runs_out is not None:
            runs_out.update(runs)
        else:
            for rs in runs.values():
                rs[0].journal.close()
        return results
    finally:
        if own:
            shutil.rmtree(workdir, ignore_errors=True)


__all__ = [
    "CASES",
    "CASE_NAMES",
    "CaseResult",
    "CaseRun",
    "FaultCase",
    "FaultMatrixError",
    "ForecasterFault",
    "MatrixBackend",
    "MatrixConfig",
    "damage_model_dir",
    "persistence_model_bytes",
    "plan",
    "run_matrix",
    "write_model_dir",
]
