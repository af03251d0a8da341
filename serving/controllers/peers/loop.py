"""Loop, as Tidepool's pyloopkit (``opsb-pyloopkit==0.1.0``, BSD-2-Clause), as a glucast
controller: the real code in a long-running process of its own venv (pyloopkit pins
numpy < 2).

Each cycle, for each patient, the adapter turns the `ControlInput` and its `SlotHistory` into
pyloopkit's input dictionary (`build_request`; the JSON "previous run" form), the driver
(``loop_driver.py``) calls ``pyloopkit.loop_data_manager.update`` and the recommendation
becomes a `Proposal` (`proposal_from_result`).

What Loop is given (the settings used, `LoopConfig`):

* CGM readings (slots with a reading), delivered insulin as pump doses — temp basals
  rebuilt from the delivered basal per slot (runs at the scheduled rate left out: Loop counts
  insulin net of the schedule) and boluses — and announced carbs, each with Loop's "medium"
  absorption time (180 min) since the simulated person does not pick one;
* one schedule entry each for basal, ISF, carb ratio and the correction range (target to
  target); max basal = what the supervisor lets through (min(max basal, 3 × max daily
  basal, 4 × scheduled), oref0's caps, which glucast applies to every controller; Loop
  itself has only the one setting), floored to the 0.05 U/h grid as a pump's setting is;
  the settings' max bolus, suspend threshold = the settings'
  ``low_suspend_mgdl``, the exponential insulin model with DIA 360 min and peak 75 min
  (Loop's "Rapid-Acting – Adults"; glucast's `InsulinCurve` is the same curve), insulin and
  carb delay 10 min, rate rounding 0.05 U/h (Omnipod);
* retrospective correction on (the Loop app runs it; pyloopkit's own default is off),
  dynamic carb absorption on, momentum 15 min, RC grouping/integration 30 min, recency 15 min,
  default absorption times 120/180/240 min (Loop's);
* no running temp basal (``last_temporary_basal`` empty): glucast's engine re-decides every
  5 min and re-sends a ≤ 30-min temp each cycle, so the adapter is stateless. Loop's
  ``recommended_temp_basal`` None ("keep what runs") and ``[0, 0]`` (cancel) then both mean
  the scheduled basal.

**Boluses.** pyloopkit ports Loop 2.x (2019), which has no automatic bolus (that came with
Loop 3's "automatic bolus" dosing strategy): closed loop is **temp basal only**. Its
``recommended_bolus`` is the bolus Loop *offers* the person; with ``meal_bolus`` (default)
the person accepts it when they announce a meal — that is how Loop is used — and at no other
time. Unannounced meals therefore get temp basals only.

Units: the temp basal is U/h and minutes, the bolus U, predictions mg/dL.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd

from serving.controllers.peers.history import (
    basal_runs,
    checked_history,
    iso,
    iso_many,
    on_grid,
    utc_index,
)
from serving.controllers.peers.process import (
    PeerAnswerError,
    PeerError,
    PeerProcess,
    answer_batch,
    build_batch,
    child_env,
)
from serving.safety.rules import max_basal
from serving.types import ControlInput, PatientSettings, Proposal

PEER = "loop"


@dataclass(frozen=True)
class LoopConfig:
    """How glucast runs Loop (the values are the ones used; see the module docstring)."""

    dia_min: float = 360.0
    peak_min: float = 75.0  # "Rapid-Acting – Adults" (children's model: 65)
    insulin_delay_min: float = 10.0
    carb_delay_min: float = 10.0
    carb_absorption_min: float = 180.0  # Loop's "medium" (the person picks none)
    default_absorption_times: tuple[float, float, float] = (120.0, 180.0, 240.0)
    retrospective_correction: bool = True
    dynamic_carb_absorption: bool = True
    momentum_minutes: float = 15.0
    rc_grouping_min: float = 30.0
    rc_integration_min: float = 30.0
    recency_min: float = 15.0
    rate_rounder: float = 0.05
    meal_bolus: bool = True  # the person accepts Loop's recommended bolus when announcing carbs
    # what the adapter passes. Loop computes 24 h of effects, but its decision reads only
    # DIA (6 h), carb absorption and the retrospective-correction window: over 1152 closed-
    # loop decisions (4 patients incl. child#008, unannounced meals, a day) 12 h gave exactly
    # the 24 h decisions, 8 h did not (3 differed by 0.05-0.2 U/h); 12 h is ~1.4x faster
    history_hours: float = 12.0
    timeout_s: float = 10.0  # per decision; past it the process is ended (PeerTimeoutError)


def max_basal_cap(s: PatientSettings) -> float:
    """The highest temp basal the supervisor lets through for these settings (U/h)."""
    daily = s.max_daily_basal_u_per_h or s.basal_u_per_h
    return float(max_basal(s.max_basal_u_per_h, daily, s.basal_u_per_h))


def build_request(
    inp: ControlInput, config: LoopConfig = LoopConfig(), *, bolus_now_u: float = 0.0
) -> dict:
    """pyloopkit's input dictionary of one decision, as JSON (pure).

    `bolus_now_u` adds a bolus at the cycle's time to the dose history: the meal bolus the
    person just accepted, for the second pass (see `LoopController.propose`).
    """
    s = inp.settings
    h = checked_history(inp, PEER, max_hours=config.history_hours)
    times = utc_index(h.time)
    now = times[-1]
    sched = float(s.basal_u_per_h)

    def z(t) -> str:
        return iso(t, zulu=False)

    doses: list[tuple[str, str, str, float]] = []  # (type, start, end, value), oldest first
    events: list[tuple[int, int, tuple[str, str, str, float]]] = []
    stamps = iso_many(times, zulu=False).tolist()  # per slot, vectorised
    runs = basal_runs(h, sched)
    ends = iso_many(
        pd.DatetimeIndex([r.start_ns + r.minutes * 60 * 10**9 for r in runs], tz="UTC"),
        zulu=False,
    ).tolist()
    for run, end in zip(runs, ends, strict=True):
        events.append((run.start_ns, 0, ("TempBasal", stamps[run.index], end, run.rate_u_per_h)))
    for i in np.flatnonzero(h.bolus_u > 0):
        events.append((int(times.asi8[i]), 1, ("Bolus", stamps[i], stamps[i],
                                               float(h.bolus_u[i]))))  # fmt: skip
    if bolus_now_u > 0:
        events.append((now.value, 2, ("Bolus", z(now), z(now), float(bolus_now_u))))
    events.sort(key=lambda e: (e[0], e[1]))
    doses = [e[2] for e in events]
    ok = np.flatnonzero(np.isfinite(h.glucose))
    if len(ok) == 0:
        raise PeerAnswerError(
            f"loop ({s.name} at {now}): no glucose reading in the history", peer=PEER
        )
    carbs = np.flatnonzero(h.carbs_g > 0)
    target = float(s.target_mgdl)
    return {
        "glucose_dates": [stamps[i] for i in ok],
        "glucose_values": [float(h.glucose[i]) for i in ok],
        "dose_types": [d[0] for d in doses],
        "dose_start_times": [d[1] for d in doses],
        "dose_end_times": [d[2] for d in doses],
        "dose_values": [d[3] for d in doses],
        "dose_delivered_units": [None] * len(doses),
        "carb_dates": [stamps[i] for i in carbs],
        "carb_values": [float(h.carbs_g[i]) for i in carbs],
        "carb_absorption_times": [float(config.carb_absorption_min)] * len(carbs),
        "settings_dictionary": {
            "model": [float(config.dia_min), float(config.peak_min)],
            "momentum_data_interval": float(config.momentum_minutes),
            "suspend_threshold": float(s.low_suspend_mgdl),
            "dynamic_carb_absorption_enabled": bool(config.dynamic_carb_absorption),
            "retrospective_correction_integration_interval": float(config.rc_integration_min),
            "recency_interval": float(config.recency_min),
            "retrospective_correction_grouping_interval": float(config.rc_grouping_min),
            "retrospective_correction_enabled": bool(config.retrospective_correction),
            "default_absorption_times": [float(x) for x in config.default_absorption_times],
            "max_basal_rate": on_grid(max_basal_cap(s), config.rate_rounder),
            "max_bolus": float(s.max_bolus_u),
            "rate_rounder": float(config.rate_rounder),
            "insulin_delay": float(config.insulin_delay_min),
            "carb_delay": float(config.carb_delay_min),
        },
        "sensitivity_ratio_start_times": ["00:00:00"],
        "sensitivity_ratio_end_times": ["23:59:59"],
        "sensitivity_ratio_values": [float(s.isf_mgdl_per_u)],
        "carb_ratio_start_times": ["00:00:00"],
        "carb_ratio_values": [float(s.carb_ratio_g_per_u)],
        "basal_rate_start_times": ["00:00:00"],
        "basal_rate_values": [sched],
        "basal_rate_minutes": [1440.0],
        "target_range_start_times": ["00:00:00"],
        "target_range_end_times": ["23:59:59"],
        "target_range_minimum_values": [target],
        "target_range_maximum_values": [target],
        "last_temporary_basal": [],
        "time_to_calculate_at": z(now),
    }


def meal_bolus_offered(result: dict, inp: ControlInput, config: LoopConfig) -> float:
    """The bolus the person takes this cycle: Loop's recommendation, when they announce a meal."""
    if not config.meal_bolus or not (inp.carbs_announced_g or 0) > 0:
        return 0.0
    rec = result.get("recommended_bolus")
    return _finite(rec[0], "recommended bolus") if isinstance(rec, list) and rec else 0.0


