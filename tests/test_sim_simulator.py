"""Closed-loop stepping: the Simulator API the runtime and trials drive."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from forecast.sim import (
    BasalBolusController,
    ExcitationPolicy,
    FixedScenario,
    PhysiologyWarning,
    RandomScenario,
    ScenarioError,
    SensorConfig,
    SimInputError,
    Simulator,
    load_patients,
    replay,
)

NO_MEALS = FixedScenario([])


@pytest.fixture(scope="module")
def trio():
    return load_patients("adolescent#002,adult#006,child#007")


def _run(sim, policy, minutes, k=5):
    for _ in range(minutes // k):
        m = sim.minute
        basal, bolus = policy.act(m, sim.read_cgm(), sim.announced_carbs(m, m + k))
        sim.step(k, basal, bolus)


def test_stepping_equals_replaying_what_was_delivered_and_eaten(trio):
    sim = Simulator(trio, scenario=RandomScenario(), sensor="dexcom", seed=4)
    ctl = BasalBolusController(trio)
    cho, ins, bg = [], [], [sim.bg[:, None]]
    for _ in range(288):
        m = sim.minute
        basal, bolus = ctl.act(m, sim.read_cgm(), sim.announced_carbs(m, m + 5))
        sim.step(5, basal, bolus)
        cho.append(sim.last_eaten)
        ins.append(sim.last_delivery.insulin_u_per_min)
        bg.append(sim.last_bg[:, 1:])
    r = replay(trio, np.hstack(cho), np.hstack(ins), return_states=False)
    np.testing.assert_allclose(r.bg, np.hstack(bg), rtol=0, atol=1e-9)
    assert np.hstack(cho).sum() == pytest.approx(sim.eaten_carbs(0, 1440).sum())
    assert np.hstack(cho).max() <= 5.0  # the 5 g/min eating rule


def test_steady_state_in_closed_loop_with_an_ideal_pump():
    p = load_patients("all")
    sim = Simulator(p, scenario=NO_MEALS, sensor="none", pump="ideal")
    for _ in range(288):
        sim.step(5, p.basal_u_per_h, 0.0)
    assert np.abs(sim.bg - p.bg0).max() < 0.01
    assert sim.minute == 1440 and sim.time == pd.Timestamp("2018-01-02", tz="UTC")


def test_eating_a_47g_meal_takes_ten_minutes():
    p = load_patients("adult#001")
    sim = Simulator(p, scenario=FixedScenario([(1.0, 47)]), sensor=None)
    sim.step(60, p.basal_u_per_h)
    assert sim.eaten_g[0] == 0
    sim.step(15, p.basal_u_per_h)
    np.testing.assert_array_equal(sim.last_eaten[0], [5] * 9 + [2] + [0] * 5)


def test_copy_is_a_what_if(trio):
    sim = Simulator(trio, scenario=FixedScenario([(0.5, 60)]), seed=2)
    _run(sim, BasalBolusController(trio), 30)
    a, b, c = sim.copy(), sim.copy(), sim.copy()
    basal = trio.basal_u_per_h
    for _ in range(24):
        a.step(5, basal, 0.0)
        b.step(5, basal, 0.0)
        c.step(5, basal * 2, 0.0)
    np.testing.assert_array_equal(a.bg, b.bg)
    np.testing.assert_array_equal(a.read_cgm(), b.read_cgm())  # same future noise
    assert (c.bg < a.bg).all()
    assert sim.minute == 30  # the original did not move


def test_announced_carbs_by_minutes_and_times():
    p = load_patients("adult#001,adult#002")
    sc = FixedScenario({"adult#002": [(1.0, 50), (2.0, 20)]})
    sim = Simulator(p, scenario=sc)
    np.testing.assert_array_equal(sim.announced_carbs(60, 65), [0, 50])
    np.testing.assert_array_equal(sim.announced_carbs(0, 60), [0, 0])
    t0 = pd.Timestamp("2018-01-01 01:00", tz="UTC")
    np.testing.assert_array_equal(sim.announced_carbs(t0, t0 + pd.Timedelta("2h")), [0, 70])
    np.testing.assert_array_equal(sim.eaten_carbs(0, 1440), [0, 70])


def test_delivery_occlusion_and_limits_are_visible():
    p = load_patients("adult#001,adult#002")
    sim = Simulator(p, scenario=NO_MEALS, sensor=None)
    sim.pump.occlude(np.array([False, True]), fraction=0.0)
    sim.step(60, np.array([1.0, 1.0]), np.array([40.0, 2.0]))
    np.testing.assert_allclose(sim.delivered_basal_u, [1.0, 0.0])
    np.testing.assert_allclose(sim.delivered_bolus_u, [30.0, 0.0])  # max bolus 30 U
    assert list(sim.last_delivery.limited) == [True, False]
    np.testing.assert_allclose(sim.delivered_u, [31.0, 0.0])


@pytest.mark.parametrize(
    ("minutes", "basal", "bolus", "match"),
    [
        (5, -0.1, 0.0, "negative"),
        (5, 1.0, np.nan, "not finite"),
        (0, 1.0, 0.0, "positive integer"),
        (2.5, 1.0, 0.0, "positive integer"),
        (5, [1.0, 1.0, 1.0], 0.0, "shape"),
    ],
)
def test_bad_steps_raise(minutes, basal, bolus, match):
    p = load_patients("adult#001,adult#002")
    sim = Simulator(p, sensor=None)
    with pytest.raises(SimInputError, match=match):
        sim.step(minutes, basal, bolus)
    assert sim.minute == 0 and np.isfinite(sim.bg).all()


def test_run_end_is_enforced_and_meals_must_fit():
    p = load_patients("adult#001")
    sim = Simulator(p, duration_min=60, sensor=None)
    sim.step(60, p.basal_u_per_h)
    with pytest.raises(SimInputError, match="past the end"):
        sim.step(5, p.basal_u_per_h)
    with pytest.raises(ScenarioError):
        Simulator(p, scenario=FixedScenario([(3.0, 30)]), duration_min=120)


def test_out_of_range_is_flagged_per_patient_and_the_run_goes_on():
    p = load_patients("adult#001,child#003")
    sim = Simulator(p, scenario=NO_MEALS, sensor="none")
    with pytest.warns(PhysiologyWarning, match="child#003"):
        sim.step(5, p.basal_u_per_h, np.array([0.0, 25.0]))
        for _ in range(100):
            sim.step(5, p.basal_u_per_h, 0.0)
    assert list(sim.out_of_range) == [False, True]
    assert sim.bg_min[1] < 10 and np.isfinite(sim.bg).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error", PhysiologyWarning)
        sim.step(5, p.basal_u_per_h, 0.0)  # warned once per patient, not every step


def test_sensor_timing_and_no_sensor():
    p = load_patients("adult#001")
    sim = Simulator(p, sensor=SensorConfig.simglucose(noise=False), scenario=NO_MEALS)
    assert sim.cgm_minute == 0
    sim.step(5, p.basal_u_per_h)
    assert sim.cgm_minute == 3  # readings every 3 min
    assert [m for m, _ in sim.readings_since(0)] == [0, 3]
    assert sim.read_cgm()[0] == pytest.approx(sim.last_gsub[0, 3])
    assert np.isnan(sim.last_reading_in(4, 5)).all()
    blind = Simulator(p, sensor=None)
    assert np.isnan(blind.read_cgm()).all()


def test_excitation_policy_perturbs_insulin_but_stays_safe():
    p = load_patients("adults")
    sim = Simulator(p, scenario=RandomScenario(), seed=8)
    pol = ExcitationPolicy(p, seed=8)
    basal_seen, extra = [], 0
    ctl = pol.base  # gentler corrections than simglucose's (see ExcitationPolicy)
    for _ in range(288):
        m = sim.minute
        g, carbs = sim.read_cgm(), sim.announced_carbs(m, m + 5)
        basal, bolus = pol.act(m, g, carbs)
        basal_seen.append(basal / p.basal_u_per_h)
        extra += int(((bolus > 0) & (carbs == 0)).sum())
        planned = ctl.bolus_u(g, carbs)
        assert (basal[g < 70] == 0).all() and (bolus[g < 70] == 0).all()
        full = g >= pol.config.low_mgdl
        assert (bolus[full] >= planned[full] - 1e-12).all()  # meal bolus kept when not low
        sim.step(5, basal, bolus)
    ratios = np.array(basal_seen)
    assert ratios.min() == 0.0 and ratios.max() > 1.5
    assert 5 < extra < 50  # ~2 extra boluses per patient-day
    assert not sim.out_of_range.any()


@settings(max_examples=10, deadline=None)
@given(k=st.sampled_from([1, 3, 5, 7, 15]))
def test_step_size_does_not_change_the_physics(k):
    p = load_patients("child#007")  # steep gastric emptying (b = 0.95)
    sc = FixedScenario([(0.25, 45), (1.0, 20)])
    a = Simulator(p, scenario=sc, sensor=None, pump="ideal")
    b = Simulator(p, scenario=sc, sensor=None, pump="ideal")
    for _ in range(210 // k):
        a.step(k, p.basal_u_per_h)
    b.step(210 // k * k, p.basal_u_per_h)
    np.testing.assert_allclose(a.bg, b.bg, rtol=0, atol=1e-9)
