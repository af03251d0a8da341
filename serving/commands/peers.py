"""`glucast peers install|check`: the peer controllers' own environments (stdlib imports only).

    glucast peers install              # oref0 (npm) and Loop (pyloopkit venv), pinned
    glucast peers install oref0        # one of them
    glucast peers check --json         # start each driver and report versions
    glucast peers install glupredkit   # GluPredKit 1.0.32 for `glucast benchmark` (named only)

They go to $GLUCAST_PEERS_DIR (default ~/.cache/glucast/peers). Exit code 1 when a peer is
missing or not the pinned version.
"""

from __future__ import annotations

import argparse
import sys

PEERS = ("oref0", "loop")  # serving.controllers.peers.env.PEERS (not imported up here)
#: Forecasting peers: installed or checked only when named. GluPredKit's environment is the
#: lab's (training.peers.glupredkit, imported inside the function so that this command's
#: module never loads training).
FORECAST_PEERS = ("glupredkit",)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "peers",
        help="install or check the peer controllers (OpenAPS oref0, Loop)",
        description="The peer controllers run as their real code in environments glucast "
        "creates and pins: OpenAPS oref0 0.7.1 from npm (needs Node.js and npm) and Loop as "
        "opsb-pyloopkit 0.1.0 in a venv of its own (it pins numpy < 2). They live in "
        "$GLUCAST_PEERS_DIR (default ~/.cache/glucast/peers).",
    )
    psub = p.add_subparsers(dest="peers_command", metavar="ACTION")
    psub.required = True
    inst = psub.add_parser("install", help="create (or re-create) the pinned environments")
    inst.add_argument(
        "peer", nargs="*", help="oref0, loop and/or glupredkit (default: oref0 and loop)"
    )
    inst.add_argument("--quiet", action="store_true", help="no progress on stderr")
    inst.set_defaults(func=run)
    chk = psub.add_parser("check", help="start each peer's driver and check its version")
    chk.add_argument(
        "peer", nargs="*", help="oref0, loop and/or glupredkit (default: oref0 and loop)"
    )
    chk.add_argument("--json", action="store_true", help="print one JSON object")
    chk.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from serving.controllers.peers import env
    from serving.controllers.peers.process import PeerError

    asked = tuple(args.peer) or PEERS
    unknown = [p for p in asked if p not in PEERS + FORECAST_PEERS]
    if unknown:
        print(
            f"glucast peers: unknown peer(s) {unknown}; choose from {PEERS + FORECAST_PEERS}",
            file=sys.stderr,
        )
        return 2
    peers = tuple(p for p in asked if p in PEERS)
    extra = [_glupredkit(args)] if "glupredkit" in asked else []
    if not peers:
        return _finish(args, [], extra)
    if args.peers_command == "install":
        log = (lambda m: None) if args.quiet else (lambda m: print(m, file=sys.stderr))
        try:
            statuses = env.install(peers, log=log)
        except PeerError as e:
            print(f"glucast peers install: {e}", file=sys.stderr)
            return 1
    else:
        statuses = env.check(peers)
    return _finish(args, statuses, extra)


def _glupredkit(args: argparse.Namespace):
    """GluPredKit's venv (training.peers.glupredkit): install it or check its version."""
    from serving.controllers.peers.env import PeerStatus
    from training.peers import glupredkit as gpk  # the lab's, loaded only when named

    if args.peers_command == "install":
        log = (lambda m: None) if args.quiet else (lambda m: print(m, file=sys.stderr))
        try:
            gpk.install(progress=log)
        except (gpk.PeerError, OSError) as e:
            return PeerStatus("glupredkit", False, str(gpk.env_dir()), detail=str(e)[-2000:])
    have = gpk.installed_version()
    reason = gpk.unavailable_reason()
    return PeerStatus(
        "glupredkit", reason is None, str(gpk.env_dir()), have or "", detail=reason or ""
    )


def _finish(args: argparse.Namespace, statuses: list, extra: list) -> int:
    from serving.controllers.peers import env

    statuses = [*statuses, *extra]
    if args.peers_command == "check" and getattr(args, "json", False):
        from forecast.cli import emit_json

        emit_json({"peers_dir": str(env.peers_dir()), "peers": [s.to_dict() for s in statuses]})
    else:
        if args.peers_command == "check":
            print(f"peers in {env.peers_dir()}")
        _table(statuses)
    return 0 if all(s.ok for s in statuses) else 1


def _table(statuses) -> None:
    for s in statuses:
        mark = "ok" if s.ok else "MISSING" if not s.version else "WRONG"
        extra = ", ".join(f"{k} {v}" for k, v in s.runtime.items())
        print(f"  {s.peer:10s} {mark:7s} {s.version or '-':6s} {s.path}  {extra}")
        if s.detail:
            print(f"             {s.detail}")
