"""Latency of one MPC decision: predict (one batched ONNX call) + optimise + supervise.

Inputs are real: a short basal–bolus trial records what the loop saw each cycle (windows,
IOB, readings, announced meals), and the MPC decides on those states again and again. A
"decision" for a batch of N patients is `MPCController.propose` for all N (one forecaster
call for N × K candidate plans) plus `serving.safety.check_batch` on the proposals. One
thread everywhere (onnxruntime intra/inter-op 1, OMP 1) and, where the OS allows, pinned
to one core. Prints one JSON object on stdout and a table on stderr.

    python benchmarks/mpc_latency.py --model models/lstm [--batch 1 10 30] [--repeats 300]
    python benchmarks/mpc_latency.py --physio            # the physio-mpc ablation
    python benchmarks/mpc_latency.py --model DIR --whole-graph   # without the shared encoder
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import warnings

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")


def record_states(patients: str, hours: float, seed: int):
    """(inputs per cycle, safety states per cycle, settings) from a basal–bolus run."""
    from serving.controllers.basal_bolus import BasalBolusController
    from serving.insilico.trial import TrialConfig, run_trial
    from serving.safety import SafetyState, assess_cgm
    from serving.types import Reading

    seen: list[list] = []

    class Recorder(BasalBolusController):
        def propose(self, inputs):
            seen.append(list(inputs))
            return super().propose(inputs)

    cfg = TrialConfig(
        controller="basal-bolus", patients=patients, days=hours / 24, seed=seed, carb_error=0.2
    )
    result = run_trial(cfg, controller=Recorder())
    states = []
    for c, inputs in enumerate(seen):
        row = []
        for i, inp in enumerate(inputs):
            recent = [
                Reading(time=result.times[j], glucose_mgdl=float(result.log["cgm"][i, j]))
                for j in range(max(0, c - 11), c + 1)
                if result.log["cgm"][i, j] == result.log["cgm"][i, j]
            ]
            row.append(SafetyState(now=inp.time, iob_u=inp.iob_u, cgm=assess_cgm(recent, inp.time)))
        states.append(row)
    return seen, states, result.settings


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="exported forecaster directory (model.onnx + manifest.json)")
    ap.add_argument("--physio", action="store_true", help="time physio-mpc instead")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 10, 30], help="patients per call")
    ap.add_argument("--repeats", type=int, default=300, help="timed decisions per batch size")
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--cpu", type=int, default=0, help="core to pin to (-1: no pinning)")
    ap.add_argument(
        "--whole-graph",
        action="store_true",
        help="run the whole ONNX graph per candidate (no shared past encoder), for comparison",
    )
    args = ap.parse_args()
    if not args.model and not args.physio:
        ap.error("give --model DIR (the exported LSTM) or --physio")
    warnings.simplefilter("ignore")
    if args.cpu >= 0 and hasattr(os, "sched_setaffinity"):
        try:
            os.sched_setaffinity(0, {args.cpu})
        except OSError:
            pass

    import numpy as np

    from serving.controllers.mpc import MPCController, physio_predictor
    from serving.predictor import Predictor
    from serving.safety import check_batch

    if args.physio:
        predictor, name = physio_predictor(), "physio-mpc"
    else:
        from serving.insilico.shared_past import shared_past_predictor

        predictor, name = Predictor(args.model), "mpc"
        if not args.whole_graph:  # what `glucast trial` runs
            predictor = shared_past_predictor(predictor)
    mpc = MPCController(predictor, name=name)
    inputs, states, settings = record_states("all", 8.0, args.seed)
    n_all = len(settings)
    cycles = len(inputs)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    shared = getattr(predictor.primary, "split", False)
    out = {"controller": name, "shared_past_encoder": shared, "load_average_1min": load, "cpus": os.cpu_count(), "model": args.model, "threads": 1, "cycles_recorded": cycles,
           "python": platform.python_version(), "machine": platform.machine(), "results": []}  # fmt: skip
    rows = []
    for b in args.batch:
        if b > n_all:
            continue
        times, cpu, rows_sent = [], [], []
        rng = np.random.default_rng(b)
        for r in range(args.warmup + args.repeats):
            c = int(rng.integers(cycles))
            idx = rng.choice(n_all, size=b, replace=False) if b < n_all else np.arange(n_all)
            inp = [inputs[c][i] for i in idx]
            st = [states[c][i] for i in idx]
            se = [settings[i] for i in idx]
            t0, c0 = time.perf_counter(), time.thread_time()
            props = mpc.propose(inp)
            check_batch(se, props, st)
            dt, dc = time.perf_counter() - t0, time.thread_time() - c0
            if r >= args.warmup:
                times.append(dt * 1000.0)
                cpu.append(dc * 1000.0)
                rows_sent.append(mpc.last_forecast.glucose.shape[0])
        t, tc = np.array(times), np.array(cpu)
        k = mpc.last_ladder.basal.shape[1] if mpc.last_ladder is not None else 0
        res = {
            "patients": b,
            "candidates_per_patient": k,
            "rows_per_call": float(np.mean(rows_sent)),  # distinct plans sent (≤ N·K)
            "p50_ms": float(np.percentile(t, 50)),
            "p90_ms": float(np.percentile(t, 90)),
            "p99_ms": float(np.percentile(t, 99)),
            "max_ms": float(t.max()),
            "per_patient_p50_ms": float(np.percentile(t, 50) / b),
            # CPU time of this thread (onnxruntime runs on it with 1 intra-op thread): what a
            # dedicated core would take, without the waiting a shared machine adds to wall time
            "cpu_p50_ms": float(np.percentile(tc, 50)),
            "cpu_p99_ms": float(np.percentile(tc, 99)),
        }
        out["results"].append(res)
        rows.append(res)
    print(json.dumps(out, indent=2))
    print(f"\n{name}: one decision (predict + optimise + supervise), 1 thread", file=sys.stderr)
    print(
        f"{'patients':>9s} {'rows':>6s} {'p50 ms':>8s} {'p90 ms':>8s} {'p99 ms':>8s} {'max ms':>8s}"
        f" {'cpu p50':>8s} {'cpu p99':>8s}",
        file=sys.stderr,
    )
    for r in rows:
        print(
            f"{r['patients']:9d} {r['rows_per_call']:6.0f} {r['p50_ms']:8.2f} {r['p90_ms']:8.2f} "
            f"{r['p99_ms']:8.2f} {r['max_ms']:8.2f} {r['cpu_p50_ms']:8.2f} {r['cpu_p99_ms']:8.2f}",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
