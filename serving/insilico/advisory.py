"""Who turns advice into action: a simulated person (advisory mode), and the trial's helpers.

In advisory mode the runtime offers the supervisor-checked plan of each cycle as *advice*
(`serving.modes.advice_from_verdict`); nothing reaches the pump until a person confirms it.
`AdvisoryPerson` simulates that person for N patients at once:

* advice is offered only when it changes something (a bolus, or a basal rate other than the
  one running) and only while no other advice is waiting for that patient — the screen
  shows one suggestion at a time, and a person who has not answered has not seen the next.
  One exception: a bolus (an announced meal's) replaces a waiting basal-only suggestion,
  which is withdrawn (``superseded``) — a meal bolus must not be lost behind a temp basal;
* the person answers `delay_min` after the offer (at the first cycle at or after it) and
  accepts with probability `accept_prob`. The draw is a pure function of (seed, cycle
  time, patient), so a restarted loop, or a trial run twice, makes the same decisions;
* a refusal is journaled and dropped; nothing is sent;
* a confirmation of *fresh* advice (at most 15 min old, glucose within 30 mg/dL of the
  reading it was computed from) releases the advised plan, which the supervisor checks
  again against the state at confirmation before anything is sent;
* a confirmation of *stale* advice (older, glucose moved more, or no trusted reading now)
  is re-advised, as pump bolus calculators do when a calculation has gone out of date: the
  bolus is recalculated for the same carbs with the current glucose and insulin on board
  (`BolusAdvice.recalculated`: it may shrink, never grow beyond what was confirmed), the
  temp basal is replaced by this cycle's advice, and the person — at the screen at that
  moment — confirms the update at once. The supervisor then checks it like any plan.

`MonitorOnly` (monitor mode: nothing is ever released, the pump runs its schedule) and
`AutoAccept` (closed loop: everything is released at once) have the same `filter` method,
so a trial runs any mode through one call per cycle; `confirm_batch` wraps the whole
advice → person → supervisor step for a cohort (see its docstring for the trial hook).

Imports: numpy, pandas, stdlib, `forecast` and serving's own modules.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import pandas as pd

from forecast.schema import GlucastError
from serving.modes import (
    BOLUS_MIN_U,
    BolusAdvice,
    Mode,
    advice_from_verdict,
    bolus_advice,
    is_actionable,
    parse_mode,
    same_plan,
    scheduled_proposal,
)
from serving.types import ControlInput, PatientSettings, Proposal, Verdict

ADVICE_MAX_AGE_MIN = 15.0  # older advice is stale: recalculated before it is carried out
ADVICE_MAX_GLUCOSE_CHANGE_MGDL = 30.0  # a reading this far from the advice's: stale too
_EPS = pd.Timedelta(seconds=1)


class AdvisoryError(GlucastError, ValueError):
    """A simulated person configured with impossible numbers."""


# --------------------------------------------------------------------------- records


def _utc(t: Any) -> pd.Timestamp:
    ts = pd.Timestamp(t)
    return ts.tz_localize("UTC") if ts.tzinfo is None else ts.tz_convert("UTC")


def _plan_dict(p: Proposal | None) -> dict[str, Any] | None:
    if p is None:
        return None
    return {
        "temp_basal_u_per_h": float(p.temp_basal_u_per_h),
        "duration_min": int(p.duration_min),
        "bolus_u": float(p.bolus_u),
        "reason": p.reason,
    }


def _plan_from(d: dict[str, Any]) -> Proposal:
    return Proposal(
        float(d["temp_basal_u_per_h"]), int(d["duration_min"]), float(d["bolus_u"]), d["reason"]
    )


def _f(v: float) -> float | None:
    return float(v) if v is not None and math.isfinite(v) else None


@dataclass
class Advice:
    """One suggestion on the person's screen, and the answer they will give."""

    patient: int
    offered: pd.Timestamp
    due: pd.Timestamp  # when the person answers
    accept: bool  # the answer (drawn when offered)
    proposal: Proposal  # the plan offered (already checked by the supervisor)
    glucose_mgdl: float  # the reading it was computed from (NaN if none)
    bolus: BolusAdvice | None = None

    def event(self) -> dict[str, Any]:
        """The journal's ``advice`` event for the offer (the answer is not disclosed)."""
        return {
            "action": "offered",
            "offered": self.offered.isoformat(),
            "due": self.due.isoformat(),
            "glucose": _f(self.glucose_mgdl),
            "plan": _plan_dict(self.proposal),
            "bolus": None if self.bolus is None else self.bolus.to_dict(),
        }

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready state (the forecast is not kept: a confirmation is re-forecast)."""
        return {**self.event(), "patient": self.patient, "accept": self.accept}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Advice:
        g = d.get("glucose")
        return cls(
            patient=int(d["patient"]),
            offered=_utc(d["offered"]),
            due=_utc(d["due"]),
            accept=bool(d["accept"]),
            proposal=_plan_from(d["plan"]),
            glucose_mgdl=math.nan if g is None else float(g),
            bolus=None if d.get("bolus") is None else BolusAdvice.from_dict(d["bolus"]),
        )


@dataclass
class Answer:
    """What the person did with one piece of advice, and what goes to the supervisor now."""

    # "confirmed" | "refused" | "readvised" (a stale confirmation, recalculated) |
    # "superseded" (withdrawn unanswered: a bolus suggestion took its place)
    action: str
    advice: Advice
    time: pd.Timestamp
    proposal: Proposal | None  # the plan released this cycle (None: nothing to send)
    stale: str = ""  # why the advice was out of date ("" when fresh)
    bolus: BolusAdvice | None = None  # the bolus as confirmed (recalculated when stale)

    @property
    def age_min(self) -> float:
        return (self.time - self.advice.offered).total_seconds() / 60.0

    def event(self) -> dict[str, Any]:
        return {
            "action": self.action,
            "offered": self.advice.offered.isoformat(),
            "age_min": round(self.age_min, 3),
            "stale": self.stale,
            "advised": _plan_dict(self.advice.proposal),
            "released": _plan_dict(self.proposal),
            "bolus": None if self.bolus is None else self.bolus.to_dict(),
        }


# --------------------------------------------------------------------------- who confirms


class Confirmer(Protocol):
    """Turns each cycle's advice into what is carried out (None: nothing this cycle)."""

    n: int

    def filter(
        self,
        time: pd.Timestamp,
        proposals: Sequence[Proposal | None],
        inputs: Sequence[ControlInput],
        *,
        running_u_per_h: Sequence[float] | np.ndarray | None = None,
    ) -> list[Proposal | None]: ...


