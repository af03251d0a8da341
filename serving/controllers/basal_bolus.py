"""Basal–bolus therapy: the baseline every closed loop must beat.

What a person on a pump does by hand: scheduled basal all day, and at each announced meal a
bolus of carbs / carb ratio plus a correction when glucose is above a threshold (ISF-based,
minus the insulin still on board, as every pump's bolus calculator does). No automatic
action between meals — that is exactly the gap the MPC is meant to close.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from forecast.insulin import bolus_calculator, net_iob_u
from serving.controllers import meal_bolus_u
from serving.types import ControlInput, Proposal


@dataclass(frozen=True)
class BasalBolusConfig:
    correction_above_mgdl: float = 150.0  # correct only above this (at meals)
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
        net = net_iob_u(inp.iob_u, s.basal_u_per_h, slot_minutes=c.slot_minutes)
        bolus = float(
            bolus_calculator(
                inp.carbs_announced_g,
                inp.glucose_mgdl,
                carb_ratio_g_per_u=s.carb_ratio_g_per_u,
                isf_mgdl_per_u=s.isf_mgdl_per_u,
                target_mgdl=s.target_mgdl,
                correct_above_mgdl=c.correction_above_mgdl,
                net_iob_u=net if c.iob_aware else 0.0,
            )
        )
        corr = bolus - carb if carb > 0 else 0.0
        reason = "scheduled basal"
        if bolus > 0:
            reason = f"meal {inp.carbs_announced_g:.0f} g → {carb:.2f} U + correction {corr:.2f} U"
        return Proposal(
            temp_basal_u_per_h=float(s.basal_u_per_h),
            duration_min=30,
            bolus_u=float(bolus),
            reason=reason,
        )
