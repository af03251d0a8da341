"""Where the closed loop's outcomes come from: each MPC feature off, same cohort, same seeds.

    python benchmarks/controller_ablation.py --model reports/demo/models/lstm/model \
        [--days 7] [--seeds 1,5] [--scenarios announced,unannounced,variability] \
        [--variants all,no-uam,no-quiet,median-cost,no-response,no-autosens] [--peers oref0,loop]

Every run is `glucast trial` in-process (30 virtual patients, Dexcom G6 model, the safety
supervisor unchanged): *announced* meals with a 20 % carb-count error, *unannounced* meals,
and *variability* (announced, with the intra-patient variability of `--variability all`).
Variants of the MPC (`serving.controllers.mpc.MPCConfig`):

- ``all``: the default controller;
- ``no-uam``: no unannounced-meal detection (`uam=False`, the controller before it);
- ``no-quiet``: UAM without its safety gates (it may infer meals through announced carbs on
  board, within 6 h of an announcement and after suspensions);
- ``median-cost``: the cost's "how low could it go" is the median, not the lower quantile
  (the forecaster's uncertainty unused);
- ``no-response``: no sensitivity learned from how glucose answers insulin
  (`serving.controllers.autosens`), only the step after each low;
- ``no-autosens``: no sensitivity adaptation at all.

`--peers oref0,loop` adds the peers' own code (`glucast peers install`; slow: oref0 ~6 ms,
Loop ~100 ms a decision). Prints one JSON object and a table (cohort TIR, TBR<70 on CGM,
true-glucose TBR<54 patients, lowest true glucose, per age group TIR).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from serving.insilico.trial import TrialConfig, build_controller, run_trial  # noqa: E402

SCENARIOS = {
    "announced": dict(carb_error=0.2),
    "unannounced": dict(unannounced=True),
    "variability": dict(carb_error=0.2, variability="all"),
}
NO_GATES = dict(
    announced_quiet_min=0.0, announced_cob_max_g=math.inf, min_net_iob_basal_h=-math.inf
)
VARIANTS = {
    "all": {},
    "no-uam": dict(uam=False),
    "no-quiet": dict(uam_detector=NO_GATES),
    "median-cost": dict(cost=dict(lower_quantile=0.5)),
    "no-response": dict(learn_response=False),
    "no-autosens": dict(autosens_step=1.0, learn_response=False),
}


def _configured(controller, overrides: dict):
    """The MPC with `overrides` applied to its config (nested dataclasses by dict)."""
    from serving.controllers.mpc import MPCController

    c = controller.config
    for k, v in overrides.items():
        cur = getattr(c, k)
        new = dataclasses.replace(cur, **v) if isinstance(v, dict) else v
        c = dataclasses.replace(c, **{k: new})
    return MPCController(controller.predictor, c, name=controller.name)


def run_one(model: str, controller: str, variant: str, scenario: str, seed: int, days: float):
    cfg = TrialConfig(
        controller=controller,
        model_dir=model if controller == "mpc" else None,
        patients="all",
        days=days,
        seed=seed,
        **SCENARIOS[scenario],
    )
    ctl, window, _, pred = build_controller(cfg)
    if controller == "mpc":
        ctl = _configured(ctl, VARIANTS[variant])
    t0 = time.perf_counter()
    try:
        r = run_trial(cfg, controller=ctl, window=window, predictor=pred)
    finally:
        close = getattr(ctl, "close", None)
        if callable(close):
            close()
    c, p = r.cohort_metrics(), r.patient_metrics()
    groups: dict[str, list[float]] = {}
    for name, m in p.items():
        groups.setdefault(name.split("#")[0], []).append(m["bg_tir"])
    return {
        "controller": controller if controller != "mpc" else f"mpc:{variant}",
        "scenario": scenario,
        "seed": seed,
        "days": days,
        "tir": c["tir"],
        "tbr70": c["tbr70"],
        "tar250": c["tar250"],
        "bg_tir": c["bg_tir"],
        "bg_tbr70": c["bg_tbr70"],
        "patients_bg_below_54": int(c["patients_with_bg_tbr54"]),
        "lowest_bg": float(min(m["bg_min"] for m in p.values())),
        "limit_violations": int(c["limit_violations"]),
        "age_group_bg_tir": {k: float(np.mean(v)) for k, v in groups.items()},
        "wall_s": time.perf_counter() - t0,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="exported forecaster for the MPC")
    ap.add_argument("--days", type=float, default=7.0)
    ap.add_argument("--seeds", default="1,5")
    ap.add_argument("--scenarios", default=",".join(SCENARIOS))
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--peers", default="", help="e.g. oref0,loop (their own code; slow)")
    ap.add_argument("--out", help="also write the JSON here")
    a = ap.parse_args(argv)
    runs = []
    seeds = [int(s) for s in a.seeds.split(",")]
    plan = [("mpc", v) for v in a.variants.split(",") if v] + [
        (p, "") for p in a.peers.split(",") if p
    ]
    for scenario in a.scenarios.split(","):
        for controller, variant in plan:
            for seed in seeds:
                r = run_one(a.model, controller, variant, scenario, seed, a.days)
                runs.append(r)
                print(
                    f"{r['scenario']:12s} {r['controller']:16s} seed {seed}: TIR {r['tir']:.1f} "
                    f"TBR70 {r['tbr70']:.2f} <54 {r['patients_bg_below_54']} "
                    f"({r['wall_s']:.0f} s)",
                    file=sys.stderr,
                )
    # mean over seeds per (scenario, controller)
    table: dict[tuple[str, str], list[dict]] = {}
    for r in runs:
        table.setdefault((r["scenario"], r["controller"]), []).append(r)
    rows = []
    for (scenario, ctl), rs in table.items():
        ages = {
            k: float(np.mean([r["age_group_bg_tir"][k] for r in rs]))
            for k in rs[0]["age_group_bg_tir"]
        }
        rows.append(
            {
                "scenario": scenario,
                "controller": ctl,
                "seeds": [r["seed"] for r in rs],
                "tir": float(np.mean([r["tir"] for r in rs])),
                "tbr70": float(np.mean([r["tbr70"] for r in rs])),
                "tar250": float(np.mean([r["tar250"] for r in rs])),
                "patients_bg_below_54": [r["patients_bg_below_54"] for r in rs],
                "lowest_bg": float(min(r["lowest_bg"] for r in rs)),
                "limit_violations": int(sum(r["limit_violations"] for r in rs)),
                "age_group_bg_tir": ages,
            }
        )
    out = {"days": a.days, "seeds": seeds, "model": a.model, "rows": rows, "runs": runs}
    print(json.dumps(out))
    if a.out:
        Path(a.out).write_text(json.dumps(out, indent=1))
    head = "| scenario | controller | TIR % | TBR<70 % | TAR>250 % | patients true BG<54 (per seed) | lowest true BG | adolescents / adults / children TIR |"
    print(head, file=sys.stderr)
    print("|" + "---|" * 8, file=sys.stderr)
    for r in rows:
        ages = r["age_group_bg_tir"]
        print(
            f"| {r['scenario']} | {r['controller']} | {r['tir']:.1f} | {r['tbr70']:.2f} | "
            f"{r['tar250']:.1f} | {r['patients_bg_below_54']} | {r['lowest_bg']:.0f} | "
            f"{ages.get('adolescent', float('nan')):.1f} / {ages.get('adult', float('nan')):.1f}"
            f" / {ages.get('child', float('nan')):.1f} |",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
