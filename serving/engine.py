"""ONE control cycle for a batch of patients: inputs → controller → forecast → supervisor.

Both shells run a cycle through this: the journaled real-time loop (`serving.loop`, one
patient or many, the journal and the pump HAL around it) and the accelerated in-memory
trial (`serving.insilico.trial`, a whole simulated cohort). What happens between "the model
inputs are built" and "the supervisor has judged" is therefore the same code in both, and a
trial result is evidence about the runtime.

    decisions = engine.decide(inputs, settings, states, mode)

1. **propose**: the controller answers for every patient with inputs, in one batched call
   (monitor mode asks nobody: the proposal is the pump's schedule). A patient without
   inputs gets the scheduled basal; a controller that raises does not stop the cycle — its
   patients get the scheduled basal and a fault event.
2. **forecast**: a proposal that came without a forecast (basal–bolus, PID, the schedule) is
   forecast under its own plan (`plan_window`) with the runtime's forecaster, all such
   patients in one call, so the supervisor's predictive low suspend sees every plan.
3. **check**: the supervisor's rules judge every proposal at once (`serving.safety.check_batch`;
   in monitor mode there is nothing to judge: the schedule's verdict).

Commanding the pump, journaling, alerts and advice stay with the shells: they differ in
what a pump and a record are, not in what is decided.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from forecast.windows import WindowConfig
from serving.controllers import Controller, ControllerError
from serving.modes import Mode, schedule_verdict, scheduled_proposal
from serving.predictor import Forecaster
from serving.safety.rules import SafetyState, check_batch
from serving.types import ControlInput, PatientSettings, Proposal, Verdict

Event = tuple[str, dict[str, Any]]


@dataclass
class Decisions:
    """What one cycle decided for each patient of the batch (same order as the inputs)."""

    proposals: list[Proposal]  # with `predicted_mgdl`: the controller's or the engine's
    verdicts: list[Verdict]
    sources: list[str]  # whose forecast: controller | model | fallback | none | failed
    events: list[list[Event]] = field(default_factory=list)  # faults, per patient


class CycleEngine:
    """The decision part of a control cycle, shared by the loop and the trial."""

    def __init__(self, controller: Controller | None, predictor: Forecaster | None,
                 window: WindowConfig) -> None:  # fmt: skip
        self.controller = controller
        self.predictor = predictor
        self.window = window

    # ---- 1. propose
    def propose(
        self,
        inputs: Sequence[ControlInput | None],
        settings: Sequence[PatientSettings],
        mode: Mode,
    ) -> tuple[list[Proposal], list[list[Event]]]:
        events: list[list[Event]] = [[] for _ in inputs]
        if mode is Mode.MONITOR:  # nothing is proposed: the pump runs its own program
            return [scheduled_proposal(s, "monitor: the pump's schedule") for s in settings], events
        out = [
            Proposal(s.basal_u_per_h, 30, 0.0, reason="no model inputs → scheduled basal")
            for s in settings
        ]
        live = [k for k, inp in enumerate(inputs) if inp is not None]
        if not live or self.controller is None:
            return out, events
        try:
            got = self.controller.propose([inputs[k] for k in live])  # type: ignore[misc]
            for k, p in zip(live, got, strict=True):
                out[k] = p
        except Exception as e:  # a controller bug must not stop the loop
            # a controller that failed for some patients only (`ControllerError.failed`, the
            # others in `.partial`) keeps their proposals: one bad record costs the cohort nothing
            failed, partial = {}, []
            if isinstance(e, ControllerError) and len(e.partial) == len(live):
                failed, partial = e.failed, e.partial
            for j, k in enumerate(live):
                if failed and j not in failed and isinstance(partial[j], Proposal):
                    out[k] = partial[j]
                    continue
                why = failed.get(j, str(e)) if failed else str(e)
                events[k].append(("fault", {"controller": f"{type(e).__name__}: {why}"}))
                out[k] = Proposal(
                    settings[k].basal_u_per_h, 30, 0.0,
                    reason=f"controller failed ({type(e).__name__}) → scheduled basal",
                    predicted_mgdl=np.full((self.window.horizon_slots, 1), np.nan),
                )  # fmt: skip
        return out, events

    # ---- 2. forecast
    def forecast_plans(
        self,
        inputs: Sequence[ControlInput | None],
        plans: Sequence[Proposal],
        settings: Sequence[PatientSettings],
        events: list[list[Event]] | None = None,
    ) -> list[tuple[np.ndarray | None, str]]:
        """The forecast of each plan: the controller's own where it gave one, else the
        forecaster's under the plan (one call for all), else None (no inputs)."""
        out: list[tuple[np.ndarray | None, str]] = [(None, "none")] * len(plans)
        todo = []
        for k, (inp, p) in enumerate(zip(inputs, plans)):
            if p.predicted_mgdl is not None:
                out[k] = (np.asarray(p.predicted_mgdl), "controller")
            elif inp is not None and self.predictor is not None:
                todo.append(k)
        if not todo:
            return out
        rows = [plan_window(inputs[k].past, inputs[k].future, self.window, plans[k],  # type: ignore[union-attr]
                            settings[k]) for k in todo]  # fmt: skip
        past = np.stack([r[0] for r in rows])  # [B, L, F_past]
        future = np.stack([r[1] for r in rows])  # [B, H, F_future]
        try:
            f = self.predictor.forecast(past, future, settings=[settings[k] for k in todo])
        except Exception as e:  # a failing predictor → no trustworthy prediction
            for k in todo:
                if events is not None:
                    events[k].append(("fault", {"predictor": f"{type(e).__name__}: {e}"}))
                out[k] = (np.full((self.window.horizon_slots, 1), np.nan), "failed")
            return out
        for r, k in enumerate(todo):
            out[k] = (np.asarray(f.glucose[r]), "fallback" if f.fallback[r] else "model")
        return out

    # ---- 3. the whole decision
    def decide(
        self,
        inputs: Sequence[ControlInput | None],
        settings: Sequence[PatientSettings],
        states: Sequence[SafetyState],
        mode: Mode = Mode.CLOSED,
    ) -> Decisions:
        proposals, events = self.propose(inputs, settings, mode)
        preds = self.forecast_plans(inputs, proposals, settings, events)
        for k, (pred, _) in enumerate(preds):
            if pred is not None and proposals[k].predicted_mgdl is None:
                p = proposals[k]
                proposals[k] = Proposal(p.temp_basal_u_per_h, p.duration_min, p.bolus_u,
                                        p.reason, pred)  # fmt: skip
        if mode is Mode.MONITOR:  # the supervisor has nothing to check, the pump nothing to do
            verdicts = [schedule_verdict(s) for s in settings]
        else:
            verdicts = check_batch(settings, proposals, states)
        return Decisions(proposals, verdicts, [s for _, s in preds], events)


def plan_window(
    past: np.ndarray,
    future: np.ndarray,
    w: WindowConfig,
    proposal: Proposal,
    settings: PatientSettings,
) -> tuple[np.ndarray, np.ndarray]:
    """Write one proposal into a window: this slot's insulin in the last past row (and its
    IOB), the temp basal for the rest of its duration then scheduled basal in `future`."""
    past, future = past.copy(), future.copy()  # [L, F_past], [H, F_future]
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


__all__ = ["CycleEngine", "Decisions", "plan_window"]
