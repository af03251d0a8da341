"""The window builder: which windows exist, what they hold, splits, and serving parity."""

from __future__ import annotations

import time

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from forecast.insulin import InsulinCurve, insulin_on_board
from forecast.schema import DatasetMeta, SchemaError, get_meta, set_meta
from forecast.windows import (
    FUTURE_FEATURES,
    PAST_FEATURES,
    WindowConfig,
    Windows,
    add_features,
    inputs_at,
    make_windows,
    split_chronological,
    split_subjects,
)

T0 = pd.Timestamp("2024-03-01 00:00", tz="UTC")
SLOT = pd.Timedelta(minutes=5)


def toy_frame(
    n_subjects: int = 2,
    n_slots: int = 400,
    *,
    seed: int = 0,
    nan_frac: float = 0.08,
    drop_frac: float = 0.0,
    tz: str = "UTC",
) -> pd.DataFrame:
    """Random but valid canonical frame: NaN readings, optional missing rows, meals, boluses."""
    rng = np.random.default_rng(seed)
    parts = []
    for s in range(n_subjects):
        n = n_slots + 10 * s  # subjects of different lengths
        g = 140 + 40 * np.sin(np.arange(n) / 30 + s) + rng.normal(0, 4, n)
        g[rng.random(n) < nan_frac] = np.nan
        carbs = np.where(rng.random(n) < 0.02, rng.uniform(10, 80, n), 0.0)
        parts.append(
            pd.DataFrame(
                {
                    "subject_id": f"p{s}",
                    "time": T0 + SLOT * np.arange(n) + pd.Timedelta(minutes=35 * s),
                    "glucose": np.round(g, 1),
                    "basal_u": rng.uniform(0.03, 0.12, n),
                    "bolus_u": np.where(rng.random(n) < 0.02, rng.uniform(0.5, 6, n), 0.0),
                    "carbs_g": carbs,
                }
            )
        )
    f = pd.concat(parts, ignore_index=True)
    if drop_frac:
        f = f[rng.random(len(f)) >= drop_frac].reset_index(drop=True)
    set_meta(f, DatasetMeta(source="toy", timezone=tz))
    return f


def reference_origins(frame: pd.DataFrame, cfg: WindowConfig) -> set[tuple[str, pd.Timestamp]]:
    """The window rules of forecast.windows written the slow, obvious way."""
    L, H, gap = cfg.past_slots, cfg.horizon_slots, cfg.max_past_gap_slots
    out = set()
    for sid, g in frame.groupby("subject_id", sort=False):
        glucose = dict(zip(g["time"], g["glucose"]))
        first = g["time"].min()

        def missing(t, glucose=glucose):
            return t not in glucose or np.isnan(glucose[t])

        def run_at(t, first=first, missing=missing):
            n = 0
            while missing(t):
                if t < first:
                    return np.inf  # no reading yet in this subject
                n += 1
                t -= SLOT
            return n

        for t0 in g["time"]:
            if missing(t0):
                continue
            span = [t0 + k * SLOT for k in range(-L + 1, H + 1)]
            if any(t not in glucose for t in span):
                continue
            if max(run_at(t0 + k * SLOT) for k in range(-L + 1, 1)) > gap:
                continue
            if all(missing(t0 + k * SLOT) for k in range(1, H + 1)):
                continue
            out.add((str(sid), t0))
    return out


def window_keys(w: Windows) -> set[tuple[str, pd.Timestamp]]:
    return {(s, pd.Timestamp(o, tz="UTC")) for s, o in zip(w.subject_id, w.origin)}


# --------------------------------------------------------------------------- config


def test_config_helpers_and_round_trip():
    cfg = WindowConfig()
    assert cfg.past_features == PAST_FEATURES and cfg.future_features == FUTURE_FEATURES
    assert cfg.past_index("glucose") == 0 and cfg.future_index("bolus_u") == 1
    assert cfg.horizons_min == list(range(5, 61, 5))
    assert WindowConfig.from_dict(cfg.to_dict()) == cfg
    assert WindowConfig.from_minutes(60, 120).horizon_slots == 24
    with pytest.raises(SchemaError, match="multiple"):
        WindowConfig.from_minutes(120, 62)
    with pytest.raises(KeyError):
        cfg.past_index("nope")
    with pytest.raises(SchemaError, match="glucose"):
        WindowConfig(past_features=("basal_u",))
    with pytest.raises(SchemaError, match="future"):
        WindowConfig(future_features=("glucose",))
    with pytest.raises(SchemaError):
        WindowConfig(slot_minutes=15)


