"""How well could *any* forecaster warn of CGM lows on a simulated G6 frame? An upper bound.

The predicted-low goal (>= 90 % of lows warned, median lead >= 20 min, <= 1 false alert a
day) is scored on CGM episodes, and a G6's noise makes some of them: a reading dips below 70
because the sensor's error did, not the glucose. This script asks how far perfect
*glucose* foresight gets. Its "oracle" knows, at every reading, the whole future of the
sensor's signal (plasma → interstitium lag, calibration drift, compression lows, dropouts:
everything in the CGM but its measurement noise) and the noise's exact current state; it
does not know the noise's future innovations. It draws `--samples` continuations of the G6
noise (`forecast.sim.sensor.G6_NOISE`, the same two AR(2) processes the simulator used,
regenerated from the frame's seed) and alerts when the probability of a low episode
(3 readings < 70 mg/dL) starting within 30 min exceeds p. The alerts go through the same
scorer, episodes, test split and re-alert rule (20 min) as `glucast alerts evaluate`.

Anything a model could learn from the past is below this bound; a model's gap to it is
what better glucose forecasting could still win, the bound's gap to the goal is what no
forecaster can.

    python benchmarks/alert_ceiling.py --data cohort.parquet [--samples 200] [--json]

The frame must come from `glucast simulate` with the G6 sensor (its metadata names the
seed, the patients and the sensor).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import pandas as pd

from forecast.schema import get_meta
from forecast.sim import load_patients
from forecast.sim.rng import STREAM_NOISE, stream_seeds
from forecast.sim.sensor import AR2_MODELS, AR2Stream
from forecast.windows import WindowConfig, split_chronological
from serving.insilico.alert_eval import LOW_EPISODE, _minutes, score_alerts, scoring_truth

HORIZON_SLOTS = 6  # an episode starting within 30 min
EPISODE_READINGS = LOW_EPISODE.min_readings
REALERT_MIN = 20.0
CLEAR_CYCLES = 2


def sensor_noise(frame: pd.DataFrame) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The G6 noise the simulator added to each subject's readings, and its AR states."""
    meta = get_meta(frame).extra
    sensor = meta.get("sensor") or {}
    model = AR2_MODELS.get(str(sensor.get("noise_model", "")).lower())
    if model is None or not sensor.get("noise", False):
        raise SystemExit("the frame's sensor has no G6 noise: simulate with --sensor dexcom")
    names = list(meta["patients"])
    ids = load_patients(names).ids
    n = int(frame.groupby("subject_id", observed=True).size().max())
    stream = AR2Stream(model, stream_seeds(int(meta["seed"]), ids, STREAM_NOISE))
    noise, states = stream.take_with_states(n)  # one value per reading, minute 0 included
    return (
        {s: noise[i] for i, s in enumerate(names)},
        {s: states[i] for i, s in enumerate(names)},
    )


def low_probability(
    signal: np.ndarray, states: np.ndarray, origins: np.ndarray, samples: int, rng
) -> np.ndarray:
    """[K] P(3 readings < 70 starting within 30 min) at each origin slot, by Monte Carlo."""
    model = AR2_MODELS["g6"]
    a1 = np.array([c[0] for c in model.components])  # [C]
    a2 = np.array([c[1] for c in model.components])
    sd = np.sqrt([c[2] for c in model.components])
    e1 = np.repeat(states[origins, 0][:, None], samples, 1)  # [K, M, C]
    e2 = np.repeat(states[origins, 1][:, None], samples, 1)
    steps = HORIZON_SLOTS + EPISODE_READINGS - 1
    below = np.zeros((len(origins), samples, steps), bool)
    for h in range(steps):
        e = a1 * e1 + a2 * e2 + sd * rng.standard_normal(e1.shape)
        e2, e1 = e1, e
        s = signal[np.minimum(origins + h + 1, len(signal) - 1)]  # [K], NaN: no reading
        below[:, :, h] = (s[:, None] + e.sum(-1)) < LOW_EPISODE.threshold_mgdl
    event = np.zeros(below.shape[:2], bool)
    for j in range(HORIZON_SLOTS):
        event |= below[:, :, j : j + EPISODE_READINGS].all(-1)
    return event.mean(1)


def alert_times(times: np.ndarray, prob: np.ndarray, p: float) -> np.ndarray:
    """The engine's bookkeeping: alert on a new prediction, again every 20 min while it
    stands, a prediction ends after 2 cycles without it."""
    out: list[float] = []
    last, active, clear = -np.inf, False, 0
    for t, x in zip(times, prob):
        if x > p:
            clear = 0
            if not active or t - last >= REALERT_MIN - 1e-9:
                out.append(t)
                last = t
            active = True
        else:
            clear += 1
            if clear >= CLEAR_CYCLES:
                active = False
    return np.asarray(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True, help="simulated frame (glucast simulate, G6)")
    ap.add_argument("--samples", type=int, default=200, help="noise continuations per origin")
    ap.add_argument("--seed", type=int, default=0, help="seed of the Monte Carlo draws")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args(argv)
    start = time.perf_counter()
    frame = pd.read_parquet(args.data)
    noise, states = sensor_noise(frame)
    test = split_chronological(frame)["test"]
    rng = np.random.default_rng(args.seed)
    # the same episodes, scoring start and days as `glucast alerts evaluate`
    truth = scoring_truth(test, (LOW_EPISODE,), WindowConfig().past_slots, HORIZON_SLOTS * 5.0)
    episodes, scored_from, days = truth.episodes[0], truth.scored_from, truth.days
    probs = {}
    for sid, sub in frame.groupby("subject_id", sort=True, observed=True):
        sid = str(sid)
        g = sub["glucose"].to_numpy(float)
        signal = g - noise[sid][: len(g)]  # the CGM without its measurement noise
        tst = test[test["subject_id"].astype(str) == sid]
        k0 = int(np.searchsorted(sub["time"].to_numpy(), tst["time"].to_numpy()[0]))
        t = _minutes(tst["time"])
        gt = tst["glucose"].to_numpy(float)
        origins = k0 + np.flatnonzero(np.isfinite(gt))
        probs[sid] = (
            t[0] + (origins - k0) * 5.0,
            low_probability(signal, states[sid], origins, args.samples, rng),
        )
    rows = []
    for p in (0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7):
        alerts = {s: alert_times(tt, pr, p) for s, (tt, pr) in probs.items()}
        r = score_alerts(alerts, episodes, days=days, window_min=30.0, scored_from=scored_from)
        rows.append({"p": p, **r.to_dict()})
    out = {
        "data": args.data,
        "days": round(days, 2),
        "samples": args.samples,
        "seconds": round(time.perf_counter() - start, 1),
        "oracle": rows,
    }
    if args.json:
        print(json.dumps(out))
        return 0
    print(f"{args.data}: {out['days']} test days, {rows[0]['episodes']} CGM lows")
    print(f"{'P >':>5} {'warned':>7} {'lead min':>9} {'false/day':>10}")
    for r in rows:
        print(
            f"{r['p']:>5} {r['sensitivity']:>7.1%} {r['lead_min']:>9} {r['false_per_day']:>10.2f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
