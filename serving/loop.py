"""The closed loop: one control cycle, and the runner that repeats it every 5 minutes.

A cycle, for every patient of a backend at once:

1. read the CGM (the readings as the device reports them) and judge them (`assess_cgm`);
2. update state from the journal: copy the pump's new deliveries in, resolve commands left
   unresolved, rebuild insulin on board from the delivered insulin (`insulin_history`);
3. build the model inputs with `forecast.windows.inputs_at` (THE window builder) from a
   canonical frame of trusted readings, delivered insulin and announced carbs;
4. the controller proposes (one batched call); the prediction that goes with a proposal is
   the controller's, or the loop's own under the proposed plan;
5. the supervisor checks each proposal and, in closed-loop mode, commands the pump with keys
   derived from (patient, cycle time, kind) — the only road to the pump;
6. the cycle is journaled whole (readings, prediction, proposal, verdict, fallback, mode).

A killed loop restarts where it stopped: a cycle already journaled is not run again, a
cycle interrupted halfway is re-run with the same keys (the supervisor reuses what the
journal and the pump already know, never sends a key twice), and IOB comes back from the
journal. A journal that cannot be written does not stop the loop: insulin is limited to
scheduled basal (see `serving.journal`), a warning is printed every cycle and the recovery
is journaled.

`run_loop` repeats cycles on a backend's clock: ``fast`` (simulated time, as fast as it
goes) or ``realtime`` (a 5-minute wall-clock cycle), until `until` or SIGINT/SIGTERM — the
current cycle always finishes and the journal is closed cleanly.
"""

from __future__ import annotations

import math
import signal
import sys
import threading
import time as _time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import pandas as pd

from forecast.schema import SLOT, SLOT_MINUTES, GlucastError
from forecast.windows import WindowConfig
from serving.hal.cgm import CGM, CGMError
from serving.hal.pump import Delivery, Pump, PumpError, PumpStatus
from serving.journal import InsulinRecord, Journal, JournalError
from serving.safety import CommandResult, SafetyState, Supervisor, assess_cgm
from serving.types import ControlInput, PatientSettings, Proposal, Reading, Verdict

CYCLE_MINUTES = SLOT_MINUTES
MODES = ("closed", "open")


class LoopError(GlucastError):
    """The loop cannot start (bad configuration, a journal for other patients...)."""


# --------------------------------------------------------------------------- backends


class Backend(Protocol):
    """Devices and a clock for N patients. Simulated backends also move time (`advance`)."""

    names: list[str]

    def now(self) -> pd.Timestamp: ...

    def cgm(self, i: int) -> CGM: ...

    def pump(self, i: int) -> Pump: ...

    def settings(self, i: int) -> PatientSettings: ...

    def announced_carbs(self, i: int, t0: pd.Timestamp, t1: pd.Timestamp) -> float: ...

    def advance(self, minutes: int) -> None: ...


def _wrap(device: Any, specs: Sequence[str], target: str, clock) -> Any:
    from serving.hal.faults import build_fault, fault_target

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
        from serving.hal.replay import ReplayCGM
        from serving.hal.simulated import ManualClock, VirtualPump

        probe = ReplayCGM(frame, subject_id, ManualClock("2000-01-01"))
        start = (probe.start + SLOT * (window or WindowConfig()).past_slots).ceil(SLOT)
        self.clock = ManualClock(start)
        self._settings = settings or settings_from_frame(frame, subject_id)
        self.replay = ReplayCGM(frame, subject_id, self.clock)
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

    def advance(self, minutes: int) -> None:
        self.vpump.advance(minutes)

    def describe(self) -> dict[str, Any]:
        return {"backend": "replay", "subject": self.names[0]}


def settings_from_frame(frame: pd.DataFrame, subject_id: str) -> PatientSettings:
    """Conservative settings for a recorded patient whose therapy settings are unknown.

    Scheduled basal = the median delivered basal rate; carb ratio and ISF population values
    (10 g/U, 40 mg/dL/U); limits as the trial's (4 × basal, a modest bolus and IOB cap).
    """
    sub = frame[frame["subject_id"].astype(str) == str(subject_id)]
    rates = sub["basal_u"].to_numpy(dtype=float) * 60.0 / SLOT_MINUTES
    rates = rates[np.isfinite(rates) & (rates > 0)]
    basal = float(np.median(rates)) if len(rates) else 1.0
    return PatientSettings(
        name=str(subject_id),
        basal_u_per_h=basal,
        carb_ratio_g_per_u=10.0,
        isf_mgdl_per_u=40.0,
        max_basal_u_per_h=4.0 * basal,
        max_bolus_u=10.0,
        max_iob_u=10.0 + 3.0 * basal,
        max_daily_basal_u_per_h=basal,
    )


