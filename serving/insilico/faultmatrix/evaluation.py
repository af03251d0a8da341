"""One case's verdict: its checks over its patients, what the loop did, the glucose outcome."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np

from serving.insilico.faultmatrix.checks import CHECKS, _vetoes, common_checks
from serving.insilico.faultmatrix.records import CaseResult, CaseRun

LOW_MGDL = 70.0

# --------------------------------------------------------------------------- outcome


def _outcome(bg: Sequence[float]) -> dict[str, Any]:
    a = np.asarray([x for x in bg if math.isfinite(x)], dtype=float)
    if not a.size:
        return {"n": 0}
    return {
        "n": int(a.size),
        "min_mgdl": round(float(a.min()), 1),
        "mean_mgdl": round(float(a.mean()), 1),
        "max_mgdl": round(float(a.max()), 1),
        "below70_pct": round(100.0 * float((a < LOW_MGDL).mean()), 1),
        "below54_pct": round(100.0 * float((a < 54.0).mean()), 1),
    }


def what_the_loop_did(run: CaseRun) -> dict[str, Any]:
    during = [r for r in run.records if r.fault_on and r.cycle is not None]
    fb = Counter(r.cycle.verdict.fallback or "closed-loop" for r in during)
    boluses = sum(1 for r in during if r.cycle.verdict.bolus_u > 0)
    cmds = Counter(r.status for r in run.journal.commands(patient=run.name) if run.on(r.cycle_time))
    preds = Counter(r.cycle.predictor.split(":")[-1] for r in during)
    return {
        "cycles_during": len(during),
        "decisions_during": dict(fb),
        "boluses_during": boluses,
        "vetoes_during": dict(_vetoes(run)),
        "commands_during": dict(cmds),
        "forecaster_during": dict(preds),
    }


def summarise(run: CaseRun) -> str:
    d = what_the_loop_did(run)
    fb = ", ".join(f"{k} {n}" for k, n in sorted(d["decisions_during"].items()))
    top = ", ".join(f"{k}×{n}" for k, n in Counter(d["vetoes_during"]).most_common(2))
    return f"{fb}; boluses {d['boluses_during']}" + (f"; {top}" if top else "")


def evaluate(runs: Sequence[CaseRun]) -> CaseResult:
    """One case's verdict over its patients."""
    case = runs[0].case
    violations: list[str] = []
    per_patient = []
    for run in runs:
        v = common_checks(run) + CHECKS[case.check](run)
        violations += [f"{run.patient}: {x}" for x in v]
        bg_during = [r.bg for r in run.records if r.fault_on]
        bg_after = [r.bg for r in run.records if not r.fault_on and run.after(r.time, case.tail)]
        per_patient.append({
            "patient": run.patient,
            "loop": what_the_loop_did(run),
            "summary": summarise(run),
            "glucose_during": _outcome(bg_during),
            "glucose_after": _outcome(bg_after),
            "violations": len(v),
            **({"undetected_occurrences": run.notes["silent_occurrences"]}
               if run.notes.get("silent_occurrences") else {}),
        })  # fmt: skip
    return CaseResult(
        name=case.name,
        passed=not violations,
        violations=len(violations),
        detail={
            "expect": case.expect,
            "fault": case.spec or case.mode,
            "minutes": case.minutes,
            "occurrences": len(runs[0].windows),
            "patients": per_patient,
            "problems": violations[:10],
        },
    )
