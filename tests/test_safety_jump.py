"""The CGM jump rule and predictive low-glucose suspend, at the edges a closed loop meets.

A rising jump (> 40 mg/dL per 5 min) keeps the scheduled-basal fallback (the reading must not
drive insulin), but a meal bolus up to the carb-ratio bolus of this cycle's announced carbs
still goes through; a falling jump, a jump from a low reading, a jump without a meal or any
other fault blocks every bolus. p-LGS suspends on the lower quantile as well as the median.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_safety import T0, readings, settings_

from serving.safety import CGMProblem, SafetyState, Supervisor, assess_cgm, check_batch
from serving.types import PatientSettings, Proposal

# child#008's settings: the patient whose fast meal rises first met the jump rule
CHILD_008 = dict(
    name="child#008",
    basal_u_per_h=0.34,
    carb_ratio_g_per_u=15.0,
    isf_mgdl_per_u=31.0,
    max_basal_u_per_h=1.36,
    max_bolus_u=7.5,
    max_iob_u=9.2,
)


def s_(**kw) -> PatientSettings:
    return settings_(**{**CHILD_008, **kw})


def state(values, meal_u=0.0, iob=0.8, **kw) -> SafetyState:
    return SafetyState(
        now=T0, iob_u=iob, cgm=assess_cgm(readings(values), T0), meal_bolus_u=meal_u, **kw
    )


def test_rising_jump_lets_the_meal_bolus_through_but_not_a_correction():
    s = s_()
    st_ = state([120, 125, 180], meal_u=6.0)
    assert st_.cgm.problem == CGMProblem.JUMP and st_.cgm.rising_jump_only
    v = Supervisor(s).check(Proposal(1.2, 30, 4.5), st_)
    assert v.bolus_u == pytest.approx(4.5)  # a legitimate meal bolus is not blocked
    assert v.temp_basal_u_per_h == pytest.approx(s.basal_u_per_h)  # no high temp on the jump
    assert v.fallback == "scheduled_basal"
    assert any(r.startswith("cgm_unusable") for r in v.vetoes)  # still on the record
    # more than the announced carbs justify: cut to the carb-ratio bolus (no correction)
    v = Supervisor(s).check(Proposal(0.34, 30, 7.0), st_)
    assert v.bolus_u == pytest.approx(6.0)


@pytest.mark.parametrize(
    ("values", "meal_u", "kw"),
    [
        ([120, 125, 180], 0.0, {}),  # a jump with no meal: an artefact must not drive insulin
        ([180, 175, 120], 6.0, {}),  # a falling jump: maybe a real fast drop, never a bolus
        ([60, 65, 110], 6.0, {}),  # the jump starts below low suspend
        ([120, 125, 180], 6.0, {"unconfirmed_bolus_u": 1.0}),  # unconfirmed bolus blocks
        ([120, 125, 180], 6.0, {"journal_ok": False}),
    ],
)
def test_other_jumps_and_faults_still_block_every_bolus(values, meal_u, kw):
    v = Supervisor(s_()).check(Proposal(0.34, 30, 4.5), state(values, meal_u, **kw))
    assert v.bolus_u == 0.0
    assert v.fallback in ("scheduled_basal", "suspend")


def test_meal_bolus_through_a_jump_keeps_max_bolus_and_max_iob():
    s = s_(max_bolus_u=3.0, max_iob_u=4.0)
    v = Supervisor(s).check(Proposal(0.34, 30, 6.0), state([120, 125, 180], 6.0, iob=2.0))
    assert v.bolus_u == pytest.approx(2.0)  # the IOB headroom (4 - 2) is tighter than 3 U
    v = Supervisor(s).check(Proposal(0.34, 30, 6.0), state([120, 125, 180], 6.0, iob=0.0))
    assert v.bolus_u == pytest.approx(3.0)


def test_predicted_low_on_the_lower_quantile_suspends_a_meal_bolus():
    s = s_()
    med = np.full(12, 120.0)
    lo = med.copy()
    lo[4] = 50.0  # the median is fine, the lower quantile reaches a level-2 low within 30 min
    pred = np.c_[lo, med, med + 30]
    v = Supervisor(s).check(Proposal(1.0, 30, 3.0, predicted_mgdl=pred), state([118, 119, 120]))
    assert v.suspend and v.bolus_u == 0.0 and v.temp_basal_u_per_h == 0.0
    assert any(r.startswith("predicted_low") for r in v.vetoes)
    # the same low beyond 30 min is the controller's business, not p-LGS's
    lo2 = med.copy()
    lo2[8] = 50.0
    v = Supervisor(s).check(
        Proposal(1.0, 30, 3.0, predicted_mgdl=np.c_[lo2, med, med + 30]), state([118, 119, 120])
    )
    assert not v.suspend and v.bolus_u == pytest.approx(3.0)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.floats(40, 400), min_size=2, max_size=4),
    st.floats(0, 20),
    st.floats(0, 20),
    st.floats(0, 12),
)
def test_a_bolus_through_a_jump_never_exceeds_the_meal_bolus_or_a_limit(vals, meal_u, bolus, iob):
    s = s_()
    st_ = state(vals, meal_u, iob=iob)
    (v,) = check_batch([s], [Proposal(0.34, 30, bolus)], [st_])
    assert v.bolus_u <= s.max_bolus_u + 1e-9
    assert iob + v.bolus_u <= s.max_iob_u + 1e-9 or v.bolus_u == 0.0
    if st_.cgm.problem:
        assert v.bolus_u <= meal_u + 1e-9
        if not st_.cgm.rising_jump_only:
            assert v.bolus_u == 0.0
