"""MPC insulin bounds that keep a closed loop out of late post-meal lows.

High temps are IOB-aware: the extra insulin of the top temp and of the boluses that ride it
share one bolus-calculator room (net IOB may not exceed what COB or BG above target
justifies), so a forecaster that keeps predicting a rise cannot run 3x temps for hours.
"""

from __future__ import annotations

import numpy as np
import pytest
from test_controllers import control_input, patient
from test_predictor import write_model_dir

from forecast.windows import WindowConfig
from serving.controllers import basal_iob_u
from serving.controllers.mpc import MPCConfig, MPCController, ZoneCost, physio_predictor
from serving.predictor import Predictor


@pytest.fixture(scope="module")
def predictor(tmp_path_factory):
    return Predictor(write_model_dir(tmp_path_factory.mktemp("mpc_limits") / "model"))


def _extra_u(lad, basal_h, temp_h=0.5):
    """[N, K] insulin above scheduled basal that each rung's first move asks for."""
    return lad.bolus_now + np.maximum(lad.rate_u_per_h - basal_h[:, None], 0.0) * temp_h


def test_no_high_temp_or_bolus_when_net_iob_already_covers_bg_and_carbs(predictor):
    mpc = MPCController(predictor)
    s = patient(basal=1.0, isf=40.0)
    inp = control_input(250.0, s, slope=3.0)
    room = mpc._bolus_room([inp], np.array([6.0]), np.array([0.0]))
    assert room[0] == 0.0  # 6 U net IOB x 40 mg/dL/U already more than covers 250 mg/dL
    lad = mpc.ladder([inp], np.array([6.0]), np.array([0.0]))
    assert lad.rate_u_per_h.max() == pytest.approx(s.basal_u_per_h)
    assert lad.bolus_now.max() == 0.0
    steady = float(basal_iob_u(s.basal_u_per_h))
    p = mpc.propose([control_input(250.0, s, slope=3.0, iob=steady + 6.0)])[0]
    assert p.temp_basal_u_per_h <= s.basal_u_per_h + 1e-9 and p.bolus_u == 0.0


@pytest.mark.parametrize("net", [0.0, 0.5, 1.0, 2.0])
def test_top_temp_plus_bolus_never_exceed_the_room(predictor, net):
    mpc = MPCController(predictor)
    s = patient(basal=1.0, isf=40.0)
    inp = control_input(260.0, s, slope=2.0)
    room = mpc._bolus_room([inp], np.array([net]), np.array([0.0]))
    lad = mpc.ladder([inp], np.array([net]), np.array([0.0]))
    extra = _extra_u(lad, np.array([s.basal_u_per_h]))
    assert extra.max() <= room[0] + 0.05 + 1e-9  # + pump rounding of the bolus
    if room[0] > 0:
        assert lad.rate_u_per_h.max() > s.basal_u_per_h  # corrections are still possible


def test_ladder_is_a_chain_with_the_room_bound():
    """Every rung gives at least as much insulin as the one below it in every slot."""
    mpc = MPCController(physio_predictor(WindowConfig()))
    rng = np.random.default_rng(0)
    inputs = [
        control_input(float(g), patient(f"p{i}", basal=float(b)), slope=float(sl))
        for i, (g, b, sl) in enumerate(
            zip(rng.uniform(60, 350, 20), rng.uniform(0.2, 2.0, 20), rng.uniform(-4, 4, 20))
        )
    ]
    net = rng.uniform(-1, 4, 20)
    lad = mpc.ladder(inputs, net, rng.uniform(0, 60, 20))
    dose = lad.basal + lad.bolus
    assert (np.diff(dose, axis=1) >= -1e-12).all()


def test_a_fall_the_forecast_sees_counts_beyond_its_end():
    """momentum: the same forecast end is costlier when glucose is falling towards it."""
    mpc = MPCController(physio_predictor(WindowConfig()))
    assert mpc.config.cost.momentum_minutes > 0
    h = WindowConfig().horizon_slots
    pred = np.zeros((2, 1, h, 3))
    pred[..., 0], pred[..., 1], pred[..., 2] = 85.0, 100.0, 115.0  # flat at the end
    kw = dict(
        carb_tail=np.zeros(2),
        insulin_tail=np.zeros((2, 1)),
        insulin_u=np.zeros((2, 1)),
        targets=np.full(2, 110.0),
    )
    falling, steady = mpc.cost(pred, glucose_now=np.array([200.0, 85.0]), **kw)[:, 0]
    assert falling > steady
    off = MPCController(
        physio_predictor(WindowConfig()), MPCConfig(cost=ZoneCost(momentum_minutes=0.0))
    )
    a, b = off.cost(pred, glucose_now=np.array([200.0, 85.0]), **kw)[:, 0]
    assert a == b  # switched off: only the forecast counts
