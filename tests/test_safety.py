"""The supervisor: hard limits as properties, CGM judgement, fallbacks, and the pump road."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from serving.hal.pump import MAX_TEMP_MINUTES, CommandKind, PumpFault, PumpFirmware
from serving.safety import (
    LEVEL2_LOW_MGDL,
    CGMProblem,
    SafetyError,
    SafetyState,
    Supervisor,
    Veto,
    assess_cgm,
    check_batch,
    command_key,
    decide,
    max_basal,
)
from serving.types import CGMStatus, PatientSettings, Proposal, Reading

T0 = pd.Timestamp("2026-03-01 08:00", tz="UTC")
FIVE = pd.Timedelta(minutes=5)


def readings(values, end=T0, step=FIVE, status=CGMStatus.OK) -> list[Reading]:
    n = len(values)
    return [Reading(end - (n - 1 - i) * step, float(v), status) for i, v in enumerate(values)]


def settings_(**kw) -> PatientSettings:
    base = dict(
        name="adult#001",
        basal_u_per_h=1.0,
        carb_ratio_g_per_u=10.0,
        isf_mgdl_per_u=40.0,
        max_basal_u_per_h=3.0,
        max_bolus_u=10.0,
        max_iob_u=6.0,
    )
    base.update(kw)
    return PatientSettings(**base)


def ok_state(iob=0.0, values=(120, 121, 122), **kw) -> SafetyState:
    return SafetyState.from_readings(T0, readings(values), iob, **kw)


# --------------------------------------------------------------------------- properties

finite_or_not = st.one_of(
    st.floats(-50, 100, allow_nan=False),
    st.sampled_from([math.nan, math.inf, -math.inf, 0.0, 1e9]),
)


@st.composite
def scenario(draw):
    sched = draw(st.floats(0.05, 5.0))
    s = settings_(
        basal_u_per_h=sched,
        max_basal_u_per_h=sched * draw(st.floats(1.0, 10.0)),
        max_daily_basal_u_per_h=draw(
            st.one_of(st.none(), st.floats(1.0, 3.0).map(lambda k: sched * k))
        ),
        max_bolus_u=draw(st.floats(0.0, 25.0)),
        max_iob_u=draw(st.floats(0.0, 30.0)),
        low_suspend_mgdl=draw(st.floats(60.0, 100.0)),
    )
    p = Proposal(
        temp_basal_u_per_h=draw(finite_or_not),
        duration_min=draw(st.integers(-10, 240)),
        bolus_u=draw(finite_or_not),
        predicted_mgdl=draw(
            st.one_of(
                st.none(),
                st.lists(st.floats(20, 400), min_size=12, max_size=12).map(
                    lambda v: np.c_[np.array(v) - 15, np.array(v), np.array(v) + 15]
                ),
            )
        ),
    )
    vals = draw(st.lists(st.floats(10, 500), min_size=0, max_size=12))
    age = draw(st.sampled_from([0, 3, 11, 13, 60, -4, -6, -60]))
    rs = readings(vals, end=T0 - pd.Timedelta(minutes=age))
    if rs and draw(st.booleans()):
        rs[-1] = Reading(rs[-1].time, math.nan, draw(st.sampled_from(list(CGMStatus))))
    pump = PumpFirmware(sched)
    pump.suspended = draw(st.booleans()) and draw(st.booleans())
    if draw(st.integers(0, 5)) == 0:
        pump.fault = PumpFault.OCCLUSION
    state = SafetyState.from_readings(
        T0,
        rs,
        draw(st.one_of(st.floats(0, 40), st.just(math.nan))),
        pump=pump.status(T0),
        unconfirmed_bolus_u=draw(st.sampled_from([0.0, 0.0, 1.5])),
        journal_ok=draw(st.booleans()) or draw(st.booleans()),
    )
    return s, p, state


@settings(max_examples=250, deadline=None)
@given(scenario())
def test_verdict_never_exceeds_any_limit(sc):
    s, p, state = sc
    v = Supervisor(s).check(p, state)
    cap = float(
        max_basal(
            s.max_basal_u_per_h, s.max_daily_basal_u_per_h or s.basal_u_per_h, s.basal_u_per_h
        )
    )
    assert cap <= min(s.max_basal_u_per_h, 4 * s.basal_u_per_h) + 1e-12
    assert 0.0 <= v.temp_basal_u_per_h <= cap + 1e-9
    assert 0.0 <= v.bolus_u <= s.max_bolus_u + 1e-9
    assert 5 <= v.duration_min <= MAX_TEMP_MINUTES
    iob = state.iob_u if math.isfinite(state.iob_u) else math.inf
    on_board = iob + state.unconfirmed_bolus_u
    added = v.bolus_u + max(0.0, v.temp_basal_u_per_h - s.basal_u_per_h) * v.duration_min / 60
    if on_board >= s.max_iob_u:
        assert added == 0.0
    else:
        assert on_board + added <= s.max_iob_u + 1e-6
    if state.unconfirmed_bolus_u > 0:
        assert v.bolus_u == 0.0
    if not state.cgm.usable:
        assert v.bolus_u == 0.0 and v.fallback in ("scheduled_basal", "suspend")
        assert v.temp_basal_u_per_h <= s.basal_u_per_h + 1e-12
    if v.suspend:
        assert v.temp_basal_u_per_h == 0.0 and v.bolus_u == 0.0
    if state.pump is not None and (state.pump.fault or state.pump.suspended):
        assert v.suspend
    changed = (
        v.bolus_u != (p.bolus_u if math.isfinite(p.bolus_u) else None)
        or v.temp_basal_u_per_h != p.temp_basal_u_per_h
    )
    if changed and (p.bolus_u > 0 or v.fallback):
        assert v.vetoes, "a changed proposal must say why"


@settings(max_examples=60, deadline=None)
@given(st.lists(scenario(), min_size=1, max_size=6))
def test_batch_equals_one_by_one(scs):
    ss, ps, sts = zip(*scs)
    batch = check_batch(ss, ps, sts)
    for s, p, state, v in zip(ss, ps, sts, batch):
        assert Supervisor(s).check(p, state) == v


@settings(max_examples=100, deadline=None)
@given(
    st.floats(0.1, 3.0),
    st.lists(st.floats(30, 300), min_size=6, max_size=12),
    st.floats(0, 20),
    st.floats(0, 10),
)
def test_predicted_low_suspends(sched, pred, rate, bolus):
    s = settings_(basal_u_per_h=sched, max_basal_u_per_h=sched * 4)
    p = np.array(pred)
    v = Supervisor(s).check(
        Proposal(rate, 30, bolus, predicted_mgdl=np.c_[p - 20, p, p + 20]), ok_state()
    )
    low = p[:6].min() < s.low_suspend_mgdl or (p[:6] - 20).min() < LEVEL2_LOW_MGDL
    assert v.suspend == low
    if low:
        assert v.temp_basal_u_per_h == 0.0 and v.bolus_u == 0.0 and v.fallback == "suspend"
        assert any(r.startswith("predicted_low") for r in v.vetoes)


def test_vectorised_decide_matches_limits_on_a_million():
    rng = np.random.default_rng(0)
    n = 200_000
    sched = rng.uniform(0.05, 4, n)
    d = decide(
        rate=rng.normal(2, 5, n),
        duration=rng.integers(-5, 120, n),
        bolus=rng.normal(2, 6, n),
        scheduled=sched,
        max_basal_setting=sched * rng.uniform(1, 8, n),
        max_daily_basal=sched * rng.uniform(1, 2, n),
        max_bolus=rng.uniform(0, 15, n),
        max_iob=rng.uniform(0, 20, n),
        low_suspend=80.0,
        iob=rng.uniform(0, 25, n),
        glucose=rng.uniform(40, 400, n),
        cgm_problem=rng.integers(0, 2, n) * int(CGMProblem.STALE),
        last_valid_low=rng.random(n) < 0.1,
        pred_median_low=rng.uniform(40, 300, n),
        pred_lowest=rng.uniform(30, 300, n),
        pred_valid=rng.random(n) < 0.95,
    )
    assert (d.rate >= 0).all() and (d.rate <= d.max_basal + 1e-9).all()
    assert (d.bolus >= 0).all() and (d.duration <= 30).all()
    assert (d.rate[d.suspend] == 0).all()


# --------------------------------------------------------------------------- CGM


def test_max_basal_is_oref0():
    assert max_basal(10.0, 1.0, 0.5) == 2.0  # 4 × current
    assert max_basal(10.0, 0.5, 1.0) == 1.5  # 3 × max daily
    assert max_basal(1.2, 1.0, 1.0) == 1.2  # the setting


@pytest.mark.parametrize(
    ("rs", "problem"),
    [
        ([], CGMProblem.NO_DATA),
        (readings([120, 121], end=T0 - pd.Timedelta(minutes=13)), CGMProblem.STALE),
        (readings([120, 121], end=T0 + pd.Timedelta(minutes=6)), CGMProblem.FUTURE),
        (readings([120, 170]), CGMProblem.JUMP),
        (readings([120, 60]), CGMProblem.JUMP),
        (readings([120, 100]) + [Reading(T0 + FIVE, math.nan, CGMStatus.ERROR)], CGMProblem.ERROR),
        ([Reading(T0, math.nan, CGMStatus.WARMUP)], CGMProblem.WARMUP),
        (readings([120] * 9), CGMProblem.FLAT),
        (readings([120, 650]), CGMProblem.OUT_OF_RANGE),
    ],
)
def test_cgm_problems(rs, problem):
    c = assess_cgm(rs, T0 + (FIVE if problem is CGMProblem.ERROR else pd.Timedelta(0)))
    assert problem in c.problem, c
    assert not c.usable and math.isnan(c.glucose_mgdl)


def test_cgm_tolerates_backfill_duplicates_and_small_skew():
    rs = readings([100, 104, 108, 112])
    shuffled = [rs[2], rs[0], rs[3], rs[1], rs[3]]  # out of order and duplicated
    c = assess_cgm(shuffled, T0 + pd.Timedelta(minutes=2))
    assert c.usable and c.glucose_mgdl == 112 and len(c.readings) == 4
    assert assess_cgm(readings([100, 104]), T0 - pd.Timedelta(minutes=4)).usable  # 4 min ahead ok
    assert assess_cgm(readings([100, 140], step=pd.Timedelta(minutes=10)), T0).usable  # 20/5 min


def test_clock_jump_back_goes_stale_and_forward_is_future():
    before = readings([110, 112, 114])
    back = [*before, Reading(T0 - pd.Timedelta(minutes=55), 116.0)]  # sensor clock −1 h
    assert assess_cgm(back, T0).usable  # the newest real reading is still fresh
    assert CGMProblem.STALE in assess_cgm(back, T0 + pd.Timedelta(minutes=15)).problem
    fwd = [*before, Reading(T0 + pd.Timedelta(minutes=65), 116.0)]
    assert CGMProblem.FUTURE in assess_cgm(fwd, T0 + FIVE).problem


# --------------------------------------------------------------------------- fallbacks


@pytest.mark.parametrize(
    "values,expect", [((100, 101, 102), "scheduled_basal"), ((80, 72, 65), "suspend")]
)
def test_stale_cgm_falls_back_to_scheduled_or_suspend(values, expect):
    s = settings_()
    state = SafetyState.from_readings(T0 + pd.Timedelta(minutes=20), readings(values), 0.5)
    v = Supervisor(s).check(Proposal(2.5, 30, 2.0), state)
    assert v.fallback == expect and v.bolus_u == 0.0
    assert v.temp_basal_u_per_h == (s.basal_u_per_h if expect == "scheduled_basal" else 0.0)
    assert any(r.startswith("cgm_unusable: CGM stale") for r in v.vetoes)


def test_low_reading_long_ago_does_not_suspend_forever():
    state = SafetyState.from_readings(T0 + pd.Timedelta(hours=3), readings((80, 72, 65)), 0.0)
    assert Supervisor(settings_()).check(Proposal(1.0), state).fallback == "scheduled_basal"


def test_limits_and_iob():
    s = settings_(max_iob_u=3.0)
    v = Supervisor(s).check(Proposal(9.0, 45, 12.0), ok_state(iob=1.0))
    assert v.bolus_u == pytest.approx(2.0)  # max IOB headroom, below max bolus
    assert v.temp_basal_u_per_h == pytest.approx(1.0)  # no room left above scheduled
    assert v.duration_min == 30
    names = {r.split(":")[0] for r in v.vetoes}
    assert {"max_basal", "max_duration", "max_bolus", "max_iob"} <= names
    # above max IOB: temp limited to scheduled, lower temps untouched
    v = Supervisor(s).check(Proposal(0.4, 30, 0.0), ok_state(iob=5.0))
    assert v.temp_basal_u_per_h == 0.4 and not v.vetoes
    v = Supervisor(s).check(Proposal(2.0, 30, 0.0), ok_state(iob=2.5))
    assert v.temp_basal_u_per_h == pytest.approx(1.0 + 0.5 * 60 / 30)


def test_low_now_and_invalid_prediction():
    v = Supervisor(settings_()).check(Proposal(2.0, 30, 1.0), ok_state(values=(90, 84, 78)))
    assert v.suspend and any(r.startswith("low_glucose") for r in v.vetoes)
    bad = np.full((12, 3), 120.0)
    bad[3, 1] = np.nan
    v = Supervisor(settings_()).check(Proposal(2.0, 30, 1.0, predicted_mgdl=bad), ok_state())
    assert v.fallback == "scheduled_basal" and v.bolus_u == 0.0
    v = Supervisor(settings_()).check(Proposal(math.nan, 30, 1.0), ok_state())
    assert v.fallback == "scheduled_basal" and "non_finite_proposal" in v.vetoes[0]


def test_settings_are_validated():
    with pytest.raises(SafetyError, match="below the scheduled"):
        Supervisor(settings_(max_basal_u_per_h=0.5))
    with pytest.raises(SafetyError, match="finite"):
        Supervisor(settings_(max_iob_u=math.nan))


def test_command_key_is_deterministic_per_patient_time_kind():
    k = command_key("adult#001", T0, CommandKind.BOLUS)
    assert k == command_key("adult#001", T0.tz_convert("Europe/Paris"), "bolus")
    assert k != command_key("adult#001", T0 + FIVE, CommandKind.BOLUS)
    assert k != command_key("adult#002", T0, CommandKind.BOLUS)
    assert k != command_key("adult#001", T0, CommandKind.TEMP_BASAL)
    assert Veto.MAX_IOB.label == "max_iob"
