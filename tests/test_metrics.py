"""Forecast accuracy metrics: hand-computed values, published grid boundaries, properties."""

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from forecast import metrics as M
from forecast.metrics import MetricError

SEVERITY = {"A": 0, "B": 1, "C": 2, "D": 3, "E": 4}


# --------------------------------------------------------------------------- point errors


def test_point_errors_by_hand_and_nan_references_skipped():
    ref = [100.0, 200.0, np.nan]
    pred = [110.0, 180.0, 5.0]  # the prediction at the missing reading is ignored
    assert M.rmse(ref, pred) == pytest.approx(math.sqrt((10**2 + 20**2) / 2))
    assert M.mae(ref, pred) == pytest.approx(15.0)
    assert M.mard(ref, pred) == pytest.approx((10 / 100 + 20 / 200) / 2 * 100)
    assert M.bias(ref, pred) == pytest.approx(-5.0)


def test_missing_prediction_at_a_real_reading_raises():
    with pytest.raises(MetricError, match="not finite"):
        M.rmse([100.0, 120.0], [100.0, np.nan])


def test_shape_mismatch_raises_with_hint():
    with pytest.raises(MetricError, match="median column"):
        M.mae(np.ones((4, 3)), np.ones((4, 3, 3)))


def test_empty_gives_nan():
    assert math.isnan(M.rmse([np.nan], [1.0]))
    assert math.isnan(M.mard([], []))


def test_errors_by_range_boundaries():
    ref = np.array([69.0, 70.0, 180.0, 181.0])
    pred = ref + np.array([1.0, 2.0, 3.0, 4.0])
    br = M.errors_by_range(ref, pred)
    assert [br[k]["n"] for k in ("<70", "70-180", ">180")] == [1, 2, 1]
    assert br["70-180"]["mae"] == pytest.approx(2.5)
    assert br[">180"]["rmse"] == pytest.approx(4.0)


# --------------------------------------------------------------------------- Clarke


@pytest.mark.parametrize(
    ("ref", "pred", "zone"),
    [
        (100, 100, "A"),
        (100, 120, "A"),  # exactly +20 %
        (100, 80, "A"),  # exactly -20 %
        (100, 121, "B"),
        (50, 65, "A"),  # both hypoglycaemic
        (70, 84, "A"),
        (50, 200, "E"),  # hypo read as hyper
        (70, 180, "E"),  # corner of the upper-left E zone
        (200, 60, "E"),  # hyper read as hypo
        (180, 70, "E"),
        (100, 220, "C"),  # above y = x + 110
        (290, 400, "C"),  # end point of the upper C line
        (291, 402, "B"),  # past x = 290 the upper C zone stops
        (160, 40, "C"),  # below y = 7/5 x - 182
        (160, 43, "B"),
        (250, 100, "D"),  # lower-right D (x >= 240, 70 <= y <= 180)
        (240, 180, "D"),
        (50, 100, "D"),  # upper-left D (x <= 175/3)
        (65, 79, "D"),  # above y = 6/5 x for 175/3 <= x <= 70
        (65, 78, "A"),
        (300, 420, "B"),
        (400, 250, "B"),
    ],
)
def test_clarke_published_points(ref, pred, zone):
    assert M.clarke_zones([ref], [pred])[0] == zone


def test_clarke_vectorised_and_nan():
    z = M.clarke_zones(np.array([[100, np.nan]]), np.array([[100, 100]]))
    assert z.shape == (1, 2)
    assert z.tolist() == [["A", ""]]


# --------------------------------------------------------------------------- Parkes


@pytest.mark.parametrize(
    ("ref", "pred", "zone"),
    [
        (100, 100, "A"),
        # on a published vertex: the inner zone; just outside: the next one
        (140, 170, "A"),
        (140, 171, "B"),
        (430, 550, "A"),
        (430, 551, "B"),
        (170, 145, "A"),
        (170, 144, "B"),
        (50, 10, "A"),  # on the vertical foot of the A lower border
        (51, 10, "B"),
        (70, 110, "B"),
        (70, 111, "C"),
        (260, 130, "B"),
        (260, 129, "C"),
        (80, 215, "C"),
        (80, 216, "D"),
        (250, 40, "C"),
        (251, 40, "D"),
        (550, 150, "C"),
        (550, 149, "D"),
        (35, 155, "D"),
        (35, 156, "E"),
        (20, 300, "E"),
        (500, 20, "D"),  # type 1 has no lower E zone
        (600, 742, "A"),  # past (430, 550) the border keeps its last slope (1.133)
        (600, 744, "B"),
    ],
)
def test_parkes_type1_published_vertices(ref, pred, zone):
    assert M.parkes_zones([ref], [pred])[0] == zone


def test_parkes_type2_and_bad_type():
    assert M.parkes_zones([20], [210], diabetes_type=2)[0] == "E"
    assert M.parkes_zones([20], [190], diabetes_type=2)[0] == "D"
    with pytest.raises(MetricError):
        M.parkes_zones([1], [1], diabetes_type=3)


