"""The runtime loop: one cycle, and the runner that repeats it every 5 minutes.

The loop runs in one of three modes (`serving.modes`): ``monitor`` (CGM, forecast and
alerts; the pump is never commanded), ``advisory`` (the supervisor-checked proposal is
offered as advice; only what a person confirms is carried out, through the supervisor, see
`serving.insilico.advisory`) and ``closed`` (the supervisor carries out every checked proposal).

A cycle, for every patient of a backend at once:

1. read the CGM (the readings as the device reports them) and judge them (`assess_cgm`);
2. update state from the journal: copy the pump's new deliveries in, resolve commands left
   unresolved, rebuild insulin on board from the delivered insulin (`insulin_history`);
3. build the model inputs with `forecast.windows.windows_from_slots` (the window builder's
   array form, which the trial calls too) from the slot arrays of trusted readings,
   delivered insulin and announced carbs — no frame is built per cycle;
4. the controller proposes (one batched call; not in monitor mode, where the proposal is
   the pump's schedule); the prediction that goes with a proposal is the controller's, or
   the loop's own under the proposed plan;
5. the supervisor checks each proposal and commands the pump with keys derived from
   (patient, cycle time, kind) — the only road to the pump: in closed mode the verdict, in
   advisory mode what the person confirmed this cycle (checked again now), in monitor mode
   nothing;
6. the alert engine (`serving.alerts`) takes the newest reading, the forecast of what the
   pump will do (in advisory mode: of the schedule, as if nobody acted) and the pump's
   faults;
7. the cycle is journaled whole, in one transaction: readings, prediction, proposal,
   verdict, fallback, mode, and its events — vetoes, faults, alerts, advice offered,
   confirmed, refused or re-advised. The alert engine's state and the advice waiting for an
   answer go into the cycle's detail, so a restarted loop neither repeats an alarm nor
   forgets a question it asked.

A mode is chosen at start; a journal that continues under another mode records the change
(a ``mode`` event, and a warning on stderr). A killed loop restarts where it stopped: a
cycle already journaled is not run again, a cycle interrupted halfway is re-run with the
same keys (the supervisor reuses what the journal and the pump already know, never sends a
key twice), and IOB comes back from the journal. A journal that cannot be written does not stop the loop: insulin is limited to
scheduled basal (see `serving.journal`), a warning is printed every cycle and the recovery
is journaled.

`run_loop` repeats cycles on a backend's clock: ``fast`` (simulated time, as fast as it
goes) or ``realtime`` (a 5-minute wall-clock cycle), until `until` or SIGINT/SIGTERM — the
current cycle always finishes and the journal is closed cleanly.
"""

from __future__ import annotations

import json
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

from forecast.insulin import iob_before
from forecast.schema import SLOT, SLOT_MINUTES, GlucastError
from forecast.windows import PROFILE_FEATURES, WindowConfig, history_slots, windows_from_slots
from serving.alerts import Alert, AlertEngine, AlertForecast, AlertThresholds
from serving.controllers import Controller, meal_bolus_u
from serving.engine import CycleEngine
from serving.hal.cgm import CGM, CGMError
from serving.hal.pump import Delivery, Pump, PumpError, PumpStatus
from serving.journal import InsulinRecord, Journal, JournalError
from serving.modes import (
    BOLUS_MIN_U,
    MODE_ALIASES,
    Mode,
    ModeError,
    advice_from_verdict,
    bolus_advice,
    is_actionable,
    parse_mode,
    same_plan,
    scheduled_proposal,
)
from serving.predictor import Forecaster
from serving.safety import CommandResult, SafetyState, Supervisor, assess_cgm
from serving.types import (
    CGMStatus,
    ControlInput,
    PatientSettings,
    Proposal,
    Reading,
    SlotHistory,
    Verdict,
)

