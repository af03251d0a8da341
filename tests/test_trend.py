"""Trend arrows: exact CGM categories, no arrow across gaps, frame and runtime agree."""

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from forecast.schema import SchemaError
from forecast.trend import (
    TrendArrow,
    TrendConfig,
    add_trend,
    arrow_for_rate,
    arrows_for_rates,
    rate_of_change,
    trend_at,
)

T0 = pd.Timestamp("2024-03-01 00:00", tz="UTC")


def frame(glucose, subject="s1", start=T0):
    g = np.asarray(glucose, dtype=float)
    return pd.DataFrame(
        {
            "subject_id": subject,
            "time": pd.date_range(start, periods=len(g), freq="5min"),
            "glucose": g,
            "basal_u": 0.0,
            "bolus_u": 0.0,
            "carbs_g": 0.0,
        }
    )


@pytest.mark.parametrize(
    ("rate", "arrow"),
    [
        (4.0, "↑↑"),
        (3.5, "↑↑"),
        (2.5, "↑"),
        (1.5, "↗"),
        (0.5, "→"),
        (0.0, "→"),
        (-0.5, "→"),
        (-1.5, "↘"),
        (-2.5, "↓"),
        (-3.5, "↓↓"),
        (-4.0, "↓↓"),
    ],
)
def test_ramp_gives_exact_category(rate, arrow):
    g = 200 + rate * 5 * np.arange(12)
    out = add_trend(frame(g))
    # the first two readings cannot span 10 minutes: no arrow
    assert out["trend_arrow"].isna().tolist()[:2] == [True, True]
    assert (out["trend_arrow"].iloc[2:] == arrow).all()
    np.testing.assert_allclose(out["roc_mgdl_min"].iloc[2:], rate, atol=1e-9)


@pytest.mark.parametrize(
    ("rate", "arrow"),
    [
        (1.0, TrendArrow.FLAT),
        (-1.0, TrendArrow.FLAT),
        (1.0001, TrendArrow.FORTY_FIVE_UP),
        (2.0, TrendArrow.FORTY_FIVE_UP),
        (-2.0, TrendArrow.FORTY_FIVE_DOWN),
        (2.0001, TrendArrow.SINGLE_UP),
        (3.0, TrendArrow.SINGLE_UP),
        (-3.0, TrendArrow.SINGLE_DOWN),
        (3.0001, TrendArrow.DOUBLE_UP),
        (-3.0001, TrendArrow.DOUBLE_DOWN),
    ],
)
def test_boundaries_are_symmetric_and_closed_inwards(rate, arrow):
    assert arrow_for_rate(rate) is arrow
    assert arrows_for_rates(np.array([rate]))[0] == arrow.value


def test_nan_rate_has_no_arrow():
    assert arrow_for_rate(float("nan")) is None
    assert arrows_for_rates(np.array([np.nan, 0.0])).tolist() == [None, "→"]


def test_gap_leaves_no_arrow_until_three_readings_span_ten_minutes():
    g = 100 + 7.5 * np.arange(11)  # 1.5 mg/dL/min
    g[4:7] = np.nan
    out = add_trend(frame(g))
    arrows = out["trend_arrow"].tolist()
    assert arrows[3] == "↗"
    assert all(a is pd.NA for a in arrows[4:7])  # no reading, no arrow
    assert arrows[7] is pd.NA and arrows[8] is pd.NA  # 1 and 2 readings after the gap
    assert arrows[9] == "↗"  # three readings spanning 10 min


def test_one_missing_reading_still_gives_an_arrow():
    g = np.array([100, 110, np.nan, 130, 140], float)  # 2 mg/dL/min
    out = add_trend(frame(g))
    assert out["roc_mgdl_min"].iloc[3] == pytest.approx(2.0)
    assert out["trend_arrow"].iloc[3] == "↗"


def test_absent_rows_equal_nan_rows():
    g = np.array([100, 104, 108, np.nan, np.nan, 120, 125, 130, 131], float)
    full = frame(g)
    sparse = full[np.isfinite(g)].reset_index(drop=True)
    a = add_trend(full)
    b = add_trend(sparse)
    np.testing.assert_allclose(
        a.loc[np.isfinite(g), "roc_mgdl_min"].to_numpy(), b["roc_mgdl_min"].to_numpy()
    )


