"""Basal–bolus therapy: the baseline every closed loop must beat.

What a person on a pump does by hand: scheduled basal all day, and at each announced meal a
bolus of carbs / carb ratio plus a correction when glucose is above a threshold (ISF-based,
minus the insulin still on board, as every pump's bolus calculator does). No automatic
action between meals — that is exactly the gap the MPC is meant to close.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from forecast.insulin import net_iob_u
from serving.controllers import meal_bolus_u
from serving.types import ControlInput, Proposal


@dataclass(frozen=True)
class BasalBolusConfig:
    correction_above_mgdl: float = 150.0  # correct only above this (at meals)
    correct_to_target: bool = True  # correct down to settings.target_mgdl
    iob_aware: bool = True  # subtract positive net IOB from the correction
    slot_minutes: int = 5


class BasalBolusController:
    """Scheduled basal + carb-ratio meal bolus + IOB-aware correction at meals."""

    name = "basal-bolus"

    def __init__(self, config: BasalBolusConfig | None = None, **overrides) -> None:
        self.config = config or BasalBolusConfig(**overrides)

    def propose(self, inputs: Sequence[ControlInput]) -> list[Proposal]:
        return [self._one(inp) for inp in inputs]

    def _one(self, inp: ControlInput) -> Proposal:
        c, s = self.config, inp.settings
        carb = meal_bolus_u(inp.carbs_announced_g, s)
        corr = 0.0
        g = inp.glucose_mgdl
        if carb > 0 and np.isfinite(g) and g > c.correction_above_mgdl:
            corr = (g - s.target_mgdl) / s.isf_mgdl_per_u
            if c.iob_aware:
                corr -= max(
                    0.0,
                    net_iob_u(inp.iob_u, inp.settings.basal_u_per_h, slot_minutes=c.slot_minutes),
                )
            corr = max(0.0, corr)
        bolus = carb + corr
        reason = "scheduled basal"
        if bolus > 0:
            reason = f"meal {inp.carbs_announced_g:.0f} g → {carb:.2f} U + correction {corr:.2f} U"
        return Proposal(
            temp_basal_u_per_h=float(s.basal_u_per_h),
            duration_min=30,
            bolus_u=float(bolus),
            reason=reason,
        )