CYCLE_MINUTES = SLOT_MINUTES
MODES = (*(m.value for m in Mode), *MODE_ALIASES)  # "open": advisory with nobody to confirm


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

    def profile(self, i: int, times: pd.DatetimeIndex) -> dict[str, np.ndarray]:
        """The therapy profile in effect at each of `times` (a model's static inputs)."""
        ...

    def prior_daily_dose_u(self, i: int) -> float | None:
        """Total daily insulin before the run began (the pump history's; None: unknown, the
        scheduled basal is counted)."""
        ...

    def advance(self, minutes: int) -> None: ...


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
    mode: str = Mode.CLOSED.value
    alerts: list[Alert] = field(default_factory=list)  # raised this cycle
    advice: list[dict[str, Any]] = field(default_factory=list)  # advice events this cycle
    confirmed: Verdict | None = None  # advisory: the verdict on what the person confirmed


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
    index: int  # the patient's position in the backend
    history: SlotHistory | None = None  # the raw record the windows were built from


class ControlLoop:
    """The cycle for every patient of a backend, journaled; see the module docstring.

    `mode` is ``monitor``, ``advisory`` or ``closed`` (``open``: advisory with nobody to
    confirm). `person` answers advice in advisory mode (a `serving.insilico.advisory.AdvisoryPerson`
    over the backend's patients; None: advice is journaled and never carried out).
    `alert_thresholds` are every patient's alert settings (default: `AlertThresholds()`).
    """

    def __init__(
        self,
        backend: Backend,
        journal: Journal,
        controller: Controller | None,
        predictor: Forecaster | None,
        *,
        mode: str | Mode = Mode.CLOSED,
        window: WindowConfig | None = None,
        log: Callable[[str], None] | None = None,
        person: Any = None,
        alert_thresholds: AlertThresholds | None = None,
    ) -> None:
        try:
            self.mode = parse_mode(mode)
        except ModeError as e:
            raise LoopError(f"mode must be one of {MODES}, got {mode!r}") from e
        self.backend, self.journal, self.controller, self.predictor = (
            backend,
            journal,
            controller,
            predictor,
        )
        if person is not None and self.mode is not Mode.ADVISORY:
            raise LoopError(f"a person confirms advice in advisory mode only, not {self.mode}")
        if person is not None and getattr(person, "n", len(backend.names)) != len(backend.names):
            raise LoopError(f"the person answers for {person.n} patients, the backend has "
                            f"{len(backend.names)}")  # fmt: skip
        self.person = person
        self.window = window or (predictor.config if predictor is not None else WindowConfig())
        w = self.window
        self.engine = CycleEngine(controller, predictor, w)
        self.k_ins = w.insulin_curve.iob_kernel(w.slot_minutes)  # [K], k[0] = 1
        # the record each cycle reads back: the past window plus the longest look-back of a
        # feature (IOB/COB kernels, 24 h for the daily dose)
        self.span = history_slots(w)
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
        self.alert_thresholds = alert_thresholds or AlertThresholds()
        self.alert_engines = [AlertEngine(self.alert_thresholds) for _ in self.names]
        self._late_alerts: dict[str, list[Alert]] = {n: [] for n in self.names}

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
        mode = self.mode.value
        last_mode = j.meta("mode")
        if last_mode != mode:  # a new run, or a journal continued under another mode
            why = "run started" if last_mode is None else "restarted in another mode"
            j.set_meta("mode", mode)
            j.event("mode", {"from": last_mode, "to": mode, "why": why}, time=self.backend.now())
            if last_mode is not None:
                self.log(f"glucast loop: warning: {j.path} ran in {last_mode} mode; "
                         f"continuing in {mode} mode (journaled)")  # fmt: skip
        for i, name in enumerate(self.names):
            j.reconcile(self.backend.pump(i), name)
            self._restore(i, name)
        person = getattr(self.person, "describe", lambda: None)()
        j.event("start", {"mode": mode, "controller": self.controller.name if self.controller else "none",
                          "predictor": self.predictor.label if self.predictor is not None else "none",
                          "person": person if self.mode is Mode.ADVISORY else None,
                          "alerts": self.alert_thresholds.to_dict()}, time=self.backend.now())  # fmt: skip

    def _restore(self, i: int, name: str) -> None:
        """Alert state and the advice awaiting an answer, from the patient's last cycle."""
        last = self.journal.cycles(name, last=1)
        if not len(last):
            return
        try:
            detail = json.loads(last["detail"].iloc[-1] or "{}")
        except ValueError:
            detail = {}
        state = detail.get("alerts")
        if state:
            eng = AlertEngine.from_state(state)
            eng.thresholds = self.alert_thresholds  # this run's settings, the episodes kept
            self.alert_engines[i] = eng
        waiting = detail.get("advice_open")
        if not waiting:
            return
        if self.person is not None and str(last["mode"].iloc[-1]) == self.mode.value:
            self.person.restore(i, waiting)
        else:  # the question asked under another mode (or of a person now absent) is withdrawn
            self.journal.event("advice", {"action": "withdrawn", "why": "loop restarted without it",
                                          "offered": waiting.get("offered"), "advised": waiting.get("plan")},
                               patient=name, time=self.backend.now())  # fmt: skip

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
        settings = [self.settings[i] for i in todo]
        states = [self._state(p, now) for p in prepared]
        d = self.engine.decide(inputs, settings, states, self.mode)
        out = []
        for k, i in enumerate(todo):
            prepared[k].notes.extend(d.events[k])
            out.append(self._act(i, prepared[k], d.proposals[k], d.verdicts[k], d.sources[k],
                                 states[k], t, now))  # fmt: skip
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
        # a controller that reads the raw record (a peer: `reads_history`) gets the CGM's
        # readings over the whole record span, as a rig keeps them (the model needs only the
        # past window's); the same slots as the trial's record
        older: list[Reading] = []
        if getattr(self.controller, "reads_history", False):
            try:
                older = list(self.backend.cgm(i).recent(self.span * self.window.slot_minutes))
            except CGMError:
                older = []
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
        past = future = history = None
        try:
            past, future, history = self._window(
                i, slots, check.readings, basal, bolus, carbs_hist, carbs_now, older
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
            i,
            history,
        )

    def _journal_down(self, t: pd.Timestamp, e: Exception) -> None:
        if self._journal_down_since is None:
            self._journal_down_since = t
        self.log(
            f"glucast loop: warning: journal unavailable since {self._journal_down_since} ({e}); "
            "insulin limited to scheduled basal, no bolus"
        )

    def _window(
        self,
        i: int,
        slots: pd.DatetimeIndex,
        trusted: Sequence[Reading],
        basal: np.ndarray,
        bolus: np.ndarray,
        carbs_hist: pd.DataFrame,
        carbs_now: float,
        older: Sequence[Reading] = (),
    ) -> tuple[np.ndarray, np.ndarray, SlotHistory]:
        """The model inputs at the cycle's slot from the patient's record on the slot grid
        (`forecast.windows.windows_from_slots`, the function the trial calls too), and that
        record as a `SlotHistory` (what the peers' adapters read, as the trial gives them)."""
        w = self.window
        sched = self.settings[i].basal_u_per_h * w.slot_minutes / 60.0
        slot_ns = slots.as_unit("ns").asi8  # [T]
        t0, n = int(slot_ns[0]), len(slot_ns)

        def column(times: Sequence[pd.Timestamp]) -> np.ndarray:
            """Slot index of each time ([-1] outside the span)."""
            ns = pd.DatetimeIndex(list(times)).as_unit("ns").asi8  # [R]
            k = (ns - t0) // SLOT.value  # t0 is on the slot grid: this floors each time
            return np.where((k >= 0) & (k < n), k, -1)

        glucose = np.full(n, np.nan)
        for k, r in zip(column([r.time for r in trusted]), trusted):
            if k >= 0:
                glucose[k] = r.glucose_mgdl  # a later reading in the same slot wins
        before = slot_ns < self._run_start.value
        if before.any() and trusted and trusted[0].time >= self._run_start:
            glucose[before] = trusted[0].glucose_mgdl  # steady state before the run (as trials do)
        carbs = np.zeros(n)
        if len(carbs_hist):
            ks = column(list(carbs_hist["time"]))
            grams = carbs_hist["carbs_g"].to_numpy(dtype=float)
            np.add.at(carbs, ks[ks >= 0], grams[ks >= 0])
        basal, bolus = basal.copy(), bolus.copy()
        basal[-1], bolus[-1], carbs[-1] = sched, 0.0, carbs_now  # this slot: decided now
        profile = None
        if any(k in w.past_features for k in PROFILE_FEATURES):  # static inputs of the model
            profile = {
                k: np.asarray(v, float)[None] for k, v in self.backend.profile(i, slots).items()
            }
        prior = self.backend.prior_daily_dose_u(i)
        past, future, ok = windows_from_slots(
            w,
            glucose=glucose[None],
            basal_u=basal[None],
            bolus_u=bolus[None],
            carbs_g=carbs[None],
            first_slot_ns=t0,
            future_basal_u=np.array([sched]),
            profile=profile,
            daily_dose_before_u=None
            if prior is None
            else np.array([prior / (1440 // w.slot_minutes)]),
            known_from=int(before.sum()),
        )  # [1, L, F_past], [1, H, F_future]
        if not ok[0]:
            raise LoopError(
                f"no glucose reading at or before the start of the past window ({w.past_slots} "
                f"slots before {slots[-1]}): no model inputs this cycle"
            )
        hist_glucose = glucose.copy()
        if older:  # readings before the past window, and the run's first one as steady state
            ok = [r for r in older if r.status is CGMStatus.OK and math.isfinite(r.glucose_mgdl)]
            for k, r in zip(column([r.time for r in ok]), ok):
                if k >= 0 and not math.isfinite(hist_glucose[k]):
                    hist_glucose[k] = r.glucose_mgdl
            if before.any() and ok and ok[0].time >= self._run_start:
                hist_glucose[before] = ok[0].glucose_mgdl
        history = SlotHistory(
            slot_ns.astype("datetime64[ns]"), hist_glucose, basal, bolus, carbs
        )  # the trial's form: UTC slot starts as datetime64[ns], oldest first
        return past[0], future[0], history

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
            history=p.history,
        )

    def _predict(self, i: int, p: _Prepared, proposal: Proposal) -> tuple[np.ndarray | None, str]:
        """The forecast under one plan (the controller's when it gave one)."""
        ((pred, source),) = self.engine.forecast_plans(
            [self._input(i, p, self.cycle_time())], [proposal], [self.settings[i]], [p.notes]
        )
        return pred, source

    def _state(self, p: _Prepared, now: pd.Timestamp) -> SafetyState:
        """What the supervisor knows of a patient this cycle."""
        return SafetyState(now=now, iob_u=p.iob_u, cgm=p.cgm, pump=p.pump,
                           unconfirmed_bolus_u=p.unconfirmed_u, journal_ok=p.journal_ok,
                           meal_bolus_u=meal_bolus_u(p.carbs_g, self.settings[p.index]))  # fmt: skip

    def _act(self, i: int, p: _Prepared, proposal: Proposal, verdict: Verdict, source: str,
             state: SafetyState, t: pd.Timestamp, now: pd.Timestamp) -> PatientCycle:  # fmt: skip
        """Carry out one patient's decision: pump, advice, alerts, journal."""
        name, sup = self.names[i], self.supervisors[i]
        pred = None if proposal.predicted_mgdl is None else np.asarray(proposal.predicted_mgdl)
        events = list(p.notes)
        last = self.predictor.last if self.predictor is not None else None
        if source == "controller" and last is not None:  # say which forecaster made it
            source = last.source
        label = f"{self.predictor.label if self.predictor is not None else 'none'}:{source}"
        if label != self._last_label.get(name):  # journal when the forecaster in use changes
            reasons = "; ".join(getattr(last, "reasons", []) or []) if source != "model" else ""
            events.append(
                ("predictor", {"from": self._last_label.get(name), "to": label, "why": reasons})
            )
            self._last_label[name] = label
        results: list[CommandResult] = []
        advice: list[dict[str, Any]] = []
        confirmed: Verdict | None = None
        alert_pred = pred
        if self.mode is not Mode.MONITOR:  # in monitor mode nothing was judged, nothing is sent
            events += [
                ("veto", {"reason": r, "fallback": verdict.fallback}) for r in verdict.vetoes
            ]
            if self.mode is Mode.CLOSED:
                results = sup.apply(verdict, t, journal_vetoes=False)  # vetoes go with the cycle
            else:
                results, advice, confirmed, alert_pred = self._advise(
                    i, p, proposal, verdict, state, t, events
                )
        alerts = self._alerts(i, p, now, t, alert_pred, source)
        late, self._late_alerts[name] = self._late_alerts[name], []
        events += [("alert", {**a.to_dict(), "late": True}) for a in late]
        events += [("alert", a.to_dict()) for a in alerts]
        events += [("advice", a) for a in advice]
        detail: dict[str, Any] = {
            "cgm": p.cgm.problem.label, "cgm_detail": p.cgm.detail,
            "unconfirmed_bolus_u": p.unconfirmed_u,
            "commands": [{"key": r.command.key, "status": r.status} for r in results],
            "alerts": self.alert_engines[i].state_dict(),
        }  # fmt: skip
        if self.person is not None:
            detail["advice_open"] = self.person.state(i)
        if confirmed is not None:
            detail["confirmed"] = {"temp_basal_u_per_h": confirmed.temp_basal_u_per_h,
                                   "duration_min": confirmed.duration_min,
                                   "bolus_u": confirmed.bolus_u, "fallback": confirmed.fallback}  # fmt: skip
        journal_ok = p.journal_ok
        try:
            self.journal.record_cycle(
                patient=name, time=t, readings=p.readings, glucose=p.cgm.glucose_mgdl, iob_u=p.iob_u,
                verdict=verdict, mode=self.mode.value, proposal=proposal, prediction=pred,
                carbs_g=p.carbs_g, predictor=label, events=events, detail=detail,
            )  # fmt: skip
        except JournalError as e:
            journal_ok = False
            self._journal_down(t, e)
            self._late_alerts[name] = [*late, *alerts]  # journaled with the next cycle that can be
        for a in alerts:
            self.log(f"glucast loop: ALERT {name} {a.time:%H:%M} [{a.severity}] {a.message}")
        return PatientCycle(name, t, p.cgm.glucose_mgdl, p.iob_u, proposal, verdict, results,
                            label, journal_ok, p.readings, self.mode.value, alerts, advice,
                            confirmed)  # fmt: skip

    def _advise(
        self,
        i: int,
        p: _Prepared,
        proposal: Proposal,
        verdict: Verdict,
        state: SafetyState,
        t: pd.Timestamp,
        events: list[tuple[str, dict[str, Any]]],
    ) -> tuple[list[CommandResult], list[dict[str, Any]], Verdict | None, np.ndarray | None]:
        """Advisory mode: offer the verdict as advice; carry out what the person confirms.

        Returns (commands sent, advice events, verdict on the confirmed plan, the forecast
        the alerts should see: that of the pump's schedule, as if nobody acted).
        """
        s, sup = self.settings[i], self.supervisors[i]
        advice = advice_from_verdict(verdict, proposal, s)
        running = p.pump.current_rate_u_per_h if p.pump is not None else s.basal_u_per_h
        bolus = None
        if advice.bolus_u >= BOLUS_MIN_U or proposal.bolus_u >= BOLUS_MIN_U:
            bolus = bolus_advice(time=t, glucose_mgdl=p.cgm.glucose_mgdl, iob_u=p.iob_u,
                                 carbs_g=p.carbs_g, settings=s, proposed_u=proposal.bolus_u,
                                 advised_u=advice.bolus_u, predicted=proposal.predicted_mgdl,
                                 vetoes=verdict.vetoes, slot_minutes=self.window.slot_minutes)  # fmt: skip
        out: list[dict[str, Any]] = []
        results: list[CommandResult] = []
        confirmed: Verdict | None = None
        if self.person is None:  # nobody to confirm: the advice is journaled, nothing more
            if is_actionable(advice, running):
                out.append({"action": "offered", "confirm": "nobody", "plan": _plan(advice),
                            "bolus": None if bolus is None else bolus.to_dict()})  # fmt: skip
        else:
            offer, answer = self.person.step(
                i, t, advice, glucose_mgdl=p.cgm.glucose_mgdl, iob_u=p.iob_u, settings=s,
                carbs_g=p.carbs_g, running_u_per_h=running, bolus=bolus,
            )  # fmt: skip
            said = [] if answer is None else [answer.event()]
            shown = [] if offer is None else [offer.event()]
            # the withdrawn suggestion goes first; an answer to a new one after its offer
            out += (
                said + shown
                if answer is not None and answer.action == "superseded"
                else shown + said
            )
            if answer is not None and answer.proposal is not None:
                plan = answer.proposal
                if same_plan(plan, advice):
                    plan = advice
                else:  # forecast the confirmed plan from now before the supervisor judges it
                    plan = Proposal(plan.temp_basal_u_per_h, plan.duration_min, plan.bolus_u,
                                    plan.reason)  # fmt: skip
                    got, _ = self._predict(i, p, plan)
                    plan.predicted_mgdl = got
                confirmed = sup.check(plan, state)
                events += [("veto", {"reason": r, "fallback": confirmed.fallback, "confirmed": True})
                           for r in confirmed.vetoes]  # fmt: skip
                results = sup.apply(confirmed, t, journal_vetoes=False)
        # the alerts see what happens if nobody acts (or what was just confirmed)
        if confirmed is not None:
            return results, out, confirmed, proposal.predicted_mgdl
        neutral = scheduled_proposal(s)
        if same_plan(proposal, neutral):
            return results, out, confirmed, proposal.predicted_mgdl
        pred, _ = self._predict(i, p, neutral)
        return results, out, confirmed, pred

    def _alerts(
        self, i: int, p: _Prepared, now: pd.Timestamp, t: pd.Timestamp,
        pred: np.ndarray | None, source: str,
    ) -> list[Alert]:  # fmt: skip
        """One step of the patient's alert engine: newest reading, forecast, pump faults."""
        reading = max(p.readings, key=lambda r: r.time) if p.readings else None
        fc = None
        q = tuple(self.predictor.quantiles) if self.predictor is not None else ()
        if pred is not None and source not in ("failed", "none"):
            g = np.asarray(pred, dtype=float)
            if g.ndim == 2 and g.shape[1] == len(q) and np.isfinite(g).all():
                physio = source in ("fallback", "mixed") or self.predictor.physiological
                fc = AlertForecast(t, g, q, source="physio" if physio else "model",
                                   slot_minutes=self.window.slot_minutes)  # fmt: skip
        faults = None if p.pump is None else ([str(p.pump.fault)] if p.pump.fault else [])
        return self.alert_engines[i].update(now, reading, forecast=fc, pump_faults=faults)


def _plan(p: Proposal) -> dict[str, Any]:
    return {"temp_basal_u_per_h": p.temp_basal_u_per_h, "duration_min": p.duration_min,
            "bolus_u": p.bolus_u, "reason": p.reason}  # fmt: skip


def _empty_carbs() -> pd.DataFrame:
    return pd.DataFrame({"time": pd.to_datetime([], utc=True), "carbs_g": []})


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