# --------------------------------------------------------------------------- one cycle


@dataclass
class PatientCycle:
    """What one cycle did for one patient."""

    patient: str
    time: pd.Timestamp
    glucose: float
    iob_u: float
    proposal: Proposal
    verdict: Verdict
    results: list[CommandResult] = field(default_factory=list)
    predictor: str = ""
    journal_ok: bool = True
    readings: list[Reading] = field(default_factory=list)


@dataclass
class _Prepared:
    """A patient's state at the start of a cycle, before the controller is asked."""

    name: str
    readings: list[Reading]
    cgm: Any
    iob_u: float
    unconfirmed_u: float
    pump: PumpStatus | None
    carbs_g: float
    past: np.ndarray | None
    future: np.ndarray | None
    journal_ok: bool
    notes: list[tuple[str, dict[str, Any]]]


class ControlLoop:
    """The cycle for every patient of a backend, journaled; see the module docstring."""

    def __init__(
        self,
        backend: Backend,
        journal: Journal,
        controller: Any,
        predictor: Any,
        *,
        mode: str = "closed",
        window: WindowConfig | None = None,
        log: Callable[[str], None] | None = None,
    ) -> None:
        if mode not in MODES:
            raise LoopError(f"mode must be one of {MODES}, got {mode!r}")
        self.backend, self.journal, self.controller, self.predictor = (
            backend,
            journal,
            controller,
            predictor,
        )
        self.mode = mode
        self.window = window or getattr(predictor, "config", None) or WindowConfig()
        w = self.window
        self.k_ins = w.insulin_curve.iob_kernel(w.slot_minutes)  # [K], k[0] = 1
        self.span = w.past_slots + max(
            len(self.k_ins), len(w.carb_curve.cob_kernel(w.slot_minutes))
        )
        self.names = list(backend.names)
        self.settings = [backend.settings(i) for i in range(len(self.names))]
        self.supervisors = [
            Supervisor(s, backend.pump(i), journal, patient=n)
            for i, (n, s) in enumerate(zip(self.names, self.settings))
        ]
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self._journal_down_since: pd.Timestamp | None = None
        self._run_start = backend.now().floor(SLOT)
        self._last_label: dict[str, str] = {}
        self.cycles_run = 0

    # ---- start and stop
    def start(self, *, describe: dict[str, Any] | None = None) -> None:
        """Check the journal belongs to these patients, reconcile what a crash left pending."""
        j = self.journal
        known = j.meta("patients")
        names = ",".join(self.names)
        describe = {k: str(v) for k, v in (describe or {}).items()}
        if known is None:  # a new run: who, when and on what, in one transaction
            j.set_meta_many(
                {"patients": names, "run_start": self.backend.now().isoformat(), **describe}
            )
        elif known != names:
            raise LoopError(f"journal {j.path} is for patients {known}, not {names}")
        else:
            for k, v in describe.items():
                if j.meta(k) not in (None, v):
                    raise LoopError(
                        f"journal {j.path} belongs to another {k} ({j.meta(k)}), not {v}: "
                        "a journal continues only the run it recorded"
                    )
        self._run_start = pd.Timestamp(j.meta("run_start")).floor(SLOT)
        last_mode = j.meta("mode")
        if last_mode != self.mode:
            j.set_meta("mode", self.mode)
            j.event("mode", {"from": last_mode, "to": self.mode}, time=self.backend.now())
        for i, name in enumerate(self.names):
            j.reconcile(self.backend.pump(i), name)
        j.event("start", {"mode": self.mode, "controller": getattr(self.controller, "name", type(self.controller).__name__),
                          "predictor": _predictor_label(self.predictor)}, time=self.backend.now())  # fmt: skip

    def sync(self) -> None:
        """Copy the pumps' newest deliveries into the journal (best effort; see `stop`)."""
        for i, name in enumerate(self.names):
            try:
                self.journal.record_deliveries(
                    name, self.backend.pump(i).deliveries(self.journal.last_delivery_seq(name))
                )
            except (JournalError, PumpError) as e:
                self.log(f"glucast loop: warning: final delivery sync for {name} failed: {e}")

    def stop(self, reason: str) -> None:
        """Journal the stop, after the deliveries since the last cycle."""
        self.sync()
        try:
            self.journal.event(
                "stop", {"reason": reason, "cycles": self.cycles_run}, time=self.backend.now()
            )
        except JournalError as e:
            self.log(f"glucast loop: warning: could not journal the stop: {e}")

    @property
    def run_start(self) -> pd.Timestamp | None:
        v = self.journal.meta("run_start")
        return None if v is None else pd.Timestamp(v)

    # ---- the cycle
    def cycle_time(self) -> pd.Timestamp:
        return self.backend.now().floor(SLOT)

    def cycle(self) -> list[PatientCycle]:
        """Run one cycle for every patient (a patient whose cycle is journaled is skipped)."""
        t = self.cycle_time()
        now = self.backend.now()
        todo = [i for i, n in enumerate(self.names) if not self._done(n, t)]
        if not todo:
            return []
        prepared = [self._prepare(i, t, now) for i in todo]
        inputs = [self._input(i, p, t) for i, p in zip(todo, prepared)]
        live = [k for k, inp in enumerate(inputs) if inp is not None]
        proposals: list[Proposal] = [
            Proposal(
                self.settings[i].basal_u_per_h, 30, 0.0, reason="no model inputs → scheduled basal"
            )
            for i in todo
        ]
        if live:
            try:
                got = self.controller.propose([inputs[k] for k in live])
                for k, p in zip(live, got):
                    proposals[k] = p
            except Exception as e:  # a controller bug must not stop the loop
                for k in live:
                    prepared[k].notes.append(("fault", {"controller": f"{type(e).__name__}: {e}"}))
                    proposals[k] = Proposal(
                        self.settings[todo[k]].basal_u_per_h, 30, 0.0,
                        reason=f"controller failed ({type(e).__name__}) → scheduled basal",
                        predicted_mgdl=np.full((self.window.horizon_slots, 1), np.nan),
                    )  # fmt: skip
        out = []
        for k, i in enumerate(todo):
            out.append(self._decide_and_act(i, prepared[k], proposals[k], t, now))
        self.cycles_run += 1
        return out

    def _done(self, name: str, t: pd.Timestamp) -> bool:
        try:
            return self.journal.has_cycle(name, t)
        except JournalError:
            return False

    def _prepare(self, i: int, t: pd.Timestamp, now: pd.Timestamp) -> _Prepared:
        name, j = self.names[i], self.journal
        pump = self.backend.pump(i)
        notes: list[tuple[str, dict[str, Any]]] = []
        journal_ok = True
        # 1. the CGM, as reported
        try:
            readings = list(
                self.backend.cgm(i).recent((self.window.past_slots + 1) * self.window.slot_minutes)
            )
        except CGMError as e:
            readings = []
            notes.append(("fault", {"cgm": str(e)}))
        check = assess_cgm(readings, now)
        # 2. state from the journal (the pump's history copied in first)
        try:
            last_seq = j.last_delivery_seq(name)
        except JournalError:
            last_seq = 0
        new: list[Delivery] = []
        status: PumpStatus | None = None
        try:
            new = pump.deliveries(last_seq)
            status = pump.status()
        except PumpError as e:
            notes.append(("fault", {"pump": f"{type(e).__name__}: {e}"}))
        try:
            j.record_deliveries(name, new, synced_at=t)  # writes every cycle: a dead disk shows
            if j.unresolved(name):
                j.reconcile(pump, name)
            new = []  # now in the journal
        except JournalError as e:
            journal_ok = False
            self._journal_down(t, e)
        if journal_ok and self._journal_down_since is not None:
            notes.append(
                (
                    "warning",
                    {"journal_recovered": True, "down_since": str(self._journal_down_since)},
                )
            )
            self.log(
                f"glucast loop: journal writable again (down since {self._journal_down_since})"
            )
            self._journal_down_since = None
        since = t - SLOT * (self.span - 1)
        try:
            hist = j.insulin_record(name, since=since - pd.Timedelta(hours=1))
            carbs_hist = j.carbs_history(name, since)
            unconfirmed = j.unconfirmed_bolus_u(name)
        except JournalError as e:  # unreadable journal: assume the worst about insulin
            self._journal_down(t, e)
            journal_ok, carbs_hist, unconfirmed = False, _empty_carbs(), math.inf
            hist = InsulinRecord(np.zeros(0, np.int64), np.zeros(0), np.zeros(0), np.zeros(0, bool))
        hist = hist.extend(new)  # deliveries the journal could not take yet still count
        if status is not None:
            unconfirmed += status.pending_bolus_u
        carbs_now = float(self.backend.announced_carbs(i, t, t + SLOT))
        # 3. the frame and the window
        slots = pd.date_range(since, t, freq=SLOT)
        slot_ns = slots.as_unit("ns").asi8
        basal = hist.per_slot(slot_ns, self.window.slot_minutes, "basal")
        bolus = hist.per_slot(slot_ns, self.window.slot_minutes, "bolus")
        before = slot_ns < self._run_start.value  # the pump ran its schedule before the loop began
        basal[before] = self.settings[i].basal_u_per_h * self.window.slot_minutes / 60.0
        iob = iob_before(basal + bolus, self.k_ins)
        past = future = None
        try:
            past, future = self._window(
                name, t, slots, check.readings, basal, bolus, carbs_hist, carbs_now, i
            )
        except GlucastError as e:
            notes.append(("warning", {"inputs": str(e)}))
        return _Prepared(
            name,
            readings,
            check,
            iob,
            unconfirmed,
            status,
            carbs_now,
            past,
            future,
            journal_ok,
            notes,
        )

    def _journal_down(self, t: pd.Timestamp, e: Exception) -> None:
        if self._journal_down_since is None:
            self._journal_down_since = t
        self.log(
            f"glucast loop: warning: journal unavailable since {self._journal_down_since} ({e}); "
            "insulin limited to scheduled basal, no bolus"
        )

    def _window(self, name, t, slots, trusted, basal, bolus, carbs_hist, carbs_now, i):
        from forecast.windows import inputs_at

        w = self.window
        sched = self.settings[i].basal_u_per_h * w.slot_minutes / 60.0
        glucose = np.full(len(slots), np.nan)
        idx = {ts.value: k for k, ts in enumerate(slots)}
        for r in trusted:
            k = idx.get(r.time.floor(SLOT).value)
            if k is not None:
                glucose[k] = r.glucose_mgdl
        before = np.asarray(slots < self._run_start)
        if before.any() and trusted and trusted[0].time >= self._run_start:
            glucose[before] = trusted[0].glucose_mgdl  # steady state before the run (as trials do)
        carbs = np.zeros(len(slots))
        if len(carbs_hist):
            for ts, g in zip(carbs_hist["time"], carbs_hist["carbs_g"]):
                k = idx.get(pd.Timestamp(ts).floor(SLOT).value)
                if k is not None:
                    carbs[k] += float(g)
        basal, bolus = basal.copy(), bolus.copy()
        basal[-1], bolus[-1], carbs[-1] = sched, 0.0, carbs_now  # this slot: decided now
        fut = pd.date_range(t + SLOT, periods=w.horizon_slots, freq=SLOT)
        frame = pd.DataFrame(
            {
                "subject_id": name,
                "time": slots.append(fut),
                "glucose": np.r_[glucose, np.full(len(fut), np.nan)],
                "basal_u": np.r_[basal, np.full(len(fut), sched)],
                "bolus_u": np.r_[bolus, np.zeros(len(fut))],
                "carbs_g": np.r_[carbs, np.zeros(len(fut))],
            }
        )
        frame["subject_id"] = frame["subject_id"].astype("string")
        past, future = inputs_at(frame, w, t)
        return past[0], future[0]

    def _input(self, i: int, p: _Prepared, t: pd.Timestamp) -> ControlInput | None:
        if p.past is None or p.future is None:
            return None
        return ControlInput(
            time=t,
            past=p.past,
            future=p.future,
            glucose_mgdl=p.cgm.glucose_mgdl,
            iob_u=p.iob_u,
            settings=self.settings[i],
            carbs_announced_g=p.carbs_g,
        )

    def _predict(self, i: int, p: _Prepared, proposal: Proposal) -> tuple[np.ndarray | None, str]:
        """The forecast under the proposed plan (the controller's when it gave one)."""
        if proposal.predicted_mgdl is not None:
            return np.asarray(proposal.predicted_mgdl), "controller"
        if p.past is None or p.future is None:
            return None, "none"
        past, future = plan_window(p.past, p.future, self.window, proposal, self.settings[i])
        try:
            fc = getattr(self.predictor, "forecast", None)
            if fc is not None:
                f = fc(past[None], future[None], settings=[self.settings[i]])
                return np.asarray(f.glucose[0]), f.source
            return np.asarray(self.predictor.predict(past[None], future[None])[0]), "predictor"
        except Exception as e:  # a failing predictor → no trustworthy prediction
            p.notes.append(("fault", {"predictor": f"{type(e).__name__}: {e}"}))
            return np.full((self.window.horizon_slots, 1), np.nan), "failed"

    def _decide_and_act(self, i: int, p: _Prepared, proposal: Proposal, t, now) -> PatientCycle:
        name, sup = self.names[i], self.supervisors[i]
        pred, source = self._predict(i, p, proposal)
        if pred is not None and proposal.predicted_mgdl is None:
            proposal = Proposal(proposal.temp_basal_u_per_h, proposal.duration_min, proposal.bolus_u,
                                proposal.reason, pred)  # fmt: skip
        state = SafetyState(now=now, iob_u=p.iob_u, cgm=p.cgm, pump=p.pump,
                            unconfirmed_bolus_u=p.unconfirmed_u, journal_ok=p.journal_ok)  # fmt: skip
        verdict = sup.check(proposal, state)
        results: list[CommandResult] = []
        events = list(p.notes)
        events += [("veto", {"reason": r, "fallback": verdict.fallback}) for r in verdict.vetoes]
        if self.mode == "closed":  # open loop: the pump runs its schedule; the verdict is advice
            results = sup.apply(verdict, t, journal_vetoes=False)  # vetoes go with the cycle
        last = getattr(self.predictor, "last", None)
        if source == "controller":  # the controller's forecast: say which forecaster made it
            source = getattr(last, "source", "controller")
        label = f"{_predictor_label(self.predictor)}:{source}"
        if label != self._last_label.get(name):  # journal when the forecaster in use changes
            reasons = "; ".join(getattr(last, "reasons", []) or []) if source != "model" else ""
            events.append(
                ("predictor", {"from": self._last_label.get(name), "to": label, "why": reasons})
            )
            self._last_label[name] = label
        journal_ok = p.journal_ok
        try:
            self.journal.record_cycle(
                patient=name, time=t, readings=p.readings, glucose=p.cgm.glucose_mgdl, iob_u=p.iob_u,
                verdict=verdict, mode=self.mode, proposal=proposal, prediction=pred, carbs_g=p.carbs_g,
                predictor=label, events=events,
                detail={"cgm": p.cgm.problem.label, "cgm_detail": p.cgm.detail,
                        "unconfirmed_bolus_u": p.unconfirmed_u,
                        "commands": [{"key": r.command.key, "status": r.status} for r in results]},
            )  # fmt: skip
        except JournalError as e:
            journal_ok = False
            self._journal_down(t, e)
        return PatientCycle(name, t, p.cgm.glucose_mgdl, p.iob_u, proposal, verdict, results,
                            label, journal_ok, p.readings)  # fmt: skip


