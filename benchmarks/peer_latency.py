"""The peer controllers (OpenAPS oref0, Loop): a simulated day in closed loop, then latency.

1. **Sanity day** — each peer drives one virtual patient (default adult#001) for a day with a
   minimal loop of its own here: simulator CGM → `SlotHistory` → the peer (real code, its
   own process) → `serving.safety.Supervisor` (check, then its pump commands) → the trial's
   `CohortPump` → `forecast.sim.Simulator.step`. TIR on CGM and on true BG show that the
   adapter's units are right (a U/h read as U per slot, or mmol/L, would not give a sane day).
2. **Latency** — per-decision wall time of `propose([one patient])` on the 24 h history the
   day ends with (median / p99 over `--calls`), the process already running; and the first
   call's time (process start included).

Prints one JSON object on stdout and a table on stderr. Needs the peers
(`glucast peers install`). With `--record DIR` it also writes each peer's recorded
request/response fixture (tests/fixtures/peers/) from a cycle of the day.

    python benchmarks/peer_latency.py [--peers oref0,loop] [--patient adult#001] [--hours 24]
           [--calls 200] [--unannounced] [--seed 0] [--record tests/fixtures/peers]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

SLOT = 5


def make_controller(peer: str):
    if peer == "oref0":
        from serving.controllers.peers.oref0 import Oref0Controller

        return Oref0Controller()
    from serving.controllers.peers.loop import LoopController

    return LoopController()


def sanity_day(peer: str, patient: str, hours: float, seed: int, unannounced: bool) -> dict:
    """One patient in closed loop with the peer for `hours`; outcomes and the last input."""
    from forecast.glycemia import outcomes
    from forecast.insulin import InsulinCurve
    from forecast.sim import load_patients
    from serving.controllers import meal_bolus_u
    from serving.insilico.cohort import settings_for
    from serving.insilico.trial import CohortPump, TrialConfig, make_trial_simulator
    from serving.safety import SafetyState, Supervisor, assess_cgm, max_basal
    from serving.types import CGMStatus, ControlInput, Reading, SlotHistory

    cfg = TrialConfig(
        controller="basal-bolus",  # (only for the simulator's configuration)
        patients=patient,
        days=hours / 24.0,
        seed=seed,
        unannounced=unannounced,
    )
    patients = load_patients(patient)
    s = settings_for(patients)[0]
    sim = make_trial_simulator(cfg, patients)
    cycles = cfg.cycles
    cap = max_basal(s.max_basal_u_per_h, s.max_daily_basal_u_per_h or s.basal_u_per_h,
                    s.basal_u_per_h)  # fmt: skip
    pump = CohortPump(
        np.array([s.basal_u_per_h]), np.atleast_1d(cap), sim.pump.config.basal_increment_u_per_h
    )
    sup = Supervisor(s)
    kernel = InsulinCurve().iob_kernel(SLOT)  # [K], kernel[0] = 1: IOB after m slots
    k = len(kernel)
    prior = np.full(k, s.basal_u_per_h * SLOT / 60.0)  # steady basal before the day (IOB only)
    times = pd.DatetimeIndex([sim.start + pd.Timedelta(minutes=SLOT * c) for c in range(cycles)])
    times = times.tz_localize("UTC") if times.tz is None else times.tz_convert("UTC")
    glucose = np.full(cycles, np.nan)
    basal = np.zeros(cycles)
    bolus = np.zeros(cycles)
    carbs = np.zeros(cycles)
    bg = np.full(cycles, np.nan)
    readings: list[Reading] = []
    ctl = make_controller(peer)
    decision_s, changed, vetoes, errors = [], 0, {}, []
    inputs_at: dict[int, ControlInput] = {}
    proposals_at: dict[int, object] = {}
    try:
        for c in range(cycles):
            minute = c * SLOT
            now = times[c]
            g = float(sim.read_cgm()[0])
            carbs[c] = float(np.nan_to_num(sim.announced_carbs(minute, minute + SLOT)[0]))
            glucose[c] = g
            if math.isfinite(g):
                readings.append(Reading(time=now, glucose_mgdl=g, status=CGMStatus.OK))
            dose = np.concatenate([prior, basal[:c] + bolus[:c]])
            iob = float(dose[::-1][: k - 1] @ kernel[1:])  # before this slot's dose
            hist = SlotHistory(
                time=times[: c + 1].tz_convert(None).to_numpy(),
                glucose=glucose[: c + 1].copy(),
                basal_u=basal[: c + 1].copy(),
                bolus_u=bolus[: c + 1].copy(),
                carbs_g=carbs[: c + 1].copy(),
            )
            inp = ControlInput(
                time=now, past=np.zeros((0, 0)), future=np.zeros((0, 0)), glucose_mgdl=g,
                iob_u=iob, settings=s, carbs_announced_g=carbs[c], history=hist,
            )  # fmt: skip
            t0 = time.perf_counter()
            prop = ctl.propose([inp])[0]
            decision_s.append(time.perf_counter() - t0)
            inputs_at[c], proposals_at[c] = inp, prop
            state = SafetyState(
                now=now, iob_u=iob, cgm=assess_cgm(readings[-12:], now),
                meal_bolus_u=meal_bolus_u(carbs[c], s),
            )  # fmt: skip
            v = sup.check(prop, state)
            if v.vetoes:
                changed += 1
                for r in v.vetoes:
                    kind = r.split(":", 1)[0]
                    vetoes[kind] = vetoes.get(kind, 0) + 1
            pump.execute(0, sup.commands_for(v, now, None), minute)
            rate, bol = pump.step_inputs(minute)
            sim.step(SLOT, rate, bol)
            d = sim.last_delivery
            basal[c] = float(d.commanded_basal_u[0])
            bolus[c] = float(d.commanded_bolus_u[0])
            bg[c] = float(sim.last_bg[0, 0])
    finally:
        ctl.close()
    cgm_o, bg_o = outcomes(glucose), outcomes(bg)
    return {
        "peer": peer,
        "patient": patient,
        "hours": hours,
        "unannounced": unannounced,
        "tir": cgm_o["tir"],
        "tbr70": cgm_o["tbr70"],
        "tbr54": cgm_o["tbr54"],
        "tar180": cgm_o["tar180"],
        "mean": cgm_o["mean"],
        "bg_tir": bg_o["tir"],
        "bg_min": float(np.nanmin(bg)),
        "bg_max": float(np.nanmax(bg)),
        "insulin_u": float(basal.sum() + bolus.sum()),
        "bolus_u": float(bolus.sum()),
        "carbs_g": float(carbs.sum()),
        "supervisor_changed": changed,
        "vetoes": vetoes,
        "errors": errors,
        "decision_ms_median": 1e3 * float(np.median(decision_s)),
        "_inputs": inputs_at,
        "_proposals": proposals_at,
    }


def latency(peer: str, inp, calls: int) -> dict:
    ctl = make_controller(peer)
    try:
        t0 = time.perf_counter()
        first = ctl.propose([inp])[0]
        cold = time.perf_counter() - t0
        ts = []
        for _ in range(calls):
            t0 = time.perf_counter()
            p = ctl.propose([inp])[0]
            ts.append(time.perf_counter() - t0)
            if (p.temp_basal_u_per_h, p.duration_min, p.bolus_u) != (
                first.temp_basal_u_per_h,
                first.duration_min,
                first.bolus_u,
            ):
                raise SystemExit(f"{peer}: same input, different recommendation: {first} vs {p}")
    finally:
        ctl.close()
    a = np.array(ts) * 1e3
    return {
        "peer": peer,
        "calls": calls,
        "history_slots": len(inp.history.time),
        "first_call_ms": 1e3 * cold,
        "median_ms": float(np.median(a)),
        "p99_ms": float(np.percentile(a, 99)),
        "mean_ms": float(a.mean()),
        "deterministic": True,
    }


def record(peer: str, day: dict, out: Path) -> Path:
    """Write the fixture of one cycle of the day: the input, the request, the peer's answer."""
    from serving.controllers.peers.env import OREF0_VERSION, PYLOOPKIT_VERSION

    inputs, props = day["_inputs"], day["_proposals"]
    # a cycle past 12 h where the peer did something other than scheduled basal
    pick = None
    for c in sorted(inputs):
        p, inp = props[c], inputs[c]
        if (
            c >= 144
            and inp.carbs_announced_g == 0
            and (p.bolus_u > 0 or abs(p.temp_basal_u_per_h - inp.settings.basal_u_per_h) > 0.05)
        ):
            pick = c
            if peer == "loop" or p.bolus_u > 0:
                break
    if pick is None:
        pick = max(inputs)
    inp = inputs[pick]
    h = inp.history
    keep = 12 * 12 + 1  # the last 12 h: enough for both peers' meal and IOB windows
    if peer == "oref0":
        from serving.controllers.peers.oref0 import Oref0Config, build_request

        cfg = Oref0Config()
    else:
        from serving.controllers.peers.loop import LoopConfig, build_request

        cfg = LoopConfig()
    from serving.types import SlotHistory

    h = SlotHistory(*(np.asarray(getattr(h, f))[-keep:] for f in
                      ("time", "glucose", "basal_u", "bolus_u", "carbs_g")))  # fmt: skip
    inp.history = h
    req = build_request(inp, cfg)
    ctl = make_controller(peer)
    try:
        result = ctl.process.request(req)
        prop = ctl.propose([inp])[0]
        version = ctl.process.info.get("version")
    finally:
        ctl.close()
    s = inp.settings
    fixture = {
        "peer": peer,
        "peer_version": version,
        "peer_package": f"oref0@{OREF0_VERSION} (npm)"
        if peer == "oref0"
        else f"opsb-pyloopkit=={PYLOOPKIT_VERSION} (PyPI)",
        "peer_licence": "MIT (OpenAPS oref0)" if peer == "oref0" else "BSD-2-Clause (pyloopkit)",
        "recorded_with": "benchmarks/peer_latency.py --record (a cycle of the sanity day)",
        "input": {
            "time": str(inp.time),
            "glucose_mgdl": inp.glucose_mgdl,
            "iob_u": inp.iob_u,
            "carbs_announced_g": inp.carbs_announced_g,
            "settings": {k: getattr(s, k) for k in s.__dataclass_fields__},
            "history": {
                "time": [str(pd.Timestamp(t)) for t in h.time],
                "glucose": [None if not np.isfinite(x) else float(x) for x in h.glucose],
                "basal_u": [float(x) for x in h.basal_u],
                "bolus_u": [float(x) for x in h.bolus_u],
                "carbs_g": [float(x) for x in h.carbs_g],
            },
        },
        "request": req,
        "response": result,
        "proposal": {
            "temp_basal_u_per_h": prop.temp_basal_u_per_h,
            "duration_min": prop.duration_min,
            "bolus_u": prop.bolus_u,
            "reason": prop.reason,
        },
    }
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{peer}_cycle.json"
    path.write_text(json.dumps(fixture, indent=1, allow_nan=False) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--peers", default="oref0,loop")
    ap.add_argument("--patient", default="adult#001")
    ap.add_argument("--hours", type=float, default=24.0, help="length of the sanity day")
    ap.add_argument("--calls", type=int, default=200, help="decisions timed per peer")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--unannounced", action="store_true", help="meals eaten, never announced")
    ap.add_argument("--record", metavar="DIR", help="write the request/response fixtures here")
    args = ap.parse_args(argv)
    out = {"days": [], "latency": [], "fixtures": []}
    for peer in [p.strip() for p in args.peers.split(",") if p.strip()]:
        t0 = time.perf_counter()
        day = sanity_day(peer, args.patient, args.hours, args.seed, args.unannounced)
        day["wall_s"] = time.perf_counter() - t0
        last = day["_inputs"][max(day["_inputs"])]
        out["latency"].append(latency(peer, last, args.calls))
        if args.record:
            out["fixtures"].append(str(record(peer, day, Path(args.record))))
        out["days"].append({k: v for k, v in day.items() if not k.startswith("_")})
    w = sys.stderr.write
    w(f"\nsanity day ({args.patient}, {args.hours:g} h, seed {args.seed}, "
      f"{'unannounced' if args.unannounced else 'announced'} meals; through the supervisor)\n")  # fmt: skip
    w("peer    TIR %  TBR70  TBR54  TAR180  mean   BG TIR  BG min  BG max  insulin U  "
      "bolus U  carbs g  changed\n")  # fmt: skip
    for d in out["days"]:
        w(f"{d['peer']:6s} {d['tir']:6.1f} {d['tbr70']:6.1f} {d['tbr54']:6.1f} {d['tar180']:7.1f}"
          f" {d['mean']:5.0f}  {d['bg_tir']:6.1f} {d['bg_min']:7.0f} {d['bg_max']:7.0f}"
          f" {d['insulin_u']:10.1f} {d['bolus_u']:8.1f} {d['carbs_g']:8.0f} {d['supervisor_changed']:8d}\n")  # fmt: skip
    w("\nper-decision latency (one patient, process running)\n")
    w("peer    slots  median ms  p99 ms  first call ms\n")
    for r in out["latency"]:
        w(f"{r['peer']:6s} {r['history_slots']:6d} {r['median_ms']:10.1f} {r['p99_ms']:7.1f}"
          f" {r['first_call_ms']:13.0f}\n")  # fmt: skip
    print(json.dumps(out, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
