"""Autosens from the record: how strongly this person's glucose answers net insulin.

The settings' ISF can be far from the truth (the simulator's children respond up to twice
as strongly as their clinical ISF says), and a controller that doses for unannounced meals
finds out the hard way. Each cycle, the last 5-minute glucose change is set against the
change the ISF predicts from the net insulin acting in that slot (`MealDetector.changes`):

    x = ISF · (net insulin acting, U)      expected fall, mg/dL per 5 min
    y = −ΔCGM                              observed fall

and the ratio is the least-squares slope Σ x·y / Σ x², both sums exponentially forgotten
over `tau_h` (oref0's autosens looks at 8–24 h); the factor is its lower confidence bound.
Suspensions count too (x < 0: a rebound
that outruns the ISF is the same evidence). Slots with announced carbs on board or an
inferred meal are skipped: there the carbs, not the insulin, move glucose. The estimate
counts only once Σ x² reaches `min_information` (a CGM delta's noise is several mg/dL; the
slope's standard error is about noise / √Σx²), and is bounded to `bounds`. The MPC only
ever lets it make a patient *more* sensitive than the settings (never more insulin than the
clinician's ISF allows), and journals it in every proposal's reason.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ResponseConfig:
    tau_h: float = 24.0  # forget evidence over about a day
    min_information: float = 25.0  # Σ x² in (mg/dL)² before the estimate counts
    bounds: tuple[float, float] = (1.0, 3.0)
    # the factor is the slope's lower confidence bound, slope − z · noise / √Σx²: a patient
    # is treated as more sensitive only as far as the evidence is sure of it. Measured (30
    # patients, 3 days, seeds 2 and 3, tuning seeds): the bare slope (z = 0) removed every
    # patient's true glucose < 54 but cost 2.5–3.6 points of TIR announced and 9–10
    # unannounced (adults' slopes scatter up to ~1.9 on 1–2 days of evidence); children
    # whose glucose fell below 54 had slopes 2.4–5.5
    # slots within this long after an inferred meal are skipped too: the meal's absorption
    # goes on after the detector stops seeing its rise, and its end looks like insulin
    quiet_after_meal_min: float = 60.0
    noise_mgdl: float = 4.0  # SD of a 5-minute CGM change that insulin does not explain
    z: float = 1.5  # 2.0 → 1.5 with the larger meal boluses: the same or fewer lows (seeds 2, 3)


class InsulinResponse:
    """Per-patient running estimate (state: one small record per name)."""

    def __init__(self, config: ResponseConfig | None = None) -> None:
        self.config = config or ResponseConfig()
        # name → [Σxy, Σx², last time ns, last inferred meal ns]
        self._state: dict[str, list[float]] = {}

    def update(
        self,
        names: list[str],
        times_ns: np.ndarray,
        expected_fall: np.ndarray,
        observed_fall: np.ndarray,
        usable: np.ndarray,
        meal_now: np.ndarray,
    ) -> None:
        """Fold one cycle's evidence in ([N] arrays; `usable` False skips a patient,
        `meal_now` marks an inferred meal, which also quiets the following slots)."""
        tau_ns = self.config.tau_h * 3.6e12
        quiet_ns = self.config.quiet_after_meal_min * 6e10
        for i, name in enumerate(names):
            st = self._state.setdefault(name, [0.0, 0.0, float(times_ns[i]), -np.inf])
            if meal_now[i]:
                st[3] = float(times_ns[i])
            decay = float(np.exp(-max(0.0, float(times_ns[i]) - st[2]) / tau_ns))
            st[0] *= decay
            st[1] *= decay
            st[2] = float(times_ns[i])
            x, y = float(expected_fall[i]), float(observed_fall[i])
            if usable[i] and times_ns[i] - st[3] >= quiet_ns and np.isfinite(x) and np.isfinite(y):
                st[0] += x * y
                st[1] += x * x

    def factor(self, name: str) -> float:
        """How many times the ISF this patient's glucose answers insulin (1: not yet known)."""
        st = self._state.get(name)
        lo, hi = self.config.bounds
        c = self.config
        if st is None or st[1] < c.min_information:
            return 1.0
        lcb = st[0] / st[1] - c.z * c.noise_mgdl / math.sqrt(st[1])
        return min(max(lcb, lo), hi)
