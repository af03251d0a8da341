"""PID on glucose error with insulin feedback (Steil's ePID-IFB, simplified).

A PID that only looks at glucose stacks insulin: glucose keeps rising for an hour after a
meal bolus, so the integral and the proportional term keep adding while the insulin already
given has not acted yet. Insulin feedback subtracts net insulin on board (scaled to a rate),
which damps that stacking — the idea behind Medtronic's hybrid closed loop.

Gains scale with each patient's scheduled basal so one configuration fits a child and an
adult. Announced meals still get a carb-ratio bolus (hybrid closed loop); with
`meal_bolus=False` it is fully closed-loop.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from forecast.insulin import net_iob_u
from serving.controllers import meal_bolus_u
from serving.types import ControlInput, Proposal


@dataclass(frozen=True)
class PIDConfig:
    # rates are in multiples of the scheduled basal per mg/dL (so they scale per patient)
    kp_basal_per_mgdl: float = 1.0 / 40.0  # 40 mg/dL above target → +1 × basal
    ti_min: float = 300.0  # integral time
    td_min: float = 60.0  # derivative time
    ifb_per_h: float = 0.6  # net IOB (U) × this → U/h subtracted
    integral_limit_basal: float = 2.0  # |I| ≤ 2 × basal
    max_basal_multiple: float = 4.0
    meal_bolus: bool = True
    slot_minutes: int = 5


class PIDController:
    """Temp basal from P + I + D − insulin feedback; meal boluses by carb ratio."""

    name = "pid"

    def __init__(self, config: PIDConfig | None = None, **overrides) -> None:
        self.config = config or PIDConfig(**overrides)
        self._integral: dict[str, float] = {}
        self._last: dict[str, float] = {}

    def propose(self, inputs: Sequence[ControlInput]) -> list[Proposal]:
        return [self._one(inp) for inp in inputs]

    def _one(self, inp: ControlInput) -> Proposal:
        c, s = self.config, inp.settings
        key = s.name
        basal = float(s.basal_u_per_h)
        bolus = meal_bolus_u(inp.carbs_announced_g, s) if c.meal_bolus else 0.0
        g = inp.glucose_mgdl
        if not np.isfinite(g):  # no reading: no feedback, scheduled basal; keep the state
            return Proposal(basal, 30, bolus, reason="pid: no reading → scheduled basal")
        e = g - s.target_mgdl
        kp = c.kp_basal_per_mgdl * basal  # U/h per mg/dL
        prev = self._last.get(key, g)
        de = (g - prev) / c.slot_minutes  # mg/dL per min
        integ = self._integral.get(key, 0.0) + kp * e * c.slot_minutes / c.ti_min
        lim = c.integral_limit_basal * basal
        integ = float(np.clip(integ, -lim, lim))
        p, d = kp * e, kp * c.td_min * de
        ifb = c.ifb_per_h * net_iob_u(
            inp.iob_u, inp.settings.basal_u_per_h, slot_minutes=c.slot_minutes
        )
        rate = basal + p + integ + d - ifb
        rate_c = float(np.clip(rate, 0.0, c.max_basal_multiple * basal))
        if rate_c != rate:  # anti-windup: do not integrate while saturated the same way
            integ = self._integral.get(key, 0.0) if np.sign(rate - rate_c) == np.sign(e) else integ
        self._integral[key] = integ
        self._last[key] = g
        return Proposal(
            temp_basal_u_per_h=rate_c,
            duration_min=30,
            bolus_u=float(bolus),
            reason=f"pid P {p:+.2f} I {integ:+.2f} D {d:+.2f} IFB {-ifb:+.2f} U/h",
        )
