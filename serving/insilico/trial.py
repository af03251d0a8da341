"""In-silico trials: a whole cohort in closed loop, stepped together in accelerated time.

Every 5 minutes, for all N patients at once:

    CGM readings → windows (`forecast.windows.IncrementalWindows`, the builder's incremental form) →
    controller.propose (the MPC makes ONE batched forecaster call for all patients ×
    candidates) → `serving.safety.check_batch` (the supervisor, one vectorised decision) →
    the supervisor's own command translation (`Supervisor.commands_for`) → `CohortPump` →
    `forecast.sim.Simulator.step`.

Only the supervisor's verdicts reach the pump: a controller's proposal never touches
delivery. `TrialConfig.mode` runs the same patients in the three operating modes of
`serving.modes`: closed (the above), advisory (the verdict is offered as advice to a
simulated person, `serving.insilico.advisory.AdvisoryPerson`, and only what they confirm is checked
again and sent: `serving.insilico.advisory.confirm_batch`) and monitor (the controller is never asked;
the pump runs its schedule). `CohortPump` is the thin cohort stand-in for a pump HAL: it executes the exact
commands a real pump would get (temp basals that expire after their duration, cancels,
boluses) on the simulator's vectorised pump.

Outcomes are computed with `forecast.glycemia` on the CGM readings (the consensus standard:
what a patient's device records) and, separately, on the simulator's true plasma glucose
sampled at the same 5-minute cycles (`bg_*` keys). The log keeps every cycle's proposal,
verdict, delivery and supervisor limits, so "no limit was ever exceeded" is checked on the
record (`TrialResult.limit_violations`), not assumed.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from forecast.schema import GLUCOSE_MIN_MGDL, SLOT_MINUTES, GlucastError
from forecast.windows import IncrementalWindows, WindowConfig
from serving.controllers import (
    CONTROLLER_NAMES,
    Controller,
    meal_bolus_u,
)
from serving.hal.pump import CommandKind
from serving.insilico.cohort import SENSORS, make_simulator, settings_for
from serving.predictor import Forecaster
from serving.types import (
    CGMStatus,
    ControlInput,
    PatientSettings,
    Proposal,
    Reading,
    SlotHistory,
    profile_arrays,
)


class TrialError(GlucastError, ValueError):
    """A trial that cannot run as configured."""


# --------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class TrialConfig:
    """One trial: who, how long, which meals and sensor, which controller."""

    controller: str = "mpc"
    patients: str = "all"
    days: float = 1.0
    scenario: str = "random"
    seed: int = 0
    carb_error: float = 0.0  # SD of the relative carb-count error of announcements
    unannounced: bool = False  # meals are eaten but never announced
    sensor: str = "dexcom"  # see SENSORS
    pump: str = "Insulet"
    model_dir: str | None = None
    start: str = "2018-01-01 00:00"
    target_mgdl: float = 110.0
    mode: str = "closed"  # closed | advisory | monitor (see serving.modes)
    accept_prob: float = 0.8  # advisory: chance the simulated person accepts an advice
    accept_delay_min: float = 10.0  # advisory: minutes before the person answers
    # intra-patient variability, as `glucast simulate --variability` takes it: none, all, or
    # e.g. "circadian,meals=0.2" (forecast.sim.variability.VariabilityConfig.parse)
    variability: str = "none"

    def __post_init__(self) -> None:
        from serving.modes import ModeError, parse_mode

        if self.controller not in CONTROLLER_NAMES:
            raise TrialError(f"unknown controller {self.controller!r}; choose {CONTROLLER_NAMES}")
        try:
            object.__setattr__(self, "mode", parse_mode(self.mode).value)
        except ModeError as e:
            raise TrialError(str(e)) from None
        if not 0.0 <= self.accept_prob <= 1.0:
            raise TrialError(f"accept_prob must be in [0, 1], got {self.accept_prob}")
        if not (math.isfinite(self.accept_delay_min) and self.accept_delay_min >= 0.0):
            raise TrialError(f"accept_delay_min must be >= 0 minutes, got {self.accept_delay_min}")
        if not (self.days > 0 and math.isfinite(self.days)):
            raise TrialError(f"days must be a positive number, got {self.days}")
        if self.scenario != "random":
            raise TrialError(f"unknown scenario {self.scenario!r}; trials use 'random'")
        if not 0.0 <= self.carb_error < 1.0:
            raise TrialError(f"carb_error is a relative SD in [0, 1), got {self.carb_error}")
        if self.sensor not in SENSORS:
            raise TrialError(f"unknown sensor {self.sensor!r}; choose {SENSORS}")
        from forecast.sim.errors import SimInputError

        try:
            self.variability_config()
        except SimInputError as e:
            raise TrialError(str(e)) from None

    def variability_config(self):
        """The `forecast.sim.variability.VariabilityConfig` that `variability` names."""
        from forecast.sim.variability import VariabilityConfig

        return VariabilityConfig.parse(self.variability)

    @property
    def cycles(self) -> int:
        return int(round(self.days * 24 * 60 / SLOT_MINUTES))


def make_trial_simulator(config: TrialConfig, patients):
    """The trial's simulator: `serving.insilico.cohort.make_simulator` for the config, with
    the run's length as a guard (stepping past it is an error)."""
    return make_simulator(
        patients,
        seed=config.seed,
        start=config.start,
        sensor=config.sensor,
        carb_error=config.carb_error,
        unannounced=config.unannounced,
        pump=config.pump,
        duration_min=config.cycles * SLOT_MINUTES,
        variability=config.variability_config(),
    )


# --------------------------------------------------------------------------- the pump side


