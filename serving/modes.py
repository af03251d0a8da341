"""The runtime's three operating modes, and the bolus advice a person is shown.

People wear a pump and a CGM long before they trust automation, so the runtime runs in one of
three modes, chosen at start (`glucast loop --mode`):

* ``monitor`` — read the CGM, forecast, raise alerts. The runtime never commands the pump:
  the pump's own scheduled basal program runs, and nothing is proposed.
* ``advisory`` — also ask the controller, have the supervisor check its proposal, and offer
  the result to the person as advice (a temp basal and/or a bolus, with a `BolusAdvice`
  breakdown and the forecast). Only advice the person confirms is carried out, and then
  through the supervisor again, against the state at confirmation (`serving.insilico.advisory`).
* ``closed`` — the supervisor carries out every checked proposal (the closed loop).

Alerts run in every mode, and the supervisor is the only road to the pump in every mode.
``open`` (the runtime's former name for advice nobody answers) is accepted as an alias of
``advisory``; with no person attached, advice is journaled and never carried out.

Imports: numpy, pandas, stdlib, `forecast` and the serving nouns only.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any

import numpy as np
import pandas as pd

from forecast.insulin import net_iob_u
from forecast.schema import GlucastError
from serving.types import PatientSettings, Proposal, Verdict

RATE_TOLERANCE_U_PER_H = 0.025  # the supervisor's own "same as scheduled" (half a pump step)
BOLUS_MIN_U = 0.05  # the pump's bolus increment: less is not advice worth a confirmation
FORECAST_SHOWN_MIN = (30, 60)  # what the advice screen shows of the forecast


class Mode(StrEnum):
    MONITOR = "monitor"
    ADVISORY = "advisory"
    CLOSED = "closed"


MODES: tuple[str, ...] = tuple(m.value for m in Mode)
MODE_ALIASES: dict[str, Mode] = {"open": Mode.ADVISORY}  # advice with nobody to confirm it


class ModeError(GlucastError, ValueError):
    """A mode name the runtime does not know."""


def parse_mode(value: str | Mode) -> Mode:
    """The `Mode` a name stands for (aliases included); `ModeError` otherwise."""
    if isinstance(value, Mode):
        return value
    v = str(value).strip().lower()
    if v in MODE_ALIASES:
        return MODE_ALIASES[v]
    try:
        return Mode(v)
    except ValueError:
        choices = ", ".join((*MODES, *MODE_ALIASES))
        raise ModeError(f"unknown mode {value!r}; choose from {choices}") from None


# --------------------------------------------------------------------------- proposals


def scheduled_proposal(settings: PatientSettings, reason: str = "scheduled basal") -> Proposal:
    """ "Leave the pump on its schedule": the neutral proposal."""
    return Proposal(float(settings.basal_u_per_h), 30, 0.0, reason=reason)


def schedule_verdict(settings: PatientSettings) -> Verdict:
    """What monitor mode journals as its verdict: the pump's own program, nothing decided."""
    return Verdict(float(settings.basal_u_per_h), 30, 0.0)


def advice_from_verdict(
    verdict: Verdict, proposal: Proposal, settings: PatientSettings
) -> Proposal:
    """The advice a person is offered: the supervisor's verdict, as a plan.

    A person is never shown more than the supervisor would let through, so the advice is the
    verdict, not the raw proposal: a suspend is a zero temp basal, a fallback is the
    scheduled basal. The forecast of the proposal travels with it (what the screen shows).
    """
    if verdict.suspend:
        rate = 0.0
    elif verdict.fallback == "scheduled_basal":
        rate = float(settings.basal_u_per_h)
    else:
        rate = float(verdict.temp_basal_u_per_h)
    reason = proposal.reason
    if verdict.vetoes:
        reason = f"{reason} [supervisor: {'; '.join(v.split(':', 1)[0] for v in verdict.vetoes)}]"
    return Proposal(
        temp_basal_u_per_h=rate,
        duration_min=int(verdict.duration_min),
        bolus_u=float(verdict.bolus_u),
        reason=reason.strip(),
        predicted_mgdl=proposal.predicted_mgdl,
    )