# --------------------------------------------------------------------------- make_windows


def test_windows_match_the_reference_rules_with_gaps_and_missing_rows():
    frame = toy_frame(3, 300, seed=1, nan_frac=0.15, drop_frac=0.01)
    frame.loc[100:112, "glucose"] = np.nan  # a long CGM gap
    cfg = WindowConfig(past_slots=12, horizon_slots=6, max_past_gap_slots=3)
    w = make_windows(frame, cfg)
    assert len(w) > 100
    assert window_keys(w) == reference_origins(frame, cfg)


def test_shapes_targets_and_carried_forward_past():
    frame = toy_frame(2, 300, seed=2, nan_frac=0.2)
    cfg = WindowConfig()
    w = make_windows(frame, cfg)
    n = len(w)
    assert w.past.shape == (n, 24, len(PAST_FEATURES)) and w.past.dtype == np.float32
    assert w.future.shape == (n, 12, 5) and w.future.dtype == np.float32
    assert w.target.shape == (n, 12) and w.target.dtype == np.float32
    assert w.origin.dtype == np.dtype("datetime64[ns]")
    assert np.isfinite(w.past).all() and np.isfinite(w.future).all()
    lookup = {(s, t): g for s, t, g in zip(frame["subject_id"], frame["time"], frame["glucose"])}
    gi, oi = cfg.past_index("glucose"), cfg.past_index("observed")
    for i in range(0, n, 7):
        t0 = pd.Timestamp(w.origin[i], tz="UTC")
        sid = w.subject_id[i]
        assert w.past[i, -1, gi] == np.float32(lookup[(sid, t0)])  # a real reading at t0
        for h in range(12):
            g = lookup[(sid, t0 + (h + 1) * SLOT)]
            if np.isnan(g):
                assert np.isnan(w.target[i, h])  # NaN exactly where no reading
            else:
                assert w.target[i, h] == np.float32(g)
        last = np.nan
        for k in range(-23, 1):  # carried forward, never interpolated
            g = lookup[(sid, t0 + k * SLOT)]
            obs = not np.isnan(g)
            assert w.past[i, k + 23, oi] == float(obs)
            if obs:
                last = g
            if not np.isnan(last):
                assert w.past[i, k + 23, gi] == np.float32(last)
    assert np.isfinite(w.target).any(axis=1).all()  # every window has a real target


def test_windows_never_cross_subjects_and_stride_thins():
    frame = toy_frame(2, 200, seed=3)
    w = make_windows(frame, WindowConfig())
    for sid in np.unique(w.subject_id):
        sub = frame[frame["subject_id"] == sid]
        o = pd.to_datetime(w.origin[w.subject_id == sid]).tz_localize("UTC")
        assert (o - 23 * SLOT >= sub["time"].min()).all()
        assert (o + 12 * SLOT <= sub["time"].max()).all()
    ws = make_windows(frame, WindowConfig(), stride=6)
    assert window_keys(ws) <= window_keys(w)
    assert len(w) / 8 < len(ws) < len(w) / 4
    with pytest.raises(SchemaError):
        make_windows(frame, stride=0)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    mask=st.lists(st.booleans(), min_size=60, max_size=60),
    drop=st.lists(st.integers(0, 59), max_size=3),
    gap=st.integers(0, 4),
)
def test_property_windows_follow_the_rules(mask, drop, gap):
    frame = toy_frame(1, 60, seed=4, nan_frac=0.0)
    frame.loc[np.array(mask), "glucose"] = np.nan
    frame = frame.drop(index=list(set(drop))).reset_index(drop=True)
    cfg = WindowConfig(past_slots=6, horizon_slots=3, max_past_gap_slots=gap)
    assert window_keys(make_windows(frame, cfg)) == reference_origins(frame, cfg)


