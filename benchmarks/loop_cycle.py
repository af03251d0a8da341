"""Time of one control cycle: the journaled runtime loop (one patient) and the in-silico trial.

The runtime loop's cycle for one simulated patient — read the CGM, update state from the
journal, build the model inputs, propose, supervise, command the pump, journal — timed
cycle by cycle over a simulated day (`ControlLoop.cycle`; the simulator's own step, which a
real device would do, is outside the timing). The trial: wall time of a whole-cohort run.
One thread everywhere. Times are CPU time (thread/process), which other work on a shared
machine disturbs far less than wall time; the trial's wall time is printed too. Prints one
JSON object on stdout and a table on stderr; quote medians over repeated runs and compare
runs made on the same machine.

    python benchmarks/loop_cycle.py [--controller basal-bolus|physio-mpc] [--hours 24]
           [--trial-days 1] [--trial-patients all]

Measured on the 2-core CPU machine, physio-mpc, three alternating runs each of the code
before the one-engine restructuring (it built a DataFrame per cycle) and after it (medians;
CPU time; the machine was shared): loop cycle p50 13.4 → 6.5 ms, p99 19.6 → 10.2 ms; the
30-patient 1-day trial 6.6 → 6.4 s.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

import numpy as np  # noqa: E402


def loop_cycles(controller: str, hours: float, seed: int) -> np.ndarray:
    """Seconds per `ControlLoop.cycle` for one simulated patient over `hours`."""
    from serving.controllers import build_controller
    from serving.insilico.backends import SimBackend
    from serving.insilico.simulated import SimulatedCohort, WorldConfig
    from serving.journal import Journal
    from serving.loop import ControlLoop

    built = build_controller(controller, None)
    ctl, pred = built.controller, built.predictor
    with tempfile.TemporaryDirectory() as tmp:
        world = SimulatedCohort(WorldConfig(patients="adult#001", seed=seed, carb_error=0.2))
        backend = SimBackend(world)
        journal = Journal(Path(tmp) / "j.db", sync="normal")
        loop = ControlLoop(backend, journal, ctl, pred, log=lambda m: None)
        loop.start()
        out = []
        for _ in range(int(hours * 12)):
            t0 = time.thread_time()  # CPU time: robust to other work on a shared machine
            loop.cycle()
            out.append(time.thread_time() - t0)
            backend.advance(5)
        journal.close()
    return np.array(out)


def trial_wall(controller: str, patients: str, days: float, seed: int) -> dict:
    from serving.insilico.trial import TrialConfig, run_trial

    t0, c0 = time.perf_counter(), time.process_time()
    r = run_trial(TrialConfig(controller=controller, patients=patients, days=days, seed=seed,
                              carb_error=0.2))  # fmt: skip
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {
        "wall_s": wall,
        "cpu_s": cpu,
        "tir": r.cohort_metrics()["tir"],
        "patients": len(r.names),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--controller", default="physio-mpc")
    ap.add_argument("--hours", type=float, default=24.0)
    ap.add_argument("--trial-days", type=float, default=1.0)
    ap.add_argument("--trial-patients", default="all")
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args(argv)
    cyc = loop_cycles(a.controller, a.hours, a.seed)[12:]  # the first hour warms caches
    ms = cyc * 1000.0
    res = {
        "controller": a.controller,
        "loop_cycles": int(len(ms)),
        "loop_cycle_ms_p50": float(np.percentile(ms, 50)),
        "loop_cycle_ms_p99": float(np.percentile(ms, 99)),
        "trial": trial_wall(a.controller, a.trial_patients, a.trial_days, a.seed),
    }
    print(json.dumps(res))
    print(
        f"{'controller':<12} {'loop p50 ms':>12} {'loop p99 ms':>12} {'trial cpu s':>12} {'TIR':>6}\n"
        f"{a.controller:<12} {res['loop_cycle_ms_p50']:>12.2f} {res['loop_cycle_ms_p99']:>12.2f} "
        f"{res['trial']['cpu_s']:>12.2f} {res['trial']['tir']:>6.1f}",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
