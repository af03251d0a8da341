"""The matrix's configuration and plan: when each fault occurs, which cases share a cohort."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd

from forecast.schema import SLOT
from serving.insilico.faultmatrix.cases import CASE_NAMES, CASES, FaultCase, FaultMatrixError

LEAD_MIN = 15  # closed loop before the fault starts (at least)
MEAL_SEARCH_MIN = 90  # short matrix: look this far for a meal to put the fault in front of
LONG_DAYS = 2.0
LONG_PERIOD_H = 6.0  # --long: the fault recurs every 6 h


@dataclass(frozen=True)
class MatrixConfig:
    patients: tuple[str, ...] = ()  # () = each case on its own default patient
    long: bool = False
    days: float = LONG_DAYS
    period_h: float = LONG_PERIOD_H
    seed: int = 0
    sensor: str = "dexcom-noise"  # noise only: the faults under test are the injected ones
    start: str = "2018-01-01 06:45"  # UTC: faults begin at 07:00, around breakfast
    model_dir: str | None = None
    cases: tuple[str, ...] = ()  # () = all
    workdir: str | None = None


def occurrences(
    case: FaultCase, cfg: MatrixConfig, start: int = LEAD_MIN
) -> tuple[list[tuple[int, int]], int]:
    """[(start_min, minutes)] of the fault from the run's start, and the run's length (min).

    Short matrix: one occurrence from `start` (see `meal_start`); long: every `period_h`."""
    if cfg.long:
        total = int(round(cfg.days * 1440 / 5)) * 5
        if case.group == "model":  # a refused model stays refused: the whole run
            return [(0, total)], total
        period = int(cfg.period_h * 60)
        starts = range(LEAD_MIN + 60, total - case.minutes - case.tail, period)
        return [(s, case.minutes) for s in starts], total
    if case.group == "model":
        total = LEAD_MIN + case.minutes + case.tail
        return [(0, total)], total
    return [(start, case.minutes)], start + case.minutes + case.tail


def meal_start(case: FaultCase, world, j: int, cfg: MatrixConfig) -> int:
    """Short matrix: minutes from the start at which patient j's fault begins — `before_meal`
    minutes ahead of its first announced meal after the lead-in, so the fault meets a bolus
    decision (the moment it matters); the lead-in alone when no meal comes soon."""
    if cfg.long or case.group == "model":
        return LEAD_MIN
    t0 = world.now()
    first = LEAD_MIN + case.before_meal
    for m in range(first, first + MEAL_SEARCH_MIN, 5):
        a = t0 + pd.Timedelta(minutes=m)
        if world.announced_carbs(j, a, a + SLOT) > 0:
            return m - case.before_meal
    return LEAD_MIN


@dataclass
class _Group:
    """Cases that run together in one cohort (same length, same loop configuration)."""

    key: tuple
    pairs: list[tuple[FaultCase, str]]  # (case, virtual patient)


def plan(cfg: MatrixConfig) -> list[_Group]:
    """Which (case, patient) pairs share a cohort: device cases of one length together (a
    patient at most once per cohort), every other case alone (it changes the whole loop)."""
    chosen = [c for c in CASES if not cfg.cases or c.name in cfg.cases]
    unknown = set(cfg.cases) - set(CASE_NAMES)
    if unknown:
        raise FaultMatrixError(f"unknown case(s) {sorted(unknown)}; known: {', '.join(CASE_NAMES)}")
    groups: list[_Group] = []
    soak = _soak_patients(chosen) if cfg.long and not cfg.patients else {}
    for c in chosen:
        patients = list(cfg.patients) or [soak.get(c.name, c.patient)]
        for p in patients:
            length = occurrences(c, cfg)[1] if cfg.long else c.minutes + c.tail
            key = ("device", length) if c.group == "device" else (c.name,)
            home = next((g for g in groups if g.key == key and p not in [q for _, q in g.pairs]), None)  # fmt: skip
            if home is None:
                groups.append(_Group(key, [(c, p)]))
            else:
                home.pairs.append((c, p))
    return groups


def _soak_patients(cases: Sequence[FaultCase]) -> dict[str, str]:
    """--long without --patients: one distinct virtual patient per device case, so all of
    them soak together in one cohort (the short matrix's choice kept where it is free)."""
    from forecast.sim import load_patients

    pool = [str(n) for n in load_patients("all").names]
    taken: set[str] = set()
    out: dict[str, str] = {}
    device = [c for c in cases if c.group == "device"]
    for c in device:  # first come, first served for the defaults
        if c.patient not in taken:
            out[c.name] = c.patient
            taken.add(c.patient)
    for c in device:
        if c.name not in out:
            spare = next((p for p in pool if p not in taken), c.patient)
            out[c.name] = spare
            taken.add(spare)
    return out
