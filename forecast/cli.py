"""The `glucast` command line.

Subcommands are plugins: each package registers its commands under the entry-point group
``glucast.commands`` (see pyproject.toml), so `forecast` never imports `training` or
`serving`. A command module imports only argparse at the top and loads its heavy modules
(torch, mlflow, onnxruntime) inside the function that runs the command, which keeps
`glucast --help` fast and free of torch.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from importlib.metadata import entry_points

from forecast.schema import GlucastError

# Keep torch/onnxruntime polite on small shared machines unless the user says otherwise.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="glucast",
        description="Glucose forecasting and closed-loop insulin research "
        "(research software, not a medical device).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for ep in sorted(entry_points(group="glucast.commands"), key=lambda e: e.name):
        try:
            register = ep.load()
        except ImportError as e:  # a command whose optional extra is not installed
            p = sub.add_parser(ep.name, help=f"(unavailable: {e})")
            p.set_defaults(func=_unavailable(ep.name, e))
            continue
        register(sub)
    return parser


def _unavailable(name: str, err: Exception):
    def run(args: argparse.Namespace) -> int:
        print(f"glucast {name} is unavailable: {err}", file=sys.stderr)
        return 2

    return run


def emit_json(obj: object) -> None:
    """Print one JSON object on stdout (what `--json` promises to scripts)."""
    print(json.dumps(obj, indent=2, default=_json_default, allow_nan=False))


def _json_default(o: object):
    import numpy as np

    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return None if not np.isfinite(o) else float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        rc = args.func(args)
    except GlucastError as e:
        print(f"glucast {args.command}: error: {e}", file=sys.stderr)
        return 2
    except FileNotFoundError as e:
        print(f"glucast {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