class CohortPump:
    """N simulated pumps that take the supervisor's commands (the thin cohort HAL).

    Temp basals run for their duration and then the scheduled basal resumes by itself (a
    dead controller falls back to scheduled basal); boluses are delivered on the next step.
    Rates are sent in the pump's increments, never rounded above the supervisor's cap.
    """

    def __init__(
        self, scheduled_u_per_h: np.ndarray, cap_u_per_h: np.ndarray, increment: float = 0.05
    ) -> None:
        self.scheduled = np.asarray(scheduled_u_per_h, np.float64)
        self.cap = np.asarray(cap_u_per_h, np.float64)
        self.increment = float(increment)
        n = len(self.scheduled)
        self.temp_rate = np.zeros(n)
        self.temp_until = np.full(n, -np.inf)  # minute the temp basal ends
        self.pending_bolus = np.zeros(n)
        self.commands = 0

    def execute(self, i: int, commands: Sequence[Any], minute: float) -> None:
        for cmd in commands:
            cmd.validate()  # what pump firmware refuses, the cohort pump refuses too
            self.commands += 1
            if cmd.kind is CommandKind.TEMP_BASAL:
                self.temp_rate[i] = cmd.amount
                self.temp_until[i] = minute + cmd.duration_min
            elif cmd.kind is CommandKind.CANCEL_TEMP:
                self.temp_until[i] = -np.inf
            elif cmd.kind is CommandKind.BOLUS:
                self.pending_bolus[i] += cmd.amount
            else:
                raise TrialError(f"the cohort pump does not take {cmd.kind} in trials")

    def step_inputs(self, minute: float) -> tuple[np.ndarray, np.ndarray]:
        """(basal U/h [N], bolus U [N]) for the step starting at `minute`."""
        inc = self.increment
        rate = np.where(minute < self.temp_until, self.temp_rate, self.scheduled)
        if inc > 0:
            near = np.round(rate / inc) * inc
            rate = np.where(near > self.cap + 1e-9, np.floor(self.cap / inc + 1e-9) * inc, near)
        bolus, self.pending_bolus = self.pending_bolus, np.zeros_like(self.pending_bolus)
        return rate, bolus


# --------------------------------------------------------------------------- the trial

LOG_FIELDS = (
    "cgm",  # reading at the cycle (NaN = none)
    "bg",  # true plasma glucose at the cycle
    "iob",  # IOB before the cycle's dose (what the supervisor counted)
    "prop_rate",
    "prop_bolus",
    "ver_rate",
    "ver_bolus",
    "ver_duration",
    "sent_rate",  # U/h the pump was asked to run during the step
    "sent_bolus",
    "delivered_u",  # insulin that reached the patient in the step (basal + bolus)
    "carbs_announced",
    "carbs_eaten",
    "vetoed",  # 1 when the supervisor gave any veto reason (even if the proposal stood)
    "intervened",  # 1 when what the supervisor let through differs from the proposal
    "fallback",  # 0 none, 1 scheduled basal, 2 suspend
    "forecast_fallback",  # the controller's forecaster fell back this cycle
    "acted",  # 1 when the cycle's verdict was sent to the pump (always, in closed loop)
    "cmd_temp",  # U/h of the temp basal command sent this cycle (NaN: none sent)
    "cmd_temp_min",  # its duration (0: none)
    "cmd_bolus",  # U of the bolus command sent this cycle (0: none)
    "advice",  # advisory: 1 when an advice was offered this cycle
    "answer",  # advisory: the person's answer this cycle (see ANSWER_CODES; 0 = none)
    "controller_failed",  # 1 when the controller failed for the patient (scheduled basal)
)
ANSWER_CODES = {"confirmed": 1, "refused": 2, "readvised": 3, "superseded": 4}
FALLBACK_CODES = {"": 0, "scheduled_basal": 1, "suspend": 2}
# flags and codes are kept small (a year of 30 patients is 3.2 million cycles); the rest float64
LOG_DTYPES = {
    "vetoed": np.bool_,
    "intervened": np.bool_,
    "forecast_fallback": np.bool_,
    "acted": np.bool_,
    "advice": np.bool_,
    "controller_failed": np.bool_,
    "fallback": np.int8,
    "answer": np.int8,
}


