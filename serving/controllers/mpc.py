"""Model-predictive insulin control over a quantile glucose forecaster.

Each cycle, for every patient, the MPC builds a *ladder* of candidate insulin plans over
the forecast horizon, asks the forecaster what glucose would do under each (all patients ×
all candidates in ONE batched call, `# [N*K, H, F]`), scores the forecasts with an
asymmetric zone cost and proposes the cheapest plan's first move (re-planned every cycle).

The ladder (K rungs, ordered by insulin — every rung gives at least as much insulin as the
one below it in every slot; the high temps and the automatic boluses riding them share one
bolus-calculator room, so net IOB never exceeds what COB or BG above target justify):

    suspend for the whole horizon · suspend 30 min · ½ basal 30 min · scheduled basal ·
    1.5× · 3× basal for 30 min (capped like the supervisor caps them) ·
    that top temp + bolus b_1 < b_2 < … < b_J

When a meal is announced the high temps collapse onto scheduled basal and the boluses go up
to the meal's bolus: the MPC delivers the meal bolus itself, since the forecaster sees the
announced carbs. Bolus sizes are spaced (j/J)^1.5 up to a bolus calculator's bound
(`_bolus_room`), so a forecaster that keeps predicting a rise cannot make the MPC stack
insulin, and never above the supervisor's max bolus or the room under max IOB.

Why a ladder and not a grid: with rungs ordered by insulin, a forecaster that never predicts
higher glucose for more insulin (the model contract; enforced here by a running minimum
over the rungs) and a cost that is convex in each predicted value, the chosen rung can only
move *down* when every forecast moves down (Topkis: the cost difference between a higher and
a lower rung grows as predictions fall). That is the safety property tested in
tests/test_controllers.py: lower predictions never buy more insulin.

Cost (per patient, per rung; mg/dL² units):

* hypo on the lower quantile over the horizon: below 80 heavily, below 70 far more;
* hyper on the median over the horizon: above 140 lightly, above 180 more;
* a terminal cost on the *eventual* glucose (oref0's eventualBG): the horizon's last median
  plus what the carbs and insulin still on board at its end will do (ISF/CR × COB −
  ISF × net IOB, `forecast.insulin` curves), zero inside a band around the target;
* the same for the lower quantile's eventual glucose below 80, with the announced carbs
  discounted by the carb-count uncertainty and insulin acting harder than the ISF says —
  a bolus for carbs that may not come, in a patient more sensitive than the settings, is
  what causes late hypos — and the horizon's average fall continued for
  `ZoneCost.momentum_minutes` (a fall the 60-minute forecast sees does not stop at its end);
* a regulariser: a little per unit of insulin, and the square of the glucose-equivalent of
  insulin beyond the undoubted part of a meal bolus, so corrections come in instalments
  that the next cycles can still cancel.

A 60-minute forecast sees only a fraction of a bolus act; without the terminal term an MPC
keeps stacking insulin. The terminal term is what makes the decision IOB-aware.

Unannounced meals (`serving.controllers.uam`, oref1's UAM idea): a rise that neither the
insulin on board nor the announced carbs explain is a meal nobody told the loop about. Its
estimated rise is added to every plan's forecast (the forecaster was never told about it; the
quantiles below the median get only `1 - uam_uncertainty` of it), its remainder after the
horizon to the eventual glucose, and it opens a bolus room of `uam_room_factor` × (its carbs /
CR + the correction above target) at ≤ `uam_smb_basal_minutes` of basal a cycle (capped at
`uam_max_basal_hours` of basal for a person who announces meals). It never fires into a
falling trend, below 100 mg/dL, or within 6 h of an announced meal.

Autosens: the simulator's children respond to insulin up to twice as strongly as their
clinical ISF says, and no population forecaster knows a patient that well. Two kinds of
evidence make the MPC treat a patient as more sensitive (never less): each new low episode
(CGM < 70; ISF × 1.5, up to × 3, relaxing over days), and the record itself — how strongly
glucose answered net insulin over the last day, against what the ISF predicts
(`serving.controllers.autosens`, its lower confidence bound). Meal boluses shrink, the insulin
tail grows, the unannounced-meal room shrinks. Both are per patient state (a controller
instance belongs to one loop or one trial), and every proposal's reason carries the factor.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from forecast.insulin import CarbCurve, InsulinCurve
from forecast.windows import WindowConfig
from serving.controllers import basal_iob_u, meal_bolus_u
from serving.controllers.autosens import InsulinResponse, ResponseConfig
from serving.controllers.uam import (
    MealDetector,
    MealEstimate,
    UAMConfig,
    minutes_since_announced,
)
from serving.predictor import FallbackPredictor, Forecast, steady_state_inputs
from serving.types import ControlInput, Proposal


@dataclass(frozen=True)
class ZoneCost:
    """Asymmetric zone cost: a low is far worse than a high."""

    low_mgdl: float = 80.0
    severe_low_mgdl: float = 70.0
    high_mgdl: float = 140.0
    very_high_mgdl: float = 180.0
    w_low: float = 20.0  # lower quantile below low_mgdl, per (mg/dL)², averaged over the horizon
    w_severe_low: float = 200.0
    w_high: float = 0.05  # median above high_mgdl
    w_very_high: float = 0.2
    eventual_band: tuple[float, float] = (-10.0, 20.0)  # no terminal cost inside target + band
    w_eventual_high: float = 1.0  # eventual median above the band
    w_eventual_low: float = 4.0  # eventual median below the band
    w_eventual_hypo: float = 20.0  # eventual lower quantile below low_mgdl
    w_insulin: float = 20.0  # per unit planned above scheduled basal
    w_extra: float = 1.0  # (ISF × insulin beyond the sure part of a meal bolus)², per (mg/dL)²
    lower_quantile: float = 0.1  # which forecast quantile stands for "how low could it go"
    # the lower quantile's eventual glucose also continues the horizon's average fall for this
    # many minutes (oref0 projects its deviation 30 min on); falls only, so it can only make
    # the MPC more careful. Measured (30 patients, 7 d, seed 1, with correction_basal_hours
    # 1.0): 0 → 15 min: TIR 77.47 → 76.06 %, patients with CGM < 54 3 → 2, with true BG < 54
    # 1 → 0 (child#008's post-meal fall from 390 mg/dL); 30 min: TIR 73.15 %, 1 patient
    momentum_minutes: float = 15.0


@dataclass(frozen=True)
class MPCConfig:
    cost: ZoneCost = field(default_factory=ZoneCost)
    temp_minutes: int = 30  # every temp basal the MPC proposes lasts this long
    low_rates: tuple[float, ...] = (0.5,)  # fractions of scheduled basal below it (30 min)
    high_rates: tuple[float, ...] = (1.5, 3.0)  # multiples above it (30 min), capped
    bolus_rungs: int = 8  # J (K = 3 + 1 + 2 + J = 14 candidates: rows per patient per call)
    bolus_spacing: float = 1.5  # bolus_j = room × (j / J) ** spacing: finer near zero
    smb_basal_minutes: float = 30.0  # automatic bolus per cycle, in minutes of basal
    # meal bolus rungs span these fractions of the carb-ratio bolus; the forecaster's lower
    # quantile picks among them. Measured (8 patients incl. the 4 with lows, 7 d, seed 1,
    # after the IOB-aware temp bound): (0.3, 0.6) left the same 4 patients with CGM < 54 and
    # cost 1.1 points of TIR. With the learned sensitivity (autosens from the record) and the
    # capped meal inference for people who announce meals (30 patients, 3 d, tuning seeds 2
    # and 3): (0.4, 0.8) → (0.5, 1.0) raised TIR 80.8 → 83.9 and 81.9 → 85.1 %, every
    # patient's true glucose ≥ 54
    meal_fractions: tuple[float, float] = (0.5, 1.0)
    carb_room_factor: float = 0.8  # carbs on board may justify this × COB / CR of net IOB
    meal_correction: bool = False  # add a wizard-style correction to meal boluses
    correct_above_mgdl: float = 150.0  # … above this (IOB-aware), when meal_correction
    correction_isf_scale: float = 1.0  # automatic corrections assume ISF × this (1.5: no
    # change in lows on the same 8 patients; the 2-h net-IOB cap below is what binds)
    # net IOB from corrections ≤ this many hours of basal (oref0's max IOB idea). Measured (30
    # patients, 7 d, seed 1, after the IOB-aware temp bound): 2 h → 1 h: TIR 78.25 → 77.47 %,
    # TBR70 0.33 → 0.18 % (median 0.075 → 0), patients with CGM < 54 4 → 3 (1.5 h: TIR 77.88,
    # 3 patients). The lows it removed came 4-8 h after big meals, after corrections during
    # the slow second rise of the simulator's meals
    correction_basal_hours: float = 1.0
    carb_uncertainty: float = 0.2  # fraction of announced carbs the lower bound does not count
    isf_uncertainty: float = 0.3  # the lower bound lets insulin act this much harder than ISF
    monotone: bool = True  # running minimum over rungs (more insulin never raises a forecast)
    decision_slot: str = "future"  # where this cycle's dose goes in the window (apply_plans)
    # autosens: each new low (CGM < autosens_low_mgdl) makes the MPC treat the patient as
    # `autosens_step` times more insulin-sensitive (up to `autosens_max`), decaying back
    # over `autosens_tau_h`; 1.0 / 0 switch it off
    autosens_step: float = 1.5
    autosens_max: float = 3.0
    autosens_tau_h: float = 72.0
    autosens_low_mgdl: float = 70.0
    insulin_curve: InsulinCurve = field(default_factory=InsulinCurve)
    carb_curve: CarbCurve = field(default_factory=CarbCurve)
    # unannounced meals (serving.controllers.uam): a rise that insulin and announced carbs do
    # not explain opens a bolus room of `uam_room_factor` × (its remaining carbs / CR + the
    # correction above target), at most `uam_smb_basal_minutes` of basal a cycle; the eventual
    # median counts its remaining rise, the eventual lower quantile does not
    uam: bool = True
    uam_detector: UAMConfig = field(default_factory=UAMConfig)
    uam_room_factor: float = 0.5
    # 30 → 60 min of basal per cycle (oref1 allows 30 a SMB plus a high temp; ours counts the
    # temp against the same room), measured with the suspension gate off and autosens z 1.5
    # (3 d, seeds 2, 3): unannounced TIR 60.7 → 65.1 and 60.5 → 65.8 %, one child at 53 mg/dL
    uam_smb_basal_minutes: float = 60.0
    # a person who announced a meal within `announcing_hours` is one who announces meals: an
    # unexplained rise is then more likely a snack, a rebound or the sensor than a whole meal,
    # so the net IOB it may justify is capped at `uam_max_basal_hours` of basal. Measured (30
    # patients, 3 d, tuning seeds 2, 3, meals announced): without the cap child#004 fell to
    # 50 mg/dL at night after a rise 6 h past dinner was dosed as a meal; with it TIR is the same
    uam_max_basal_hours: float = 2.0
    announcing_hours: float = 24.0
    # autosens from the record (serving.controllers.autosens): the patient's glucose answering
    # net insulin more strongly than the ISF says makes the MPC treat them as more sensitive
    learn_response: bool = True
    response: ResponseConfig = field(default_factory=ResponseConfig)
    uam_uncertainty: float = 0.7  # share of its estimated rise the lower quantiles do not count


@dataclass
class Ladder:
    """Candidate plans for N patients × K rungs (units per slot)."""

    basal: np.ndarray  # [N, K, 1+H] U per slot; slot 0 = now (the window's last past slot)
    bolus: np.ndarray  # [N, K, 1+H] U per slot (bolus in slot 0 only)
    rate_u_per_h: np.ndarray  # [N, K] the temp basal rate the first move asks for
    bolus_now: np.ndarray  # [N, K] U
    label: list[str]  # [K]


class MPCController:
    """Batched MPC: one forecaster call per cycle for all patients × candidates."""

    def __init__(
        self,
        predictor: FallbackPredictor,
        config: MPCConfig | None = None,
        *,
        name: str = "mpc",
        **overrides,
    ) -> None:
        self.predictor = predictor
        self.config = config or MPCConfig(**overrides)
        self.name = name
        self.window: WindowConfig = predictor.config
        w = self.window
        self._fb = w.future_index("basal_u")
        self._fbo = w.future_index("bolus_u")
        self._fc = w.future_index("carbs_g")
        self._pb = w.past_index("basal_u")
        self._pbo = w.past_index("bolus_u")
        self._pc = w.past_index("carbs_g")
        self._pcob = w.past_features.index("cob_g") if "cob_g" in w.past_features else None
        self._piob = w.past_features.index("iob_u") if "iob_u" in w.past_features else None
        q = np.asarray(predictor.quantiles)
        self._qlo = int(np.argmin(np.abs(q - self.config.cost.lower_quantile)))
        self._qmed = int(np.argmin(np.abs(q - 0.5)))
        self._tail = _TailKernels(w, self.config.insulin_curve, self.config.carb_curve)
        self.last_forecast: Forecast | None = None
        self.last_cost: np.ndarray | None = None  # [N, K]
        self.last_ladder: Ladder | None = None
        self._sens: dict[str, _Autosens] = {}
        try:  # the deviations need IOB and observed-reading features in the window
            self._detector: MealDetector | None = MealDetector(w, self.config.uam_detector)
        except ValueError:
            self._detector = None
        self._uam = self._detector if self.config.uam else None
        self._response = (
            InsulinResponse(self.config.response)
            if self.config.learn_response and self._detector is not None
            else None
        )
        self.last_meal: MealEstimate | None = None
        # The physiological fallback's first call costs ~0.8 s (lazy imports, JIT): without
        # this the first cycle whose forecast is refused took 525 ms (benchmarks/mpc_latency.py
        # max at 10 patients) instead of ~6 ms. Pay it once here, not in a live cycle.
        fb = getattr(predictor, "fallback", None)
        if fb is not None and getattr(predictor, "primary", None) is not None:
            fb.predict(*steady_state_inputs(self.window))

    # -- candidate plans -----------------------------------------------------------------

    def ladder(
        self,
        inputs: Sequence[ControlInput],
        net_iob: np.ndarray,
        cob_g: np.ndarray,
        meal_est: MealEstimate | None = None,
        *,
        sens: np.ndarray | None = None,
        since_announced_min: np.ndarray | None = None,
    ) -> Ladder:
        """The K candidate plans of every patient, ordered by insulin (a chain).

        Below scheduled basal: suspend for the whole horizon, suspend 30 min, reduced rates
        for 30 min. Above it, when no meal is announced now: higher temp basals for 30 min
        (up to the supervisor's oref0 cap), then that highest temp plus boluses; when a meal
        is announced: scheduled basal plus boluses up to the meal's bolus (the high-temp
        rungs collapse onto scheduled basal). Every rung gives at least as much insulin as
        the one below it in every slot, whatever the patient. `sens` ([N] autosens factors)
        and `since_announced_min` ([N]) are computed here when not given.
        """
        from serving.safety.rules import max_basal

        if sens is None:
            sens = self.sensitivities(inputs)
        if since_announced_min is None:
            since_announced_min = np.array(
                [minutes_since_announced(i.history, self.window.slot_minutes) for i in inputs]
            )

        c, h = self.config, self.window.horizon_slots + 1  # now + the horizon
        n = len(inputs)
        slot_h = self.window.slot_minutes / 60.0
        temp_slots = max(1, c.temp_minutes // self.window.slot_minutes)
        st = [i.settings for i in inputs]
        basal_h = np.array([s.basal_u_per_h for s in st], np.float64)  # [N]
        cap = max_basal(
            np.array([s.max_basal_u_per_h for s in st]),
            np.array([s.max_daily_basal_u_per_h or s.basal_u_per_h for s in st]),
            basal_h,
        )  # [N] U/h, the supervisor's cap
        meal = np.array([i.carbs_announced_g > 0 for i in inputs])  # [N]
        b = basal_h * slot_h  # [N] U per slot
        rungs: list[tuple[str, np.ndarray, int]] = [
            ("suspend-hold", np.zeros(n), h),
            ("suspend-30", np.zeros(n), temp_slots),
        ]
        rungs += [(f"{f:g}x-30", np.full(n, f), temp_slots) for f in sorted(c.low_rates)]
        rungs.append(("scheduled", np.ones(n), temp_slots))
        bmax = self._bolus_room(inputs, net_iob, cob_g, sens)  # [N]
        uam_room, uam_cap = self._uam_room(inputs, net_iob, meal_est, since_announced_min, sens)
        # IOB-aware high temps (oref0's insulinReq): the extra insulin of a 30-min high temp
        # may not exceed the same bolus-calculator room as an automatic bolus. Without this
        # bound the 3x temp ran for hours through a slow post-meal rise while net IOB was
        # already far above what COB and BG justified (adolescent#002: IOB 15 U, ISF 13),
        # and the patient went below 54 mg/dL 5-7 h after the meal with insulin suspended
        # for the last 2 h (baseline: 9 of 12 patients' lows came 4.5-8 h after a meal).
        room_mult = 1.0 + np.maximum(bmax, uam_room) / np.maximum(
            basal_h * c.temp_minutes / 60.0, 1e-9
        )  # [N]
        top = np.ones(n)
        for f in sorted(c.high_rates):
            allowed = np.minimum(np.minimum(f, cap / np.maximum(basal_h, 1e-9)), room_mult)
            mult = np.where(meal, 1.0, allowed)
            top = np.maximum(top, mult)
            rungs.append((f"{f:g}x-30", top.copy(), temp_slots))
        k_base = len(rungs)
        k = k_base + c.bolus_rungs
        basal = np.repeat(b[:, None, None], k, axis=1).repeat(h, axis=2)  # [N, K, 1+H]
        rate = np.repeat(basal_h[:, None], k, axis=1)  # [N, K]
        for j, (_, mult, slots) in enumerate(rungs):
            basal[:, j, :slots] = (mult * b)[:, None]
            rate[:, j] = mult * basal_h
        basal[:, k_base:, :temp_slots] = (top * b)[:, None, None]  # boluses ride the top temp
        rate[:, k_base:] = (top * basal_h)[:, None]
        steps = (np.arange(1, c.bolus_rungs + 1) / c.bolus_rungs) ** c.bolus_spacing  # [J]
        # the bolus rungs ride the top temp: they share the room, so the top rung's net IOB
        # stays within the calculator's bound too
        temp_extra = (top - 1.0) * basal_h * c.temp_minutes / 60.0  # [N] U
        # an unannounced meal's bolus is capped per cycle on its own: the top temp already
        # counts against its total room
        auto = np.maximum(bmax - temp_extra, np.minimum(uam_room - temp_extra, uam_cap))  # [N]
        bol = np.maximum(auto, 0.0)[:, None] * steps[None, :]  # [N, J] (no meal announced)
        if meal.any():  # a meal now: the calculator's bolus, scaled between min and max
            fr = np.linspace(c.meal_fractions[0], c.meal_fractions[1], c.bolus_rungs)  # [J]
            full = self._meal_bolus(inputs, net_iob, sens)  # [N]
            limit = np.array([_limit(i) for i in inputs])  # [N] max bolus, IOB room
            bol = np.where(
                meal[:, None], np.minimum(full[:, None] * fr[None, :], limit[:, None]), bol
            )
        bol = np.round(bol / 0.05) * 0.05  # pump resolution
        bolus = np.zeros((n, k, h))
        bolus[:, k_base:, 0] = bol
        labels = [name for name, _, _ in rungs] + [f"bolus{j + 1}" for j in range(c.bolus_rungs)]
        return Ladder(basal, bolus, rate, bolus[:, :, 0].copy(), labels)

    def sensitivity(self, inp: ControlInput) -> float:
        """How many times more insulin-sensitive than its ISF this patient has proven: by its
        lows, or by how its glucose answers insulin (`serving.controllers.autosens`)."""
        a = self._sens.get(inp.settings.name)
        lows = 1.0 if a is None else a.factor
        if self._response is None:
            return lows
        return min(self.config.autosens_max, max(lows, self._response.factor(inp.settings.name)))

    def sensitivities(self, inputs: Sequence[ControlInput]) -> np.ndarray:
        """`sensitivity` of every patient of a batch: [N]."""
        return np.array([self.sensitivity(i) for i in inputs])

    def _update_sensitivity(self, inp: ControlInput) -> None:
        """Autosens in its simplest form: a low is evidence that insulin works harder than
        the settings say (a child's ISF in the settings can be half the truth). Each new low
        episode multiplies the factor; it relaxes back to 1 over days without lows."""
        c = self.config
        a = self._sens.setdefault(inp.settings.name, _Autosens())
        t = inp.time if isinstance(inp.time, pd.Timestamp) else pd.Timestamp(inp.time)
        if a.time is not None and c.autosens_tau_h > 0:
            hours = max(0.0, (t.value - a.time.value) / 3.6e12)  # ns → h (hot path)
            a.factor = 1.0 + (a.factor - 1.0) * float(np.exp(-hours / c.autosens_tau_h))
        a.time = t
        g = inp.glucose_mgdl
        if not np.isfinite(g):
            return
        if g < c.autosens_low_mgdl and not a.in_low:
            a.factor = min(c.autosens_max, a.factor * c.autosens_step)
            a.in_low = True
        elif g >= c.autosens_low_mgdl + 20.0:
            a.in_low = False

    def _bolus_room(
        self,
        inputs: Sequence[ControlInput],
        net_iob: np.ndarray,
        cob_g: np.ndarray,
        sens: np.ndarray | None = None,
    ) -> np.ndarray:
        """Largest bolus worth considering now, per patient (U).

        A bolus calculator's bound, independent of the forecaster, so a forecaster that keeps
        predicting a rise cannot make the MPC stack insulin: net IOB after the bolus may not
        exceed what either the carbs on board (counted generously, + carb-count uncertainty)
        or the glucose above target justifies — the larger of the two, not their sum, since
        a post-meal rise *is* the carbs on board showing up. Corrections add at most
        `smb_basal_minutes` of basal a cycle (oref1's SMB rule) and never take net IOB above
        `correction_basal_hours` of basal (a child's ISF in the settings can be half the
        truth); never above max bolus or the room under max IOB.
        """
        c = self.config
        if sens is None:  # [N] autosens factors (the cycle passes its own)
            sens = self.sensitivities(inputs)
        out = np.zeros(len(inputs))
        for i, inp in enumerate(inputs):
            s = inp.settings
            g = inp.glucose_mgdl
            net = max(0.0, net_iob[i])
            carbs = c.carb_room_factor * cob_g[i] / s.carb_ratio_g_per_u
            isf = s.isf_mgdl_per_u * c.correction_isf_scale * sens[i]
            corr = max(0.0, (g - s.target_mgdl) / isf) if np.isfinite(g) else 0.0
            corr = min(corr, c.correction_basal_hours * s.basal_u_per_h)  # oref0's max IOB idea
            # carbs nobody bolused for (the supervisor held a meal bolus during a low) may be
            # covered at once; corrections come at most `smb_basal_minutes` of basal a cycle
            smb = c.smb_basal_minutes / 60.0 * s.basal_u_per_h
            room = max(carbs - net, min(max(carbs, corr) - net, smb))
            out[i] = max(0.0, min(room, _limit(inp)))
        return out

    def _uam_room(
        self,
        inputs: Sequence[ControlInput],
        net_iob: np.ndarray,
        meal_est: MealEstimate | None,
        since_announced_min: np.ndarray,
        sens: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Room for an unannounced meal, per patient: (net IOB it may still add, U; the most
        one automatic bolus may give, U). A share (`uam_room_factor`) of what the meal's
        estimated remaining carbs and the glucose above target need — the full correction,
        not capped like `_bolus_room`'s: the rise is the meal showing up — less net IOB;
        each bolus at most `uam_smb_basal_minutes` of basal (oref1's SMB rule). Zero where no
        meal is detected (the detector never fires on a falling or low trend)."""
        c = self.config
        if sens is None:  # [N] autosens factors (the cycle passes its own)
            sens = self.sensitivities(inputs)
        n = len(inputs)
        room, cap = np.zeros(n), np.zeros(n)
        if meal_est is None:
            return room, cap
        for i, inp in enumerate(inputs):
            if not meal_est.detected[i]:
                continue
            s = inp.settings
            isf = s.isf_mgdl_per_u * c.correction_isf_scale * sens[i]
            need = c.uam_room_factor * (
                meal_est.carbs_g[i] / (s.carb_ratio_g_per_u * sens[i])
                + max(0.0, inp.glucose_mgdl - s.target_mgdl) / isf
            )
            if since_announced_min[i] < c.announcing_hours * 60.0:
                need = min(need, c.uam_max_basal_hours * s.basal_u_per_h)
            room[i] = max(0.0, min(need - max(0.0, net_iob[i]), _limit(inp)))
            cap[i] = c.uam_smb_basal_minutes / 60.0 * s.basal_u_per_h
        return room, cap

    def _meal_bolus(
        self, inputs: Sequence[ControlInput], net_iob: np.ndarray, sens: np.ndarray | None = None
    ) -> np.ndarray:
        """A bolus calculator's answer for the meal announced now, per patient (U).

        Carbs / carb ratio (/ the autosens factor), plus — with `meal_correction` — a
        correction above `correct_above_mgdl` minus positive net IOB (a pump wizard's). The
        MPC scales it between `meal_fractions`: less when the forecaster sees a low coming,
        never more than the clinician's settings say, however confident the forecaster is
        about a meal's rise. Trial data say corrections are safer on the automatic path
        (capped per cycle and in net IOB) than folded into a meal bolus.
        """
        c = self.config
        if sens is None:  # [N] autosens factors (the cycle passes its own)
            sens = self.sensitivities(inputs)
        out = np.zeros(len(inputs))
        for i, inp in enumerate(inputs):
            s = inp.settings
            g = inp.glucose_mgdl
            f = sens[i]
            corr = 0.0
            if c.meal_correction and np.isfinite(g) and g > c.correct_above_mgdl:
                corr = max(0.0, (g - s.target_mgdl) / (s.isf_mgdl_per_u * f) - max(0.0, net_iob[i]))
            out[i] = meal_bolus_u(inp.carbs_announced_g, s) / f + corr
        return out

    def _cob_now(self, past: np.ndarray, future: np.ndarray) -> np.ndarray:
        """Carbs on board now plus carbs announced for the horizon: [N] g."""
        fut = _finite0(future[:, :, self._fc]).sum(axis=1)
        if self._pcob is not None:
            now = _finite0(past[:, -1, self._pcob])
        else:  # no COB feature: the window's announced carbs, unabsorbed
            now = _finite0(past[:, :, self._pc]).sum(axis=1)
        return now + fut

    # -- decision ------------------------------------------------------------------------

    def propose(self, inputs: Sequence[ControlInput]) -> list[Proposal]:
        inputs = list(inputs)
        out: list[Proposal | None] = [None] * len(inputs)
        for inp in inputs:
            self._update_sensitivity(inp)
        live = [i for i, inp in enumerate(inputs) if np.isfinite(inp.glucose_mgdl)]
        for i, inp in enumerate(inputs):
            if i not in live:  # no reading to forecast from: scheduled basal, no bolus
                out[i] = Proposal(
                    inp.settings.basal_u_per_h,
                    self.config.temp_minutes,
                    0.0,
                    reason=f"{self.name}: no glucose reading → scheduled basal",
                )
        if live:
            batch = [inputs[i] for i in live]
            for i, p in zip(live, self._decide(batch)):
                out[i] = p
        return [p for p in out if p is not None]

    def _decide(self, inputs: list[ControlInput]) -> list[Proposal]:
        w, c = self.window, self.config
        n, h = len(inputs), w.horizon_slots
        past = np.stack([i.past for i in inputs]).astype(np.float32)  # [N, L, Fp]
        future = np.stack([i.future for i in inputs]).astype(np.float32)  # [N, H, Ff]
        settings = [i.settings for i in inputs]
        isf = np.array([s.isf_mgdl_per_u for s in settings])  # [N]
        sens = self.sensitivities(inputs)  # [N] autosens factor ≥ 1
        cr = np.array([s.carb_ratio_g_per_u for s in settings])  # [N]
        basal_h = np.array([s.basal_u_per_h for s in settings])  # [N]
        curve = c.insulin_curve
        steady_iob = basal_iob_u(basal_h, slot_minutes=w.slot_minutes, curve=curve)
        iob = np.array([i.iob_u for i in inputs])  # [N] before this cycle's dose
        cob_now = self._cob_now(past, future)  # [N] g, this slot's announced carbs included
        isf_eff = isf * sens
        meal_est = None
        since = np.array([minutes_since_announced(i.history, w.slot_minutes) for i in inputs])
        if self._uam is not None:
            meal_est = self._uam.estimate(
                past, isf_eff, cr * sens, basal_h, since, net_iob_u=iob - steady_iob
            )
        self.last_meal = meal_est
        if self._response is not None and self._detector is not None:
            dg, net_act, _ = self._detector.changes(past[:, -2:], basal_h)  # [N, 1] each
            quiet = self._detector.announced_cob(past) <= c.uam_detector.announced_cob_max_g
            meal_now = np.zeros(n, bool) if meal_est is None else meal_est.detected
            self._response.update(
                [s.name for s in settings],
                np.array([pd.Timestamp(i.time).value for i in inputs], np.float64),
                isf * net_act[:, -1],
                -dg[:, -1],
                quiet & ~meal_now,
                meal_now,
            )
        sens_now = self.sensitivities(inputs)  # [N] after this cycle's evidence
        lad = self.ladder(
            inputs, iob - steady_iob, cob_now, meal_est, sens=sens_now, since_announced_min=since
        )
        k = lad.basal.shape[1]
        pst, fut = self.apply_plans(past, future, lad)  # [N, K, L, Fp], [N, K, H, Ff]
        # a rung equal to the one below it (no bolus room; high temps collapsed at a meal)
        # needs no forecast of its own: send each distinct plan once, in ONE batched call
        same = np.zeros((n, k), dtype=bool)  # [N, K]
        same[:, 1:] = (
            (lad.basal[:, 1:] == lad.basal[:, :-1]) & (lad.bolus[:, 1:] == lad.bolus[:, :-1])
        ).all(axis=2)
        distinct = ~same
        groups = np.repeat(np.arange(n), k).reshape(n, k)[distinct]  # [R]
        fc = self.predictor.forecast(
            pst[distinct],  # [R ≤ N*K, L, Fp]
            fut[distinct],  # [R, H, Ff]
            groups=groups,  # a patient's candidates share one forecaster (model or fallback)
            settings=settings,  # the fallback forecasts each patient with its own ISF/CR
        )
        src = np.maximum.accumulate(np.where(distinct, np.arange(k)[None, :], 0), axis=1)
        row = np.cumsum(distinct.ravel()).reshape(n, k) - 1  # row of each distinct rung
        idx = np.take_along_axis(row, src, axis=1)  # [N, K] forecast row of every rung
        glucose = fc.glucose[idx]  # [N, K, H, Q]
        pred = glucose.astype(np.float64)
        if c.monotone:
            pred = np.minimum.accumulate(pred, axis=1)  # more insulin never raises a forecast
        uam_tail = None
        if meal_est is not None:
            # an unannounced meal is a disturbance the forecaster was never told about: add
            # its estimated rise to every plan's forecast (the same for all rungs, so the
            # ladder's order and the cost's convexity stand); quantiles below the median get
            # only the share the estimate's uncertainty leaves
            path = meal_est.path_mgdl(h)[:, None, :, None]  # [N, 1, H, 1]
            share = np.where(np.arange(pred.shape[3]) < self._qmed, 1.0 - c.uam_uncertainty, 1.0)
            pred = pred + path * share  # [N, K, H, Q]
            uam_tail = meal_est.tail_mgdl(h)  # [N] mg/dL after the horizon

        # what insulin and carbs still on board at the horizon's end will do afterwards
        ins_end = self._tail.insulin_left(past, lad.basal + lad.bolus, iob, self._pb, self._pbo)
        steady_end = basal_iob_u(
            basal_h, slot_minutes=w.slot_minutes, curve=curve, include_current=True
        )  # [N] the plan's last slot (age 0) counts in full, as on scheduled basal
        ins_end = ins_end - steady_end[:, None]  # [N, K] net of scheduled basal
        cob_end = self._tail.carbs_left(past, future, self._pc, self._fc, self._pcob)  # [N]
        planned = (lad.basal + lad.bolus).sum(axis=2)  # [N, K] U over now + horizon
        scheduled = basal_h * w.slot_minutes / 60.0 * (h + 1)  # [N]
        temp_h = c.temp_minutes / 60.0
        extra_u = lad.bolus_now + np.maximum(lad.rate_u_per_h - basal_h[:, None], 0.0) * temp_h
        carbs_now = np.array([max(i.carbs_announced_g, 0.0) for i in inputs])  # [N]
        meal_sure = (1.0 - c.carb_uncertainty) * carbs_now / cr / sens  # [N] U nobody doubts
        if meal_est is not None:  # an unannounced meal's share counts as sure as the room
            meal_sure = meal_sure + c.uam_room_factor * meal_est.carbs_g / (cr * sens)
        cost = self.cost(
            pred,
            carb_tail=(isf / cr) * cob_end,
            insulin_tail=(isf * sens)[:, None] * ins_end,
            insulin_u=planned - scheduled[:, None],
            targets=np.array([s.target_mgdl for s in settings]),
            extra_mgdl=(isf * sens)[:, None] * np.maximum(extra_u - meal_sure[:, None], 0.0),
            glucose_now=np.array([i.glucose_mgdl for i in inputs]),
            uam_tail=uam_tail,
        )  # [N, K]
        best = np.argmin(cost, axis=1)  # first (least insulin) among ties
        self.last_forecast, self.last_cost, self.last_ladder = fc, cost, lad
        props = []
        for i, kk in enumerate(best):
            why = f"{self.name}: {lad.label[kk]} (cost {cost[i, kk]:.0f})"
            if sens[i] != 1.0:
                why += f"; autosens ×{sens[i]:.2f}"
            if meal_est is not None and meal_est.detected[i]:
                why += (
                    f"; unannounced meal: ~{meal_est.carbs_g[i]:.0f} g still to absorb "
                    f"(rise {meal_est.deviation[i]:.1f} mg/dL/5 min unexplained)"
                )
            if fc.fallback[idx[i, 0]]:
                why += f"; forecast fallback: {'; '.join(fc.reasons) or 'model unavailable'}"
            props.append(
                Proposal(
                    temp_basal_u_per_h=float(lad.rate_u_per_h[i, kk]),
                    duration_min=c.temp_minutes,
                    bolus_u=float(lad.bolus_now[i, kk]),
                    reason=why,
                    predicted_mgdl=glucose[i, kk],
                )
            )
        return props

    def apply_plans(
        self, past: np.ndarray, future: np.ndarray, lad: Ladder
    ) -> tuple[np.ndarray, np.ndarray]:
        """Write every candidate plan into copies of the window.

        `forecast.windows` ends `past` with the latest reading's slot, whose insulin is the
        insulin this cycle decides. A learned forecaster, though, only answers "what if"
        questions causally for *future* insulin: its monotone insulin head (and the
        interventional-accuracy check of `training.interventional`) acts on
        ``future[..., basal_u / bolus_u]``, while insulin in the past window goes through
        the encoder, which learned from data where a bolus in the last slot means a meal is
        coming — so more insulin there can *raise* its forecast. With ``decision_slot =
        "future"`` (default) the plan therefore starts at ``future[0]`` (the model sees the
        dose 5 minutes late, a small conservative error) and the last past slot keeps what the
        runtime put there (scheduled basal, no bolus). ``"past"`` writes slot 0 into the
        last past slot (and its IOB) and slots 1…H into `future`, as the frames are laid out.
        """
        k = lad.basal.shape[1]
        pst = np.repeat(past[:, None], k, axis=1)  # [N, K, L, Fp]
        fut = np.repeat(future[:, None], k, axis=1)  # [N, K, H, Ff]
        h = future.shape[1]
        if self.config.decision_slot == "future":
            fut[..., self._fb] = lad.basal[:, :, :h]
            fut[..., self._fbo] = lad.bolus[:, :, :h]
            return pst, fut
        given = past[:, -1, self._pb].astype(np.float64) + past[:, -1, self._pbo]  # [N]
        now = lad.basal[:, :, 0] + lad.bolus[:, :, 0]  # [N, K]
        pst[:, :, -1, self._pb] = lad.basal[:, :, 0]
        pst[:, :, -1, self._pbo] = lad.bolus[:, :, 0]
        if self._piob is not None:
            pst[:, :, -1, self._piob] += (now - given[:, None]).astype(np.float32)
        fut[..., self._fb] = lad.basal[:, :, 1:]
        fut[..., self._fbo] = lad.bolus[:, :, 1:]
        return pst, fut

    def cost(
        self,
        pred: np.ndarray,
        *,
        carb_tail: np.ndarray,
        insulin_tail: np.ndarray,
        insulin_u: np.ndarray,
        targets: np.ndarray,
        extra_mgdl: np.ndarray | None = None,
        glucose_now: np.ndarray | None = None,
        uam_tail: np.ndarray | None = None,
    ) -> np.ndarray:
        """[N, K, H, Q] forecasts → [N, K] cost (convex in every predicted value)."""
        z, unc = self.config.cost, self.config.carb_uncertainty
        lo = pred[..., self._qlo]  # [N, K, H]
        med = pred[..., self._qmed]  # [N, K, H]
        relu = _relu
        path = (
            z.w_low * relu(z.low_mgdl - lo) ** 2
            + z.w_severe_low * relu(z.severe_low_mgdl - lo) ** 2
            + z.w_high * relu(med - z.high_mgdl) ** 2
            + z.w_very_high * relu(med - z.very_high_mgdl) ** 2
        ).mean(axis=2)  # [N, K]
        ev = med[:, :, -1] + carb_tail[:, None] - insulin_tail  # [N, K]
        if uam_tail is not None:  # an unannounced meal's rise after the horizon
            ev = ev + uam_tail[:, None]
        kappa = 1.0 + self.config.isf_uncertainty
        ev_lo = lo[:, :, -1] + (1 - unc) * carb_tail[:, None] - kappa * insulin_tail  # [N, K]
        if uam_tail is not None:
            ev_lo = ev_lo + (1.0 - self.config.uam_uncertainty) * uam_tail[:, None]
        if z.momentum_minutes > 0 and glucose_now is not None:
            # the horizon's average fall of the lower quantile, continued (oref0 projects its
            # deviation 30 min on): a function of the horizon's last value and the current
            # reading only, so the cost stays convex and non-increasing in every prediction
            horizon_min = lo.shape[2] * self.window.slot_minutes
            fall = np.maximum(glucose_now[:, None] - lo[:, :, -1], 0.0) / horizon_min
            ev_lo = ev_lo - fall * z.momentum_minutes
        lo_band = targets[:, None] + z.eventual_band[0]
        hi_band = targets[:, None] + z.eventual_band[1]
        term = (
            z.w_eventual_high * relu(ev - hi_band) ** 2
            + z.w_eventual_low * relu(lo_band - ev) ** 2
            + z.w_eventual_hypo * relu(z.low_mgdl - ev_lo) ** 2
        )
        reg = z.w_insulin * np.maximum(insulin_u, 0.0)
        if extra_mgdl is not None:  # partial corrections: re-planned every 5 minutes anyway
            reg = reg + z.w_extra * extra_mgdl**2
        return path + term + reg


@dataclass
class _Autosens:
    factor: float = 1.0
    time: pd.Timestamp | None = None
    in_low: bool = False


def _limit(inp: ControlInput) -> float:
    """The largest bolus the supervisor would let through unchanged (max bolus, IOB room)."""
    s = inp.settings
    return max(0.0, min(s.max_bolus_u, s.max_iob_u - max(0.0, inp.iob_u)))


def _finite0(x: np.ndarray) -> np.ndarray:
    """float64 copy with NaN/inf → 0 (a cheaper nan_to_num for the hot path)."""
    x = np.asarray(x, dtype=np.float64)
    return np.where(np.isfinite(x), x, 0.0)


def _relu(x: np.ndarray) -> np.ndarray:
    return np.maximum(x, 0.0)


class _TailKernels:
    """Remaining IOB / COB at the end of the horizon, as dot products with fixed kernels.

    Ages follow `forecast.insulin`: a dose counts as given at the start of its slot; the
    horizon ends H slots after the last past slot (slot 0 of a plan).
    """

    def __init__(self, w: WindowConfig, ins: InsulinCurve, carbs: CarbCurve) -> None:
        sm, n_past, h = w.slot_minutes, w.past_slots, w.horizon_slots
        end = h * sm  # minutes from now (the last past slot) to the horizon's end
        age_now = (n_past - 1 - np.arange(n_past - 1)) * sm  # [L-1] earlier past slots' ages now
        self.ins_past_now = ins.iob_fraction(age_now)  # [L-1]
        self.ins_past_end = ins.iob_fraction(age_now + end)  # [L-1]
        self.ins_plan_end = ins.iob_fraction(end - np.arange(h + 1) * sm)  # [1+H]
        age_now_c = (
            n_past - 1 - np.arange(n_past)
        ) * sm  # [L] carbs: the last slot's meal is known
        self.cob_past_now = carbs.cob_fraction(age_now_c)
        self.cob_past_end = carbs.cob_fraction(age_now_c + end)
        self.cob_fut_end = carbs.cob_fraction(end - (np.arange(h) + 1) * sm)  # [H]
        # doses older than the window: treat them as ~1 h older than the window's start
        old = n_past * sm + 60.0
        self.ins_old_decay = float(ins.iob_fraction(old + end) / max(ins.iob_fraction(old), 1e-9))
        self.cob_old_decay = float(
            carbs.cob_fraction(old + end) / max(carbs.cob_fraction(old), 1e-9)
        )

    def insulin_left(
        self, past: np.ndarray, plan: np.ndarray, iob_now: np.ndarray, bi: int, boi: int
    ) -> np.ndarray:
        """IOB (U) at the horizon's end: [N, K] = earlier doses + each plan + older doses.

        `iob_now` is the IOB before this cycle's dose; what the window's earlier slots do not
        explain of it comes from doses older than the window.
        """
        dose = past[:, :-1, bi].astype(np.float64) + past[:, :-1, boi]  # [N, L-1]
        older = np.maximum(iob_now - dose @ self.ins_past_now, 0.0)  # [N]
        common = dose @ self.ins_past_end + older * self.ins_old_decay  # [N]
        return common[:, None] + plan @ self.ins_plan_end  # [N, K]

    def carbs_left(
        self, past: np.ndarray, future: np.ndarray, ci: int, fci: int, cobi: int | None
    ) -> np.ndarray:
        """COB (g) left at the horizon's end: [N] (window's carbs + announced + older)."""
        carbs = _finite0(past[:, :, ci])  # [N, L]
        fut = _finite0(future[:, :, fci])  # [N, H]
        older = np.zeros(len(past))
        if cobi is not None:  # the window's own COB feature knows about meals before it
            cob_now = _finite0(past[:, -1, cobi])
            older = np.maximum(cob_now - carbs @ self.cob_past_now, 0.0)
        return carbs @ self.cob_past_end + older * self.cob_old_decay + fut @ self.cob_fut_end


def physio_predictor(
    config: WindowConfig | None = None, quantiles: Sequence[float] = (0.1, 0.5, 0.9)
) -> FallbackPredictor:
    """The settings-parameterised physiological forecaster behind the same checks.

    For the ``physio-mpc`` ablation: the same MPC, the same cost, the same ladder — only the
    forecaster differs, so the difference in outcomes is what the learned model buys.
    """
    from serving.predictor import SettingsPhysio

    physio = SettingsPhysio(config or WindowConfig(), quantiles)
    return FallbackPredictor(physio, physio)