def test_zone_shares_percent_all_keys():
    s = M.zone_shares(np.array(["A", "A", "B", "E", ""]))
    assert s == {"A": 50.0, "B": 25.0, "C": 0.0, "D": 0.0, "E": 25.0}
    assert all(math.isnan(v) for v in M.zone_shares([]).values())


glucose = st.floats(20, 600, allow_nan=False)


@settings(max_examples=60, deadline=None)
@given(ref=glucose, a=st.floats(0, 800), b=st.floats(0, 800))
def test_zone_severity_grows_away_from_the_diagonal(ref, a, b):
    """Moving a prediction further from the reference (same side) never improves its zone."""
    for lo, hi in ((min(a, b), max(a, b)),):
        for grid in (M.clarke_zones, M.parkes_zones):
            if lo >= ref:  # both above
                z1, z2 = grid([ref, ref], [lo, hi])
                assert SEVERITY[z1] <= SEVERITY[z2]
            if hi <= ref:  # both below
                z1, z2 = grid([ref, ref], [hi, lo])
                assert SEVERITY[z1] <= SEVERITY[z2]


@settings(max_examples=30, deadline=None)
@given(arrays(np.float64, st.integers(1, 50), elements=glucose))
def test_perfect_predictions_are_all_zone_a(ref):
    assert M.zone_shares(M.clarke_zones(ref, ref))["A"] == 100.0
    assert M.zone_shares(M.parkes_zones(ref, ref))["A"] == 100.0
    assert M.rmse(ref, ref) == 0.0


@settings(max_examples=25, deadline=None)
@given(
    st.integers(2, 40).flatmap(
        lambda n: st.tuples(
            arrays(np.float64, n, elements=glucose),
            arrays(np.float64, n, elements=glucose),
            arrays(np.float64, n, elements=st.floats(0, 60)),
            st.permutations(range(n)),
        )
    )
)
def test_metrics_invariant_to_permutation_and_coverage_bounded(data):
    ref, pred, half, perm = data
    perm = np.asarray(perm)
    for f in (M.rmse, M.mae, M.mard):
        assert f(ref, pred) == pytest.approx(f(ref[perm], pred[perm]))
    for grid in (M.clarke_zones, M.parkes_zones):
        assert M.zone_shares(grid(ref, pred)) == pytest.approx(
            M.zone_shares(grid(ref[perm], pred[perm]))
        )
    cov = M.interval_coverage(ref, pred - half, pred + half)
    assert 0.0 <= cov <= 100.0
    assert cov == pytest.approx(
        M.interval_coverage(ref[perm], (pred - half)[perm], (pred + half)[perm])
    )


# --------------------------------------------------------------------------- intervals, lag


def test_interval_coverage_and_width_by_hand():
    t = np.array([100.0, 150.0, 200.0, np.nan])
    lo = np.array([90.0, 155.0, 200.0, 0.0])
    hi = np.array([110.0, 160.0, 230.0, 1.0])
    assert M.interval_coverage(t, lo, hi) == pytest.approx(200 / 3)  # bounds inclusive
    assert M.interval_width(t, lo, hi) == pytest.approx((20 + 5 + 30) / 3)


def _persistence(y: np.ndarray, horizon: int):
    n = len(y) - horizon
    target = np.stack([y[i + 1 : i + 1 + horizon] for i in range(n)])
    pred = np.repeat(y[:n, None], horizon, axis=1)
    return target, pred


def test_time_lag_of_persistence_equals_horizon_and_perfect_is_zero():
    y = 140 + 50 * np.sin(np.arange(600) / 25.0)
    target, pred = _persistence(y, 12)
    for j in (0, 5, 11):
        assert M.time_lag_min(target[:, j], pred[:, j], 5) == 5.0 * (j + 1)
        assert M.time_lag_min(target[:, j], target[:, j], 5) == 0.0


def test_time_lag_uses_origins_across_skipped_windows():
    y = 140 + 50 * np.sin(np.arange(400) / 20.0)
    target, pred = _persistence(y, 6)
    origins = np.datetime64("2024-01-01T00:00") + np.arange(len(target)) * np.timedelta64(5, "m")
    keep = np.ones(len(target), bool)
    keep[100:130] = False  # a skipped stretch: rows are no longer consecutive
    t, p, o = target[keep, 5], pred[keep, 5], origins[keep]
    assert M.time_lag_min(t, p, 5, origins=o) == 30.0
    sid = np.where(np.arange(keep.sum()) < 150, "a", "b")
    assert M.time_lag_min(t, p, 5, origins=o, subject_ids=sid) == 30.0


# --------------------------------------------------------------------------- evaluate_forecast


def _toy(n: int = 300, h: int = 12, seed: int = 0):
    rng = np.random.default_rng(seed)
    y = 140 + 60 * np.sin(np.arange(n + h + 1) / 30.0) + rng.normal(0, 4, n + h + 1)
    target, med = _persistence(y, h)
    target, med = target[:n], med[:n]
    pred = np.stack([med - 25, med, med + 25], axis=-1)
    return target, pred