@dataclass
class TrialResult:
    """Everything a trial recorded, and the outcomes computed from it."""

    config: TrialConfig
    names: list[str]
    settings: list[PatientSettings]
    times: pd.DatetimeIndex  # [T] cycle starts
    log: dict[str, np.ndarray]  # field → [N, T] (float64; flags bool, codes int8: LOG_DTYPES)
    veto_kinds: list[dict[str, int]]  # per patient: veto label → cycles
    cap_rate: np.ndarray  # [N] supervisor max basal (oref0 cap) U/h
    wall_s: float
    decision_s: np.ndarray  # [T] controller + supervisor time per cycle (whole cohort)
    forecaster_calls: int = -1
    info: dict[str, Any] = field(default_factory=dict)
    out_of_range: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))  # [N] sim flag

    @property
    def days(self) -> float:
        return len(self.times) * SLOT_MINUTES / 1440.0

    # -- outcomes ------------------------------------------------------------------------

    def patient_metrics(self) -> dict[str, dict[str, float]]:
        """Per patient: outcomes on CGM (plain keys) and on true BG (``bg_`` keys), insulin,
        supervisor interventions. Percentages in %."""
        from forecast.glycemia import outcomes

        out: dict[str, dict[str, float]] = {}
        t = len(self.times)
        for i, name in enumerate(self.names):
            cgm = outcomes(self.log["cgm"][i], expected_slots=t)
            # the simulator can be driven outside physiology (it flags it: `sim_out_of_range`);
            # such values are scored at the CGM floor so that outcomes stay defined
            bg = outcomes(np.clip(self.log["bg"][i], GLUCOSE_MIN_MGDL, None))
            m: dict[str, float] = {
                k: cgm[k]
                for k in ("tir", "tbr70", "tbr54", "tar180", "tar250", "cv", "mean", "sd",
                          "gmi", "lbgi", "hbgi", "coverage")
            }  # fmt: skip
            for k in ("tir", "tbr70", "tbr54", "tar180", "tar250", "cv", "mean", "lbgi", "hbgi"):
                m[f"bg_{k}"] = bg[k]
            m["bg_min"] = float(np.nanmin(self.log["bg"][i]))
            m["bg_max"] = float(np.nanmax(self.log["bg"][i]))
            m["tdi_u"] = float(self.log["delivered_u"][i].sum() / self.days)
            m["bolus_u_per_day"] = float(self.log["sent_bolus"][i].sum() / self.days)
            m["interventions"] = float(self.log["intervened"][i].sum())
            m["interventions_per_day"] = m["interventions"] / self.days
            m["veto_cycles"] = float(self.log["vetoed"][i].sum())
            m["suspend_fallbacks"] = float((self.log["fallback"][i] == 2).sum())
            m["forecast_fallbacks"] = float(self.log["forecast_fallback"][i].sum())
            m["sim_out_of_range"] = (
                float(bool(self.out_of_range[i])) if len(self.out_of_range) else 0.0
            )
            m["acted_cycles"] = float(self.log["acted"][i].sum())
            # the controller's failures (a peer's error or timeout → scheduled basal), and how
            # often the supervisor changed or vetoed a command the controller did give
            failed = self.log["controller_failed"][i] > 0
            m["controller_fallbacks"] = float(failed.sum())
            m["controller_interventions"] = float(((self.log["intervened"][i] > 0) & ~failed).sum())
            m["controller_vetoes"] = float(((self.log["vetoed"][i] > 0) & ~failed).sum())
            if self.config.mode == "advisory":
                m.update(self._advice_counts(i))
            out[name] = m
        return out

    def _advice_counts(self, i: int) -> dict[str, float]:
        """What the simulated person did with patient `i`'s advice (counts of cycles)."""
        ans = self.log["answer"][i]
        n = {k: float((ans == code).sum()) for k, code in ANSWER_CODES.items()}
        offered = float(self.log["advice"][i].sum())
        answered = n["confirmed"] + n["refused"] + n["readvised"]
        return {
            "advice_offered": offered,
            "advice_accepted": n["confirmed"] + n["readvised"],  # carried out (maybe updated)
            "advice_confirmed": n["confirmed"],  # carried out as offered
            "advice_readvised": n["readvised"],  # stale when confirmed: recalculated
            "advice_refused": n["refused"],
            "advice_superseded": n["superseded"],  # withdrawn unanswered for a meal bolus
            "advice_accept_rate": (
                (n["confirmed"] + n["readvised"]) / answered if answered else math.nan
            ),
        }

    def cohort_metrics(self, patients: dict[str, dict[str, float]] | None = None) -> dict:
        """Mean over patients of every patient metric (equal-length traces: the pooled
        value), plus medians and worst cases the safety criteria are stated in."""
        p = patients if patients is not None else self.patient_metrics()
        keys = list(next(iter(p.values())).keys())
        arr = {k: np.array([p[n][k] for n in p], dtype=np.float64) for k in keys}
        out = {
            k: float(np.nanmean(v)) if np.isfinite(v).any() else math.nan for k, v in arr.items()
        }
        for k in ("tir", "tbr70", "tbr54", "bg_tir", "bg_tbr70", "bg_tbr54"):
            out[f"{k}_median"] = float(np.nanmedian(arr[k]))
        for k in ("tbr70", "tbr54", "bg_tbr70", "bg_tbr54", "tar250"):
            out[f"{k}_max"] = float(np.nanmax(arr[k]))
        out["bg_min"] = float(np.nanmin(arr["bg_min"]))
        out["patients_with_tbr54"] = float((arr["tbr54"] > 0).sum())
        out["patients_with_bg_tbr54"] = float((arr["bg_tbr54"] > 0).sum())
        out["n_patients"] = float(len(p))
        out["days"] = self.days
        out["limit_violations"] = float(len(self.limit_violations()))
        # how the controller fared with the supervisor, in cycles over the cohort: its failures
        # (scheduled basal instead), and of the cycles it did decide, how often the supervisor
        # changed or vetoed its command (for a peer: the "changed or vetoed" count)
        for k in ("controller_fallbacks", "controller_interventions", "controller_vetoes"):
            out[f"{k}_total"] = float(np.nansum(arr[k]))
        decided = len(p) * len(self.times) - out["controller_fallbacks_total"]
        for k in ("controller_interventions", "controller_vetoes"):
            out[f"{k}_pct"] = 100.0 * out[f"{k}_total"] / decided if decided > 0 else math.nan
        return out

    def to_json(self) -> dict[str, Any]:
        """`{"cohort": {...}, "patients": {name: {...}}, "run": {...}}` (NaN → null)."""
        pm = self.patient_metrics()
        return {
            "cohort": _finite(self.cohort_metrics(pm)),
            "patients": {n: _finite(m) for n, m in pm.items()},
            "run": _finite(self.run_info()),
        }

    def run_info(self) -> dict[str, Any]:
        d = self.decision_s * 1000.0
        return {
            **asdict(self.config),
            "cycles": len(self.times),
            "wall_s": self.wall_s,
            "decision_ms_p50": float(np.percentile(d, 50)) if d.size else math.nan,
            "decision_ms_p99": float(np.percentile(d, 99)) if d.size else math.nan,
            "forecaster_calls": self.forecaster_calls,
            "glucose_source": "CGM readings (bg_*: true plasma glucose at the same cycles)",
            "variability_on": ",".join(self.config.variability_config().effects()) or "none",
            "variability_detail": self.config.variability_config().describe(),
            **self.info,
        }

    def pump_commands(self, i: int) -> list[tuple[float | None, int | None, float]]:
        """Patient `i`'s pump commands, cycle by cycle: (temp basal U/h or None, its minutes or
        None, bolus U) — what the supervisor sent, to compare with a journaled loop."""
        lg = self.log
        return [
            (
                None
                if not np.isfinite(lg["cmd_temp"][i, c])
                else round(float(lg["cmd_temp"][i, c]), 6),
                None if not np.isfinite(lg["cmd_temp"][i, c]) else int(lg["cmd_temp_min"][i, c]),
                round(float(lg["cmd_bolus"][i, c]), 6),
            )
            for c in range(len(self.times))
        ]

    # -- safety audit --------------------------------------------------------------------

    def limit_violations(self, tol: float = 1e-6) -> list[str]:
        """Every cycle where a verdict or a pump command broke a supervisor limit (none expected)."""
        lg = self.log
        out: list[str] = []
        for i, s in enumerate(self.settings):
            checks = {
                "verdict rate above max basal": lg["ver_rate"][i] > self.cap_rate[i] + tol,
                "pump rate above max basal": lg["sent_rate"][i] > self.cap_rate[i] + tol,
                "bolus above max bolus": lg["ver_bolus"][i] > s.max_bolus_u + tol,
                "pump bolus above max bolus": lg["sent_bolus"][i] > s.max_bolus_u + tol,
                "bolus above max IOB": (lg["ver_bolus"][i] > 0)
                & (lg["iob"][i] + lg["ver_bolus"][i] > s.max_iob_u + tol),
                "temp basal longer than 30 min": lg["ver_duration"][i] > 30,
                "negative insulin": (lg["ver_rate"][i] < 0) | (lg["ver_bolus"][i] < 0),
            }
            for what, bad in checks.items():
                for t in np.flatnonzero(bad)[:5]:
                    out.append(f"{self.names[i]} @ {self.times[t]}: {what}")
        return out

    # -- frames for reports --------------------------------------------------------------

    def frame(self) -> pd.DataFrame:
        """The trial as a canonical glucose frame (with ``bg_true``)."""
        parts = []
        for i, name in enumerate(self.names):
            parts.append(
                pd.DataFrame(
                    {
                        "subject_id": name,
                        "time": self.times,
                        "glucose": self.log["cgm"][i],
                        "basal_u": self.log["sent_rate"][i] * SLOT_MINUTES / 60.0,
                        "bolus_u": self.log["sent_bolus"][i],
                        "carbs_g": self.log["carbs_eaten"][i],
                        "bg_true": self.log["bg"][i],
                    }
                )
            )
        f = pd.concat(parts, ignore_index=True)
        f["subject_id"] = f["subject_id"].astype("string")
        return f


