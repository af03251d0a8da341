"""`glucast peers install|check`: the peer controllers' own environments (stdlib imports only).

    glucast peers install              # oref0 (npm) and Loop (pyloopkit venv), pinned
    glucast peers install oref0        # one of them
    glucast peers check --json         # start each driver and report versions

They go to $GLUCAST_PEERS_DIR (default ~/.cache/glucast/peers). Exit code 1 when a peer is
missing or not the pinned version.
"""

from __future__ import annotations

import argparse
import sys

PEERS = ("oref0", "loop")  # serving.controllers.peers.env.PEERS (not imported up here)


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
    inst.add_argument("peer", nargs="*", help="oref0 and/or loop (default: both)")
    inst.add_argument("--quiet", action="store_true", help="no progress on stderr")
    inst.set_defaults(func=run)
    chk = psub.add_parser("check", help="start each peer's driver and check its version")
    chk.add_argument("peer", nargs="*", help="oref0 and/or loop (default: both)")
    chk.add_argument("--json", action="store_true", help="print one JSON object")
    chk.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from serving.controllers.peers import env
    from serving.controllers.peers.process import PeerError

    peers = tuple(args.peer) or PEERS
    unknown = [p for p in peers if p not in PEERS]
    if unknown:
        print(f"glucast peers: unknown peer(s) {unknown}; choose from {PEERS}", file=sys.stderr)
        return 2
    if args.peers_command == "install":
        log = (lambda m: None) if args.quiet else (lambda m: print(m, file=sys.stderr))
        try:
            statuses = env.install(peers, log=log)
        except PeerError as e:
            print(f"glucast peers install: {e}", file=sys.stderr)
            return 1
        _table(statuses)
        return 0 if all(s.ok for s in statuses) else 1
    statuses = env.check(peers)
    if getattr(args, "json", False):
        from forecast.cli import emit_json

        emit_json({"peers_dir": str(env.peers_dir()), "peers": [s.to_dict() for s in statuses]})
    else:
        print(f"peers in {env.peers_dir()}")
        _table(statuses)
    return 0 if all(s.ok for s in statuses) else 1


def _table(statuses) -> None:
    for s in statuses:
        mark = "ok" if s.ok else "MISSING" if not s.version else "WRONG"
        extra = ", ".join(f"{k} {v}" for k, v in s.runtime.items())
        print(f"  {s.peer:6s} {mark:7s} {s.version or '-':6s} {s.path}  {extra}")
        if s.detail:
            print(f"         {s.detail}")
