"""Simulator throughput: patient-days per second, per core, side by side with simglucose.

    .venv/bin/python benchmarks/sim_throughput.py [--json] [--sizes 1,30,300,3000]
        [--simglucose-python /tmp/sgvenv/bin/python]

Two workloads for N patients x 1 day each:

* closed_loop — `simulate_cohort`: 5-minute cycles of CGM read, basal–bolus controller, pump,
  simglucose's random meals and Dexcom noise (3-minute sensor, as in simglucose), ending in
  the canonical pandas frame. This is the same work simglucose's `SimObj.simulate()` does
  (its BBController, Dexcom sensor, Insulet pump, RandomScenario, pandas history).
* replay — the bare model: `forecast.sim.replay` of one day of recorded inputs.

Times are CPU seconds of this process (`time.process_time`): everything here runs on one core,
and CPU time is what "per core" means on a shared machine; wall time is reported too. Each
size is run `--repeats` times after a warm-up (numba compiles once, then loads from cache);
the median is reported. simglucose runs in another interpreter (it needs `setuptools<81`;
never install it into the project venv) and is timed there the same way, in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import warnings

SIMGLUCOSE_SCRIPT = r"""
import json, sys, time, logging, warnings
from datetime import datetime, timedelta
warnings.filterwarnings("ignore")
logging.disable(logging.CRITICAL)
from simglucose.actuator.pump import InsulinPump
from simglucose.controller.basal_bolus_ctrller import BBController
from simglucose.patient.t1dpatient import T1DPatient
from simglucose.sensor.cgm import CGMSensor
from simglucose.simulation.env import T1DSimEnv
from simglucose.simulation.scenario_gen import RandomScenario
from simglucose.simulation.sim_engine import SimObj
names = sys.argv[1].split(",")
days = float(sys.argv[2])
cpu, wall = [], []
for k, name in enumerate(names):
    start = datetime(2018, 1, 1)
    env = T1DSimEnv(T1DPatient.withName(name), CGMSensor.withName("Dexcom", seed=k + 1),
                    InsulinPump.withName("Insulet"), RandomScenario(start_time=start, seed=k + 1))
    sim = SimObj(env, BBController(), timedelta(days=days), animate=False, path=None)
    c, w = time.process_time(), time.perf_counter()
    sim.simulate()
    sim.results()
    cpu.append(time.process_time() - c)
    wall.append(time.perf_counter() - w)
