"""Insulin controllers: given a batch of `ControlInput`s, propose what each patient should get.

Every controller is batched over patients (`propose(inputs) -> list[Proposal]`) because the
trial steps a whole cohort at once and the MPC wants one forecaster call per cycle. No
controller talks to a pump: proposals go to `serving.safety.Supervisor`.

`make_controller(name, predictor=...)` builds one by the name the CLI uses:
``mpc`` (the ONNX forecaster), ``physio-mpc`` (the same MPC over the physiological
forecaster: the ablation that shows what the learned model buys), ``basal-bolus`` (the usual
baseline) and ``pid``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np

from forecast.insulin import basal_iob_u, net_iob_u  # noqa: F401 - the controllers' names
from forecast.schema import GlucastError
from serving.types import ControlInput, PatientSettings, Proposal

CONTROLLER_NAMES = ("mpc", "physio-mpc", "basal-bolus", "pid")


@runtime_checkable
class Controller(Protocol):
    """What the loop and the trial need from a controller."""

    name: str

    def propose(self, inputs: Sequence[ControlInput]) -> list[Proposal]: ...


class UnknownControllerError(GlucastError, ValueError):
    """A controller name the CLI does not know."""


def meal_bolus_u(carbs_g: float, settings: PatientSettings) -> float:
    """The carb-ratio bolus for an announced meal (0 for none)."""
    if not carbs_g or not np.isfinite(carbs_g) or carbs_g <= 0:
        return 0.0
    return float(carbs_g / settings.carb_ratio_g_per_u)


def make_controller(name: str, *, predictor=None, physio=None, **kwargs) -> Controller:
    """A controller by CLI name.

    `predictor` is the checked forecaster for ``mpc`` (a `serving.predictor.FallbackPredictor`);
    ``physio-mpc`` builds its own over `forecast.baselines.PhysioForecaster` unless `physio`
    is given. Extra keyword arguments go to the controller's config.
    """
    if name == "mpc":
        from serving.controllers.mpc import MPCController

        if predictor is None:
            raise ValueError("the mpc controller needs a predictor (an exported model)")
        return MPCController(predictor, **kwargs)
    if name == "physio-mpc":
        from serving.controllers.mpc import MPCController, physio_predictor

        return MPCController(
            physio if physio is not None else physio_predictor(), name=name, **kwargs
        )
    if name == "basal-bolus":
        from serving.controllers.basal_bolus import BasalBolusController

        return BasalBolusController(**kwargs)
    if name == "pid":
        from serving.controllers.pid import PIDController

        return PIDController(**kwargs)
    raise UnknownControllerError(f"unknown controller {name!r}; choose from {CONTROLLER_NAMES}")


__all__ = [
    "CONTROLLER_NAMES",
    "Controller",
    "UnknownControllerError",
    "basal_iob_u",
    "make_controller",
    "meal_bolus_u",
    "net_iob_u",
]