def proposal_from_result(
    result: dict, inp: ControlInput, config: LoopConfig, *, after_bolus: dict | None = None
) -> Proposal:
    """Loop's recommendation (the driver's result) → a `Proposal`.

    At an announced meal the person takes Loop's recommended bolus and Loop loops again with
    that bolus in its dose history (as the app does after a bolus): `after_bolus` is that
    second result, whose temp basal is the one proposed. Taking both from one result would
    dose the meal twice (the first temp basal was computed without the bolus).
    """
    sched = float(inp.settings.basal_u_per_h)
    temp = (after_bolus if after_bolus is not None else result).get("recommended_temp_basal")
    rate, duration, what = sched, 30, "no temp needed: scheduled basal"
    if temp is not None:
        if not isinstance(temp, list) or len(temp) != 2:
            raise PeerAnswerError(f"loop recommended_temp_basal = {temp!r}", peer=PEER)
        r, d = _finite(temp[0], "temp basal rate"), _finite(temp[1], "temp basal duration")
        if d > 0:
            rate, duration, what = r, int(round(d)), f"temp basal {r:.2f} U/h × {d:.0f} min"
        else:
            what = "cancel temp: scheduled basal"
    bolus = 0.0
    rec = result.get("recommended_bolus")
    offered = 0.0
    notice = None
    if isinstance(rec, list) and rec:
        offered = _finite(rec[0], "recommended bolus")
        notice = rec[2] if len(rec) > 2 else None
    if config.meal_bolus and (inp.carbs_announced_g or 0) > 0:
        bolus = offered
        what += f"; meal bolus {bolus:.2f} U (Loop's recommendation, accepted; temp after it)"
    elif offered > 0:
        what += f"; bolus {offered:.2f} U offered, not taken (no automatic bolus in Loop 2)"
    last = after_bolus if after_bolus is not None else result
    preds = last.get("predicted_glucose_values") or []
    eventual = preds[-1] if preds else None
    cob = last.get("carbs_on_board")
    parts = [what]
    if eventual is not None:
        parts.append(f"eventual BG {eventual:.0f} mg/dL")
    if cob is not None:
        parts.append(f"COB {cob:.0f} g")
    if notice:
        parts.append(f"notice {notice}")
    return Proposal(
        temp_basal_u_per_h=float(rate),
        duration_min=int(duration),
        bolus_u=float(bolus),
        reason="loop: " + "; ".join(parts),
    )