def _changed(p: Proposal, v) -> bool:
    """Did the supervisor change what the controller asked for (an intervention)?"""
    return (
        abs(v.temp_basal_u_per_h - p.temp_basal_u_per_h) > 1e-6
        or abs(v.bolus_u - p.bolus_u) > 1e-6
        or int(v.duration_min) != int(p.duration_min)
    )


def _finite(d: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, float | np.floating) and not math.isfinite(float(v)):
            out[k] = None
        elif isinstance(v, np.floating | np.integer):
            out[k] = v.item()
        else:
            out[k] = v
    return out


def build_controller(
    config: TrialConfig,
) -> tuple[Controller, WindowConfig, dict[str, Any], Forecaster]:
    """The controller a trial config names (`serving.controllers.build_controller`, the
    runtime's factory), the window it needs, and facts for the record. The model must be
    trustworthy (strict); the MPC's forecaster runs its encoder once per patient instead of
    once per candidate plan (exact, about half the forecaster's time: `shared_past`)."""
    from serving.controllers import build_controller as build
    from serving.insilico.shared_past import shared_past_predictor

    if config.controller == "mpc" and not config.model_dir:
        raise TrialError("--controller mpc needs --model DIR (an exported forecaster)")
    b = build(config.controller, config.model_dir, strict=True, accelerate=shared_past_predictor)
    return b.controller, b.window, b.info, b.predictor


def run_trial(
    config: TrialConfig,
    *,
    controller: Controller | None = None,
    window: WindowConfig | None = None,
    predictor: Forecaster | None = None,
    progress: Callable[[int, int], None] | None = None,
    workers: int = 1,
) -> TrialResult:
    """Run the cohort for `config.days` in `config.mode`; every dose through the supervisor.

    closed: each cycle's verdict goes to the pump. advisory: the verdict is offered as
    advice to a simulated person (`serving.insilico.advisory.AdvisoryPerson`: accepts with
    `accept_prob`, answers after `accept_delay_min`); only what they release is checked
    again by the supervisor and sent. monitor: the controller is never asked; the pump runs
    its schedule (the supervisor still judges the schedule, for the record).

    `workers` > 1 splits the patients over that many processes (`run_split`), each with
    its own controller built from `config`: the result is the same as in one process.
    """
    if workers > 1:
        if controller is not None:
            raise TrialError("run_trial(workers > 1) builds a controller in each worker; "
                             "do not pass one")  # fmt: skip
        return run_split(config, workers, progress=progress)
    info: dict[str, Any] = {}
    if controller is not None:
        return _run_trial(config, controller, window, predictor, progress, info)
    controller, window, info, predictor = build_controller(config)
    try:
        return _run_trial(config, controller, window, predictor, progress, info)
    finally:  # a peer's processes end with the trial that started them
        close_controller(controller)


