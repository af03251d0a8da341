"""Training targets on sparse sensors: short gaps filled by lines, nothing else touched."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from training.data import fill_target_gaps


def test_libre_like_targets_are_filled_between_readings_only():
    nan = np.nan
    # origin 100, readings at +15 and +30 min (slots 3 and 6), then nothing
    t = np.array([[nan, nan, 130.0, nan, nan, 100.0, nan, nan]])
    got = fill_target_gaps(t, np.array([100.0]), max_gap_slots=3)
    np.testing.assert_allclose(got[0, :6], [110, 120, 130, 120, 110, 100])
    assert np.isnan(got[0, 6:]).all()  # trailing gap: nothing on the right to anchor it


def test_long_gaps_stay_missing():
    nan = np.nan
    t = np.array([[nan, nan, nan, nan, 80.0, 81.0]])
    got = fill_target_gaps(t, np.array([100.0]), max_gap_slots=3)
    assert np.isnan(got[0, :4]).all()
    np.testing.assert_array_equal(got[0, 4:], [80.0, 81.0])


@settings(max_examples=60, deadline=None)
@given(
    data=st.lists(st.one_of(st.just(float("nan")), st.floats(40, 400)), min_size=12, max_size=12),
    g0=st.floats(40, 400),
    gap=st.integers(2, 6),
)
def test_readings_kept_and_fills_between_neighbours(data, g0, gap):
    t = np.array([data], dtype=np.float32)
    got = fill_target_gaps(t, np.array([g0]), gap)
    real = np.isfinite(t)
    np.testing.assert_array_equal(got[real], t[real])  # real readings untouched
    y = np.r_[g0, t[0]]
    idx = np.flatnonzero(np.isfinite(y))
    for j in np.flatnonzero(~real[0]) + 1:  # slot j of [origin, target...]
        left, right = idx[idx < j], idx[idx > j]
        filled = np.isfinite(got[0, j - 1])
        assert filled == (len(right) > 0 and right[0] - left[-1] <= gap)
        if filled:
            lo, hi = sorted((y[left[-1]], y[right[0]]))
            assert lo - 1e-3 <= got[0, j - 1] <= hi + 1e-3
