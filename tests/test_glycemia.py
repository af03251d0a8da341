"""Glycaemic outcomes: Kovatchev risk, consensus ranges, GMI, frames by subject/day, CVGA, AGP."""

import math

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from forecast import glycemia as G
from forecast.glycemia import GlycemiaError
from forecast.schema import DatasetMeta, SchemaError, set_meta


def test_risk_zero_at_112_5_and_symmetric_extremes():
    assert abs(G.risk_transform(112.5)) < 1e-3
    f20, f600 = G.risk_transform([20.0, 600.0])
    assert f20 == pytest.approx(-f600, abs=0.01)  # the transform symmetrises the scale
    assert f20 == pytest.approx(-math.sqrt(10), abs=0.02)
    assert G.risk([20.0, 600.0]) == pytest.approx([100.0, 100.0], abs=0.2)


def test_risk_hand_value_at_50():
    # f(50) = 1.509 (ln(ln 50)*1.084 exp - 5.381) = 1.509 (4.38684 - 5.381) = -1.50022
    f = 1.509 * (math.log(50) ** 1.084 - 5.381)
    assert f == pytest.approx(-1.5002, abs=1e-3)
    assert G.risk(50.0) == pytest.approx(10 * f * f)


def test_outcomes_by_hand():
    out = G.outcomes([50.0, 100.0, 200.0, 300.0, np.nan], expected_slots=8)
    assert out["n"] == 4
    assert out["mean"] == pytest.approx(162.5)
    assert out["sd"] == pytest.approx(np.std([50, 100, 200, 300], ddof=1))
    assert out["cv"] == pytest.approx(100 * out["sd"] / 162.5)
    assert out["gmi"] == pytest.approx(3.31 + 0.02392 * 162.5)
    assert (out["tbr70"], out["tbr54"], out["tir"], out["tar180"], out["tar250"]) == (
        25.0,
        25.0,
        25.0,
        50.0,
        25.0,
    )
    # LBGI/HBGI average over ALL 4 readings (zeros on the other side of 112.5)
    assert out["lbgi"] == pytest.approx((G.risk(50.0) + G.risk(100.0)) / 4)
    assert out["hbgi"] == pytest.approx((G.risk(200.0) + G.risk(300.0)) / 4)
    assert out["coverage"] == pytest.approx(50.0)


def test_range_boundaries_inclusive_tir():
    out = G.outcomes([54.0, 70.0, 180.0, 250.0])
    assert out["tbr54"] == 0.0 and out["tbr70"] == 25.0
    assert out["tir"] == 50.0 and out["tar250"] == 0.0


def test_outcomes_empty_and_mmol_refused():
    out = G.outcomes([np.nan, np.nan])
    assert out["n"] == 0 and math.isnan(out["mean"]) and math.isnan(out["tir"])
    with pytest.raises(GlycemiaError, match="mmol/L"):
        G.outcomes([5.5, 7.2, 9.1])


def test_weights_time_weighted_statistics():
    out = G.outcomes([60.0, 120.0], weights=[15.0, 5.0])
    assert out["tbr70"] == pytest.approx(75.0)
    assert out["mean"] == pytest.approx((60 * 15 + 120 * 5) / 20)


@settings(max_examples=60, deadline=None)
@given(arrays(np.float64, st.integers(1, 200), elements=st.floats(20, 600)))
def test_ranges_sum_to_100_and_are_nested(g):
    out = G.outcomes(g)
    assert out["tbr70"] + out["tir"] + out["tar180"] == pytest.approx(100.0)
    assert out["tbr54"] <= out["tbr70"] and out["tar250"] <= out["tar180"]
    assert out["lbgi"] >= 0 and out["hbgi"] >= 0
    perm = np.random.default_rng(0).permutation(len(g))
    assert G.outcomes(g[perm])["lbgi"] == pytest.approx(out["lbgi"])


# --------------------------------------------------------------------------- frames


def _frame(days: int = 3, tz: str = "Europe/Paris", sampling: float = 5.0) -> pd.DataFrame:
    n = 288 * days
    t = pd.date_range("2024-03-30 00:00", periods=n, freq="5min", tz="UTC")
    g = 140 + 60 * np.sin(np.arange(n) / 40.0)
    g[::10] = np.nan
    f = pd.DataFrame(
        {
            "subject_id": pd.array(["a"] * n + ["b"] * n, dtype="string"),
            "time": np.concatenate([t, t]),
            "glucose": np.concatenate([g, g - 30]),
            "basal_u": 0.1,
            "bolus_u": 0.0,
            "carbs_g": 0.0,
        }
    )
    set_meta(f, DatasetMeta(timezone=tz, sampling_minutes=sampling))
    return f


def test_outcomes_frame_by_subject_matches_outcomes():
    f = _frame()
    res = G.outcomes_frame(f, by="subject")
    assert list(res.index) == ["a", "b"]
    ga = f.loc[f.subject_id == "a", "glucose"]
    direct = G.outcomes(ga, expected_slots=len(ga))
    for k in ("mean", "tir", "lbgi", "coverage", "n"):
        assert res.loc["a", k] == pytest.approx(direct[k])
    assert res.loc["a", "coverage"] == pytest.approx(90.0, abs=0.2)


