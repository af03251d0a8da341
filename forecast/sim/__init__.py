"""UVA/Padova S2008 in silico: 30 virtual patients, vectorised, with sensors, pumps, scenarios.

The model (`model`) is simglucose 0.2.11's ODE re-implemented as one numba RK4 kernel over
N patients; `replay` integrates recorded inputs; `Simulator` steps a cohort in closed loop
with meals (`scenario`), a CGM (`sensor`) and a pump (`pump`); `simulate_cohort` writes the
canonical glucose frame. See docs/interfaces.md (forecast.sim) for the contract.
"""

from forecast.sim.cohort import simulate_cohort
from forecast.sim.controller import BasalBolusController, ExcitationConfig, ExcitationPolicy
from forecast.sim.errors import (
    PhysiologyWarning,
    ScenarioError,
    SimInputError,
    UnknownPatientError,
)
from forecast.sim.model import ModelConfig
from forecast.sim.patient import Patients, load_patients
from forecast.sim.pump import Pump, PumpConfig
from forecast.sim.replay import ReplayResult, replay
from forecast.sim.scenario import (
    AnnouncementConfig,
    FixedScenario,
    MealPlan,
    RandomScenario,
    Scenario,
)
from forecast.sim.sensor import CGM, SensorConfig, noise_sequence
from forecast.sim.simulator import Simulator

__all__ = [
    "CGM",
    "AnnouncementConfig",
    "BasalBolusController",
    "ExcitationConfig",
    "ExcitationPolicy",
    "FixedScenario",
    "MealPlan",
    "ModelConfig",
    "Patients",
    "PhysiologyWarning",
    "Pump",
    "PumpConfig",
    "RandomScenario",
    "ReplayResult",
    "Scenario",
    "ScenarioError",
    "SensorConfig",
    "SimInputError",
    "Simulator",
    "UnknownPatientError",
    "load_patients",
    "noise_sequence",
    "replay",
    "simulate_cohort",
]
