"""The UVA/Padova model and replay against simglucose 0.2.11's own trajectories.

Fixtures (tests/fixtures/sim_oracle, see its README): the shared oracle runs of three
patients, simglucose references for all 30 patients (two scenarios each), and the oracle's
steady-state table.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from forecast.sim import (
    ModelConfig,
    PhysiologyWarning,
    SimInputError,
    UnknownPatientError,
    load_patients,
    replay,
)
from forecast.sim.patient import PARAM_NAMES, all_names, resolve_names

ORACLE = "sim_oracle/oracle_001.npz"
REFS = "sim_oracle/simglucose_refs.npz"


@pytest.fixture(scope="module")
def everyone():
    return load_patients("all")


# --------------------------------------------------------------------------- patients


def test_thirty_patients_in_file_order(everyone):
    assert len(everyone) == 30
    assert list(everyone.names[:2]) == ["adolescent#001", "adolescent#002"]
    assert everyone.names[10] == "adult#001" and everyone.names[29] == "child#010"
    assert everyone.params.shape == (30, len(PARAM_NAMES))
    assert everyone.x0.shape == (30, 13)
    assert np.all(everyone.ids == np.arange(30))


def test_groups_and_names():
    assert len(load_patients("adults")) == 10
    assert all(n.startswith("child#") for n in load_patients("children").names)
    p = load_patients("child#002,ADULT#001")
    assert list(p.names) == ["child#002", "adult#001"]
    assert list(p.ids) == [21, 10]
    assert resolve_names(["adolescents"]) == all_names()[:10]


@pytest.mark.parametrize(
    "sel", ["adult#011", "grown-ups", "", "adult#001,adult#001", "adults,adult#003"]
)
def test_unknown_or_duplicate_patients_are_errors(sel):
    with pytest.raises(UnknownPatientError):
        load_patients(sel)


def test_basal_and_bg0_match_the_oracle_table(everyone, fixtures):
    s = pd.read_csv(fixtures / "sim_oracle/steady_state_all30.csv")
    assert list(s.Name) == list(everyone.names)
    np.testing.assert_allclose(everyone.basal_u_per_min, s.basal_U_per_min, rtol=1e-9)
    np.testing.assert_allclose(everyone.bg0, s.BG0, atol=1e-6)
    assert 0.28 < everyone.basal_u_per_h.min() and everyone.basal_u_per_h.max() < 1.73


def test_subset_by_positions_and_names(everyone):
    sub = everyone.subset([10, 20])
    assert list(sub.names) == ["adult#001", "child#001"]
    np.testing.assert_array_equal(sub.params, everyone.params[[10, 20]])
    assert list(everyone.subset("child#001").names) == ["child#001"]


def test_data_dir_override(monkeypatch, tmp_path):
    monkeypatch.setenv("GLUCAST_DATA_DIR", str(tmp_path))
    from forecast.sim.patient import data_dir

    assert data_dir() == tmp_path / "uva_padova_2008"
    with pytest.raises(FileNotFoundError, match="GLUCAST_DATA_DIR"):
        load_patients("all")


# --------------------------------------------------------------------------- steady state


def test_all_thirty_hold_steady_state_for_24h(everyone):
    t = 1440
    ins = np.repeat(everyone.basal_u_per_min[:, None], t, axis=1)
    r = replay(everyone, np.zeros((30, t)), ins, return_states=False)
    drift = np.abs(r.bg - r.bg[:, :1]).max(axis=1)
    assert drift.max() < 0.01, dict(zip(everyone.names, drift, strict=True))
    assert np.abs(r.gsub - r.gsub[:, :1]).max() < 0.01
    np.testing.assert_allclose(r.bg[:, 0], everyone.bg0)


# --------------------------------------------------------------------------- oracle


def test_replay_reproduces_the_three_oracle_runs(fixtures):
    o = np.load(fixtures / ORACLE)
    p = load_patients(list(o["names"]))
    r = replay(p, o["cho"], o["ins"])
    err = np.abs(r.bg - o["bg"]).max(axis=1)
    assert err.max() < 0.01, err  # dopri5 vs RK4 with meal sub-steps
    assert np.abs(r.gsub - o["gsub"]).max() < 0.01
    # every state, every 10 minutes, relative to its scale
    states = r.states[:, ::10]
    scale = np.abs(o["states10"]).max(axis=1, keepdims=True) + 1e-9
    assert (np.abs(states - o["states10"]) / scale).max() < 1e-4
    assert r.states.shape == (3, 1441, 13) and r.bg.shape == (3, 1441)


def test_plain_one_minute_rk4_is_worse_but_stable(fixtures):
    o = np.load(fixtures / ORACLE)
    p = load_patients(list(o["names"]))
    coarse = replay(p, o["cho"], o["ins"], config=ModelConfig(substeps=1, meal_substeps=1))
    fine = replay(p, o["cho"], o["ins"])
    e_coarse = np.abs(coarse.bg - o["bg"]).max()
    e_fine = np.abs(fine.bg - o["bg"]).max()
    assert e_fine < e_coarse < 0.1


@pytest.mark.parametrize("scenario", ["fixed", "random"])
def test_replay_matches_simglucose_for_all_thirty_patients(fixtures, everyone, scenario):
    refs = np.load(fixtures / REFS)
    assert list(refs["names"]) == list(everyone.names)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", PhysiologyWarning)
        r = replay(everyone, refs[f"{scenario}_cho"], refs[f"{scenario}_ins"], return_states=False)
    # simglucose's own child#003 falls to 3.8 mg/dL on the random day: flagged, not fatal
    low = refs[f"{scenario}_bg"].min(axis=1) < 10
    np.testing.assert_array_equal(r.out_of_range, low)
    assert len(caught) == int(low.any())
    err = np.abs(r.bg - refs[f"{scenario}_bg"]).max(axis=1)
    worst = {n: round(float(e), 4) for n, e in zip(everyone.names, err, strict=True) if e > 0.05}
    assert err.max() < 0.1, worst
    assert np.abs(r.gsub - refs[f"{scenario}_gsub"]).max() < 0.1


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("cho", "ins", "match"),
    [
        (-1.0, 0.01, "cho_g_per_min is negative"),
        (0.0, -0.01, "insulin_u_per_min is negative"),
        (np.nan, 0.01, "cho_g_per_min is not finite"),
        (0.0, np.inf, "insulin_u_per_min is not finite"),
    ],
)
def test_bad_inputs_raise(cho, ins, match):
    p = load_patients("adult#001,child#001")
    c = np.zeros((2, 60))
    u = np.full((2, 60), 0.02)
    c[1, 30] = cho
    u[1, 31] = ins
    with pytest.raises(SimInputError, match=match):
        replay(p, c, u)


def test_wrong_shapes_raise():
    p = load_patients("adult#001,child#001")
    with pytest.raises(SimInputError, match="shape"):
        replay(p, np.zeros((3, 10)), np.zeros((3, 10)))
    with pytest.raises(SimInputError, match="shape"):
        replay(p, np.zeros((2, 10)), np.zeros((2, 11)))
    with pytest.raises(SimInputError, match="x0"):
        replay(p, np.zeros((2, 10)), np.zeros((2, 10)), x0=np.zeros((2, 12)))


def test_leaving_range_is_flagged_per_patient_not_fatal():
    p = load_patients("adult#001,child#001")
    t = 600
    ins = np.repeat(p.basal_u_per_min[:, None], t, axis=1)
    ins[1, 0] = 40.0  # a huge insulin overdose for the child only
    with pytest.warns(PhysiologyWarning, match="child#001"):
        r = replay(p, np.zeros((2, t)), ins)
    assert list(r.out_of_range) == [False, True]
    assert np.isfinite(r.bg).all()
    assert r.bg[1].min() < 10 and abs(r.bg[0, -1] - r.bg[0, 0]) < 0.01


# --------------------------------------------------------------------------- properties


@settings(max_examples=25, deadline=None)
@given(
    meals=st.lists(st.tuples(st.integers(0, 200), st.floats(1.0, 30.0)), min_size=1, max_size=4),
    extra_u=st.floats(0.0, 3.0),
)
def test_more_insulin_never_raises_bg(meals, extra_u):
    p = load_patients("adolescent#003")
    t = 300
    cho = np.zeros((1, t))
    for m, g in meals:
        cho[0, m] += min(g, 5.0)
    ins = np.full((1, t), p.basal_u_per_min[0])
    more = ins.copy()
    more[0, 0] += extra_u
    a = replay(p, cho, ins, return_states=False).bg
    b = replay(p, cho, more, return_states=False).bg
    assert (b <= a + 1e-9).all()


@settings(max_examples=20, deadline=None)
@given(grams=st.floats(5.0, 120.0), minute=st.integers(0, 100))
def test_carbs_in_stomach_are_conserved_until_absorbed(grams, minute):
    # With no absorption (kabs=0) every eaten mg stays in Qsto1+Qsto2+Qgut.
    p = load_patients("adult#002")
    params = p.params.copy()
    params[:, PARAM_NAMES.index("kabs")] = 0.0
    q = type(p)(p.names, p.ids, params, p.x0, p.cr, p.cf, p.tdi, p.age)
    t = 200
    cho = np.zeros((1, t))
    n_full, rest = divmod(grams, 5.0)
    cho[0, minute : minute + int(n_full)] = 5.0
    cho[0, minute + int(n_full)] = rest
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PhysiologyWarning)
        r = replay(q, cho, np.full((1, t), p.basal_u_per_min[0]))
    gut = r.states[0, -1, :3].sum()
    assert gut == pytest.approx(1000.0 * grams, rel=1e-6)
    np.testing.assert_allclose(r.eaten, cho)
