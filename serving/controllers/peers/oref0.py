"""OpenAPS oref0 0.7.1 (npm, MIT) as a glucast controller: the real code in a node process.

Each cycle, for each patient, the adapter turns the `ControlInput` and its `SlotHistory` into
the files an oref0 rig would have (`build_request`), the driver (``oref0_driver.js``) runs
oref0's lib/iob, lib/meal, lib/glucose-get-last and determine-basal on them, and the
suggestion becomes a `Proposal` (`proposal_from_result`). The supervisor checks it like any
other controller's.

What oref0 is given (the settings used, `Oref0Config`):

* **profile** — oref0's own defaults (lib/profile ``defaults()``, applied in the driver),
  overridden by the patient's settings: one schedule entry each for basal, ISF, carb ratio
  and target (min_bg = max_bg = target), ``max_basal`` = the settings' max basal (floored
  to the pump's 0.05 U/h grid, as a pump's setting is),
  ``max_daily_basal`` = the highest scheduled rate, ``dia`` 6 h with the "rapid-acting"
  curve (peak 75 min: glucast's `forecast.insulin.InsulinCurve` is the same curve), and
  ``max_iob`` from the settings. oref0's max_iob caps *net* IOB (above scheduled basal)
  while `PatientSettings.max_iob_u` is the absolute IOB the supervisor counts, so oref0 gets
  max_iob_u minus the steady IOB of scheduled basal (for `serving.insilico.cohort.settings_for`'s
  patients: one max bolus + 3 h of basal). Left at oref0's default 0, oref0 never adds
  insulin above basal.
* **SMB and UAM on**, as the OpenAPS docs recommend for meals that are not announced
  ("enableUAM" needs SMB to act without carbs: ``enableSMB_always``; also with COB and for
  6 h after carbs): ``microBolusAllowed``, maxSMBBasalMinutes 30, maxUAMSMBBasalMinutes 30
  (oref0's defaults), SMBInterval 3 min, bolus increment 0.05 U (an Omnipod's).
* **announced meals**: an oref0 user boluses for a meal themself (OpenAPS has no bolus
  calculator; the pump's does). With ``meal_bolus`` the adapter gives carbs / carb ratio,
  floored to the bolus increment, at the announcement, and writes that bolus into the pump
  history oref0 reads, as a rig would see it after the person bolused, so SMB does not dose
  the same carbs again. No correction is added: oref0 does corrections.
* **autosens** is not run (ratio 1.0): rigs run it every 30 min from 24 h of data, and the
  simulator's patients do not drift; `autosens_ratio` can set it.
* **currenttemp**: none running. glucast's engine re-decides every 5 minutes and the
  supervisor re-sends a ≤ 30-minute temp each cycle, so the adapter is stateless: oref0 always
  states the rate it wants (an answer with no rate, or a cancel, means scheduled basal).
* **history**: the last 8 h (`history_hours`: DIA + 2 h; with autosens off oref0 reads
  nothing older, checked against 24 h decision by decision, see `Oref0Config`).
* pump history newest first, TZ=UTC, glucose entries newest first from one device.

Units (checked by the sanity day in benchmarks/peer_latency.py): oref0's ``rate`` is U/h,
``duration`` minutes, ``units`` (the SMB) U, ``eventualBG`` and ``bg`` mg/dL.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from serving.controllers import basal_iob_u, meal_bolus_u
from serving.controllers.peers.history import (
    basal_runs,
    checked_history,
    epoch_ms,
    epoch_ms_many,
    iso,
    iso_many,
    on_grid,
    utc_index,
)
from serving.controllers.peers.process import (
    PeerAnswerError,
    PeerProcess,
    answer_batch,
    build_batch,
    child_env,
)
from serving.types import ControlInput, Proposal

PEER = "oref0"


@dataclass(frozen=True)
class Oref0Config:
    """How glucast runs oref0 (the values are the ones used; see the module docstring)."""

    dia_hours: float = 6.0
    curve: str = "rapid-acting"  # oref0's exponential curve, peak 75 min
    smb: bool = True  # microBolusAllowed + enableSMB_always/with_COB/after_carbs
    uam: bool = True  # enableUAM
    max_smb_basal_minutes: int = 30
    max_uam_smb_basal_minutes: int = 30
    smb_interval_min: int = 3
    bolus_increment_u: float = 0.05
    basal_increment_u_per_h: float = 0.05  # the pump's rate grid (max_basal is floored to it)
    meal_bolus: bool = True  # carbs / CR at an announced meal, as the person would bolus
    autosens_ratio: float = 1.0
    # what the adapter passes: DIA (6 h) + 2 h. oref0's rigs keep 24 h, but without autosens
    # nothing reads past DIA/meal absorption: over 3456 closed-loop decisions (4 patients incl.
    # child#008, announced with 20 % carb error for 2 days and unannounced for 1) 8 h and 12 h
    # gave exactly the 24 h decisions, 6 h did not (4 differed: the IOB tail); 3.5x faster
    history_hours: float = 8.0
    device: str = "glucast-cgm"  # glucose-get-last compares deltas from one device only
    timeout_s: float = 10.0  # per decision; past it the process is ended (PeerTimeoutError)
    max_temp_minutes: int = 30  # longer temps are proposed for this long, renewed each cycle
    # node processes a cohort's batch is split over (one core each; a second one starts only
    # when a batch has two patients or more, and the answers do not depend on the split)
    processes: int = 2

    def profile_prefs(self) -> dict:
        """The oref0 preferences (preferences.json keys) these settings stand for."""
        return {
            "curve": self.curve,
            "useCustomPeakTime": False,
            "enableUAM": bool(self.uam),
            "enableSMB_always": bool(self.smb),
            "enableSMB_with_COB": bool(self.smb),
            "enableSMB_after_carbs": bool(self.smb),
            "maxSMBBasalMinutes": int(self.max_smb_basal_minutes),
            "maxUAMSMBBasalMinutes": int(self.max_uam_smb_basal_minutes),
            "SMBInterval": int(self.smb_interval_min),
            "bolus_increment": float(self.bolus_increment_u),
        }


def build_request(inp: ControlInput, config: Oref0Config = Oref0Config()) -> dict:
    """The JSON request of one decision (pure: the same input gives the same request)."""
    s = inp.settings
    h = checked_history(inp, PEER, max_hours=config.history_hours)
    now = utc_index(h.time)[-1]
    sched = float(s.basal_u_per_h)
    max_daily = float(s.max_daily_basal_u_per_h or sched)
    steady = float(basal_iob_u(sched, include_current=True))
    profile = {
        **config.profile_prefs(),
        "dia": float(config.dia_hours),
        "max_iob": round(max(0.0, float(s.max_iob_u) - steady), 3),
        "current_basal": sched,
        "max_daily_basal": max_daily,
        "max_basal": on_grid(float(s.max_basal_u_per_h), config.basal_increment_u_per_h),
        "min_bg": float(s.target_mgdl),
        "max_bg": float(s.target_mgdl),
        "sens": float(s.isf_mgdl_per_u),
        "carb_ratio": float(s.carb_ratio_g_per_u),
        "out_units": "mg/dL",
        "temptargetSet": False,
        "basalprofile": _basal_profile(sched),
        "isfProfile": {
            "units": "mg/dL",
            "user_preferred_units": "mg/dL",
            "sensitivities": [
                {
                    "i": 0,
                    "x": 0,
                    "start": "00:00:00",
                    "offset": 0,
                    "endOffset": 1440,
                    "sensitivity": float(s.isf_mgdl_per_u),
                }
            ],
        },  # fmt: skip
        "bg_targets": {
            "units": "mg/dL",
            "user_preferred_units": "mg/dL",
            "targets": [
                {
                    "i": 0,
                    "x": 0,
                    "start": "00:00:00",
                    "offset": 0,
                    "low": float(s.target_mgdl),
                    "high": float(s.target_mgdl),
                    "min_bg": float(s.target_mgdl),
                    "max_bg": float(s.target_mgdl),
                }
            ],
        },  # fmt: skip
        "carb_ratios": {
            "units": "grams",
            "schedule": [
                {
                    "i": 0,
                    "x": 0,
                    "start": "00:00:00",
                    "offset": 0,
                    "ratio": float(s.carb_ratio_g_per_u),
                    "r": float(s.carb_ratio_g_per_u),
                }
            ],
        },  # fmt: skip
    }
    times = utc_index(h.time)
    events: list[tuple[int, int, list[dict]]] = []  # (time ms, order, records) → newest first
    for run in basal_runs(h, sched):
        ts = iso(run.start)
        events.append(
            (epoch_ms(run.start), 0, [
                {"_type": "TempBasalDuration", "timestamp": ts, "duration (min)": run.minutes},
                {"_type": "TempBasal", "timestamp": ts, "temp": "absolute",
                 "rate": run.rate_u_per_h},
            ])
        )  # fmt: skip
    stamps, ms = iso_many(times).tolist(), epoch_ms_many(times).tolist()  # per slot, vectorised
    for i in np.flatnonzero(h.bolus_u > 0):
        events.append(
            (ms[i], 1, [{"_type": "Bolus", "timestamp": stamps[i],
                         "amount": float(h.bolus_u[i]), "duration": 0}])
        )  # fmt: skip
    meal_u = _meal_bolus(inp, config)
    if meal_u > 0:
        events.append(
            (epoch_ms(now), 2, [{"_type": "Bolus", "timestamp": iso(now), "amount": meal_u,
                                 "duration": 0}])
        )  # fmt: skip
    events.sort(key=lambda e: (e[0], e[1]), reverse=True)
    pumphistory = [r for _, _, recs in events for r in recs]
    carbhistory = [
        {"created_at": stamps[i], "carbs": float(h.carbs_g[i]), "enteredBy": "glucast"}
        for i in np.flatnonzero(h.carbs_g > 0)[::-1]
    ]
    glucose = [
        {"date": ms[i], "dateString": stamps[i], "sgv": float(h.glucose[i]),
         "glucose": float(h.glucose[i]), "device": config.device, "type": "sgv"}
        for i in np.flatnonzero(np.isfinite(h.glucose))[::-1]
    ]  # fmt: skip
    return {
        "clock": iso(now),
        "profile": profile,
        "pumphistory": pumphistory,
        "carbhistory": carbhistory,
        "glucose": glucose,
        "basalprofile": _basal_profile(sched),
        "currenttemp": {"duration": 0, "rate": 0, "temp": "absolute"},
        "autosens": {"ratio": float(config.autosens_ratio)},
        "microBolusAllowed": bool(config.smb),
        "reservoir": None,
        "meal_bolus_u": meal_u,  # what the adapter added at `clock` (not an oref0 input)
    }


def _basal_profile(rate: float) -> list[dict]:
    return [{"i": 0, "start": "00:00:00", "minutes": 0, "rate": float(rate)}]


def _meal_bolus(inp: ControlInput, config: Oref0Config) -> float:
    if not config.meal_bolus:
        return 0.0
    u = meal_bolus_u(inp.carbs_announced_g, inp.settings)
    inc = config.bolus_increment_u
    return round(math.floor(u / inc + 1e-9) * inc, 3) if u > 0 else 0.0


def proposal_from_result(
    result: dict, request: dict, inp: ControlInput, *, max_minutes: int = 30
) -> Proposal:
    """oref0's suggestion (the driver's result) → a `Proposal`.

    ``rate``/``duration`` set a temp basal (U/h, min); duration 0 is oref0's cancel and no
    rate at all means "keep what runs", and nothing runs (see ``currenttemp``), so both are
    the scheduled basal. ``units`` is the SMB (U); the meal bolus the adapter gave is added.
    A temp longer than `max_minutes` (oref0 sets zero temps of up to 60 min beside an SMB, for
    a rig that may not loop again soon) is proposed for `max_minutes`: glucast's temps last at
    most 30 min and the engine decides again in 5, so the same zero temp is simply renewed
    (otherwise the supervisor would cut every such temp and count it as a change).
    """
    rt = result.get("suggested")
    if not isinstance(rt, dict):
        raise PeerAnswerError(f"oref0 answer has no 'suggested' object: {result!r}", peer=PEER)
    sched = float(inp.settings.basal_u_per_h)
    rate, duration = sched, 30
    longer = ""
    if "rate" in rt and rt.get("duration"):
        rate, duration = _finite(rt, "rate"), int(round(_finite(rt, "duration")))
        if duration > max_minutes:
            longer = f" [{duration} min asked: {max_minutes} min, renewed each cycle]"
            duration = max_minutes
    smb = _finite(rt, "units") if "units" in rt else 0.0
    meal_u = float(request.get("meal_bolus_u") or 0.0)
    reason = str(rt.get("reason", ""))
    if meal_u > 0:
        reason = f"meal bolus {meal_u:.2f} U (carbs/CR, by the person); {reason}"
    reason += longer
    if "rate" not in rt:
        reason += " [no temp asked: scheduled basal]"
    elif not rt.get("duration"):
        reason += " [cancel: scheduled basal]"
    return Proposal(
        temp_basal_u_per_h=float(rate),
        duration_min=int(duration),
        bolus_u=float(smb + meal_u),
        reason=f"oref0: {reason}",
    )


def _finite(rt: dict, key: str) -> float:
    try:
        v = float(rt[key])
    except (TypeError, ValueError):
        v = math.nan
    if not math.isfinite(v) or v < 0:
        raise PeerAnswerError(f"oref0 suggested {key} = {rt.get(key)!r}", peer=PEER)
    return v


class Oref0Controller:
    """OpenAPS oref0 0.7.1, one long-running node process for all patients.

    Stateless between cycles (oref0 reads everything from the history it is given), so one
    instance may serve any number of patients. Call `close()` (or use it as a context
    manager) to end the node process.
    """

    name = "oref0"
    reads_history = True  # the loop gives it the CGM readings of the whole record span

    def __init__(
        self,
        config: Oref0Config | None = None,
        *,
        peers_root: str | Path | None = None,
        **overrides,
    ) -> None:
        self.config = replace(config or Oref0Config(), **overrides)
        from serving.controllers.peers.env import OREF0_DRIVER, require_oref0

        node, mod = require_oref0(None if peers_root is None else Path(peers_root))
        if self.config.processes < 1:
            raise ValueError(f"oref0 needs at least one process, got {self.config.processes}")
        self.processes = [
            PeerProcess(
                PEER,
                [node, str(OREF0_DRIVER), str(mod)],
                env=child_env(),
                timeout_s=self.config.timeout_s,
            )
            for _ in range(self.config.processes)
        ]
        self.process = self.processes[0]

    def settings_used(self) -> dict:
        return {"peer": "oref0", "version": "0.7.1", **asdict(self.config)}

    def propose(self, inputs: Sequence[ControlInput]) -> list[Proposal]:
        """One proposal per input; the whole batch in one round trip per process. A patient
        whose request cannot be built or whose answer is refused fails alone (`PeerError`
        with `failed` and `partial`)."""
        requests, failed = build_batch(lambda i: build_request(inputs[i], self.config), len(inputs))
        return answer_batch(
            self.processes,
            requests,
            lambda i, res: proposal_from_result(
                res, requests[i], inputs[i], max_minutes=self.config.max_temp_minutes
            ),
            [inp.settings.name for inp in inputs],
            failed=failed,
        )

    def close(self) -> None:
        for p in self.processes:
            p.close()

    def __enter__(self) -> Oref0Controller:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
