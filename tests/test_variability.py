"""Intra-patient variability (forecast.sim.variability): each effect changes what it should and
nothing else; off is bit-identical to the constant S2008 patients; fixed seeds reproduce."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from forecast.sim import load_patients
from forecast.sim import model as m
from forecast.sim.errors import SimInputError
from forecast.sim.simulator import Simulator
from forecast.sim.variability import VariabilityConfig, circadian_factor

PATIENTS = "adult#001,child#002"


def _run(variability, *, seed=3, hours=12, start="2018-01-01 00:00", sensor="dexcom"):
    """Open loop at the scheduled basal, no bolus (insulin the same in every run)."""
    p = load_patients(PATIENTS)
    sim = Simulator(p, seed=seed, start=start, sensor=sensor, variability=variability)
    bg, cgm, eaten, gsub = [], [], [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(hours * 12):
            cgm.append(sim.read_cgm())
            gsub.append(sim.gsub.copy())
            sim.step(5, p.basal_u_per_h, 0.0)
            bg.append(sim.last_bg[:, 1:].copy())
            eaten.append(sim.last_eaten.copy())
    meals = sim.meals(0, hours * 60)
    sim.gsub_trace = np.stack(gsub, 1)  # [N, T] subcutaneous glucose at each reading
    return np.concatenate(bg, 1), np.stack(cgm, 1), np.concatenate(eaten, 1), meals, sim


def test_off_is_bit_identical_to_no_variability():
    a = _run(None)
    b = _run(VariabilityConfig())
    for x, y in zip(a[:3], b[:3]):
        assert np.array_equal(x, y, equal_nan=True)
    assert b[4].variability is None  # all off: the simulator takes the original code path


def test_meal_variation_changes_glucose_only_after_each_patients_first_meal():
    base_bg, _, base_eaten, meals, _ = _run(None)
    bg, _, eaten, meals2, _ = _run(VariabilityConfig(meal_absorption_cv=0.3))
    assert np.array_equal(base_eaten, eaten)  # the same meals, eaten the same way
    assert np.array_equal(meals.minute, meals2.minute)
    for i in range(bg.shape[0]):
        first = int(meals.minute[meals.patient == i].min())
        # column j holds minute j + 1: identical up to and including the meal's first minute
        assert np.array_equal(bg[i, :first], base_bg[i, :first])
        assert not np.array_equal(bg[i, first:], base_bg[i, first:])


def test_circadian_scales_only_insulin_sensitivity_by_the_profile():
    v = VariabilityConfig(circadian_amplitude=0.25, circadian_low_hour=6.0)
    p = load_patients(PATIENTS)
    sim = Simulator(p, seed=1, start="2018-01-01 00:00", variability=v)
    base = p.params
    for hour in (0.0, 6.0, 12.0, 18.0):
        q = sim.params_at(hour * 60)
        f = float(circadian_factor(v, hour))
        changed = np.flatnonzero(~np.all(np.isclose(q, base, rtol=0, atol=0), axis=0))
        want = [] if f == 1.0 else sorted([m.VMX, m.KP3])
        assert sorted(changed.tolist()) == want, hour
        np.testing.assert_allclose(q[:, m.VMX], base[:, m.VMX] * f, rtol=1e-12)
        np.testing.assert_allclose(q[:, m.KP3], base[:, m.KP3] * f, rtol=1e-12)
    assert circadian_factor(v, 6.0) == pytest.approx(0.75)  # the dawn low
    assert circadian_factor(v, 18.0) == pytest.approx(1.25)
    assert circadian_factor(v, np.arange(0, 24, 0.25)).mean() == pytest.approx(
        1.0
    )  # same daily need


def test_circadian_changes_glucose_not_meals_or_sensor_noise():
    base_bg, base_cgm, base_eaten, meals, s0 = _run(None, sensor="dexcom-noise")
    bg, cgm, eaten, meals2, s1 = _run(VariabilityConfig(circadian_amplitude=0.25),
                                      sensor="dexcom-noise")  # fmt: skip
    assert np.array_equal(base_eaten, eaten)
    assert np.array_equal(meals.carbs_g, meals2.carbs_g)
    assert not np.allclose(bg, base_bg)
    # the sensor draws the same noise: CGM minus subcutaneous glucose is unchanged
    assert np.nanmax(np.abs(cgm - base_cgm)) > 0
    np.testing.assert_allclose(cgm - s1.gsub_trace, base_cgm - s0.gsub_trace, atol=1e-9)
    # at the dawn low (06:00) less sensitivity → higher glucose than the constant patient
    assert np.all(bg[:, 7 * 60] > base_bg[:, 7 * 60])


def test_day_to_day_factor_is_constant_within_a_day_and_seeded():
    v = VariabilityConfig(daily_si_cv=0.2)
    p = load_patients(PATIENTS)
    a = Simulator(p, seed=5, start="2018-01-01 00:00", variability=v)
    b = Simulator(p, seed=5, start="2018-01-01 00:00", variability=v)
    c = Simulator(p, seed=6, start="2018-01-01 00:00", variability=v)
    day0 = [a.variability.si_factor(t) for t in (0, 300, 1439)]
    assert all(np.array_equal(day0[0], x) for x in day0)
    assert not np.array_equal(a.variability.si_factor(0), a.variability.si_factor(1440))
    assert np.array_equal(a.variability.si_factor(2000), b.variability.si_factor(2000))
    assert not np.array_equal(a.variability.si_factor(0), c.variability.si_factor(0))


def test_fixed_seeds_reproduce_every_effect():
    v = VariabilityConfig.parse("all")
    a, b = _run(v, seed=9), _run(v, seed=9)
    for x, y in zip(a[:3], b[:3]):
        assert np.array_equal(x, y, equal_nan=True)
    c = _run(v, seed=10)
    assert not np.array_equal(a[0], c[0])


def test_a_patients_factors_do_not_depend_on_the_cohort():
    v = VariabilityConfig(daily_si_cv=0.2, meal_absorption_cv=0.3)
    alone = _run(v, seed=2)
    p1 = load_patients("adult#001")
    sim = Simulator(p1, seed=2, start="2018-01-01 00:00", variability=v)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = []
        for _ in range(12 * 12):
            sim.step(5, p1.basal_u_per_h, 0.0)
            out.append(sim.last_bg[:, 1:].copy())
    assert np.array_equal(np.concatenate(out, 1)[0], alone[0][0])


def test_parse_and_typed_errors():
    v = VariabilityConfig.parse("circadian=0.3,meals")
    assert (v.circadian_amplitude, v.meal_absorption_cv, v.daily_si_cv) == (0.3, 0.3, 0.0)
    assert v.effects() == ["circadian", "meals"]
    assert VariabilityConfig.parse("none") == VariabilityConfig()
    assert VariabilityConfig.parse("all").effects() == ["circadian", "daily", "meals"]
    for bad in ("sunshine", "circadian=x", "circadian=1.5", "meals=-0.1"):
        with pytest.raises(SimInputError):
            VariabilityConfig.parse(bad)


@settings(max_examples=40, deadline=None)
@given(
    amp=st.floats(0.0, 0.9),
    low=st.floats(0.0, 23.99),
    hour=st.floats(0.0, 48.0),
)
def test_circadian_profile_stays_within_its_amplitude(amp, low, hour):
    v = VariabilityConfig(circadian_amplitude=amp, circadian_low_hour=low)
    f = float(circadian_factor(v, hour))
    assert 1 - amp - 1e-12 <= f <= 1 + amp + 1e-12
    assert f == pytest.approx(float(circadian_factor(v, hour + 24.0)))


def test_trial_states_which_variability_was_on():
    from serving.insilico.trial import TrialConfig, TrialError, run_trial

    r = run_trial(
        TrialConfig(
            controller="basal-bolus", patients="adult#001", days=0.1, variability="circadian,meals"
        )  # fmt: skip
    )
    info = r.run_info()
    assert info["variability_on"] == "circadian,meals"
    assert "circadian SI" in info["variability_detail"]
    with pytest.raises(TrialError):
        TrialConfig(controller="basal-bolus", variability="weather")
