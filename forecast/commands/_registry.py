"""Collects the `register(subparsers)` functions of a package's command modules."""

from __future__ import annotations

import argparse
import importlib


def register_modules(sub: argparse._SubParsersAction, package: str, names: list[str]) -> None:
    """Import `package.name` for each name and call its `register(sub)`.

    Command modules import only the standard library at the top; a module that is missing
    (a capability not installed in this distribution) is skipped.
    """
    for name in names:
        try:
            mod = importlib.import_module(f"{package}.{name}")
        except ModuleNotFoundError as e:
            if e.name and e.name.startswith(f"{package}.{name}"):
                continue
            raise
        mod.register(sub)
