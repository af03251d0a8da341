"""The trial is the runtime: one patient, one seed, one model, one day, two shells.

The journaled real-time loop (`serving.loop.ControlLoop` over simulated devices, fast
speed) and the in-silico trial (`serving.insilico.trial.run_trial`) both decide through
`serving.engine.CycleEngine` and build their windows with `forecast.windows`; here they are
run side by side and must send the pump the same commands, cycle by cycle.
"""

from __future__ import annotations

import numpy as np
import pytest
from test_predictor import write_model_dir

from serving.controllers import build_controller
from serving.hal.pump import CommandKind
from serving.insilico.backends import SimBackend
from serving.insilico.simulated import SimulatedCohort, WorldConfig
from serving.insilico.trial import TrialConfig, run_trial
from serving.journal import Journal
from serving.loop import ControlLoop

pytestmark = pytest.mark.slow


def loop_commands(tmp_path, controller: str, model_dir, cycles: int) -> list[tuple]:
    """(temp rate U/h or None, duration, bolus U) the loop sent each cycle."""
    b = build_controller(controller, model_dir, strict=True)
    world = SimulatedCohort(
        WorldConfig(patients="adult#001", seed=3, carb_error=0.2, sim_pump="Insulet")
    )
    backend = SimBackend(world)
    loop = ControlLoop(backend, Journal(tmp_path / f"{controller}.db", sync="normal"),
                       b.controller, b.predictor, log=lambda m: None)  # fmt: skip
    loop.start()
    out = []
    for _ in range(cycles):
        (rec,) = loop.cycle()
        temp = [r.command for r in rec.results if r.command.kind is CommandKind.TEMP_BASAL]
        bolus = [r.command for r in rec.results if r.command.kind is CommandKind.BOLUS]
        out.append((
            round(temp[0].amount, 6) if temp else None,
            temp[0].duration_min if temp else None,
            round(bolus[0].amount, 6) if bolus else 0.0,
        ))  # fmt: skip
        backend.advance(5)
    return out


def trial_commands(controller: str, model_dir, days: float) -> tuple[list[tuple], object]:
    """The same, from the trial's log (what its supervisor sent to its pump)."""
    cfg = TrialConfig(controller=controller, patients="adult#001", days=days, seed=3,
                      carb_error=0.2, model_dir=None if model_dir is None else str(model_dir))  # fmt: skip
    r = run_trial(cfg)
    return r.pump_commands(0), r


@pytest.mark.parametrize("controller", ["mpc", "basal-bolus"])
def test_loop_and_trial_send_the_same_pump_commands_for_a_day(tmp_path, controller):
    model = write_model_dir(tmp_path / "model") if controller == "mpc" else None
    want, result = trial_commands(controller, model, days=1.0)
    got = loop_commands(tmp_path, controller, model, cycles=len(want))
    assert len(got) == len(want) == 288
    differ = [(c, w, g) for c, (w, g) in enumerate(zip(want, got)) if w != g]
    assert not differ, f"first differences (cycle, trial, loop): {differ[:5]}"
    # the day was not trivial: the controller changed the basal and dosed meals
    assert sum(w[0] is not None for w in want) >= 10
    assert sum(w[2] > 0 for w in want) >= 2
    assert np.isfinite(result.log["bg"]).all()
