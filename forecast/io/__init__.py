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
    """The format implied by the files' suffixes (directories are not guessed)."""
    suffixes = {Path(p).suffix.lower() for p in paths}
    fmts = {name for name, (_, _, suf) in FORMATS.items() if suffixes & set(suf)}
    if len(fmts) != 1 or not suffixes <= {s for n in fmts for s in FORMATS[n][2]}:
        raise InputError(
            "cannot tell the format from the file names",
            field="format",
            value=", ".join(sorted(suffixes)),
            hint="pass --format ohio|shanghai|nightscout|csv",
        )
    return fmts.pop()


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