def test_carbs_nan_and_unannounced_meals_are_zero_inputs():
    frame = toy_frame(1, 200, seed=5, nan_frac=0.0)
    frame.loc[100, "carbs_g"] = np.nan  # a meal of unknown size
    frame.loc[120, "carbs_g"] = 50.0
    cfg = WindowConfig()
    w = make_windows(frame, cfg)
    ci = cfg.past_index("carbs_g")
    assert np.isfinite(w.past[..., ci]).all()
    t_nan = frame.loc[100, "time"]
    i = np.flatnonzero(pd.to_datetime(w.origin).tz_localize("UTC") == t_nan)[0]
    assert w.past[i, -1, ci] == 0.0
    # announced-only: an unannounced meal is not an input (past, future, COB)
    ann = frame.copy()
    ann["meal_announced"] = True
    ann.loc[120, "meal_announced"] = False
    wa = make_windows(ann, cfg)
    t_meal = frame.loc[120, "time"]
    j = np.flatnonzero(pd.to_datetime(wa.origin).tz_localize("UTC") == t_meal - 2 * SLOT)[0]
    assert w.future[j, 1, cfg.future_index("carbs_g")] == 50.0
    assert wa.future[j, 1, cfg.future_index("carbs_g")] == 0.0
    assert add_features(ann).loc[130, "cob_g"] < add_features(frame).loc[130, "cob_g"]


def test_features_iob_and_local_time_of_day():
    frame = toy_frame(1, 400, seed=6, tz="America/New_York")
    f = add_features(frame)
    for c in ("observed", "iob_u", "cob_g", "tod_sin", "tod_cos"):
        assert c in f.columns and f[c].notna().all()
    ins = (frame["basal_u"] + frame["bolus_u"]).to_numpy()
    np.testing.assert_allclose(f["iob_u"], insulin_on_board(ins), rtol=1e-12)
    local = f["time"].dt.tz_convert("America/New_York")
    minutes = local.dt.hour * 60 + local.dt.minute
    np.testing.assert_allclose(f["tod_sin"], np.sin(2 * np.pi * minutes / 1440), atol=1e-12)
    np.testing.assert_allclose(f["tod_cos"], np.cos(2 * np.pi * minutes / 1440), atol=1e-12)
    assert get_meta(f).timezone == "America/New_York"
    # a different curve changes IOB
    slow = add_features(frame, insulin=InsulinCurve(peak_min=90, dia_min=480))
    assert (slow["iob_u"] >= f["iob_u"] - 1e-12).all()


def test_trailing_daily_dose_against_a_rolling_reference():
    """tdd_u: basal + bolus over the subject's rows of the last 24 h, scaled to a day by the
    rows present; never mixes subjects; the start of a split still sees the day before it."""
    frame = toy_frame(3, 700, seed=8, drop_frac=0.1)
    f = add_features(frame)
    for _, g in f.groupby("subject_id"):
        dose = (g["basal_u"] + g["bolus_u"]).to_numpy()
        t = g["time"].to_numpy()
        for i in range(0, len(g), 37):
            inside = (t > t[i] - np.timedelta64(24, "h")) & (t <= t[i])
            want = dose[inside].sum() * 288 / inside.sum()
            assert f.loc[g.index[i], "tdd_u"] == pytest.approx(want, rel=1e-9)
    parts = split_chronological(frame, (0.5, 0.25, 0.25))
    full = add_features(frame)
    te = parts["test"]
    merged = te.merge(full[["subject_id", "time", "tdd_u"]], on=["subject_id", "time"])
    np.testing.assert_allclose(merged["tdd_u_x"], merged["tdd_u_y"], rtol=1e-12)


def test_bad_frames_raise_clear_errors():
    frame = toy_frame(1, 50)
    with pytest.raises(SchemaError, match="missing required column"):
        make_windows(frame.drop(columns=["bolus_u"]))
    with pytest.raises(SchemaError):
        make_windows("not a frame")  # type: ignore[arg-type]
    bad_tz = frame.copy()
    set_meta(bad_tz, DatasetMeta(timezone="Mars/Olympus"))
    with pytest.raises(SchemaError, match="time zone"):
        make_windows(bad_tz)
    assert len(make_windows(frame.iloc[:0])) == 0


