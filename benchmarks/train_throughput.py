"""Training throughput of the deep forecasters: windows per second, one CPU thread.

Measures forward + pinball loss + backward + AdamW step over real windows cut from a
simulated cohort (training.synthetic.replay_cohort), at the default window geometry
(L = 24, H = 12) and batch size, for each model. Prints one JSON object, then a table
(on stderr, so `python benchmarks/train_throughput.py | jq` works).

    python benchmarks/train_throughput.py [--models lstm transformer] [--batches 60]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")


def measure(kind: str, frame, batches: int, batch_size: int | None) -> dict:
    """Timed optimiser steps of one model on training windows of `frame`."""
    import numpy as np
    import torch

    from training.config import TrainConfig
    from training.models import model_from_spec
    from training.module import pinball_loss
    from training.pipeline import _spec
    from training.splits import build_splits

    cfg = TrainConfig.from_dict({"model": kind})
    bs = batch_size or cfg.trainer.batch_size
    wc = cfg.window_config()
    w = build_splits(frame, cfg.data, wc).windows["train"]
    model = model_from_spec(_spec(cfg, wc))
    model.fit_normalisation(w.past, w.future, w.target)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.trainer.lr)
    q = torch.tensor(cfg.head.quantiles)
    past, future, target = (torch.from_numpy(a) for a in (w.past, w.future, w.target))
    rng = np.random.default_rng(0)

    def step() -> None:
        idx = torch.from_numpy(rng.integers(0, len(past), bs))
        loss = pinball_loss(model(past[idx], future[idx]), target[idx], q, model.delta_scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.trainer.gradient_clip)
        opt.step()

    for _ in range(5):  # warm-up
        step()
    t0 = time.perf_counter()
    for _ in range(batches):
        step()
    dt = time.perf_counter() - t0
    return {
        "model": kind,
        "parameters": sum(p.numel() for p in model.parameters()),
        "batch_size": bs,
        "batches": batches,
        "seconds": dt,
        "windows_per_second": batches * bs / dt,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["lstm", "transformer"])
    ap.add_argument("--batches", type=int, default=60, help="timed optimiser steps per model")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument(
        "--threads", type=int, default=int(os.environ.get("GLUCAST_TORCH_THREADS", "1"))
    )
    args = ap.parse_args()

    import torch

    from training.synthetic import replay_cohort

    torch.set_num_threads(args.threads)
    frame = replay_cohort("adult#001,adult#002,adolescent#001,child#001", days=4, seed=1)
    results = [measure(kind, frame, args.batches, args.batch_size) for kind in args.models]
    out = {
        "benchmark": "train_throughput",
        "threads": args.threads,
        "torch": torch.__version__,
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "load_avg_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "results": results,
    }
    print(json.dumps(out, indent=2))
    print(f"{'model':<12} {'params':>8} {'batch':>6} {'windows/s':>10}", file=sys.stderr)
    for r in results:
        print(
            f"{r['model']:<12} {r['parameters']:>8} {r['batch_size']:>6} {r['windows_per_second']:>10.0f}",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