def test_evaluate_forecast_structure_and_values():
    target, pred = _toy()
    res = M.evaluate_forecast(target, pred, (0.05, 0.5, 0.95))
    assert list(res["horizons"]) == [str(5 * (j + 1)) for j in range(12)]
    h30 = res["horizons"]["30"]
    assert h30["rmse"] == pytest.approx(M.rmse(target[:, 5], pred[:, 5, 1]))
    assert h30["mae"] == pytest.approx(M.mae(target[:, 5], pred[:, 5, 1]))
    assert h30["width"] == pytest.approx(50.0)
    assert h30["n"] == 300
    assert h30["lag_min"] == 30.0
    assert sum(h30["clarke"].values()) == pytest.approx(100.0)
    assert sum(h30["parkes"].values()) == pytest.approx(100.0)
    assert set(h30["by_range"]) == {"<70", "70-180", ">180"}
    assert sum(v["n"] for v in h30["by_range"].values()) == 300
    assert res["interval"] == [0.05, 0.95]
    json.dumps(res, allow_nan=False)  # JSON-ready: None, never NaN


def test_evaluate_forecast_ignores_nan_targets():
    target, pred = _toy()
    t2 = target.copy()
    t2[::3, :] = np.nan
    p2 = pred.copy()
    p2[::3, :, :] = np.nan  # no forecast where no reading: fine
    full = M.evaluate_forecast(t2, p2, (0.05, 0.5, 0.95))["horizons"]["60"]
    keep = np.ones(len(target), bool)
    keep[::3] = False
    sub = M.evaluate_forecast(target[keep], pred[keep], (0.05, 0.5, 0.95))["horizons"]["60"]
    for k in ("rmse", "mae", "mard", "coverage", "width", "n", "clarke", "parkes"):
        assert full[k] == pytest.approx(sub[k])
    assert full["n"] == keep.sum()


def test_evaluate_forecast_median_is_nearest_half_and_horizon_subset():
    target, pred = _toy(h=6)
    pred = pred[..., [0, 1, 2]]
    res = M.evaluate_forecast(target, pred, (0.1, 0.45, 0.9), horizons=[10, 30])
    assert list(res["horizons"]) == ["10", "30"]
    assert res["median_quantile"] == 0.45
    assert res["horizons"]["30"]["rmse"] == pytest.approx(M.rmse(target[:, 5], pred[:, 5, 1]))
    with pytest.raises(MetricError, match="multiple"):
        M.evaluate_forecast(target, pred, (0.1, 0.45, 0.9), horizons=[33])
    with pytest.raises(MetricError, match="quantiles"):
        M.evaluate_forecast(target, pred, (0.1, 0.9))


def test_evaluate_forecast_point_forecast_and_empty_ranges_are_none():
    target = np.full((5, 2), 120.0)
    res = M.evaluate_forecast(target, target + 1, None)
    h = res["horizons"]["5"]
    assert h["coverage"] is None and h["width"] is None
    assert h["by_range"]["<70"]["rmse"] is None
    assert h["rmse"] == pytest.approx(1.0)


def test_bglp_scores_mean_of_patients():
    target = np.full((4, 12), 100.0)
    pred = target.copy()
    pred[:2, 5] += 10.0  # subject a: error 10 at 30 min
    pred[2:, 5] += 20.0  # subject b: error 20
    target[3, 11] = np.nan  # no reading → not scored at 60 min
    res = M.bglp_scores(target, pred, subject_ids=["a", "a", "b", "b"])
    assert res["30"]["rmse"] == pytest.approx(15.0)
    assert res["30"]["rmse_pooled"] == pytest.approx(math.sqrt((100 + 100 + 400 + 400) / 4))
    assert res["60"]["n"] == 3
    assert res["subjects"]["b"]["60"]["n"] == 1
    assert "30 and 60" in res["rules"]


def test_json_safe_replaces_nan():
    assert M.json_safe({"a": np.float64("nan"), "b": [np.int64(2), 1.5]}) == {
        "a": None,
        "b": [2, 1.5],
    }


def _naive_lag(t: np.ndarray, p: np.ndarray, k_max: int) -> int:
    best, best_c = 0, -np.inf
    for k in sorted(range(-k_max, k_max + 1), key=lambda v: (abs(v), v)):
        a, b = (t[: len(t) - k], p[k:]) if k >= 0 else (t[-k:], p[: len(p) + k])
        m = np.isfinite(a) & np.isfinite(b)
        c = np.corrcoef(a[m], b[m])[0, 1]
        if c > best_c + 1e-12:
            best, best_c = k, c
    return best


@pytest.mark.parametrize("seed", range(5))
def test_time_lag_matches_naive_pairwise_correlation(seed):
    rng = np.random.default_rng(seed)
    y = np.cumsum(rng.normal(0, 3, 500)) + 150
    shift = int(rng.integers(-6, 10))
    p = np.roll(y, shift) + rng.normal(0, 4, 500)
    t = y.copy()
    t[rng.random(500) < 0.2] = np.nan
    p[rng.random(500) < 0.1] = np.nan
    p[np.isfinite(t) & ~np.isfinite(p)] = 150.0  # a forecast wherever a reading exists
    assert M.time_lag_min(t, p, 5, max_lag_slots=12) == 5.0 * _naive_lag(t, p, 12)
