"""Meal scenarios: simglucose's random meals exactly, seeded per-patient streams, errors."""

from __future__ import annotations

import json
from datetime import timedelta

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from forecast.sim import (
    AnnouncementConfig,
    FixedScenario,
    RandomScenario,
    ScenarioError,
    SimInputError,
    load_patients,
)


@pytest.fixture(scope="module")
def adults():
    return load_patients("adults")


def test_random_meals_equal_simglucose(fixtures):
    refs = json.loads((fixtures / "sim_oracle/simglucose_random_meals.json").read_text())
    p = load_patients("adult#003")
    for r in refs:
        sc = RandomScenario(per_patient=False, simglucose_midnight_quirk=True)
        start = pd.Timestamp(f"2018-01-01 {r['start_hour']:02d}:00")
        plan = sc.planner(p, start, r["seed"]).meals(0, r["minutes"])
        got = [[int(m), float(g)] for m, g in zip(plan.minute, plan.carbs_g, strict=True)]
        assert got == r["meals"], (r["seed"], r["start_hour"])


def test_random_meals_look_like_the_distribution(adults):
    plan = RandomScenario().planner(adults, None, 3).meals(0, 30 * 1440)
    mod = plan.minute % 1440
    assert mod.min() >= 5 * 60 and mod.max() <= 23 * 60
    big = plan.carbs_g > 30
    per_day = big.sum() / (10 * 30)
    assert 2.6 < per_day < 3.0  # three main meals at p=0.95
    assert 60 < plan.carbs_g[(mod >= 10 * 60) & (mod < 14 * 60) & big].mean() < 80


def test_per_patient_streams_are_independent_of_the_cohort(adults):
    one = load_patients("adult#004")
    a = RandomScenario().planner(adults, None, 5).meals(0, 3 * 1440)
    b = RandomScenario().planner(one, None, 5).meals(0, 3 * 1440)
    mine = a.patient == 3
    np.testing.assert_array_equal(a.minute[mine], b.minute)
    np.testing.assert_array_equal(a.carbs_g[mine], b.carbs_g)
    # different patients, different meals
    assert not np.array_equal(a.minute[a.patient == 0], a.minute[a.patient == 1])


@settings(max_examples=15, deadline=None)
@given(cuts=st.lists(st.integers(1, 4 * 1440 - 1), max_size=5), start_hour=st.integers(0, 23))
def test_planning_does_not_depend_on_windows(cuts, start_hour):
    p = load_patients("child#001,adult#001")
    sc = RandomScenario(announcement=AnnouncementConfig.realistic())
    start = pd.Timestamp("2018-03-01") + timedelta(hours=start_hour)
    whole = sc.planner(p, start, 11).meals(0, 4 * 1440)
    pl = sc.planner(p, start, 11)
    edges = [0, *sorted(set(cuts)), 4 * 1440]
    parts = [pl.meals(a, b) for a, b in zip(edges[:-1], edges[1:], strict=True)]
    got = np.concatenate([x.minute for x in parts])
    np.testing.assert_array_equal(got, whole.minute)
    np.testing.assert_array_equal(np.concatenate([x.announced_g for x in parts]), whole.announced_g)


def test_fixed_scenario_hours_timedelta_datetime(adults):
    start = pd.Timestamp("2018-01-01 06:00", tz="UTC")
    sc = FixedScenario(
        [(1.5, 40), (timedelta(hours=3), 20), (pd.Timestamp("2018-01-01 12:00"), 60)]
    )
    plan = sc.planner(adults.subset([0]), start, 0).meals(0, 1440)
    assert list(plan.minute) == [90, 180, 360]
    assert list(plan.carbs_g) == [40, 20, 60]
    assert plan.announced.all() and (plan.announce_minute == plan.minute).all()


def test_fixed_daily_repeats_on_the_clock(adults):
    sc = FixedScenario.daily_default()
    plan = sc.planner(adults.subset([0]), pd.Timestamp("2018-01-01 08:00"), 0).meals(0, 2 * 1440)
    # 07:00 on day 0 is before the start; 12:00, 18:30, 22:00, then day 1 all four
    assert list(plan.minute) == [240, 630, 840, 1380, 1680, 2070, 2280, 2820]


def test_fixed_scenario_errors(adults):
    p = adults.subset([0])
    with pytest.raises(ScenarioError, match="before the simulation start"):
        FixedScenario([(pd.Timestamp("2017-12-31 23:00"), 30)]).planner(p, "2018-01-01", 0)
    with pytest.raises(ScenarioError, match="beyond the run"):
        FixedScenario([(30.0, 50)]).check_run(p, None, 1440)
    with pytest.raises(ScenarioError, match="grams"):
        FixedScenario([(1.0, -5)])
    with pytest.raises(ScenarioError, match="grams"):
        FixedScenario([(1.0, float("nan"))])
    with pytest.raises(ScenarioError, match="hour of the day"):
        FixedScenario([(25.0, 5)], daily=True)
    with pytest.raises(ScenarioError, match="not in the cohort"):
        FixedScenario({"child#009": [(1.0, 5)]}).planner(p, None, 0)
    with pytest.raises(SimInputError, match="whole minute"):
        FixedScenario().planner(p, "2018-01-01 00:00:30", 0)


def test_per_patient_fixed_meals(adults):
    p = load_patients("adult#001,adult#002")
    sc = FixedScenario({"adult#002": [(2.0, 33)]})
    plan = sc.planner(p, None, 0).meals(0, 1440)
    assert list(plan.patient) == [1] and list(plan.carbs_g) == [33]


def test_announcement_errors(adults):
    ann = AnnouncementConfig(
        carb_error_sd=0.2, carb_error_bias=-0.1, missed_bolus_prob=0.1, late_bolus_prob=0.2,
        late_bolus_minutes=(20, 40), unannounced_snacks_per_day=1.0,
    )  # fmt: skip
    plan = RandomScenario(announcement=ann).planner(adults, None, 1).meals(0, 60 * 1440)
    base = RandomScenario().planner(adults, None, 1).meals(0, 60 * 1440)
    n_snacks = len(plan) - len(base)
    assert 450 < n_snacks < 750  # Poisson(1)/day for 10 patients x 60 days
    ann_ok = plan.announced
    assert ann_ok.sum() / len(base) == pytest.approx(0.9, abs=0.03)  # 10 % missed; snacks never
    assert (plan.announced_g[~ann_ok] == 0).all()
    ratio = plan.announced_g[ann_ok] / plan.carbs_g[ann_ok]
    assert ratio.mean() == pytest.approx(0.9, abs=0.03)
    assert ratio.std() == pytest.approx(0.2, abs=0.04)
    delay = plan.announce_minute - plan.minute
    assert set(np.unique(delay[delay > 0])) <= set(range(20, 41))
    assert 0.15 < (delay > 0).mean() < 0.25
    assert np.allclose(np.round(plan.announced_g), plan.announced_g)


def test_bad_announcement_config():
    with pytest.raises(SimInputError):
        AnnouncementConfig(missed_bolus_prob=1.2)
    with pytest.raises(SimInputError):
        AnnouncementConfig(late_bolus_minutes=(30, 10))