def test_outcomes_frame_by_local_day_handles_dst():
    f = _frame(tz="Europe/Paris")
    res = G.outcomes_frame(f, by="day")
    days = [str(d) for d in res.loc["a"].index]
    # data start at 01:00 local on 30 March; 31 March is the 23-hour DST day
    assert days[:3] == ["2024-03-30", "2024-03-31", "2024-04-01"]
    assert res.loc[("a", pd.Timestamp("2024-03-31").date()), "expected"] == 23 * 12
    assert res["n"].groupby(level=0).sum().loc["a"] == f[f.subject_id == "a"].glucose.notna().sum()


def test_outcomes_frame_whole_and_sampling_period():
    f = _frame(sampling=15.0)
    res = G.outcomes_frame(f, by=None)
    assert len(res) == 1
    assert res["expected"].iloc[0] == pytest.approx(2 * 288 * 3 / 3)
    tw = G.outcomes_frame(f, by="subject", time_weighted=True)
    assert tw.loc["a", "tir"] == pytest.approx(
        G.outcomes_frame(f, by="subject").loc["a", "tir"], abs=2.0
    )
    with pytest.raises(SchemaError):
        G.outcomes_frame(f.drop(columns="glucose"))
    with pytest.raises(GlycemiaError):
        G.outcomes_frame(f, by="week")


def test_reading_weights_cap_gaps():
    t = pd.date_range("2024-01-01", periods=6, freq="5min", tz="UTC")
    g = np.array([100.0, 100.0, np.nan, np.nan, np.nan, 100.0])
    w = G.reading_weights(t, g, max_gap_min=15.0)
    assert w.tolist() == [5.0, 15.0, 0.0, 0.0, 0.0, 10.0]


# --------------------------------------------------------------------------- CVGA, AGP


@pytest.mark.parametrize(
    ("lo", "hi", "zone", "detail"),
    [
        (100, 170, "A", "A"),
        (80, 170, "B", "Lower B"),
        (100, 250, "B", "Upper B"),
        (80, 250, "B", "B"),
        (60, 170, "C", "Lower C"),
        (100, 350, "C", "Upper C"),
        (60, 250, "D", "Lower D"),
        (80, 350, "D", "Upper D"),
        (60, 350, "E", "E"),
        (90, 179, "B", "Lower B"),  # min 90 is on the line: the worse side
        (91, 180, "B", "Upper B"),
        (70, 300, "B", "B"),
    ],
)
def test_cvga_zone_boundaries(lo, hi, zone, detail):
    z, d = G.cvga_zone([lo], [hi])
    assert (z[0], d[0]) == (zone, detail)


def test_cvga_table_from_frame_dict_and_array():
    f = _frame()
    t = G.cvga(f)
    assert list(t.index) == ["a", "b"]
    assert t.loc["a", "min"] == pytest.approx(np.nanmin(f[f.subject_id == "a"].glucose))
    t2 = G.cvga({"x": [95.0, 170.0], "y": [40.0, 450.0]})
    assert t2["zone"].tolist() == ["A", "E"]
    assert (t2.loc["y", "x"], t2.loc["y", "y"]) == (50.0, 400.0)  # clipped to the grid
    t3 = G.cvga(np.array([[100.0, 150.0], [60.0, 200.0]]), percentiles=(2.5, 97.5))
    assert t3["zone"].tolist() == ["A", "D"]
    assert G.cvga_shares(t2) == {"A": 50.0, "B": 0.0, "C": 0.0, "D": 0.0, "E": 50.0}


def test_agp_bins_in_local_time():
    t = pd.date_range("2024-01-01", periods=288 * 4, freq="5min", tz="UTC")
    local_hour = t.tz_convert("America/New_York").hour
    g = np.where(local_hour < 6, 80.0, 160.0)
    f = pd.DataFrame({"subject_id": "a", "time": t, "glucose": g})
    set_meta(f, DatasetMeta(timezone="America/New_York"))
    res = G.agp(f, bin_minutes=15)
    assert len(res) == 96 and list(res.columns) == ["p5", "p25", "p50", "p75", "p95", "n"]
    assert res.loc[0, "p50"] == 80.0 and res.loc[5 * 60 + 45, "p95"] == 80.0
    assert res.loc[6 * 60, "p5"] == 160.0
    assert res["n"].sum() == len(t)
    arr = G.agp(g, times=t, timezone="America/New_York", bin_minutes=60)
    assert arr.loc[0, "p50"] == 80.0
    with pytest.raises(GlycemiaError):
        G.agp(f, bin_minutes=7)


def test_agp_percentiles_by_hand():
    t = pd.date_range("2024-01-01 00:00", periods=5, freq="1min", tz="UTC")
    res = G.agp([100.0, 110.0, 120.0, 130.0, 140.0], times=t, bin_minutes=5)
    assert res.loc[0, "p50"] == 120.0 and res.loc[0, "p25"] == 110.0
    assert res.loc[5, "n"] == 0 and math.isnan(res.loc[5, "p50"])