def close_controller(controller: Any) -> None:
    """End what a controller runs beside glucast (a peer's processes); no-op for the others."""
    close = getattr(controller, "close", None)
    if callable(close):
        close()


def peer_settings(controller: Any) -> dict[str, Any] | None:
    """The settings a peer controller ran with (its ``settings_used()``), None for ours."""
    used = getattr(controller, "settings_used", None)
    return dict(used()) if callable(used) else None


MAX_FAULTS_KEPT = 20  # controller faults kept verbatim in the run info (all are counted)


# --------------------------------------------------------------------------- split over processes


def run_split(
    config: TrialConfig,
    workers: int,
    *,
    progress: Callable[[int, int], None] | None = None,
) -> TrialResult:
    """The trial with its patients split over `workers` processes, merged into one result.

    Patients are independent in a trial: each one's meals, announcements, sensor noise and
    pump draw from its own random streams (`forecast.sim.rng`: keyed on the run seed and the
    patient's id, never on who else is in the cohort), and the controller, the supervisor
    and the forecaster's fallback decide per patient. So the cohort cut into contiguous
    parts, each part run by `run_trial` in a fresh process (spawned: no onnxruntime or numba
    state is forked) with its own controller, gives the same log as one process
    (`tests/test_trial_split.py`). Advisory mode is refused: its simulated person draws by
    position in the cohort. `decision_s` is the sum of the workers' per-cycle times (the
    cohort's decision time, as in one process); `forecaster_calls` is the sum of theirs.
    """
    import multiprocessing as mp
    import queue as queue_mod

    from forecast.sim.patient import resolve_names

    if config.mode == "advisory":
        raise TrialError("advisory trials run in one process (the simulated person's draws "
                         "depend on the patient's position in the cohort)")  # fmt: skip
    names = resolve_names(config.patients)
    workers = max(1, min(int(workers), len(names)))
    parts = [list(p) for p in np.array_split(np.array(names, dtype=object), workers)]
    t0 = time.perf_counter()
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [
        ctx.Process(target=_split_worker, args=(k, _part_config(config, part), q), daemon=True)
        for k, part in enumerate(parts)
    ]
    for p in procs:
        p.start()
    done = [0] * workers
    results: list[TrialResult | None] = [None] * workers
    try:
        while any(r is None for r in results):
            try:
                kind, k, payload = q.get(timeout=5.0)
            except queue_mod.Empty:
                dead = [k for k, p in enumerate(procs) if results[k] is None and not p.is_alive()]
                if dead:
                    raise TrialError(f"trial worker {dead[0]} died (exit code "
                                     f"{procs[dead[0]].exitcode})") from None  # fmt: skip
                continue
            if kind == "error":
                raise TrialError(f"trial worker {k} failed:\n{payload}")
            if kind == "progress":
                done[k] = payload
                if progress is not None:
                    progress(min(done), config.cycles)
            else:
                results[k] = payload
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
            p.join()
    merged = merge_results(config, [r for r in results if r is not None])
    merged.wall_s = time.perf_counter() - t0  # the whole split run: starts, cycles, merge
    merged.info["workers"] = workers
    merged.info["worker_cycles_s"] = [round(r.wall_s, 3) for r in results if r is not None]
    if progress is not None:
        progress(config.cycles, config.cycles)
    return merged


def _part_config(config: TrialConfig, names: list[str]) -> TrialConfig:
    from dataclasses import replace

    return replace(config, patients=",".join(names))


def _split_worker(k: int, config: TrialConfig, q) -> None:
    """One worker of `run_split`: the trial of its part, progress every simulated day."""
    import traceback

    def progress(done: int, total: int) -> None:
        if done % 288 == 0 or done == total:
            q.put(("progress", k, done))

    try:
        q.put(("result", k, run_trial(config, progress=progress)))
    except BaseException:
        q.put(("error", k, traceback.format_exc()))


def merge_results(config: TrialConfig, parts: Sequence[TrialResult]) -> TrialResult:
    """One `TrialResult` of the whole cohort from the results of its parts (in order)."""
    first = parts[0]
    for r in parts[1:]:
        if not first.times.equals(r.times):
            raise TrialError("trial parts ran on different clocks")
    names = [n for r in parts for n in r.names]
    pos = {n: i for i, n in enumerate(names)}
    faults = sorted(  # the first few of the whole cohort, in the order one process keeps them
        (f for r in parts for f in r.info.get("controller_faults", [])),
        key=lambda f: (f["time"], pos.get(f["patient"], 0)),
    )
    return TrialResult(
        config=config,
        names=names,
        settings=[s for r in parts for s in r.settings],
        times=first.times,
        log={k: np.concatenate([r.log[k] for r in parts], axis=0) for k in first.log},
        veto_kinds=[v for r in parts for v in r.veto_kinds],
        cap_rate=np.concatenate([r.cap_rate for r in parts]),
        wall_s=max(r.wall_s for r in parts),
        decision_s=np.sum([r.decision_s for r in parts], axis=0),
        forecaster_calls=sum(r.forecaster_calls for r in parts),
        info={**first.info, "controller_faults": faults[:MAX_FAULTS_KEPT]},
        out_of_range=np.concatenate([r.out_of_range for r in parts]),
    )


