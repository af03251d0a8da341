"""Forecast latency: onnxruntime vs torch, one thread, at the default model sizes.

Batch 1 (one control cycle, one plan): p50 and p99 over many calls. Batch 256 (the MPC
scoring candidate plans in one call): forecasts per second. The models are built at their
default configuration; weights do not change the cost. `--model-dir DIR` benchmarks an
exported model directory instead (ONNX only). Prints one JSON object on stdout and a table
on stderr.

    python benchmarks/onnx_latency.py [--models lstm transformer] [--calls 3000]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")


def percentiles(fn, calls: int) -> dict[str, float]:
    import numpy as np

    for _ in range(min(200, calls // 10)):  # warm-up
        fn()
    ts = np.empty(calls)
    cpu = np.empty(calls)
    for i in range(calls):
        c = time.thread_time()
        t = time.perf_counter()
        fn()
        ts[i] = time.perf_counter() - t
        cpu[i] = time.thread_time() - c
    us, cus = ts * 1e6, cpu * 1e6
    # Wall-clock percentiles are what a control loop sees; on a shared machine the tail is
    # dominated by the scheduler (time spent waiting for a core), so the CPU time of the
    # calling thread (onnxruntime with one intra-op thread computes on it) is given too.
    return {
        "p50_us": float(np.percentile(us, 50)),
        "p99_us": float(np.percentile(us, 99)),
        "mean_us": float(us.mean()),
        "cpu_p50_us": float(np.percentile(cus, 50)),
        "cpu_p99_us": float(np.percentile(cus, 99)),
    }


def throughput(fn, batch: int, seconds: float = 2.0) -> float:
    fn()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        fn()
        n += 1
    return n * batch / (time.perf_counter() - t0)


def bench_session(sess, past, future, calls: int, batch: int) -> dict[str, float]:
    import numpy as np

    p1, f1 = past[:1], future[:1]
    pb = np.repeat(past[:1], batch, 0)
    fb = np.repeat(future[:1], batch, 0)
    out = percentiles(lambda: sess.run(["glucose"], {"past": p1, "future": f1}), calls)
    out[f"batch{batch}_forecasts_per_s"] = throughput(
        lambda: sess.run(["glucose"], {"past": pb, "future": fb}), batch
    )
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["lstm", "transformer"])
    ap.add_argument("--model-dir", help="benchmark this exported model directory instead")
    ap.add_argument("--calls", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=256)
    args = ap.parse_args()

    import numpy as np
    import torch

    from training.config import TrainConfig
    from training.export import OnnxForecaster, export_onnx, onnx_session
    from training.models import model_from_spec
    from training.pipeline import _spec

    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    results = []
    if args.model_dir:
        fc = OnnxForecaster.load(args.model_dir, threads=1)
        m = fc.manifest
        past = rng.normal(120, 30, (1, m["past_slots"], len(m["past_features"]))).astype(np.float32)
        future = np.abs(rng.normal(0, 0.1, (1, m["horizon_slots"], len(m["future_features"]))))
        r = {"model": m.get("model"), "model_dir": args.model_dir}
        r["onnx"] = bench_session(
            fc.session, past, future.astype(np.float32), args.calls, args.batch
        )
        results.append(r)
    for kind in [] if args.model_dir else args.models:
        cfg = TrainConfig.from_dict({"model": kind})
        wc = cfg.window_config()
        model = model_from_spec(_spec(cfg, wc)).eval()
        L, H = wc.past_slots, wc.horizon_slots
        past = rng.normal(0, 1, (4, L, len(wc.past_features))).astype(np.float32)
        past[..., 0] = 120 + 30 * past[..., 0]
        future = np.abs(rng.normal(0, 0.1, (4, H, len(wc.future_features)))).astype(np.float32)
        with tempfile.TemporaryDirectory() as d:
            path = export_onnx(model, os.path.join(d, "model.onnx"), past, future)
            size = os.path.getsize(path)
            sess = onnx_session(path, threads=1)
            r = {
                "model": kind,
                "parameters": sum(p.numel() for p in model.parameters()),
                "onnx_bytes": size,
                "onnx": bench_session(sess, past, future, args.calls, args.batch),
            }
        tp, tf = torch.from_numpy(past[:1]), torch.from_numpy(future[:1])
        tpb = torch.from_numpy(np.repeat(past[:1], args.batch, 0))
        tfb = torch.from_numpy(np.repeat(future[:1], args.batch, 0))
        with torch.inference_mode():
            t = percentiles(lambda m=model, a=tp, b=tf: m(a, b), args.calls)
            t[f"batch{args.batch}_forecasts_per_s"] = throughput(
                lambda m=model, a=tpb, b=tfb: m(a, b), args.batch
            )
        r["torch"] = t
        results.append(r)
    out = {
        "benchmark": "onnx_latency",
        "threads": 1,
        "onnxruntime": __import__("onnxruntime").__version__,
        "torch": torch.__version__,
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "load_avg_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "results": results,
    }
    print(json.dumps(out, indent=2))
    key = f"batch{args.batch}_forecasts_per_s"
    print(
        f"{'model':<12} {'runtime':<8} {'p50 µs':>8} {'p99 µs':>8} {'cpu p99 µs':>10} {key:>24}",
        file=sys.stderr,
    )
    for r in results:
        for rt in ("onnx", "torch"):
            if rt in r:
                x = r[rt]
                print(
                    f"{r['model']:<12} {rt:<8} {x['p50_us']:>8.0f} {x['p99_us']:>8.0f} "
                    f"{x['cpu_p99_us']:>10.0f} {x[key]:>24.0f}",
                    file=sys.stderr,
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
