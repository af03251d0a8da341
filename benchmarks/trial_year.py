"""Speed of a long in-silico trial: the 30-patient MPC cohort for days, extrapolated to a year.

The trial of issue 18's done-when point (the demo's LSTM behind the MPC):

    glucast trial --controller mpc --model reports/demo/models/lstm/model --patients all \
        --days 365 --seed 5 --carb-error 0.2

    .venv/bin/python benchmarks/trial_year.py [--days 7] [--workers 1] [--no-stages]
        [--model reports/demo/models/lstm/model] [--controller mpc] [--patients all]

Runs `serving.insilico.trial.run_trial` for `--days` (default 7, a quick number) and prints
one JSON object on stdout and a table on stderr: wall and CPU time (this process and its
worker processes), cycles/s, the extrapolation to 365 days (setup + per-day time × 365),
the size of the `TrialResult` log (and, extrapolated, a year's) and the peak resident
memory. With stage timing on (default), each stage's *exclusive* time from
timers wrapped around the functions that do it: simulator step (ODE + pump), sensor,
meals (the scenario's announced and eaten carbs), history/windows (`IncrementalWindows`),
CGM assessment (the supervisor's view of the sensor), controller propose (excluding its
forecaster call), forecaster (the checked predictor around ONNX), ONNX run, supervisor
rules (`check_batch`), supervisor commands + pump, and bookkeeping (everything else in the
cycle: building inputs, the log; and the trial's setup inside `run_trial`). Stage times are
CPU time of the trial's thread (`time.thread_time`), which other work on a shared machine
disturbs far less than wall time. Stages are timed in-process, so with `--workers 2` they
are not shown (the workers run the cycle). Run niced on a shared machine, one thread each:
``OMP_NUM_THREADS=1 GLUCAST_TORCH_THREADS=1 nice -n 10``.

Measured on this project's 2-core CPU machine (shared with other work; niced), 7 days, one
process, back to back (CPU ms per cycle; wall ~= CPU when the machine was not saturated):

* the MPC as of c097491: the engine before this work 13.7 s CPU (144 cycles/s; a year
  extrapolated 11.9 CPU-min) -> after 12.1 s (10.5 min). Forecaster checks 0.72 -> 0.46 ms,
  supervisor commands + pump 0.41 -> 0.24, rules 0.47 -> 0.38, history/windows 0.48 -> 0.38,
  CGM assessment 0.38 -> 0.30, bookkeeping 0.57 -> 0.53; ONNX 2.3 and the controller 1.1
  unchanged (not this work's).
* the MPC as of d871f0f (unannounced-meal detection, autosens from the record): before 19.7 s
  (17.1 CPU-min a year) -> after 17.3 s (15.0); ONNX 2.7 ms and the controller 2.7 ms are
  62 % of a cycle; forecaster 0.89 -> 0.58, commands + pump 0.55 -> 0.27, bookkeeping 0.79 ->
  0.63, history 0.60 -> 0.48, rules 0.56 -> 0.46, CGM 0.46 -> 0.37.
* `--workers 2`: 15 patients cost ~64 % of 30 in one process (a cycle has ~2 ms of fixed
  cost: the ONNX calls, the controller's and the engine's array work), so two workers are at
  best ~1.5x one, and only when both cores are free: with another job on one core, 7 days
  took 21 s of cycles with two workers against 17 s with one.

A year's log: 605 MB (24 float64 fields x 30 patients x 105,120 cycles) before, 429 MB after
(flags as bool/int8). Real 365-day runs, `--days 365 --workers 2`, each while another job held
about one core: the MPC as of 42407e8 with the engine at 57fd97a, 20.5 min wall, 16.8 CPU-min;
the MPC as of d871f0f with this code, 17.6 min wall, 18.0 CPU-min (9 per worker); 429 MB of
log, peak RSS 995 MB in the parent, 969 MB in a worker (its result is pickled back).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
import warnings
from collections import defaultdict

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

MODEL = "reports/demo/models/lstm/model"
YEAR_DAYS = 365


class Stages:
    """Exclusive CPU time (this thread's) per stage from timers wrapped around functions (a
    stack: a timed call inside another timed call is subtracted from its caller)."""

    def __init__(self) -> None:
        self.total: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._stack: list[list[float]] = []  # [child time] per open timer
        self._undo: list[tuple[object, str, object]] = []

    def wrap(self, owner: object, attr: str, stage: str) -> None:
        fn = getattr(owner, attr, None)
        if fn is None:
            return
        stages = self

        def timed(*a, **kw):
            stages._stack.append([0.0])
            t0 = time.thread_time()
            try:
                return fn(*a, **kw)
            finally:
                dt = time.thread_time() - t0
                child = stages._stack.pop()[0]
                stages.total[stage] += dt - child
                stages.calls[stage] += 1
                if stages._stack:
                    stages._stack[-1][0] += dt

        self._undo.append((owner, attr, fn))
        setattr(owner, attr, timed)

    def restore(self) -> None:
        for owner, attr, fn in reversed(self._undo):
            setattr(owner, attr, fn)
        self._undo.clear()


def instrument(st: Stages, controller, predictor) -> None:
    """Wrap the functions of each stage (what exists in this version of the code)."""
    import onnxruntime as ort

    import forecast.sim.sensor as sensor
    import forecast.windows as windows
    import serving.engine as engine
    import serving.insilico.trial as trial
    import serving.safety as safety
    from forecast.sim.simulator import Simulator
    from serving.safety.supervisor import Supervisor

    st.wrap(Simulator, "step", "simulator step")
    st.wrap(Simulator, "read_cgm", "sensor")
    st.wrap(sensor.CGM, "read", "sensor")
    st.wrap(Simulator, "announced_carbs", "meals")
    st.wrap(Simulator, "eaten_carbs", "meals")
    for name in ("observe", "deliver", "record", "iob_before", "windows", "history"):
        st.wrap(windows.IncrementalWindows, name, "history/windows")
    st.wrap(safety, "assess_cgm", "CGM assessment")
    st.wrap(trial, "assess_cohort", "CGM assessment")
    st.wrap(controller, "propose", "controller propose")
    st.wrap(predictor, "forecast", "forecaster (checks, fallback)")
    st.wrap(ort.InferenceSession, "run", "ONNX run")
    st.wrap(engine, "check_batch", "supervisor rules")
    st.wrap(Supervisor, "commands_for", "supervisor commands + pump")
    st.wrap(trial.CohortPump, "execute", "supervisor commands + pump")
    st.wrap(trial.CohortPump, "step_inputs", "supervisor commands + pump")


def run(a: argparse.Namespace) -> dict:
    from serving.insilico.trial import TrialConfig, build_controller, run_trial

    cfg = TrialConfig(
        controller=a.controller,
        model_dir=a.model if a.controller == "mpc" else None,
        patients=a.patients,
        days=a.days,
        seed=a.seed,
        carb_error=0.2,
    )
    w0 = time.perf_counter()
    st = Stages()
    kw: dict = {"workers": a.workers}  # several: each worker builds its own controller
    if a.workers == 1:
        controller, window, _, predictor = build_controller(cfg)
        kw = {"controller": controller, "window": window, "predictor": predictor}
        if not a.no_stages:
            instrument(st, controller, predictor)
    setup_build = time.perf_counter() - w0
    w1, c1, t1 = time.perf_counter(), time.process_time(), time.thread_time()
    ch0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    try:
        result = run_trial(cfg, **kw)
    finally:
        st.restore()
    wall, cpu = time.perf_counter() - w1, time.process_time() - c1
    thread_cpu = time.thread_time() - t1
    ch1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_children = (ch1.ru_utime - ch0.ru_utime) + (ch1.ru_stime - ch0.ru_stime)
    # the cycles themselves (run_trial's own clock; split: the slowest worker's)
    loop_s = max(result.info.get("worker_cycles_s", [result.wall_s]))
    setup = setup_build + (wall - loop_s)
    per_day = loop_s / a.days
    cycles = len(result.times)
    log_bytes = sum(v.nbytes for v in result.log.values())
    m = result.cohort_metrics()
    out = {
        "controller": a.controller,
        "patients": len(result.names),
        "days": a.days,
        "workers": a.workers,
        "cycles": cycles,
        "wall_s": wall,
        "cpu_s": cpu + cpu_children,
        "cpu_s_children": cpu_children,
        "loop_wall_s": loop_s,
        "setup_s": setup,
        "cycles_per_s": cycles / loop_s,
        "patient_cycles_per_s": cycles * len(result.names) / loop_s,
        "year_wall_s_extrapolated": setup + per_day * YEAR_DAYS,
        "year_cpu_s_extrapolated": (cpu + cpu_children) / a.days * YEAR_DAYS,
        "log_mb": log_bytes / 1e6,
        "year_log_mb_extrapolated": log_bytes / 1e6 / a.days * YEAR_DAYS,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        "peak_rss_mb_workers": ch1.ru_maxrss / 1024.0 if a.workers > 1 else None,
        "forecaster_calls": result.forecaster_calls,
        "tir": m["tir"],
        "tbr70": m["tbr70"],
        "bg_tir": m["bg_tir"],
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
        "cpus": os.cpu_count(),
    }
    if st.total:
        timed = sum(st.total.values())
        stages = dict(st.total)
        stages["bookkeeping (rest of the cycle)"] = max(0.0, thread_cpu - timed)
        out["stages_s"] = {k: round(v, 3) for k, v in stages.items()}
        out["stages_ms_per_cycle"] = {k: round(1000.0 * v / cycles, 3) for k, v in stages.items()}
        out["stage_calls"] = dict(st.calls)
    return out


def table(r: dict) -> str:
    lines = [
        f"{r['patients']} patients x {r['days']:g} days ({r['cycles']} cycles), "
        f"{r['controller']}, {r['workers']} worker(s)",
        f"  wall {r['wall_s']:.1f} s (cycles {r['loop_wall_s']:.1f} s, setup {r['setup_s']:.1f} s)"
        f", CPU {r['cpu_s']:.1f} s, {r['cycles_per_s']:.1f} cycles/s",
        f"  a year (extrapolated): wall {r['year_wall_s_extrapolated'] / 60:.1f} min, "
        f"CPU {r['year_cpu_s_extrapolated'] / 60:.1f} min",
        f"  log {r['log_mb']:.1f} MB (a year: {r['year_log_mb_extrapolated']:.0f} MB), "
        f"peak RSS {r['peak_rss_mb']:.0f} MB"
        + (f" (a worker: {r['peak_rss_mb_workers']:.0f} MB)" if r["peak_rss_mb_workers"] else "")
        + f"; TIR {r['tir']:.1f} %",
    ]
    if "stages_s" in r:
        tot = sum(r["stages_s"].values())
        lines.append(f"  {'stage (CPU time)':<34} {'s':>8} {'ms/cycle':>9} {'share':>6}")
        for k, v in sorted(r["stages_s"].items(), key=lambda kv: -kv[1]):
            lines.append(
                f"  {k:<34} {v:>8.2f} {r['stages_ms_per_cycle'][k]:>9.2f} {100 * v / tot:>5.1f}%"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--days", type=float, default=7.0)
    ap.add_argument("--workers", type=int, default=1, help="processes the cohort is split over")
    ap.add_argument("--controller", default="mpc")
    ap.add_argument("--model", default=MODEL)
    ap.add_argument("--patients", default="all")
    ap.add_argument("--seed", type=int, default=5)
    ap.add_argument("--no-stages", action="store_true", help="no stage timers")
    a = ap.parse_args(argv)
    warnings.filterwarnings("ignore", message=".*BG left.*")  # a flagged patient, not news here
    r = run(a)
    print(json.dumps(r))
    print(table(r), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