def _run_trial(
    config: TrialConfig,
    controller: Controller,
    window: WindowConfig | None,
    predictor: Forecaster | None,
    progress: Callable[[int, int], None] | None,
    info: dict[str, Any],
) -> TrialResult:
    from forecast.sim import load_patients
    from serving.engine import CycleEngine
    from serving.insilico.advisory import confirm_batch, confirmer_for
    from serving.modes import parse_mode
    from serving.predictor import load_predictor
    from serving.safety import SafetyState, Supervisor, assess_cgm, check_batch

    faults: list[dict[str, Any]] = []
    window = window or getattr(controller, "window", None) or WindowConfig()
    if predictor is None:  # as the runtime's factory pairs them: the MPC's own forecaster,
        from serving.controllers.mpc import MPCController  # else the physiological one

        mpc = isinstance(controller, MPCController)
        predictor = controller.predictor if mpc else load_predictor(None, config=window)
    engine = CycleEngine(controller, predictor, window)
    patients = load_patients(config.patients)
    names = [str(x) for x in patients.names]
    settings = settings_for(patients, target_mgdl=config.target_mgdl)
    n, cycles = len(names), config.cycles
    sim = make_trial_simulator(config, patients)
    sched = np.array([s.basal_u_per_h for s in settings])
    sups = [Supervisor(s) for s in settings]
    cap = np.array([sup.cap_u_per_h for sup in sups])  # the supervisor's max basal (oref0's cap)
    hist = IncrementalWindows(
        window,
        sched,
        sim.start,
        cycles,
        prior_daily_dose_u=patients.tdi,
        profile=profile_arrays(settings),
    )
    pump = CohortPump(sched, cap, increment=sim.pump.config.basal_increment_u_per_h)
    recent: list[deque[Reading]] = [deque(maxlen=12) for _ in range(n)]
    log = {k: np.zeros((n, cycles), LOG_DTYPES.get(k, np.float64)) for k in LOG_FIELDS}
    veto_kinds: list[dict[str, int]] = [{} for _ in range(n)]
    decision_s = np.zeros(cycles)
    person = None
    if config.mode != "closed":
        person = confirmer_for(
            config.mode,
            n,
            accept_prob=config.accept_prob,
            delay_min=config.accept_delay_min,
            seed=config.seed,
        )
    calls0 = predictor.calls
    mode = parse_mode(config.mode)
    t_start = time.perf_counter()
    times = sim.start + pd.to_timedelta(np.arange(cycles) * SLOT_MINUTES, "min")
    for c, now in enumerate(times):  # (iterating gives the same Timestamps as times[c], faster)
        minute = c * SLOT_MINUTES
        g = sim.read_cgm()  # [N]
        carbs = sim.announced_carbs(minute, minute + SLOT_MINUTES)  # [N]
        hist.observe(c, g, carbs)
        iob = hist.iob_before(c)  # [N]
        past, future = hist.windows(c)  # [N, L, Fp], [N, H, Ff]
        g_f, iob_f, carbs_f = g.tolist(), iob.tolist(), carbs.tolist()  # Python floats, once
        for i, gi in enumerate(g_f):
            if math.isfinite(gi):
                recent[i].append(Reading(time=now, glucose_mgdl=gi, status=CGMStatus.OK))
        rec = hist.record(c)  # [N, T] the last day of each record, for controllers that read it
        cgm = [assess_cgm(recent[i], now) for i in range(n)]  # the supervisor's view of the CGM
        inputs = [
            ControlInput(
                time=now,
                past=past[i],
                future=future[i],
                glucose_mgdl=cgm[i].glucose_mgdl,  # the latest trusted reading, as the loop's
                iob_u=iob_f[i],
                settings=settings[i],
                carbs_announced_g=carbs_f[i],
                history=SlotHistory(
                    rec["time"],
                    rec["glucose"][i],
                    rec["basal_u"][i],
                    rec["bolus_u"][i],
                    rec["carbs_g"][i],
                ),  # fmt: skip
            )
            for i in range(n)
        ]
        t0 = time.perf_counter()
        unconfirmed = sim.pump.pending_bolus_u.tolist()  # still being delivered
        states = [
            SafetyState(
                now=now,
                iob_u=iob_f[i],
                cgm=cgm[i],
                unconfirmed_bolus_u=unconfirmed[i],
                meal_bolus_u=meal_bolus_u(carbs_f[i], settings[i]),
            )
            for i in range(n)
        ]
        if person is None:  # closed loop: the runtime's decision, as `glucast loop` makes it
            dec = engine.decide(inputs, settings, states, mode)
            proposals, verdicts, act = dec.proposals, dec.verdicts, np.ones(n, bool)
            judged: Sequence[Any] = verdicts
            events = dec.events
        else:  # the same proposals and forecasts, offered to the simulated person
            proposals, events = engine.propose(inputs, settings, mode)
            for i, (pred, _src) in enumerate(engine.forecast_plans(inputs, proposals, settings)):
                if pred is not None and proposals[i].predicted_mgdl is None:
                    proposals[i].predicted_mgdl = pred
        answers: list[Any] = [None] * n
        if person is not None:
            running = np.where(minute < pump.temp_until, pump.temp_rate, pump.scheduled)
            res = confirm_batch(
                person, now, settings, proposals, states, inputs, running_u_per_h=running
            )
            verdicts, act, judged = res.verdicts, res.act, res.advice
            answers = list(res.answers) if res.answers else answers
        decision_s[c] = time.perf_counter() - t0
        sent = np.zeros((n, 3))
        sent[:, 0] = np.nan
        for i in range(n):
            if act[i]:
                cmds = sups[i].commands_for(verdicts[i], now, None)
                pump.execute(i, cmds, minute)
                for cmd in cmds:
                    if cmd.kind is CommandKind.TEMP_BASAL:
                        sent[i, :2] = cmd.amount, cmd.duration_min
                    elif cmd.kind is CommandKind.BOLUS:
                        sent[i, 2] = cmd.amount
        # what the supervisor said of the controller's proposal (in advisory and monitor
        # modes the verdicts above judge what the person released; the advice's own
        # verdict is recomputed here, outside the timed decision, for the record)
        advised = verdicts if person is None else check_batch(settings, proposals, states)
        offers = getattr(person, "last_offers", [None] * n)
        rate, bolus = pump.step_inputs(minute)
        eaten = sim.eaten_carbs(minute, minute + SLOT_MINUTES)
        carried = sim.pump.pending_bolus_u.copy()
        sim.step(SLOT_MINUTES, rate, bolus)
        d = sim.last_delivery
        # the record holds what the pump pushed in the slot (a long bolus spans slots), as
        # the pump's history and so the journal of the runtime do
        pushed = carried + d.commanded_bolus_u - sim.pump.pending_bolus_u
        hist.deliver(c, d.commanded_basal_u, pushed)
        row = {
            "cgm": g,
            "bg": sim.last_bg[:, 0],
            "iob": iob,
            "prop_rate": [p.temp_basal_u_per_h for p in proposals],
            "prop_bolus": [p.bolus_u for p in proposals],
            "ver_rate": [v.temp_basal_u_per_h for v in verdicts],
            "ver_bolus": [v.bolus_u for v in verdicts],
            "ver_duration": [v.duration_min for v in verdicts],
            "sent_rate": rate,
            "sent_bolus": bolus,
            "delivered_u": sim.delivered_u,
            "carbs_announced": carbs,
            "carbs_eaten": eaten,
            "vetoed": [bool(v.vetoes) for v in advised],
            "intervened": [_changed(p, v) for p, v in zip(proposals, judged)],
            "fallback": [FALLBACK_CODES[v.fallback] for v in advised],
            "forecast_fallback": ["forecast fallback" in p.reason for p in proposals],
            "acted": act,
            "cmd_temp": sent[:, 0],
            "cmd_temp_min": sent[:, 1],
            "cmd_bolus": sent[:, 2],
            "advice": [o is not None for o in offers],
            "answer": [0 if a is None else ANSWER_CODES.get(a.action, 0) for a in answers],
            "controller_failed": [
                any(kind == "fault" and "controller" in d for kind, d in ev) for ev in events
            ],
        }
        for i, ev in enumerate(events):  # the first few faults verbatim, for the record
            for kind, d in ev:
                if kind == "fault" and "controller" in d and len(faults) < MAX_FAULTS_KEPT:
                    faults.append({"patient": names[i], "time": str(now), **d})
        for k, v in row.items():
            log[k][:, c] = v
        for i, v in enumerate(advised):
            for reason in v.vetoes:
                kind = reason.split(":", 1)[0]
                veto_kinds[i][kind] = veto_kinds[i].get(kind, 0) + 1
        if progress is not None:
            progress(c + 1, cycles)
    wall = time.perf_counter() - t_start
    calls = predictor.calls - calls0
    return TrialResult(
        config=config,
        names=names,
        settings=settings,
        times=pd.DatetimeIndex(times),
        log=log,
        veto_kinds=veto_kinds,
        cap_rate=cap,
        wall_s=wall,
        decision_s=decision_s,
        forecaster_calls=calls,
        info={
            **info,
            "controller_name": getattr(controller, "name", config.controller),
            **({"peer_settings": peer_settings(controller)} if peer_settings(controller) else {}),
            "controller_faults": faults,
        },
        out_of_range=np.asarray(sim.out_of_range, dtype=bool).copy(),
    )


