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


def test_a_fifteen_minute_sensor_fits_every_horizon_slot():
    """Libre-like data (a reading every 3rd slot): the per-slot scales and skip weights that
    `fit_normalisation` fits must come from filled targets, or the untrained slots keep
    defaults and the forecast saw-tooths between +15/+30/+45/+60."""
    import pytest

    pytest.importorskip("torch")
    from forecast.windows import WindowConfig, add_features, make_windows
    from training.config import TrainConfig
    from training.data import training_targets
    from training.module import ForecastModule
    from training.pipeline import _spec
    from training.synthetic import replay_cohort

    frame = replay_cohort("adult#002,child#003", days=2, seed=4)
    slot = frame.groupby("subject_id", observed=True).cumcount().to_numpy()
    frame.loc[slot % 3 != 0, "glucose"] = np.nan  # one reading every 15 min
    w = make_windows(add_features(frame), WindowConfig())
    assert len(w) > 100
    raw_slots = np.isfinite(w.target).any(axis=0)
    assert raw_slots.sum() == 4  # only +15/+30/+45/+60 have readings
    model = ForecastModule(_spec(TrainConfig(), w.config)).model
    model.fit_normalisation(w.past, w.future, training_targets(w))
    scale = model.delta_scale.numpy()
    assert np.all(np.diff(scale) > 0)  # spread grows with the horizon, no slot left at 10
    assert np.isfinite(training_targets(w)).any(axis=0).all()
