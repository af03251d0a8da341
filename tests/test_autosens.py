"""Autosens from the record (serving.controllers.autosens) and the MPC's use of it."""

from __future__ import annotations

import numpy as np
import pandas as pd
from hypothesis import given, settings
from hypothesis import strategies as st
from test_controllers import control_input, patient

from serving.controllers import make_controller
from serving.controllers.autosens import InsulinResponse, ResponseConfig

T0 = pd.Timestamp("2024-01-01", tz="UTC").value
SLOT_NS = 300 * 10**9


def feed(resp, ratio, n=200, *, name="p", noise=2.0, seed=0, usable=True, meal_at=None):
    """n slots of a patient whose glucose falls `ratio` times what the ISF predicts."""
    rng = np.random.default_rng(seed)
    for k in range(n):
        x = 3.0 * np.sin(k / 7.0)  # expected fall, mg/dL per 5 min (boluses and suspensions)
        y = ratio * x + noise * rng.standard_normal()
        resp.update(
            [name],
            np.array([T0 + k * SLOT_NS], float),
            np.array([x]),
            np.array([y]),
            np.array([usable]),
            np.array([meal_at == k]),
        )


def test_a_patient_twice_as_sensitive_is_found_and_a_typical_one_is_left_alone():
    strong, typical = InsulinResponse(), InsulinResponse()
    feed(strong, 2.0)
    feed(typical, 1.0)
    assert 1.5 < strong.factor("p") <= 2.0  # the lower confidence bound: never above the slope
    assert typical.factor("p") == 1.0  # never *less* sensitive than the settings
    assert InsulinResponse().factor("unknown") == 1.0


def test_little_or_unusable_evidence_changes_nothing():
    r = InsulinResponse()
    feed(r, 3.0, n=3)  # Σx² far below min_information
    assert r.factor("p") == 1.0
    r = InsulinResponse()
    feed(r, 3.0, usable=False)  # carbs on board or an inferred meal: skipped
    assert r.factor("p") == 1.0


def test_slots_right_after_an_inferred_meal_are_skipped():
    cfg = ResponseConfig(quiet_after_meal_min=10_000.0)  # the whole record after slot 0
    r = InsulinResponse(cfg)
    feed(r, 3.0, meal_at=0)
    assert r.factor("p") == 1.0


def test_old_evidence_is_forgotten():
    r = InsulinResponse(ResponseConfig(tau_h=1.0))
    feed(r, 3.0, n=100)
    assert r.factor("p") > 1.0
    # a week later, one quiet slot: a day's worth of τ has passed many times over
    r.update(["p"], np.array([T0 + 7 * 288 * SLOT_NS], float), *(np.zeros(1),) * 2,
             np.array([True]), np.array([False]))  # fmt: skip
    assert r.factor("p") == 1.0


@settings(max_examples=100, deadline=None)
@given(
    xs=st.lists(st.floats(-20, 20), min_size=1, max_size=60),
    ys=st.lists(st.floats(-40, 40), min_size=60, max_size=60),
)
def test_the_factor_stays_within_its_bounds(xs, ys):
    r = InsulinResponse()
    lo, hi = r.config.bounds
    for k, x in enumerate(xs):
        r.update(["p"], np.array([T0 + k * SLOT_NS], float), np.array([x]),
                 np.array([ys[k]]), np.array([True]), np.array([False]))  # fmt: skip
        assert lo <= r.factor("p") <= hi


def test_the_mpc_journals_a_learned_sensitivity_and_doses_less():
    s = patient(basal=1.0, isf=40.0, cr=10.0)
    learned = make_controller("physio-mpc")
    plain = make_controller("physio-mpc", learn_response=False)
    feed(learned._response, 2.5, name=s.name)
    inp = control_input(220.0, s, slope=2.0)
    assert learned.sensitivity(inp) > 1.5
    a, b = learned.propose([inp])[0], plain.propose([inp])[0]
    assert "autosens ×" in a.reason
    give = lambda p: p.bolus_u + (p.temp_basal_u_per_h - s.basal_u_per_h) * 0.5  # noqa: E731
    assert give(a) < give(b)