def test_make_windows_is_fast_on_a_cohort():
    """30 subjects × 14 days (~121k slots): the issue asks for well under 2 s."""
    n = 14 * 288
    rng = np.random.default_rng(0)
    frame = pd.DataFrame(
        {
            "subject_id": np.repeat([f"s{i:02d}" for i in range(30)], n),
            "time": np.tile(T0 + SLOT * np.arange(n), 30),
            "glucose": np.where(rng.random(30 * n) < 0.05, np.nan, 120.0),
            "basal_u": 0.08,
            "bolus_u": 0.0,
            "carbs_g": 0.0,
        }
    )
    set_meta(frame, DatasetMeta(timezone="Europe/Berlin"))
    make_windows(frame.iloc[:2000])  # warm-up (imports, tz database)
    t = time.perf_counter()
    w = make_windows(frame)
    elapsed = time.perf_counter() - t
    assert len(w) > 100_000
    assert elapsed < 4.0, f"make_windows took {elapsed:.2f} s"  # ~0.4 s unloaded; 2 shared cores


# --------------------------------------------------------------------------- splits


def test_split_chronological_orders_and_separates():
    frame = toy_frame(3, 600, seed=7)
    parts = split_chronological(frame, (0.7, 0.15, 0.15))
    assert list(parts) == ["train", "val", "test"]
    assert sum(len(p) for p in parts.values()) == len(frame)
    for sid in frame["subject_id"].unique():
        tr, va, te = (p[p["subject_id"] == sid]["time"] for p in parts.values())
        assert tr.max() < va.min() and va.max() < te.min()
        assert len(tr) == pytest.approx(0.7 * (600 + 10 * int(sid[1:])), abs=1)
    cfg = WindowConfig()
    windows = {k: make_windows(p, cfg) for k, p in parts.items()}
    for k, w in windows.items():
        p = parts[k]
        for sid in np.unique(w.subject_id):
            times = p[p["subject_id"] == sid]["time"]
            o = pd.to_datetime(w.origin[w.subject_id == sid]).tz_localize("UTC")
            assert (o - 23 * SLOT >= times.min()).all() and (o + 12 * SLOT <= times.max()).all()
    # IOB computed on the whole record: the first test rows keep the insulin given before them
    full = add_features(frame)
    te = parts["test"]
    merged = te.merge(full[["subject_id", "time", "iob_u"]], on=["subject_id", "time"])
    np.testing.assert_array_equal(merged["iob_u_x"], merged["iob_u_y"])
    assert get_meta(te).timezone == get_meta(frame).timezone


def test_split_chronological_errors():
    frame = toy_frame(2, 100)
    with pytest.raises(SchemaError, match="sum to 1"):
        split_chronological(frame, (0.5, 0.2, 0.2))
    with pytest.raises(SchemaError, match="too little data"):
        split_chronological(frame, (0.7, 0.15, 0.15), config=WindowConfig())
    two = split_chronological(frame, (0.8, 0.2))
    assert list(two) == ["train", "test"]


def test_split_subjects_disjoint():
    frame = toy_frame(4, 60)
    train, test = split_subjects(frame, ["p1", "p3"])
    assert set(train["subject_id"]) == {"p0", "p2"}
    assert set(test["subject_id"]) == {"p1", "p3"}
    assert len(train) + len(test) == len(frame)
    assert get_meta(test).source == "toy"
    with pytest.raises(SchemaError, match="not in the frame"):
        split_subjects(frame, ["p9"])
    with pytest.raises(SchemaError, match="every subject"):
        split_subjects(frame, ["p0", "p1", "p2", "p3"])


# --------------------------------------------------------------------------- serving parity