class MonitorOnly:
    """Monitor mode: nothing is ever released; the pump's scheduled basal runs on its own."""

    mode = Mode.MONITOR

    def __init__(self, n: int) -> None:
        self.n = int(n)

    def filter(self, time, proposals, inputs, *, running_u_per_h=None) -> list[Proposal | None]:
        return [None] * self.n


class AutoAccept:
    """Closed loop: every cycle's (supervisor-checked) plan is carried out at once."""

    mode = Mode.CLOSED

    def __init__(self, n: int) -> None:
        self.n = int(n)

    def filter(self, time, proposals, inputs, *, running_u_per_h=None) -> list[Proposal | None]:
        return list(proposals)


class AdvisoryPerson:
    """A simulated person who answers advice late, and not always yes (see module docstring).

    ``filter(time, proposals, inputs)`` runs one cycle for all N patients and returns what
    the person releases this cycle (None where nothing); the loop calls `step` for one
    patient. `last_offers` / `last_answers` hold the cycle's offers and answers ([N], None
    where none) for the caller to journal or count.
    """

    mode = Mode.ADVISORY

    def __init__(
        self,
        n: int,
        accept_prob: float = 0.8,
        delay_min: float = 10.0,
        seed: int = 0,
        *,
        max_age_min: float = ADVICE_MAX_AGE_MIN,
        max_glucose_change_mgdl: float = ADVICE_MAX_GLUCOSE_CHANGE_MGDL,
    ) -> None:
        if int(n) < 1:
            raise AdvisoryError(f"a person needs at least one patient, got n={n}")
        if not (0.0 <= float(accept_prob) <= 1.0):
            raise AdvisoryError(f"accept_prob must be in [0, 1], got {accept_prob}")
        if not (math.isfinite(delay_min) and delay_min >= 0.0):
            raise AdvisoryError(
                f"delay_min must be a finite number of minutes >= 0, got {delay_min}"
            )
        if int(seed) < 0:
            raise AdvisoryError(f"seed must be >= 0, got {seed}")
        if not (max_age_min > 0 and max_glucose_change_mgdl > 0):
            raise AdvisoryError("staleness limits must be > 0")
        self.n = int(n)
        self.accept_prob = float(accept_prob)
        self.delay_min = float(delay_min)
        self.seed = int(seed)
        self.max_age_min = float(max_age_min)
        self.max_glucose_change_mgdl = float(max_glucose_change_mgdl)
        self.open: list[Advice | None] = [None] * self.n
        self.last_offers: list[Advice | None] = [None] * self.n
        self.last_answers: list[Answer | None] = [None] * self.n
        self._draw_key: int | None = None
        self._draw: np.ndarray = np.zeros(0)

    def describe(self) -> dict[str, Any]:
        return {"accept_prob": self.accept_prob, "delay_min": self.delay_min, "seed": self.seed,
                "max_age_min": self.max_age_min,
                "max_glucose_change_mgdl": self.max_glucose_change_mgdl}  # fmt: skip

    # ---- randomness: a pure function of (seed, minute, patient)
    def draws(self, time: pd.Timestamp) -> np.ndarray:
        """[N] uniforms for the offers made at `time` (the same for the same seed and time)."""
        minute = int(_utc(time).value // 60_000_000_000)
        if minute != self._draw_key:
            self._draw = np.random.default_rng([self.seed, minute & 0xFFFFFFFFFFFF]).random(self.n)
            self._draw_key = minute
        return self._draw

    # ---- one patient, one cycle
    def step(
        self,
        i: int,
        time: pd.Timestamp,
        advice: Proposal | None,
        *,
        glucose_mgdl: float,
        iob_u: float,
        settings: PatientSettings,
        carbs_g: float = 0.0,
        running_u_per_h: float | None = None,
        bolus: BolusAdvice | None = None,
    ) -> tuple[Advice | None, Answer | None]:
        """(advice offered now, answer given now) for patient `i` at cycle `time`.

        `advice` is this cycle's supervisor-checked plan; `glucose_mgdl` the trusted reading
        (NaN if none); `iob_u` gross IOB before this cycle's dose; `running_u_per_h` the
        rate the pump runs now (default: the scheduled basal); `bolus` the breakdown shown
        with a bolus (computed here when not given).
        """
        t = _utc(time)
        running = float(settings.basal_u_per_h)
        if running_u_per_h is not None and math.isfinite(running_u_per_h):
            running = float(running_u_per_h)
        waiting = self.open[i]
        withdrawn: Answer | None = None
        if waiting is not None:
            if t + _EPS >= waiting.due:
                self.open[i] = None
                return None, self._answer(
                    waiting, t, advice, glucose_mgdl, iob_u, settings, running
                )
            if not (_has_bolus(advice) and not _has_bolus(waiting.proposal)):
                return None, None  # not answered yet; nothing new is shown meanwhile
            self.open[i] = None  # a meal bolus takes the place of a waiting temp basal
            withdrawn = Answer("superseded", waiting, t, None)
        if not is_actionable(advice, running):
            return None, withdrawn
        assert advice is not None
        if bolus is None and advice.bolus_u > 0:
            bolus = bolus_advice(time=t, glucose_mgdl=glucose_mgdl, iob_u=iob_u, carbs_g=carbs_g,
                                 settings=settings, proposed_u=advice.bolus_u,
                                 advised_u=advice.bolus_u, predicted=advice.predicted_mgdl)  # fmt: skip
        offer = Advice(
            patient=i,
            offered=t,
            due=t + pd.Timedelta(minutes=self.delay_min),
            accept=bool(self.draws(t)[i] < self.accept_prob),
            proposal=advice,
            glucose_mgdl=float(glucose_mgdl),
            bolus=bolus,
        )
        if t + _EPS < offer.due:
            self.open[i] = offer
            return offer, withdrawn
        return offer, self._answer(offer, t, advice, glucose_mgdl, iob_u, settings, running)

    def staleness(self, advice: Advice, time: pd.Timestamp, glucose_mgdl: float) -> str:
        """Why `advice` is out of date at `time` ("" when it still holds)."""
        age = (time - advice.offered).total_seconds() / 60.0
        if age > self.max_age_min + 1e-9:
            return f"advice {age:.0f} min old (> {self.max_age_min:g})"
        if not math.isfinite(glucose_mgdl):
            return "no trusted glucose reading now"
        if not math.isfinite(advice.glucose_mgdl):
            return "advice computed without a trusted reading"
        change = glucose_mgdl - advice.glucose_mgdl
        if abs(change) > self.max_glucose_change_mgdl:
            return f"glucose moved {change:+.0f} mg/dL since the advice"
        return ""

    def _answer(
        self,
        a: Advice,
        t: pd.Timestamp,
        now_advice: Proposal | None,
        glucose: float,
        iob: float,
        settings: PatientSettings,
        running: float,
    ) -> Answer:
        if not a.accept:
            return Answer("refused", a, t, None)
        stale = self.staleness(a, t, glucose)
        if not stale:
            return Answer("confirmed", a, t, a.proposal, bolus=a.bolus)
        bolus = a.bolus.recalculated(t, glucose, iob, settings) if a.bolus is not None else None
        base = now_advice if now_advice is not None else scheduled_proposal(settings)
        plan = Proposal(
            temp_basal_u_per_h=base.temp_basal_u_per_h,
            duration_min=base.duration_min,
            bolus_u=0.0 if bolus is None else bolus.advised_u,
            reason=f"re-advised ({stale})",
            predicted_mgdl=base.predicted_mgdl,
        )
        released = plan if is_actionable(plan, running) else None
        return Answer("readvised", a, t, released, stale=stale, bolus=bolus)

    # ---- N patients, one cycle
    def filter(
        self,
        time: pd.Timestamp,
        proposals: Sequence[Proposal | None],
        inputs: Sequence[ControlInput],
        *,
        running_u_per_h: Sequence[float] | np.ndarray | None = None,
    ) -> list[Proposal | None]:
        """What the person releases this cycle, per patient (None: nothing to send)."""
        if not len(proposals) == len(inputs) == self.n:
            raise AdvisoryError(
                f"filter needs {self.n} proposals and inputs, got {len(proposals)}, {len(inputs)}"
            )
        running = [None] * self.n if running_u_per_h is None else list(running_u_per_h)
        out: list[Proposal | None] = []
        for i, (p, inp) in enumerate(zip(proposals, inputs)):
            offer, ans = self.step(i, time, p, glucose_mgdl=inp.glucose_mgdl, iob_u=inp.iob_u,
                                   settings=inp.settings, carbs_g=inp.carbs_announced_g,
                                   running_u_per_h=running[i])  # fmt: skip
            self.last_offers[i], self.last_answers[i] = offer, ans
            out.append(None if ans is None else ans.proposal)
        return out

    # ---- persistence (a restarted loop keeps the advice on the screen)
    def state(self, i: int) -> dict[str, Any] | None:
        a = self.open[i]
        return None if a is None else a.to_dict()

    def restore(self, i: int, state: dict[str, Any] | None) -> None:
        self.open[i] = None if state is None else Advice.from_dict(state)


def confirmer_for(
    mode: str | Mode, n: int, *, accept_prob: float = 0.8, delay_min: float = 10.0, seed: int = 0
) -> Confirmer:
    """`MonitorOnly`, `AdvisoryPerson` or `AutoAccept` for a mode name."""
    m = parse_mode(mode)
    if m is Mode.MONITOR:
        return MonitorOnly(n)
    if m is Mode.ADVISORY:
        return AdvisoryPerson(n, accept_prob, delay_min, seed)
    return AutoAccept(n)


# --------------------------------------------------------------------------- the cohort step


@dataclass
class Confirmed:
    """`confirm_batch`'s result, per patient ([N] each)."""

    verdicts: list[Verdict]  # the supervisor's verdict on what is carried out
    act: np.ndarray  # bool: send `verdicts[i]` to the pump this cycle (False: send nothing)
    advice: list[Proposal]  # the advice offered (the supervisor-checked proposals)
    answers: list[Answer | None] = field(default_factory=list)  # AdvisoryPerson only


def confirm_batch(
    confirmer: Confirmer,
    time: pd.Timestamp,
    settings: Sequence[PatientSettings],
    proposals: Sequence[Proposal],
    states: Sequence[Any],
    inputs: Sequence[ControlInput],
    *,
    running_u_per_h: Sequence[float] | np.ndarray | None = None,
) -> Confirmed:
    """Advice → person → supervisor for a cohort, in two vectorised supervisor calls.

    The trial hook: where the trial now calls ``check_batch(settings, proposals, states)``
    and executes every verdict, an advisory or monitor trial calls this and executes
    ``verdicts[i]`` only where ``act[i]``. The advice is the supervisor's verdict on the
    controller's proposal; what the person releases is checked again against this cycle's
    state. A released plan that is not this cycle's advice carries the lower envelope of
    its own forecast and this cycle's (the supervisor's low-glucose rules then err low).
    """
    from serving.safety import check_batch

    first = check_batch(settings, proposals, states)
    advice = [advice_from_verdict(v, p, s) for v, p, s in zip(first, proposals, settings)]
    released = confirmer.filter(time, advice, inputs, running_u_per_h=running_u_per_h)
    plans: list[Proposal] = []
    for s, adv, rel in zip(settings, advice, released):
        if rel is None:
            plans.append(scheduled_proposal(s, "nothing released"))
        elif same_plan(rel, adv):
            plans.append(adv)
        else:
            plans.append(Proposal(rel.temp_basal_u_per_h, rel.duration_min, rel.bolus_u,
                                  rel.reason, _envelope(rel.predicted_mgdl, adv.predicted_mgdl)))  # fmt: skip
    verdicts = check_batch(settings, plans, states)
    answers = list(getattr(confirmer, "last_answers", [None] * len(settings)))
    act = np.array([r is not None for r in released], dtype=bool)
    return Confirmed(verdicts, act, advice, answers)


def _has_bolus(p: Proposal | None) -> bool:
    return p is not None and math.isfinite(p.bolus_u) and p.bolus_u >= BOLUS_MIN_U - 1e-9


def _envelope(a: np.ndarray | None, b: np.ndarray | None) -> np.ndarray | None:
    if a is None or b is None:
        return b if a is None else a
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    return np.fmin(a, b) if a.shape == b.shape else b


__all__ = [
    "ADVICE_MAX_AGE_MIN",
    "ADVICE_MAX_GLUCOSE_CHANGE_MGDL",
    "Advice",
    "AdvisoryError",
    "AdvisoryPerson",
    "Answer",
    "AutoAccept",
    "Confirmed",
    "Confirmer",
    "MonitorOnly",
    "confirm_batch",
    "confirmer_for",
]