def test_subjects_do_not_share_a_window():
    a = frame([100, 100, 100, 100], subject="a")
    b = frame([200, 220, 240, 260], subject="b", start=T0 + pd.Timedelta(minutes=20))
    out = add_trend(pd.concat([a, b], ignore_index=True))
    assert out["roc_mgdl_min"].iloc[:4].fillna(0).abs().max() == 0
    assert out["roc_mgdl_min"].iloc[4:6].isna().all()  # b's first two readings
    assert out["roc_mgdl_min"].iloc[6] == pytest.approx(4.0)


def test_noise_seldom_moves_a_flat_arrow():
    rng = np.random.default_rng(7)
    g = 120 + rng.normal(0, 3.0, 2000)  # a typical CGM noise level on flat glucose
    arrows = add_trend(frame(g))["trend_arrow"].dropna()
    assert (arrows == "→").mean() > 0.99


def test_unsorted_frame_is_refused():
    f = frame([100, 110, 120])
    with pytest.raises(SchemaError):
        rate_of_change(f.iloc[::-1].reset_index(drop=True))


def test_runtime_readings_too_close_together_give_no_arrow():
    tr = trend_at([0.0, 2.0, 4.0], [100, 110, 120])  # 3 readings over 4 minutes
    assert tr.arrow is None and np.isnan(tr.roc_mgdl_min)
    assert trend_at([0.0, 5.0, 10.0], [100, 112.5, 125]).arrow is TrendArrow.SINGLE_UP


def test_runtime_clock_jump_backwards_gives_no_arrow():
    times = pd.to_datetime(
        ["2024-03-01 10:00", "2024-03-01 10:05", "2024-03-01 10:10", "2024-03-01 09:00"], utc=True
    )
    tr = trend_at(times, [100, 105, 110, 115])
    assert tr.arrow is None  # readings "after" the anchor are not used


def test_runtime_nan_latest_reading_gives_no_arrow():
    assert trend_at([0.0, 5.0, 10.0, 15.0], [100, 105, 110, np.nan]).arrow is None


def test_config_is_validated():
    with pytest.raises(ValueError):
        TrendConfig(min_readings=1)
    with pytest.raises(ValueError):
        TrendConfig(window_min=15, min_span_min=20)


@settings(max_examples=60, deadline=None)
@given(
    g=st.lists(st.one_of(st.floats(40, 400), st.just(float("nan"))), min_size=1, max_size=40),
)
def test_frame_and_runtime_compute_the_same_thing(g):
    f = frame(g)
    roc = rate_of_change(f)
    for i in range(len(g)):
        lo = max(0, i - 8)
        tr = trend_at(f["time"].iloc[lo : i + 1], f["glucose"].iloc[lo : i + 1])
        if np.isnan(roc[i]):
            assert np.isnan(tr.roc_mgdl_min)
        else:
            assert tr.roc_mgdl_min == pytest.approx(roc[i], rel=1e-9, abs=1e-9)
            assert tr.symbol == arrow_for_rate(roc[i]).value


@settings(max_examples=60, deadline=None)
@given(
    rate=st.floats(-6, 6),
    base=st.floats(60, 300),
    keep=st.lists(st.booleans(), min_size=4, max_size=4),
)
def test_a_line_has_its_own_slope_whatever_is_missing(rate, base, keep):
    t = np.arange(4) * 5.0
    g = np.where(keep, base + rate * t, np.nan)
    g[-1] = base + rate * t[-1]
    tr = trend_at(t, g)
    real_t = t[np.isfinite(g)]
    if len(real_t) >= 3 and real_t[-1] - real_t[0] >= 10:
        assert tr.roc_mgdl_min == pytest.approx(rate, abs=1e-7)
    else:
        assert tr.arrow is None


def test_sparse_sensor_needs_the_scaled_rule():
    g = np.full(30, np.nan)
    g[::3] = 100 + 1.5 * 15 * np.arange(10)  # a 15-minute Libre export rising 1.5 mg/dL/min
    f = frame(g)
    assert add_trend(f)["trend_arrow"].isna().all()  # two readings per 15 min: never an arrow
    out = add_trend(f, config=TrendConfig.for_sampling(15))
    assert (out["trend_arrow"].iloc[6::3] == "↗").all()
    assert TrendConfig.for_sampling(5) == TrendConfig()