def test_inputs_at_equals_make_windows_rows_exactly():
    frame = toy_frame(3, 400, seed=8, nan_frac=0.1, tz="Europe/Berlin")
    cfg = WindowConfig()
    w = make_windows(frame, cfg)
    rng = np.random.default_rng(0)
    for i in rng.choice(len(w), 25, replace=False):
        past, future = inputs_at(
            frame, cfg, pd.Timestamp(w.origin[i], tz="UTC"), subject_id=w.subject_id[i]
        )
        assert past.shape == (1, 24, len(PAST_FEATURES)) and future.shape == (1, 12, 5)
        assert np.array_equal(past[0], w.past[i])
        assert np.array_equal(future[0], w.future[i])
        # the same with the subject's rows only (what the runtime holds)
        sub = frame[frame["subject_id"] == w.subject_id[i]]
        p2, f2 = inputs_at(sub, cfg, pd.Timestamp(w.origin[i], tz="UTC"))
        assert np.array_equal(p2, past) and np.array_equal(f2, future)


def test_inputs_at_latest_origin_has_zero_future_inputs_and_clock_time():
    frame = toy_frame(1, 300, seed=9, tz="Asia/Tokyo")
    cfg = WindowConfig()
    past, future = inputs_at(frame, cfg)
    last_t = frame["time"].iloc[-1]
    assert past[0, -1, cfg.past_index("glucose")] == np.float32(frame["glucose"].ffill().iloc[-1])
    for name in ("basal_u", "bolus_u", "carbs_g"):
        assert (future[0, :, cfg.future_index(name)] == 0).all()
    local = pd.DatetimeIndex([last_t + (h + 1) * SLOT for h in range(12)]).tz_convert("Asia/Tokyo")
    minutes = local.hour * 60 + local.minute
    np.testing.assert_allclose(
        future[0, :, cfg.future_index("tod_sin")], np.sin(2 * np.pi * minutes / 1440), atol=1e-6
    )
    with pytest.raises(SchemaError, match="outside"):
        inputs_at(frame, cfg, last_t + SLOT)
    with pytest.raises(SchemaError, match="naive"):
        inputs_at(frame, cfg, pd.Timestamp("2024-03-01 10:00"))
    with pytest.raises(SchemaError, match="subject_id"):
        inputs_at(toy_frame(2, 100), cfg)


def test_windows_subset_and_concat():
    frame = toy_frame(2, 200)
    w = make_windows(frame)
    a, b = w.subset(np.arange(10)), w.subset(slice(10, None))
    c = Windows.concat([a, b])
    assert len(c) == len(w)
    assert np.array_equal(c.past, w.past) and np.array_equal(c.origin, w.origin)
    assert np.array_equal(
        w.subset(w.subject_id == "p1").subject_id, w.subject_id[w.subject_id == "p1"]
    )
    with pytest.raises(SchemaError):
        Windows.concat([a, make_windows(frame, WindowConfig(horizon_slots=6))])


def test_subject_time_zones_and_extra_past_columns():
    frame = toy_frame(2, 120, seed=10)
    frame["heart_rate"] = np.where(np.arange(len(frame)) % 7 == 0, np.nan, 70.0)
    set_meta(
        frame,
        DatasetMeta(timezone="UTC", extra={"subject_timezones": {"p1": "Asia/Kolkata"}}),
    )
    f = add_features(frame)
    for sid, tz in (("p0", "UTC"), ("p1", "Asia/Kolkata")):
        rows = f[f["subject_id"] == sid]
        local = rows["time"].dt.tz_convert(tz)
        minutes = local.dt.hour * 60 + local.dt.minute
        np.testing.assert_allclose(rows["tod_cos"], np.cos(2 * np.pi * minutes / 1440), atol=1e-12)
    cfg = WindowConfig(
        past_features=("glucose", "heart_rate", "iob_u"), future_features=("bolus_u",)
    )
    w = make_windows(frame, cfg)
    assert w.past.shape[2] == 3 and w.future.shape[2] == 1
    assert set(np.unique(w.past[:, :, 1])) <= {0.0, 70.0}  # NaN → 0
    with pytest.raises(SchemaError, match="neither computed"):
        make_windows(frame, WindowConfig(past_features=("glucose", "steps")))