def plan_window(
    past: np.ndarray,
    future: np.ndarray,
    w: WindowConfig,
    proposal: Proposal,
    settings: PatientSettings,
) -> tuple[np.ndarray, np.ndarray]:
    """Write one proposal into a window: this slot's insulin in the last past row (and its
    IOB), the temp basal for the rest of its duration then scheduled basal in `future`."""
    past, future = past.copy(), future.copy()
    slot_h = w.slot_minutes / 60.0
    rate = (
        proposal.temp_basal_u_per_h
        if math.isfinite(proposal.temp_basal_u_per_h)
        else settings.basal_u_per_h
    )
    bolus = proposal.bolus_u if math.isfinite(proposal.bolus_u) and proposal.bolus_u > 0 else 0.0
    rate = max(0.0, rate)
    pb, pbo = w.past_index("basal_u"), w.past_index("bolus_u")
    given = float(past[-1, pb] + past[-1, pbo])
    past[-1, pb], past[-1, pbo] = rate * slot_h, bolus
    if "iob_u" in w.past_features:
        past[-1, w.past_index("iob_u")] += rate * slot_h + bolus - given
    n_temp = max(0, int(min(proposal.duration_min, 30) // w.slot_minutes) - 1)
    fb = w.future_index("basal_u")
    future[:, fb] = settings.basal_u_per_h * slot_h
    future[:n_temp, fb] = rate * slot_h
    return past, future


def iob_before(dose: np.ndarray, kernel: np.ndarray) -> float:
    """IOB at the start of the last slot, before its own dose: Σ_{m≥1} kernel[m]·dose[−1−m].

    `dose` is U per slot, oldest first, the last slot being the current one; `kernel` is
    `InsulinCurve.iob_kernel` (kernel[0] = 1). The same quantity as the trial's
    `CohortHistory.iob_before` and what `ControlInput.iob_u` holds.
    """
    d = np.asarray(dose, dtype=float)[:-1][::-1][: len(kernel) - 1]
    return float(d @ kernel[1 : 1 + len(d)])


def _empty_carbs() -> pd.DataFrame:
    return pd.DataFrame({"time": pd.to_datetime([], utc=True), "carbs_g": []})


def _predictor_label(predictor: Any) -> str:
    if predictor is None:
        return "none"
    reason = getattr(predictor, "degraded_reason", "")
    if getattr(predictor, "primary", True) is None:
        return f"fallback ({reason})" if reason else "fallback"
    manifest = getattr(predictor, "manifest", None)
    sha = getattr(manifest, "sha256", "")
    return f"model {sha[:12]}" if sha else type(predictor).__name__


# --------------------------------------------------------------------------- the runner


@dataclass
class RunSummary:
    cycles: int
    start: pd.Timestamp
    end: pd.Timestamp
    stopped_by: str
    wall_s: float


class StopFlag:
    """Set by SIGINT/SIGTERM; the runner finishes its cycle, journals the stop and returns."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.reason = ""

    def set(self, reason: str) -> None:
        self.reason = self.reason or reason
        self.event.set()

    def __bool__(self) -> bool:
        return self.event.is_set()

    def install(self) -> Callable[[], None]:
        """Handle SIGINT and SIGTERM; returns a function restoring the previous handlers."""
        if threading.current_thread() is not threading.main_thread():
            return lambda: None
        old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

        def handler(signum, frame):
            self.set(signal.Signals(signum).name)

        for s in old:
            signal.signal(s, handler)
        return lambda: [signal.signal(s, h) for s, h in old.items()] and None


def run_loop(
    loop: ControlLoop,
    *,
    until: pd.Timestamp | None = None,
    speed: str = "fast",
    stop: StopFlag | None = None,
    on_cycle: Callable[[list[PatientCycle]], None] | None = None,
    max_cycles: int | None = None,
) -> RunSummary:
    """Cycle every 5 minutes of the backend's clock until `until`, `max_cycles` or a signal.

    ``fast``: simulated time advances as soon as a cycle is done. ``realtime``: each cycle
    waits out its 5 wall-clock minutes (interruptibly) before simulated time advances.
    """
    if speed not in ("fast", "realtime"):
        raise LoopError(f"speed must be fast or realtime, got {speed!r}")
    stop = stop or StopFlag()
    restore = stop.install()
    t_wall = _time.monotonic()
    start = loop.backend.now()
    n = 0
    reason = "until"
    try:
        while True:
            if stop:
                reason = stop.reason
                break
            if until is not None and loop.backend.now() >= until:
                break
            if max_cycles is not None and n >= max_cycles:
                reason = "max_cycles"
                break
            t0 = _time.monotonic()
            recs = loop.cycle()
            n += 1
            if on_cycle is not None and recs:
                on_cycle(recs)
            if speed == "realtime":
                left = CYCLE_MINUTES * 60.0 - (_time.monotonic() - t0)
                if left > 0 and stop.event.wait(left):
                    reason = stop.reason
                    break
            if stop:  # a signal during the cycle: it finished; time does not move on
                reason = stop.reason
                break
            loop.backend.advance(CYCLE_MINUTES)
    finally:
        restore()
        loop.stop(reason)
    return RunSummary(n, start, loop.backend.now(), reason, _time.monotonic() - t_wall)
