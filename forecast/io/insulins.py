"""Injected insulins by name: which part is a bolus and which part is basal.

Sources that record injections (ShanghaiT1DM free text, Dexcom Clarity and LibreView
"long-acting" entries) name the insulin, not its role. The frame has two insulin columns,
``bolus_u`` and ``basal_u``, so each injection is translated here:

* rapid-acting and regular (short-acting) human insulin: the whole dose is a bolus in the
  injection slot;
* long-acting analogues (glargine, detemir, degludec): the dose is **spread evenly over
  24 hours into** ``basal_u`` — the way a pump would have delivered the same basal. A daily
  injection then looks like a flat basal rate, which is what these analogues are designed to
  approximate, and insulin-on-board features stay meaningful for people on injections.
  The injection itself (name, units, time) is kept in the text column ``insulin_sc`` of its
  slot, so nothing about it is lost and nothing is counted twice;
* intermediate (NPH) insulin: spread over 12 hours into ``basal_u``;
* premixed human insulin ("30R" = 30 % regular + 70 % NPH, "50R" = 50/50): the regular part
  is a bolus, the NPH part is spread over 12 hours.

Totals are conserved: a 12 U glargine injection adds exactly 12 U to ``basal_u``.
An insulin this table does not know is reported, never guessed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import pandas as pd


@dataclass(frozen=True)
class Insulin:
    name: str
    kind: str  # "rapid" | "short" | "intermediate" | "long" | "premix"
    bolus_fraction: float  # share delivered as a bolus at injection
    spread_hours: float  # hours over which the rest is spread into basal_u


_RAPID = Insulin("rapid-acting", "rapid", 1.0, 0.0)
_SHORT = Insulin("regular", "short", 1.0, 0.0)
_NPH = Insulin("NPH", "intermediate", 0.0, 12.0)
_LONG = Insulin("long-acting", "long", 0.0, 24.0)

#: lower-case name -> role. Names as they appear in the supported sources plus the common
#: brand and generic names, so a CSV from elsewhere works too.
KNOWN: dict[str, Insulin] = {
    **dict.fromkeys(
        [
            "novolin r",
            "humulin r",
            "gansulin r",
            "actrapid",
            "insuman rapid",
            "regular insulin",
            "regular",
        ],
        _SHORT,
    ),
    **dict.fromkeys(
        [
            "insulin aspart",
            "aspart",
            "novorapid",
            "novolog",
            "fiasp",
            "insulin lispro",
            "lispro",
            "humalog",
            "admelog",
            "lyumjev",
            "insulin glulisine",
            "glulisine",
            "apidra",
            "fast-acting",
            "rapid-acting",
        ],
        _RAPID,
    ),
    **dict.fromkeys(["nph", "humulin n", "novolin n", "insulatard", "isophane"], _NPH),
    **dict.fromkeys(
        [
            "insulin glargine",
            "glargine",
            "lantus",
            "toujeo",
            "basaglar",
            "insulin detemir",
            "detemir",
            "levemir",
            "insulin degludec",
            "degludec",
            "tresiba",
            "long-acting",
        ],
        _LONG,
    ),
    "novolin 30r": Insulin("premix 30/70", "premix", 0.3, 12.0),
    "humulin 70/30": Insulin("premix 30/70", "premix", 0.3, 12.0),
    "novolin 50r": Insulin("premix 50/50", "premix", 0.5, 12.0),
}


def normalise_name(name: str) -> str:
    """Collapse spaces (including non-breaking ones) and case: 'insulin\\xa0glargine' -> ..."""
    return display_name(name).lower()


def display_name(name: str) -> str:
    """The name as written, with spacing tidied: non-breaking spaces to spaces."""
    return re.sub(r"\s+", " ", str(name).replace("\xa0", " ")).strip()


def classify(name: str) -> Insulin | None:
    """The role of a named insulin, or None if unknown."""
    return KNOWN.get(normalise_name(name))


def split_dose(name: str, units: float) -> tuple[float, float, float] | None:
    """(bolus units, basal units, spread hours) for one injection, or None if unknown."""
    ins = classify(name)
    if ins is None:
        return None
    bolus = units * ins.bolus_fraction
    return bolus, units - bolus, ins.spread_hours


def injection_events(
    subject_id: str | list[str],
    times: pd.Series,
    names: list[str],
    units: list[float] | np.ndarray,
    *,
    text_column: str = "insulin_sc",
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``doses`` and ``texts`` tables for injections of *known* insulins (see `classify`).

    The bolus part is instantaneous in ``bolus_u``; the rest is spread from the injection
    over the insulin's `spread_hours` into ``basal_u``; the text column keeps
    ``"<name> <units> U"`` at the injection.
    """
    from forecast.preprocess import table

    t = pd.Series(times).reset_index(drop=True)
    u = np.asarray(units, dtype=np.float64)
    sid = [subject_id] * len(t) if isinstance(subject_id, str) else list(subject_id)
    roles = [classify(n) for n in names]
    if any(r is None for r in roles):
        raise ValueError("injection_events takes known insulins only; screen with classify()")
    frac = np.array([r.bolus_fraction for r in roles], dtype=np.float64)
    hours = np.array([r.spread_hours for r in roles], dtype=np.float64)
    bolus = u * frac
    basal = u - bolus
    mb = bolus > 0
    ms = basal > 0
    ends = t + pd.to_timedelta(hours, unit="h")
    doses = pd.concat(
        [
            table(
                "doses",
                subject_id=[s for s, m in zip(sid, mb) if m],
                start=t[mb],
                units=bolus[mb],
                column="bolus_u",
            ),
            table(
                "doses",
                subject_id=[s for s, m in zip(sid, ms) if m],
                start=t[ms],
                end=ends[ms],
                units=basal[ms],
                column="basal_u",
            ),
        ],
        ignore_index=True,
    )
    texts = table(
        "texts",
        subject_id=sid,
        time=t,
        column=text_column,
        text=[f"{display_name(n)} {x:g} U" for n, x in zip(names, u)],
    )
    return doses, texts
