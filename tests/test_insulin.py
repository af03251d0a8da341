"""Insulin and carb kinetics: the oref0 curve's closed forms, conservation, IOB/COB properties."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy.integrate import quad

from forecast.insulin import (
    CarbCurve,
    InsulinCurve,
    KineticsError,
    carb_absorption,
    carbs_on_board,
    insulin_activity,
    insulin_on_board,
)

CURVE = InsulinCurve()
CARBS = CarbCurve()
K = int(np.ceil(CURVE.dia_min / 5)) + 1  # slots until a dose has fully acted

doses = arrays(
    np.float64,
    st.integers(1, 200),
    elements=st.one_of(st.just(0.0), st.floats(0.0, 20.0, allow_subnormal=False)),
)


def test_oref0_reference_values():
    # tau = tp (1 - tp/td) / (1 - 2 tp/td) for 75/360, computed by hand.
    assert CURVE.tau == pytest.approx(75 * (1 - 75 / 360) / (1 - 150 / 360))
    assert CURVE.iob_fraction(0.0) == 1.0
    assert CURVE.iob_fraction(360.0) == 0.0
    assert CURVE.iob_fraction(500.0) == 0.0
    # peak activity at the peak time
    t = np.linspace(0, 360, 3601)
    assert t[np.argmax(CURVE.activity(t))] == pytest.approx(75.0, abs=0.2)
    # oref0's 75/360 curve has about 69 % left at 75 min and about 21 % at 3 h
    assert CURVE.iob_fraction(75.0) == pytest.approx(0.694, abs=0.002)
    assert CURVE.iob_fraction(180.0) == pytest.approx(0.208, abs=0.002)


@pytest.mark.parametrize("curve", [InsulinCurve(), InsulinCurve(55, 300), InsulinCurve(90, 480)])
def test_activity_is_the_negative_derivative_and_integrates_to_one(curve):
    assert quad(curve.activity, 0, curve.dia_min)[0] == pytest.approx(1.0, abs=1e-9)
    t = np.linspace(1, curve.dia_min - 1, 50)
    h = 1e-4
    numeric = -(curve.iob_fraction(t + h) - curve.iob_fraction(t - h)) / (2 * h)
    np.testing.assert_allclose(numeric, curve.activity(t), rtol=1e-5, atol=1e-9)
    assert np.all(np.diff(curve.iob_fraction(np.linspace(0, curve.dia_min, 500))) <= 0)


def test_carb_curve_closed_form():
    assert quad(CARBS.absorption, 0, 180)[0] == pytest.approx(1.0, abs=1e-9)
    assert CARBS.cob_fraction(90.0) == pytest.approx(0.5)
    assert CARBS.cob_fraction(0.0) == 1.0 and CARBS.cob_fraction(180.0) == 0.0
    t = np.linspace(1, 179, 40)
    numeric = -(CARBS.cob_fraction(t + 1e-4) - CARBS.cob_fraction(t - 1e-4)) / 2e-4
    np.testing.assert_allclose(numeric, CARBS.absorption(t), rtol=1e-5, atol=1e-9)


def test_single_dose_iob_and_activity():
    u = np.zeros(100)
    u[3] = 2.5
    iob = insulin_on_board(u)
    act = insulin_activity(u)
    assert iob[:3].sum() == 0.0 and iob[3] == 2.5
    assert iob[3 + 72] == 0.0  # 360 min later
    assert np.all(iob[3 + 72 :] == 0.0)
    assert act.sum() == pytest.approx(2.5, rel=1e-12)
    # IOB decreases slot by slot by exactly the activity of that slot
    np.testing.assert_allclose(iob[4:] - iob[3:-1], -act[3:-1] + u[4:], atol=1e-12)


@settings(max_examples=60, deadline=None)
@given(u=doses)
def test_iob_never_negative_and_activity_conserves_insulin(u):
    padded = np.concatenate([u, np.zeros(K)])  # long enough for every dose to finish acting
    iob = insulin_on_board(padded)
    act = insulin_activity(padded)
    assert np.all(iob >= 0) and np.all(act >= 0)
    assert act.sum() == pytest.approx(u.sum(), rel=1e-9, abs=1e-9)
    assert iob[-1] == pytest.approx(0.0, abs=1e-12)
    # IOB is everything delivered minus everything that has acted
    np.testing.assert_allclose(iob, np.cumsum(padded) - np.r_[0, np.cumsum(act)[:-1]], atol=1e-9)


@settings(max_examples=40, deadline=None)
@given(c=doses)
def test_carbs_conserved(c):
    padded = np.concatenate([c * 5, np.zeros(40)])
    absorbed = carb_absorption(padded)
    cob = carbs_on_board(padded)
    assert np.all(absorbed >= 0) and np.all(cob >= 0)
    assert absorbed.sum() == pytest.approx(padded.sum(), rel=1e-9, abs=1e-9)
    assert cob[-1] == pytest.approx(0.0, abs=1e-12)


@settings(max_examples=30, deadline=None)
@given(u=arrays(np.float64, (3, 50), elements=st.floats(0.0, 10.0)))
def test_batch_rows_equal_single_rows_bit_for_bit(u):
    """A row gives the same bits alone or in a batch (serving vs training)."""
    batch = insulin_on_board(u)
    for i in range(3):
        assert np.array_equal(batch[i], insulin_on_board(u[i]))


def test_exact_for_any_history_length():
    """A dose 300 minutes back still counts; nothing is truncated to a window."""
    u = np.zeros(61)
    u[0] = 4.0
    assert insulin_on_board(u)[-1] == pytest.approx(4.0 * CURVE.iob_fraction(300.0))


def test_nan_carbs_are_zero_and_bad_input_raises():
    c = np.array([np.nan, 0.0, 10.0])
    assert np.array_equal(carbs_on_board(c), carbs_on_board(np.array([0.0, 0.0, 10.0])))
    with pytest.raises(KineticsError, match="NaN"):
        insulin_on_board(np.array([1.0, np.nan]))
    with pytest.raises(KineticsError, match="negative"):
        insulin_activity(np.array([1.0, -0.5]))
    with pytest.raises(KineticsError, match="half"):
        InsulinCurve(peak_min=200, dia_min=360)
    with pytest.raises(KineticsError):
        CarbCurve(absorption_min=0)
    with pytest.raises(ValueError):  # KineticsError is a ValueError
        insulin_on_board(np.array([1.0]), slot_minutes=0)
