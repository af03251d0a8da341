"""Insulin controllers: given a batch of `ControlInput`s, propose what each patient should get.

Every controller is batched over patients (`propose(inputs) -> list[Proposal]`) because the
trial steps a whole cohort at once and the MPC wants one forecaster call per cycle. No
controller talks to a pump: proposals go to `serving.safety.Supervisor`.

`make_controller(name, predictor=...)` builds one by the name the CLI uses:
``mpc`` (the ONNX forecaster), ``physio-mpc`` (the same MPC over the physiological
forecaster: the ablation that shows what the learned model buys), ``basal-bolus`` (the usual
baseline), ``pid``, and the peers ``oref0`` (OpenAPS) and ``loop`` (Loop, as pyloopkit), each
its real code in a process of its own (`serving.controllers.peers`; they need
``glucast peers install``). A peer holds a process: call its ``close()`` when done.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from forecast.insulin import basal_iob_u, net_iob_u  # noqa: F401 - the controllers' names
from forecast.schema import GlucastError
from forecast.windows import WindowConfig
from serving.types import ControlInput, PatientSettings, Proposal

CONTROLLER_NAMES = ("mpc", "physio-mpc", "basal-bolus", "pid", "oref0", "loop")
PEER_NAMES = ("oref0", "loop")  # controllers that run as another program (close them)


@runtime_checkable
class Controller(Protocol):
    """What the loop and the trial need from a controller."""

    name: str

    def propose(self, inputs: Sequence[ControlInput]) -> list[Proposal]: ...


class ControllerError(GlucastError, RuntimeError):
    """A controller could not propose for some or all of a batch (the cycle falls back).

    `failed` maps the batch index of each patient it failed for to the reason, and
    `partial` holds the proposals of the others (None where failed), so the engine falls back
    per patient; with both empty, the whole batch failed.
    """

    def __init__(
        self,
        message: str,
        *,
        failed: Mapping[int, str] | None = None,
        partial: Sequence[Proposal | None] | None = None,
    ) -> None:
        super().__init__(message)
        self.failed = dict(failed or {})
        self.partial = list(partial) if partial is not None else []


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
    if name == "oref0":  # the peers import lazily: their module starts nothing until asked
        from serving.controllers.peers.oref0 import Oref0Controller

        return Oref0Controller(**kwargs)
    if name == "loop":
        from serving.controllers.peers.loop import LoopController

        return LoopController(**kwargs)
    raise UnknownControllerError(f"unknown controller {name!r}; choose from {CONTROLLER_NAMES}")


@dataclass
class Built:
    """A controller as the CLI names it, and what a shell runs beside it."""

    controller: Controller
    predictor: Any  # the checked forecaster the loop forecasts and alerts with
    window: WindowConfig  # the inputs the controller and predictor take
    info: dict[str, Any] = field(default_factory=dict)  # facts for the record


def build_controller(
    name: str | None,
    model_dir: str | Path | None = None,
    *,
    strict: bool = False,
    accelerate: Callable[[Any], Any] | None = None,
) -> Built:
    """The one factory both shells (the journaled loop, the in-silico trial) build with.

    `name` None means ``mpc`` with a model, else ``physio-mpc``. ``mpc`` runs over the
    checked predictor of `model_dir` (`serving.predictor.load_predictor`): `strict` refuses
    a model that cannot be trusted (a trial), otherwise the predictor falls back to the
    physiological forecaster and says why (the runtime keeps running, journaled).
    ``physio-mpc`` takes the model's window when a model is named (the same inputs as the
    model it is compared with). `accelerate` may wrap the predictor in an exact faster form
    before the controller is built (the trial's shared-past encoder).
    """
    from serving.predictor import (
        MANIFEST_FILE,
        ModelManifest,
        load_predictor,
        runtime_window,
    )

    name = name or ("mpc" if model_dir else "physio-mpc")
    if name not in CONTROLLER_NAMES:
        raise UnknownControllerError(f"unknown controller {name!r}; choose from {CONTROLLER_NAMES}")
    if name == "mpc" and model_dir is None and strict:
        raise ValueError("the mpc controller needs a model (--model DIR: an exported forecaster)")
    info: dict[str, Any] = {}
    if name == "physio-mpc":
        from serving.controllers.mpc import physio_predictor

        window = (
            runtime_window(ModelManifest.read(Path(model_dir) / MANIFEST_FILE).window)
            if model_dir
            else WindowConfig()
        )
        physio = physio_predictor(window)
        return Built(make_controller("physio-mpc", physio=physio), physio, window, info)
    predictor = load_predictor(model_dir, strict=strict)
    sha = getattr(getattr(predictor, "manifest", None), "sha256", "")
    if sha:
        info.update(model_sha256=sha, model_dir=str(model_dir))
    if accelerate is not None and name == "mpc":
        fast = accelerate(predictor)
        info["shared_past_encoder"] = fast is not predictor
        predictor = fast
    controller = (
        make_controller(name, predictor=predictor) if name == "mpc" else make_controller(name)
    )
    return Built(controller, predictor, predictor.config, info)


__all__ = [
    "CONTROLLER_NAMES",
    "PEER_NAMES",
    "Built",
    "build_controller",
    "Controller",
    "UnknownControllerError",
    "basal_iob_u",
    "make_controller",
    "meal_bolus_u",
    "net_iob_u",
]