def is_actionable(proposal: Proposal | None, running_u_per_h: float) -> bool:
    """Whether a plan changes anything: a bolus, or a basal rate other than the running one.

    Advice that would leave the pump as it is is not worth a person's confirmation.
    """
    if proposal is None:
        return False
    b, r = proposal.bolus_u, proposal.temp_basal_u_per_h
    if math.isfinite(b) and b >= BOLUS_MIN_U - 1e-9:
        return True
    return math.isfinite(r) and abs(r - float(running_u_per_h)) >= RATE_TOLERANCE_U_PER_H


def same_plan(a: Proposal | None, b: Proposal | None) -> bool:
    """Two plans that deliver the same insulin (the forecast of one serves the other)."""
    if a is None or b is None:
        return a is b
    return (
        abs(a.temp_basal_u_per_h - b.temp_basal_u_per_h) < 1e-9
        and abs(a.bolus_u - b.bolus_u) < 1e-9
        and int(a.duration_min) == int(b.duration_min)
    )


# --------------------------------------------------------------------------- bolus advice


@dataclass(frozen=True)
class BolusAdvice:
    """A bolus the person is asked to confirm, and the arithmetic behind it.

    The calculator's terms are the ones every pump shows, so a person can check the advice:
    ``carbs_u`` = announced carbs / carb ratio; ``correction_u`` = (glucose − target) / ISF
    (negative below target: a reverse correction; 0 when there is no trusted reading);
    ``iob_u`` = the net insulin on board subtracted (never negative);
    ``calculator_u`` = max(0, carbs + correction − IOB). ``proposed_u`` is what the
    controller proposed (an MPC may differ from the calculator: it sees the forecast),
    ``advised_u`` what the supervisor lets through — the amount on the screen.
    ``forecast`` holds the median forecast at 30 and 60 min and the lowest quantile within the
    horizon (mg/dL, NaN when there is none) under the advised plan.
    """

    time: pd.Timestamp
    glucose_mgdl: float
    target_mgdl: float
    carbs_g: float
    carb_ratio_g_per_u: float
    isf_mgdl_per_u: float
    carbs_u: float
    correction_u: float
    iob_u: float
    calculator_u: float
    proposed_u: float
    advised_u: float
    forecast: dict[str, float] = field(default_factory=dict)
    vetoes: tuple[str, ...] = ()
    recalculated_from: float = math.nan  # advised_u of the advice this one replaced

    def recalculated(
        self, time: pd.Timestamp, glucose_mgdl: float, iob_u: float, settings: PatientSettings
    ) -> BolusAdvice:
        """The same meal's advice brought up to date (a stale confirmation, `serving.insilico.advisory`).

        The carbs stay; correction and IOB are recomputed from now; the controller's
        adjustment to the calculator is kept (advised = old advised + the calculator's
        change), and the result never exceeds the amount the person confirmed: a bolus is
        irreversible, so a confirmation may shrink on the way to the pump, never grow.
        """
        fresh = calculator(glucose_mgdl, iob_u, self.carbs_g, settings)
        advised = self.advised_u + (fresh["calculator_u"] - self.calculator_u)
        advised = float(min(max(advised, 0.0), self.advised_u))
        return BolusAdvice(
            time=pd.Timestamp(time),
            glucose_mgdl=float(glucose_mgdl),
            target_mgdl=float(settings.target_mgdl),
            carbs_g=self.carbs_g,
            carb_ratio_g_per_u=float(settings.carb_ratio_g_per_u),
            isf_mgdl_per_u=float(settings.isf_mgdl_per_u),
            **fresh,
            proposed_u=self.proposed_u,
            advised_u=advised,
            forecast={},
            vetoes=(),
            recalculated_from=self.advised_u,
        )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["time"] = pd.Timestamp(self.time).isoformat()
        d["vetoes"] = list(self.vetoes)
        return {
            k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BolusAdvice:
        def f(v: Any) -> float:
            return math.nan if v is None else float(v)

        return cls(
            time=pd.Timestamp(d["time"]),
            **{k: f(d[k]) for k in _FLOAT_FIELDS},
            forecast={k: f(v) for k, v in (d.get("forecast") or {}).items()},
            vetoes=tuple(d.get("vetoes") or ()),
            recalculated_from=f(d.get("recalculated_from")),
        )


_FLOAT_FIELDS = (
    "glucose_mgdl", "target_mgdl", "carbs_g", "carb_ratio_g_per_u", "isf_mgdl_per_u", "carbs_u",
    "correction_u", "iob_u", "calculator_u", "proposed_u", "advised_u",
)  # fmt: skip


def calculator(
    glucose_mgdl: float, iob_u: float, carbs_g: float, settings: PatientSettings
) -> dict[str, float]:
    """A pump's bolus calculator: carbs_u, correction_u, iob_u (net, ≥ 0), calculator_u."""
    carbs = float(carbs_g) if math.isfinite(carbs_g) and carbs_g > 0 else 0.0
    carbs_u = carbs / settings.carb_ratio_g_per_u if settings.carb_ratio_g_per_u > 0 else 0.0
    g = float(glucose_mgdl)
    corr = (g - settings.target_mgdl) / settings.isf_mgdl_per_u if math.isfinite(g) else 0.0
    net = net_iob_u(iob_u, settings.basal_u_per_h) if math.isfinite(iob_u) else math.inf
    sub = max(0.0, net)
    total = max(0.0, carbs_u + corr - sub) if math.isfinite(sub) else 0.0
    return {"carbs_u": carbs_u, "correction_u": corr, "iob_u": sub, "calculator_u": total}


def forecast_shown(predicted: np.ndarray | None, slot_minutes: int = 5) -> dict[str, float]:
    """The forecast as the advice screen shows it: median at 30/60 min, lowest quantile."""
    out = {f"median_{m}min": math.nan for m in FORECAST_SHOWN_MIN}
    out["lowest"] = math.nan
    if predicted is None:
        return out
    p = np.asarray(predicted, dtype=float)
    if p.ndim == 1:
        p = p[:, None]
    if p.ndim != 2 or not p.size:
        return out
    med = p[:, (p.shape[1] - 1) // 2]  # the supervisor's median column
    for m in FORECAST_SHOWN_MIN:
        k = m // slot_minutes - 1
        if 0 <= k < len(med) and math.isfinite(med[k]):
            out[f"median_{m}min"] = float(med[k])
    finite = p[np.isfinite(p)]
    if finite.size:
        out["lowest"] = float(finite.min())
    return out


def bolus_advice(
    *,
    time: pd.Timestamp,
    glucose_mgdl: float,
    iob_u: float,
    carbs_g: float,
    settings: PatientSettings,
    proposed_u: float,
    advised_u: float,
    predicted: np.ndarray | None = None,
    vetoes: tuple[str, ...] | list[str] = (),
    slot_minutes: int = 5,
) -> BolusAdvice:
    """The `BolusAdvice` for a cycle (`iob_u` gross, as `ControlInput.iob_u`)."""
    return BolusAdvice(
        time=pd.Timestamp(time),
        glucose_mgdl=float(glucose_mgdl),
        target_mgdl=float(settings.target_mgdl),
        carbs_g=float(carbs_g) if math.isfinite(carbs_g) else 0.0,
        carb_ratio_g_per_u=float(settings.carb_ratio_g_per_u),
        isf_mgdl_per_u=float(settings.isf_mgdl_per_u),
        **calculator(glucose_mgdl, iob_u, carbs_g, settings),
        proposed_u=float(proposed_u),
        advised_u=float(advised_u),
        forecast=forecast_shown(predicted, slot_minutes),
        vetoes=tuple(vetoes),
    )


__all__ = [
    "BolusAdvice",
    "MODES",
    "MODE_ALIASES",
    "Mode",
    "ModeError",
    "advice_from_verdict",
    "bolus_advice",
    "calculator",
    "forecast_shown",
    "is_actionable",
    "net_iob_u",
    "parse_mode",
    "same_plan",
    "schedule_verdict",
    "scheduled_proposal",
]
