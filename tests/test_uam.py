"""Unannounced-meal detection (serving.controllers.uam) and what the MPC does with it."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_controllers import control_input, patient, total_insulin

from forecast.windows import WindowConfig
from serving.controllers import basal_iob_u, make_controller
from serving.controllers.uam import MealDetector, UAMConfig, minutes_since_announced
from serving.types import SlotHistory

CFG = WindowConfig()


def estimate(glucose=150.0, slope=4.0, s=None, **kw):
    """The detector's view of a patient on scheduled basal whose glucose moves `slope`
    mg/dL per 5 minutes (insulin explains none of it: net IOB 0, no carbs)."""
    s = s or patient()
    inp = control_input(glucose, s, slope=slope)
    det = MealDetector(CFG, kw.pop("config", None))
    one = np.array([1.0])
    return det.estimate(
        inp.past[None],
        one * s.isf_mgdl_per_u,
        one * s.carb_ratio_g_per_u,
        one * s.basal_u_per_h,
        **kw,
    )


def test_a_sustained_unexplained_rise_is_a_meal_with_a_bounded_estimate():
    m = estimate(150.0, 4.0)
    assert m.detected[0]
    assert m.deviation[0] == pytest.approx(4.0)  # scheduled basal explains nothing
    assert 0 < m.carbs_g[0] <= UAMConfig().max_carbs_g
    # grams and mg/dL agree through ISF / CR (40 / 10)
    assert m.remaining_mgdl[0] == pytest.approx(m.carbs_g[0] * 40.0 / 10.0)
    big = estimate(300.0, 20.0, s=patient(isf=10.0))  # clipped to one meal's worth
    assert big.carbs_g[0] == pytest.approx(UAMConfig().max_carbs_g)


@pytest.mark.parametrize(
    "why, kw",
    [
        ("flat", dict(slope=0.0)),
        ("falling", dict(slope=-3.0)),
        ("too small a rise", dict(slope=0.5)),
        ("low glucose", dict(glucose=90.0)),
        ("right after announced carbs", dict(since_announced_min=np.array([60.0]))),
        (
            "after a suspension, with the gate on",
            dict(net_iob_u=np.array([-1.0]), config=UAMConfig(min_net_iob_basal_h=-0.25)),
        ),
    ],
)
def test_no_meal_is_inferred(why, kw):
    assert not estimate(**kw).detected[0], why
    assert estimate(**kw).carbs_g[0] == 0.0


@settings(max_examples=150, deadline=None)
@given(
    glucose=st.floats(40.0, 400.0),
    slope=st.floats(-20.0, 0.0),
    noise=st.lists(st.floats(-3.0, 3.0), min_size=24, max_size=24),
)
def test_never_a_meal_when_glucose_falls(glucose, slope, noise):
    """Whatever the noise in the window, a falling last 15 min never opens the UAM room."""
    s = patient()
    inp = control_input(glucose, s, slope=slope)
    gi = CFG.past_index("glucose")
    inp.past[:, gi] += np.asarray(noise)
    g = inp.past[:, gi]
    falling = np.mean(np.diff(g)[-3:]) <= 0
    one = np.array([1.0])
    m = MealDetector(CFG).estimate(inp.past[None], one * 40.0, one * 10.0, one * 1.0)
    if falling:
        assert not m.detected[0]
    assert m.carbs_g[0] >= 0.0 and m.remaining_mgdl[0] >= 0.0


def test_path_and_tail_split_the_remaining_rise():
    m = estimate(150.0, 5.0)
    path = m.path_mgdl(CFG.horizon_slots)[0]
    assert np.all(np.diff(path) >= 0)  # a rise, never a fall
    assert path[-1] + m.tail_mgdl(CFG.horizon_slots)[0] == pytest.approx(m.remaining_mgdl[0])


def test_minutes_since_announced_reads_the_record():
    t = pd.date_range("2024-01-01", periods=48, freq="5min", tz="UTC").values
    carbs = np.zeros(48)
    h = SlotHistory(t, np.full(48, 120.0), np.zeros(48), np.zeros(48), carbs)
    assert minutes_since_announced(h, 5.0) == np.inf
    carbs[40] = 30.0
    assert minutes_since_announced(h, 5.0) == 35.0
    assert minutes_since_announced(None, 5.0) == np.inf


def test_the_mpc_doses_for_an_unannounced_rise_and_only_then():
    s = patient(basal=1.0, isf=40.0, cr=10.0)
    with_uam = make_controller("physio-mpc")
    without = make_controller("physio-mpc", uam=False)
    rising = control_input(180.0, s, slope=5.0)
    more = total_insulin(with_uam.propose([rising])[0], s)
    less = total_insulin(without.propose([rising])[0], s)
    assert more > less
    assert "unannounced meal" in with_uam.propose([rising])[0].reason  # journaled
    falling = control_input(180.0, s, slope=-3.0)
    a, b = with_uam.propose([falling])[0], without.propose([falling])[0]
    assert (a.temp_basal_u_per_h, a.bolus_u) == (b.temp_basal_u_per_h, b.bolus_u)


def test_the_unannounced_meal_room_respects_net_iob_and_the_per_cycle_cap():
    s = patient(basal=1.0, isf=40.0, cr=10.0)
    mpc = make_controller("physio-mpc")
    steady = float(basal_iob_u(s.basal_u_per_h))
    for iob in (steady, steady + 2.0, steady + 6.0):
        p = mpc.propose([control_input(200.0, s, slope=5.0, iob=iob)])[0]
        assert p.bolus_u <= mpc.config.uam_smb_basal_minutes / 60.0 * s.basal_u_per_h + 1e-9
    # net IOB already above what the meal and the glucose justify: no automatic bolus
    p = mpc.propose([control_input(200.0, s, slope=5.0, iob=steady + 15.0)])[0]
    assert p.bolus_u == 0.0


def test_a_person_who_announces_meals_gets_a_capped_room_for_an_unexplained_rise():
    from serving.controllers.uam import MealEstimate

    s = patient(basal=1.0, isf=40.0, cr=10.0, max_bolus_u=20.0, max_iob_u=40.0)
    mpc = make_controller("physio-mpc")
    inp = control_input(250.0, s, slope=5.0)
    big = MealEstimate(np.array([True]), np.array([5.0]), np.array([30.0]), np.array([100.0]))
    announcing, silent = np.array([8 * 60.0]), np.array([np.inf])
    capped, _ = mpc._uam_room([inp], np.zeros(1), big, announcing, np.ones(1))
    free, _ = mpc._uam_room([inp], np.zeros(1), big, silent, np.ones(1))
    assert capped[0] == pytest.approx(mpc.config.uam_max_basal_hours * s.basal_u_per_h)
    assert free[0] > capped[0]
