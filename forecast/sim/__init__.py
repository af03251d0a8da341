"""UVA/Padova S2008 in silico: 30 virtual patients, vectorised, with sensors, pumps, scenarios.

Public API (see docs/interfaces.md, forecast.sim):
`load_patients`, `Patients`, `replay`, `ReplayResult`, `ModelConfig`.
"""

from forecast.sim.errors import (
    PhysiologyWarning,
    ScenarioError,
    SimInputError,
    UnknownPatientError,
)
from forecast.sim.model import ModelConfig
from forecast.sim.patient import Patients, load_patients
from forecast.sim.replay import ReplayResult, replay

__all__ = [
    "ModelConfig",
    "Patients",
    "PhysiologyWarning",
    "ReplayResult",
    "ScenarioError",
    "SimInputError",
    "UnknownPatientError",
    "load_patients",
    "replay",
]