print(json.dumps({"names": names, "days": days, "cpu_s": cpu, "wall_s": wall}))
"""


def _time(fn, repeats: int) -> tuple[float, float]:
    cpu, wall = [], []
    for _ in range(repeats):
        c, w = time.process_time(), time.perf_counter()
        fn()
        cpu.append(time.process_time() - c)
        wall.append(time.perf_counter() - w)
    return statistics.median(cpu), statistics.median(wall)


def bench_glucast(sizes: list[int], days: float, repeats: int, seed: int) -> list[dict]:
    import numpy as np

    from forecast.sim import PhysiologyWarning, load_patients, replay, simulate_cohort

    warnings.simplefilter("ignore", PhysiologyWarning)
    everyone = load_patients("all")
    rows = []
    for n in sizes:
        cohort = everyone.tile(n)
        simulate_cohort(cohort.subset(slice(0, 1)), days=0.05, sensor="simglucose")  # warm-up
        reps = repeats if n <= 300 else 1

        def closed(cohort=cohort):
            simulate_cohort(cohort, days=days, seed=seed, sensor="simglucose")

        c_cpu, c_wall = _time(closed, reps)
        t = int(round(days * 1440))
        cho = np.zeros((n, t))
        ins = np.repeat(cohort.basal_u_per_min[:, None], t, axis=1)
        for m in range(420, t - 12, 1440):  # daily 60 g meal (eaten at 5 g/min) + 5 U bolus
            cho[:, m : m + 12] = 5.0
            ins[:, m] += 5.0

        def open_loop(cohort=cohort, cho=cho, ins=ins):
            replay(cohort, cho, ins, return_states=False)

        r_cpu, r_wall = _time(open_loop, reps)
        pd_ = n * days
        rows.append(
            {
                "patients": n,
                "patient_days": pd_,
                "closed_loop_cpu_s": c_cpu,
                "closed_loop_wall_s": c_wall,
                "closed_loop_patient_days_per_s": pd_ / c_cpu,
                "replay_cpu_s": r_cpu,
                "replay_wall_s": r_wall,
                "replay_patient_days_per_s": pd_ / r_cpu,
                "repeats": reps,
            }
        )
        print(
            f"  glucast N={n}: closed loop {pd_ / c_cpu:,.0f} patient-days/s, "
            f"replay {pd_ / r_cpu:,.0f}",
            file=sys.stderr,
        )
    return rows


def bench_simglucose(python: str, names: list[str], days: float) -> dict | None:
    try:
        out = subprocess.run(
            [python, "-c", SIMGLUCOSE_SCRIPT, ",".join(names), str(days)],
            capture_output=True,
            text=True,
            timeout=3600,
            env={**os.environ, "PYTHONWARNINGS": "ignore"},
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        print(f"simglucose timing failed: {e}", file=sys.stderr)
        return None
    if out.returncode != 0:
        print(f"simglucose timing failed:\n{out.stderr[-2000:]}", file=sys.stderr)
        return None
    r = json.loads(out.stdout.strip().splitlines()[-1])
    per_pd_cpu = [c / days for c in r["cpu_s"]]
    per_pd_wall = [w / days for w in r["wall_s"]]
    return {
        "python": python,
        "patients_timed": r["names"],
        "days": days,
        "cpu_s_per_patient_day": statistics.median(per_pd_cpu),
        "wall_s_per_patient_day": statistics.median(per_pd_wall),
        "patient_days_per_s": 1.0 / statistics.median(per_pd_cpu),
        "all_cpu_s_per_patient_day": per_pd_cpu,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1,30,300,3000", help="cohort sizes (patients)")
    ap.add_argument("--days", type=float, default=1.0)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per size (median)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--simglucose-python",
        default=os.environ.get("SIMGLUCOSE_PYTHON"),
        help="interpreter that has simglucose 0.2.11 (e.g. /tmp/sgvenv/bin/python)",
    )
    ap.add_argument(
        "--simglucose-patients",
        default="adolescent#001,adult#001,child#001",
        help="patients to time in simglucose (median per patient-day)",
    )
    ap.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    args = ap.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]

    print("timing glucast ...", file=sys.stderr)
    rows = bench_glucast(sizes, args.days, args.repeats, args.seed)
    sg = None
    if args.simglucose_python:
        print(f"timing simglucose with {args.simglucose_python} ...", file=sys.stderr)
        sg = bench_simglucose(
            args.simglucose_python, args.simglucose_patients.split(","), args.days
        )
    for r in rows:
        if sg:
            r["closed_loop_speedup_vs_simglucose"] = (
                r["closed_loop_patient_days_per_s"] / sg["patient_days_per_s"]
            )
            r["replay_speedup_vs_simglucose"] = (
                r["replay_patient_days_per_s"] / sg["patient_days_per_s"]
            )
    result = {
        "benchmark": "sim_throughput",
        "unit": "patient-days per CPU-second (one core)",
        "days": args.days,
        "python": sys.version.split()[0],
        "cpu_count": os.cpu_count(),
        "glucast": rows,
        "simglucose": sg,
    }
    table = _table(rows, sg)
    if args.json:
        print(table, file=sys.stderr)
        from forecast.cli import emit_json

        emit_json(result)
    else:
        print(table)
    return 0


def _table(rows: list[dict], sg: dict | None) -> str:
    head = f"{'patients':>8} {'closed loop pd/s':>17} {'x simglucose':>13} {'replay pd/s':>12} {'x simglucose':>13}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['patients']:>8} {r['closed_loop_patient_days_per_s']:>17,.1f} "
            f"{r.get('closed_loop_speedup_vs_simglucose', float('nan')):>13,.0f} "
            f"{r['replay_patient_days_per_s']:>12,.0f} "
            f"{r.get('replay_speedup_vs_simglucose', float('nan')):>13,.0f}"
        )
    if sg:
        lines.append(
            f"simglucose 0.2.11: {sg['cpu_s_per_patient_day']:.2f} CPU-s per patient-day "
            f"({sg['patient_days_per_s']:.3f} pd/s; median of {len(sg['patients_timed'])})"
        )
    else:
        lines.append("simglucose not timed (pass --simglucose-python PATH)")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
