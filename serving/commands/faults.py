"""`glucast faults`: the fault-injection matrix of the closed loop (stdlib imports only here).

    glucast faults                       # the short matrix: every fault once (well under a minute)
    glucast faults --json                # {"cases": [{"name", "passed", "violations", "detail"}]}
    glucast faults --long --days 3       # soak: every fault recurring every 6 h for 3 days
    glucast faults --patients adult#001,child#002 --case cgm-dropout-60
    glucast faults --model DIR           # the MPC over an exported model instead of physio

Exit code 1 when any case fails. See `serving.insilico.faultmatrix` for what each case asserts.
"""

from __future__ import annotations

import argparse
import sys


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "faults",
        help="run the fault-injection matrix against the closed loop",
        description="Inject each fault (CGM dropouts, stale/future/flat/spiky readings, clock "
        "jumps, pump timeouts, occlusion, empty reservoir, failing or damaged models, an "
        "unwritable journal) into simulated patients while the real loop runs, and check that "
        "limits hold, the fallback engages and the event is journaled.",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--long", action="store_true", help="soak each fault over several days")
    p.add_argument("--days", type=float, default=2.0, help="--long: simulated days (default 2)")
    p.add_argument(
        "--period-hours", type=float, default=6.0, help="--long: the fault recurs every N hours"
    )
    p.add_argument(
        "--patients",
        nargs="+",
        metavar="NAME",
        help="run every case on these virtual patients (comma or space separated); default: "
        "each case on its own patient, chosen to meet a meal",
    )
    p.add_argument(
        "--case", action="append", default=[], metavar="NAME", help="only these cases (repeat)"
    )
    p.add_argument("--list", action="store_true", help="list the cases and exit")
    p.add_argument("--model", metavar="DIR", help="exported forecaster for the MPC")
    p.add_argument("--seed", type=int, default=0, help="meals and sensor noise")
    p.add_argument(
        "--sensor", default="dexcom-noise", help="simulated sensor (default: noise only)"
    )
    p.add_argument("--workdir", metavar="DIR", help="keep the journals here (default: temporary)")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from serving.insilico.faultmatrix import CASES, MatrixConfig, run_matrix

    if args.list:
        for c in CASES:
            print(f"{c.name:28s} {c.minutes:4d} min  {c.expect}")
        return 0
    patients = tuple(p for arg in (args.patients or []) for p in arg.split(",") if p.strip())
    cases = tuple(c for arg in args.case for c in arg.split(",") if c.strip())
    cfg = MatrixConfig(
        patients=patients,
        long=args.long,
        days=args.days,
        period_h=args.period_hours,
        seed=args.seed,
        sensor=args.sensor,
        model_dir=args.model,
        cases=cases,
        workdir=args.workdir,
    )

    def log(msg: str) -> None:
        if not args.quiet:
            print(f"glucast faults: {msg}", file=sys.stderr, flush=True)

    results = run_matrix(cfg, log=log)
    if args.json:
        from forecast.cli import emit_json

        emit_json(
            {
                "cases": [
                    {
                        "name": r.name,
                        "passed": r.passed,
                        "violations": r.violations,
                        "detail": _finite(r.detail),
                    }
                    for r in results
                ],
                "passed": all(r.passed for r in results),
                "long": args.long,
            }
        )
    else:
        _table(results)
    return 0 if all(r.passed for r in results) else 1


def _finite(o):
    """NaN/inf → None, so the JSON is strict."""
    import math

    if isinstance(o, dict):
        return {k: _finite(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_finite(v) for v in o]
    if isinstance(o, float) and not math.isfinite(o):
        return None
    return o


def _table(results) -> None:
    w = sys.stdout.write
    w(f"{'case':27s} {'ok':4s} {'viol':>4s}  {'patient':15s} {'min BG':>7s} {'<70 %':>6s} "
      f"{'after <70':>9s}  what the loop did\n")  # fmt: skip
    for r in results:
        for k, p in enumerate(r.detail["patients"]):
            g, a = p["glucose_during"], p["glucose_after"]
            name = r.name if k == 0 else ""
            ok = ("pass" if r.passed else "FAIL") if k == 0 else ""
            viol = str(r.violations) if k == 0 else ""
            w(f"{name:27s} {ok:4s} {viol:>4s}  {p['patient']:15s} {g.get('min_mgdl', float('nan')):7.1f} "
              f"{g.get('below70_pct', float('nan')):6.1f} {a.get('below70_pct', float('nan')):9.1f}  "
              f"{p['summary']}\n")  # fmt: skip
        for problem in r.detail["problems"][:3]:
            w(f"{'':27s}   ! {problem}\n")
    n_ok = sum(r.passed for r in results)
    w(f"{n_ok}/{len(results)} cases passed\n")