# --------------------------------------------------------------------------- report

REPORT_COLUMNS = (
    "tir", "tbr70", "tbr54", "tar180", "tar250", "cv", "mean", "lbgi", "hbgi",
    "bg_tir", "bg_tbr70", "bg_tbr54", "bg_min", "tdi_u", "interventions", "forecast_fallbacks",
)  # fmt: skip


def write_report(result: TrialResult, out_dir: str | Path) -> Path:
    """index.html (cohort and per-patient tables, AGP, CVGA, traces, supervisor record),
    trial.json, patients.csv, agp.png and cvga.png in `out_dir`. Returns the index path."""
    import json

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from forecast.glycemia import cvga
    from forecast.htmlreport import HtmlReport
    from forecast.plots import agp_plot, cvga_plot

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = result.to_json()
    (out / "trial.json").write_text(json.dumps(data, indent=2) + "\n")
    table = pd.DataFrame(data["patients"]).T
    table.index.name = "patient"
    table.to_csv(out / "patients.csv")
    cfg = result.config
    mode = {
        "closed": "closed loop",
        "advisory": f"advisory (accepts {cfg.accept_prob:g} after {cfg.accept_delay_min:g} min)",
        "monitor": "monitor (scheduled basal only)",
    }[cfg.mode]
    rep = HtmlReport(
        f"glucast trial: {cfg.controller}" + ("" if cfg.mode == "closed" else f", {cfg.mode}"),
        subtitle=f"{len(result.names)} patients · {result.days:g} days · {mode} · seed "
        f"{cfg.seed} · carb error {cfg.carb_error:g} · sensor {cfg.sensor}"
        + (" · unannounced meals" if cfg.unannounced else "")
        + f" · variability: {cfg.variability_config().describe()}",
    )
    rep.add_text(
        "Outcomes are computed on the CGM readings (the consensus standard); bg_* columns "
        "use the simulator's true plasma glucose at the same 5-minute cycles. TIR = 70–180 "
        "mg/dL; TBR/TAR in % of readings. Every dose went through the safety supervisor; "
        "'interventions' counts cycles where it changed the controller's proposal."
    )
    rep.add_heading("Cohort")
    cohort = {k: v for k, v in data["cohort"].items()}
    rep.add_table(
        cohort,
        caption="Mean over patients, with medians and worst cases",
        integers=(
            "n_patients",
            "patients_with_tbr54",
            "patients_with_bg_tbr54",
            "limit_violations",
        ),  # fmt: skip
    )
    rep.add_heading("Patients")
    rep.add_table(table[[c for c in REPORT_COLUMNS if c in table.columns]].astype(float).round(2))
    if cfg.mode == "advisory":
        rep.add_heading("Advice")
        rep.add_text(
            "Each cycle's supervisor-checked plan is offered as advice when it changes "
            "something; a simulated person answers after the delay and accepts with the given "
            "probability. Stale confirmations (older than 15 min, or glucose moved > 30 mg/dL) "
            "are recalculated (re-advised); a meal bolus supersedes a waiting temp basal."
        )
        adv = [c for c in table.columns if str(c).startswith("advice_")]
        rep.add_table(table[adv].astype(float).round(2), caption="Per patient, in cycles")
    rep.add_heading("Ambulatory glucose profile")
    frame = result.frame()
    fig = agp_plot(frame, title="AGP, all patients pooled (CGM)", timezone="UTC")
    fig.savefig(out / "agp.png", dpi=110, bbox_inches="tight")
    rep.add_figure(fig, caption="Median, 25–75 % and 5–95 % of CGM readings by time of day")
    plt.close(fig)
    rep.add_heading("Control-variability grid")
    bg = {
        n: np.clip(result.log["bg"][i], GLUCOSE_MIN_MGDL, None) for i, n in enumerate(result.names)
    }
    grid = cvga(bg, percentiles=(2.5, 97.5))
    fig = cvga_plot(grid, title="CVGA (true BG, 2.5th/97.5th percentiles)")
    fig.savefig(out / "cvga.png", dpi=110, bbox_inches="tight")
    rep.add_figure(fig)
    plt.close(fig)
    rep.add_table(grid[["min", "max", "zone"]].round(1))
    rep.add_heading("Traces")
    fig, axes = plt.subplots(
        min(3, len(result.names)), 1, figsize=(10, 2.6 * min(3, len(result.names))), squeeze=False
    )
    hours = np.arange(len(result.times)) * SLOT_MINUTES / 60.0
    for ax, i in zip(axes[:, 0], _trace_patients(result)):
        ax.axhspan(70, 180, color="#e8f5e9")
        ax.plot(hours, result.log["bg"][i], color="#999", lw=0.8, label="true BG")
        ax.plot(hours, result.log["cgm"][i], color="#1565c0", lw=0.9, label="CGM")
        b = result.log["sent_bolus"][i] > 0
        ax.vlines(
            hours[b],
            0,
            40 * result.log["sent_bolus"][i][b] / max(result.settings[i].max_bolus_u, 1e-9),
            color="#c62828",
            lw=1,
            label="bolus (scaled)",
        )
        ax.set_ylabel("mg/dL")
        ax.set_title(result.names[i], fontsize=9)
    axes[0, 0].legend(fontsize=7, loc="upper right")
    axes[-1, 0].set_xlabel("hours")
    fig.tight_layout()
    rep.add_figure(fig, caption="Best, median and worst patient by TIR")
    plt.close(fig)
    rep.add_heading("Supervisor")
    kinds = sorted({k for d in result.veto_kinds for k in d})
    sup = pd.DataFrame(
        [[d.get(k, 0) for k in kinds] for d in result.veto_kinds], index=result.names, columns=kinds
    )
    rep.add_table(sup if len(kinds) else {"vetoes": 0}, caption="Cycles with each veto reason")
    c = data["cohort"]
    rep.add_text(
        f"Controller {result.info.get('controller_name', cfg.controller)}: it failed in "
        f"{c['controller_fallbacks_total']:.0f} patient-cycles (scheduled basal instead, fault "
        f"journaled); of the cycles it decided, the supervisor changed its command in "
        f"{c['controller_interventions_total']:.0f} ({c['controller_interventions_pct']:.2f} %) "
        f"and gave a veto reason in {c['controller_vetoes_total']:.0f} "
        f"({c['controller_vetoes_pct']:.2f} %)."
        + (" The peer's settings are in the run record below." if "peer_settings" in data["run"]
           else "")
    )  # fmt: skip
    viol = result.limit_violations()
    rep.add_text(
        "Limit audit of the log: "
        + ("no supervisor limit was exceeded." if not viol else "; ".join(viol[:20]))
    )
    rep.add_heading("Run")
    rep.add_json(data["run"])
    return rep.write(out / "index.html")


def _trace_patients(result: TrialResult) -> list[int]:
    from forecast.glycemia import outcomes

    tir = np.array([outcomes(result.log["cgm"][i])["tir"] for i in range(len(result.names))])
    tir = np.nan_to_num(tir, nan=-1.0)
    order = np.argsort(-tir)
    picks = [int(order[0]), int(order[len(order) // 2]), int(order[-1])]
    return list(dict.fromkeys(picks))[: len(result.names)]