def _finite(v, what: str) -> float:
    try:
        x = float(v)
    except (TypeError, ValueError):
        x = math.nan
    if not math.isfinite(x) or x < 0:
        raise PeerAnswerError(f"loop {what} = {v!r}", peer=PEER)
    return x


class LoopController:
    """Loop (pyloopkit 0.1.0), one long-running process in the peer venv for all patients.

    Stateless between cycles; call `close()` (or use it as a context manager) to end the
    process.
    """

    name = "loop"
    reads_history = True  # the loop gives it the CGM readings of the whole record span

    def __init__(
        self,
        config: LoopConfig | None = None,
        *,
        peers_root: str | Path | None = None,
        **overrides,
    ) -> None:
        self.config = replace(config or LoopConfig(), **overrides)
        from serving.controllers.peers.env import LOOP_DRIVER, require_loop

        py = require_loop(None if peers_root is None else Path(peers_root))
        self.process = PeerProcess(
            PEER,
            [str(py), "-I", str(LOOP_DRIVER)],
            env=child_env(),
            timeout_s=self.config.timeout_s,
        )

    def settings_used(self) -> dict:
        return {"peer": "loop", "package": "opsb-pyloopkit==0.1.0", **asdict(self.config)}

    def propose(self, inputs: Sequence[ControlInput]) -> list[Proposal]:
        """One proposal per input: the cohort in one round trip, then one more for the
        patients who accepted a meal bolus. A patient whose request or answer fails fails
        alone (`PeerError` with `failed` and `partial`, the others' proposals)."""
        names = [inp.settings.name for inp in inputs]
        requests, failed = build_batch(lambda i: build_request(inputs[i], self.config), len(inputs))
        try:
            first = answer_batch(self.process, requests, lambda i, res: res, names, failed=failed)
        except PeerError as e:
            if not e.failed:  # a timeout or a crash: nobody has an answer
                raise
            first, failed = e.partial, dict(e.failed)
        boluses = [
            0.0 if r is None else meal_bolus_offered(r, inp, self.config)
            for r, inp in zip(first, inputs)
        ]
        again = [i for i, b in enumerate(boluses) if b > 0]
        second: dict[int, dict | None] = {}
        if again:
            try:
                res2 = answer_batch(
                    self.process,
                    [build_request(inputs[i], self.config, bolus_now_u=boluses[i]) for i in again],
                    lambda k, res: res,
                    [names[i] for i in again],
                )
            except PeerError as e:
                if not e.failed:
                    raise
                res2 = e.partial
                for k, why in e.failed.items():
                    failed[again[k]] = f"after the meal bolus: {why}"
            second = dict(zip(again, res2))
        out: list[Proposal | None] = []
        for i, (r, inp) in enumerate(zip(first, inputs)):
            if r is None or i in failed:
                out.append(None)
                continue
            try:
                out.append(proposal_from_result(r, inp, self.config, after_bolus=second.get(i)))
            except PeerError as e:
                out.append(None)
                failed[i] = str(e)
        if failed:
            failed = dict(sorted(failed.items()))
            i, why = next(iter(failed.items()))
            raise PeerAnswerError(
                f"loop failed for {len(failed)} of {len(inputs)} patient(s); #{i} ({names[i]}): "
                f"{why}",
                peer=PEER,
                failed=failed,
                partial=out,
            )
        return [p for p in out if p is not None]

    def close(self) -> None:
        self.process.close()

    def __enter__(self) -> LoopController:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
