"""The fault matrix: every fault the closed loop must survive, injected while the real loop runs.

Each case injects one fault into simulated patients — through the HAL fault wrappers of
`serving.insilico.faults` around the real simulated devices, through a forecaster that
misbehaves inside the real `FallbackPredictor`, through a damaged model directory, or
through SQLite itself refusing writes — while `serving.loop.ControlLoop.cycle` (the
supervisor and the journal included) runs every 5 minutes. Nothing is mocked: the
simulated patient's glucose responds to whatever insulin actually reached it.

For every case the matrix asserts, from the records the devices and the journal keep (not
from what the loop says about itself):

* **limits never exceeded** — the pump's own delivery history: no basal interval above the
  oref0 cap (min(max basal, 3 × max daily basal, 4 × scheduled)), no bolus above max bolus
  or above its acknowledgement, no bolus taking insulin on board (recomputed from the
  deliveries with the loop's IOB curve) above max IOB, no temp basal longer than 30 min;
  a cycle that fell back never raised insulin; the journal is consistent
  (`Journal.check`) and holds the pump's deliveries;
* **fallback engaged** and **the event journaled** — what each case expects (see `cases`);
* **glucose outcome** — min/mean plasma glucose and time < 70 mg/dL during and after the
  fault, from the simulator's true BG (reported, not asserted: a fault that stops insulin
  raises glucose, and that is the safe outcome).

`run_matrix()` runs the short matrix (each fault once, minutes to an hour or three of
simulated time); `run_matrix(long=True)` soaks every fault, recurring every few hours,
over several simulated days. Cases that share a length share one simulated cohort (one
patient per case) so the loop's batched cycle does the work once.
"""

from __future__ import annotations

from serving.insilico.faultmatrix.backend import MatrixBackend
from serving.insilico.faultmatrix.cases import CASE_NAMES, CASES, FaultCase, FaultMatrixError
from serving.insilico.faultmatrix.checks import CHECKS, common_checks
from serving.insilico.faultmatrix.models import (
    ForecasterFault,
    damage_model_dir,
    persistence_model_bytes,
    write_model_dir,
)
from serving.insilico.faultmatrix.planning import MatrixConfig, plan
from serving.insilico.faultmatrix.records import CaseResult, CaseRun
from serving.insilico.faultmatrix.runner import run_matrix

__all__ = [
    "CASES",
    "CASE_NAMES",
    "CHECKS",
    "CaseResult",
    "CaseRun",
    "FaultCase",
    "FaultMatrixError",
    "ForecasterFault",
    "MatrixBackend",
    "MatrixConfig",
    "common_checks",
    "damage_model_dir",
    "persistence_model_bytes",
    "plan",
    "run_matrix",
    "write_model_dir",
]
