"""Readers of real data into the canonical frame, one module per source.

Each ``read_<format>(paths, *, strict=False, ...)`` returns ``(frame, DataReport)``; `read`
dispatches by name. The readers share `forecast.io.common` (screening, time zones) and
`forecast.preprocess` (the grid), so no reader re-implements either. See data/README.md for
where each dataset comes from and how to point glucast at it.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from forecast.schema import InputError

#: format name -> (module, reader function, file suffixes it reads)
FORMATS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "ohio": ("forecast.io.ohio", "read_ohio", (".xml",)),
    "shanghai": ("forecast.io.shanghai", "read_shanghai", (".xls", ".xlsx")),
    "nightscout": ("forecast.io.nightscout", "read_nightscout", (".json",)),
    "csv": ("forecast.io.csv", "read_csv", (".csv", ".tsv", ".txt")),
    # AZT1D files are .csv too: told apart from other CSV by their header (`guess_format`)
    "azt1d": ("forecast.io.azt1d", "read_azt1d", (".csv",)),
}


def reader(fmt: str):
    """The reader function of a format name."""
    if fmt not in FORMATS:
        raise InputError(
            f"unknown format; choose one of {', '.join(FORMATS)}", field="format", value=fmt
        )
    mod, fn, _ = FORMATS[fmt]
    return getattr(importlib.import_module(mod), fn)


def guess_format(paths: Iterable[str | Path]) -> str:
    """The format implied by the files' suffixes, and for CSV by the header.

    AZT1D files are CSV with their own header, so CSV files (and folders of them) are told
    apart by their first line; other directories are not guessed.
    """
    paths = [Path(p) for p in paths]
    files = [p for p in paths if not p.is_dir()]
    dirs = [p for p in paths if p.is_dir()]
    inside = [f for d in dirs for f in sorted(d.rglob("*.csv")) if f.is_file()]
    suffixes = {p.suffix.lower() for p in files}
    if dirs:
        # a folder is guessed only when it holds AZT1D files (``Subject N/Subject N.csv``)
        if inside and not files and _all_azt1d(inside):
            return "azt1d"
        suffixes.add("")
    if suffixes == {".csv"} and _all_azt1d(files):
        return "azt1d"
    fmts = {
        name for name, (_, _, suf) in FORMATS.items() if name != "azt1d" and suffixes & set(suf)
    }
    if len(fmts) != 1 or not suffixes <= {s for n in fmts for s in FORMATS[n][2]}:
        raise InputError(
            "cannot tell the format from the file names",
            field="format",
            value=", ".join(sorted(suffixes)),
            hint=f"pass --format {'|'.join(FORMATS)}",
        )
    return fmts.pop()


def _all_azt1d(files: list[Path]) -> bool:
    from forecast.io.azt1d import looks_like

    return bool(files) and all(looks_like(f) for f in files)


def read(paths: str | Path | Iterable[str | Path], fmt: str | None = None, **options: Any):
    """Read `paths` with the reader of `fmt` (guessed from suffixes when None).

    Options a reader does not take are refused by name rather than ignored.
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    paths = list(paths)
    fmt = fmt or guess_format(paths)
    fn = reader(fmt)
    accepted = set(inspect.signature(fn).parameters)
    bad = sorted(k for k, v in options.items() if v is not None and k not in accepted)
    if bad:
        raise InputError(
            f"option(s) {', '.join(bad)} do not apply to format {fmt!r}",
            field=bad[0],
            value=options[bad[0]],
        )
    return fn(paths, **{k: v for k, v in options.items() if v is not None})


__all__ = ["FORMATS", "guess_format", "read", "reader"]
