"""The grid: nearest slot, duplicates, conservation of insulin and carbs, basal overrides."""

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from forecast.preprocess import (
    Events,
    basal_doses,
    detect_units,
    spread,
    table,
    to_grid,
)
from forecast.schema import DataReport, DatasetMeta, UnitsError, get_meta

T0 = pd.Timestamp("2024-03-01 00:00", tz="UTC")


def at(seconds) -> pd.Series:
    return pd.Series(T0 + pd.to_timedelta(np.asarray(seconds, dtype=np.int64), unit="s"))


def grid(ev: Events, readings_in: int = 0):
    rep = DataReport(readings_in=readings_in)
    return to_grid(ev, rep, DatasetMeta(source="test", timezone="Europe/Paris")), rep


# --------------------------------------------------------------------------- readings


def test_reading_goes_to_nearest_slot_and_closest_duplicate_wins():
    ev = Events()
    ev.add(
        "readings",
        table(
            "readings",
            subject_id="a",
            time=at([3 * 60, 6 * 60, 20 * 60, 22 * 60 + 29]),
            glucose=[100.0, 110.0, 120.0, 130.0],
            file="f.csv",
            record=["r1", "r2", "r3", "r4"],
        ),
    )
    f, rep = grid(ev, readings_in=4)
    g = f.set_index("time")["glucose"]
    # 00:03 and 00:06 both round to 00:05; 00:06 is closer (1 min) and is kept
    assert g[T0 + pd.Timedelta("5min")] == 110.0
    assert g[T0 + pd.Timedelta("20min")] == 120.0
    assert g[T0 + pd.Timedelta("20min")] == 120.0
    # 00:22:29 is nearer 00:20 than 00:25 but 00:20 already holds a closer reading
    assert [r.record for r in rep.rejected] == ["r1", "r4"]
    assert {r.reason for r in rep.rejected} == {"duplicate"}
    assert rep.readings_kept == 2
    assert rep.readings_kept + rep.readings_rejected == rep.readings_in
    # glucose is never interpolated: the slots between stay NaN
    assert np.isnan(g[T0 + pd.Timedelta("10min")])
    assert get_meta(f).timezone == "Europe/Paris"


def test_half_slot_boundary_is_deterministic():
    # exactly 2.5 min after a slot label belongs to the next slot: [t-2.5, t+2.5)
    ev = Events()
    ev.add("readings", table("readings", subject_id="a", time=at([150]), glucose=[99.0]))
    f, _ = grid(ev, 1)
    assert f["time"].iloc[0] == T0 + pd.Timedelta("5min")


def test_grid_is_contiguous_per_subject_and_sorted():
    ev = Events()
    ev.add(
        "readings",
        table(
            "readings",
            subject_id=["b", "a", "a"],
            time=at([0, 0, 3 * 3600]),
            glucose=[100.0, 101.0, 102.0],
        ),
    )
    ev.add("doses", table("doses", subject_id="b", start=at([7200]), units=[1.0], column="bolus_u"))
    f, _ = grid(ev, 3)
    for _, g in f.groupby("subject_id"):
        assert (g["time"].diff().dropna() == pd.Timedelta("5min")).all()
    assert f.groupby("subject_id").size().to_dict() == {"a": 37, "b": 25}
    assert f["glucose"].notna().sum() == 3


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.tuples(st.sampled_from(["a", "b"]), st.integers(0, 6 * 3600)),
        min_size=1,
        max_size=60,
    )
)
def test_property_readings_move_at_most_half_a_slot_and_all_are_accounted(items):
    sid = [s for s, _ in items]
    secs = np.array([t for _, t in items])
    values = 40.0 + np.arange(len(items))  # unique, so every value identifies its reading
    ev = Events()
    ev.add(
        "readings",
        table(
            "readings",
            subject_id=sid,
            time=at(secs),
            glucose=values,
            record=[str(i) for i in range(len(items))],
        ),
    )
    f, rep = grid(ev, len(items))
    kept = f.dropna(subset=["glucose"])
    for _, row in kept.iterrows():
        i = int(row["glucose"] - 40.0)
        assert row["subject_id"] == sid[i]
        moved = abs((row["time"] - at([secs[i]]).iloc[0]).total_seconds())
        assert moved <= 150.0
        # no rejected reading of the same slot was closer to the slot label
        for r in rep.rejected:
            j = int(r.record)
            if (
                sid[j] == sid[i]
                and abs((row["time"] - at([secs[j]]).iloc[0]).total_seconds()) < 150
            ):
                assert abs((row["time"] - at([secs[j]]).iloc[0]).total_seconds()) >= moved
    assert rep.readings_kept + rep.readings_rejected == len(items)
    assert all(r.reason == "duplicate" and r.field == "glucose" for r in rep.rejected)


# --------------------------------------------------------------------------- insulin & carbs


def test_extended_bolus_is_spread_by_overlap():
    idx, k, amt = spread(
        np.array([0], dtype=np.int64), np.array([30 * 60 * 10**9], dtype=np.int64), np.array([3.0])
    )
    # 30 min from a slot label: half slot, five full slots, half slot (slots are centred)
    assert np.allclose(amt, [0.25, 0.5, 0.5, 0.5, 0.5, 0.5, 0.25])
    assert list(k) == list(range(7))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    doses=st.lists(
        st.tuples(
            st.sampled_from(["a", "b"]),
            st.integers(0, 12 * 3600),  # start, s
            st.integers(0, 8 * 3600),  # duration, s (0 = instantaneous)
            st.floats(0.0, 20.0, allow_nan=False),
        ),
        max_size=25,
    ),
    carbs=st.lists(
        st.tuples(
            st.sampled_from(["a", "b"]),
            st.integers(0, 12 * 3600),
            st.one_of(st.none(), st.floats(0.0, 150.0, allow_nan=False)),
        ),
        max_size=15,
    ),
)
def test_property_grid_conserves_insulin_and_carbs(doses, carbs):
    ev = Events()
    if doses:
        s = np.array([d[1] for d in doses])
        e = s + np.array([d[2] for d in doses])
        ev.add(
            "doses",
            table(
                "doses",
                subject_id=[d[0] for d in doses],
                start=at(s),
                end=at(e),
                units=[d[3] for d in doses],
                column="bolus_u",
            ),
        )
    if carbs:
        ev.add(
            "carbs",
            table(
                "carbs",
                subject_id=[c[0] for c in carbs],
                time=at([c[1] for c in carbs]),
                grams=[np.nan if c[2] is None else c[2] for c in carbs],
            ),
        )
    f, _ = grid(ev)
    for who in ("a", "b"):
        sub = f[f["subject_id"] == who]
        want_u = sum(d[3] for d in doses if d[0] == who)
        assert sub["bolus_u"].sum() == pytest.approx(want_u, rel=1e-12, abs=1e-12)
        want_g = sum(c[2] for c in carbs if c[0] == who and c[2] is not None)
        assert np.nansum(sub["carbs_g"]) == pytest.approx(want_g, rel=1e-12, abs=1e-12)
        # a slot is NaN only if it holds meals and none of known size
        unknown_slots = {round((c[1] + 150) // 300) for c in carbs if c[0] == who and c[2] is None}
        known_slots = {
            round((c[1] + 150) // 300) for c in carbs if c[0] == who and c[2] is not None
        }
        k = ((sub["time"] - T0).dt.total_seconds() // 300).astype(int).to_numpy()
        nan_slots = set(k[sub["carbs_g"].isna().to_numpy()])
        assert nan_slots == unknown_slots - known_slots
    if carbs:
        assert (f["meal_announced"].fillna(0) >= 0).all()
        assert f["meal_announced"].sum() == len({(c[0], (c[1] + 150) // 300) for c in carbs})


def _brute_force_basal(rates):
    """Delivered units by integrating the effective rate second by second."""
    if not rates:
        return 0.0
    horizon = max(r[2] for r in rates) + 1
    sec = np.arange(horizon)
    total = np.zeros(horizon)

    def active(rows):
        rate = np.full(horizon, np.nan)
        best = np.full(horizon, -1)
        for s, e, value in rows:
            # the newest start at or before t wins (ties: later in input order)
            newer = (sec >= s) & (s >= best)
            best = np.where(newer, s, best)
            rate = np.where(newer, np.where(sec < e, value, np.nan), rate)
        return rate

    sched = active([(r[1], r[2], r[3]) for r in rates if not r[0]])
    temp = active([(r[1], r[2], r[3]) for r in rates if r[0]])
    total = np.where(np.isfinite(temp), temp, np.where(np.isfinite(sched), sched, 0.0))
    return float(total.sum() / 3600.0)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.tuples(
            st.booleans(),  # temp?
            st.integers(0, 4 * 3600),  # start, s
            st.integers(0, 3 * 3600),  # duration, s
            st.floats(0.0, 5.0, allow_nan=False),  # U/h
        ),
        min_size=1,
        max_size=12,
    )
)
def test_property_basal_resolution_matches_brute_force_and_grid_conserves_it(raw):
    rates = [(t, s, s + d, r) for t, s, d, r in raw]
    ev = Events()
    ev.add(
        "rates",
        table(
            "rates",
            subject_id="a",
            start=at([r[1] for r in rates]),
            end=at([r[2] for r in rates]),
            rate_u_h=[r[3] for r in rates],
            temp=[r[0] for r in rates],
        ),
    )
    want = _brute_force_basal(rates)
    doses = basal_doses(ev.rates)
    assert doses["units"].sum() == pytest.approx(want, rel=1e-9, abs=1e-12)
    f, _ = grid(ev)
    assert f["basal_u"].sum() == pytest.approx(want, rel=1e-9, abs=1e-12)


def test_temp_basal_overrides_and_percent_scales_the_schedule():
    h = 3600
    ev = Events()
    ev.add(
        "rates",
        table(
            "rates",
            subject_id="a",
            start=at([0, 2 * h, h, 3 * h]),
            end=at([4 * h, 4 * h, 1.5 * h, 3.5 * h]),
            rate_u_h=[1.0, 2.0, 0.0, np.nan],
            percent=[np.nan, np.nan, np.nan, -50.0],
            temp=[False, False, True, True],
        ),
    )
    # 0-1 h: 1 U/h; 1-1.5 h: suspended; 1.5-2 h: 1 U/h; 2-3 h: 2 U/h;
    # 3-3.5 h: 50 % of 2 U/h; 3.5-4 h: 2 U/h
    want = 1.0 + 0.0 + 0.5 + 2.0 + 0.5 + 1.0
    assert basal_doses(ev.rates)["units"].sum() == pytest.approx(want)


def test_percent_temp_without_schedule_is_reported_not_invented():
    ev = Events()
    ev.add(
        "rates",
        table(
            "rates",
            subject_id="a",
            start=at([0]),
            end=at([1800]),
            percent=[50.0],
            temp=[True],
        ),
    )
    rep = DataReport()
    assert basal_doses(ev.rates, rep)["units"].sum() == 0.0
    assert any("30 min of percent temp basal" in n for n in rep.notes)


def test_value_columns_follow_their_rules():
    ev = Events()
    ev.add(
        "values",
        table(
            "values",
            subject_id="a",
            start=at([0, 60, 0, 1200]),
            end=at([0, 60, 900, 1200]),
            column=["finger_stick", "finger_stick", "exercise", "hypo_event"],
            value=[100.0, 120.0, 6.0, 1.0],
        ),
    )
    ev.add(
        "texts",
        table(
            "texts", subject_id="a", time=at([0, 30]), column="insulin_sc", text=["x 1 U", "y 2 U"]
        ),
    )
    f, _ = grid(ev)
    assert f["finger_stick"].iloc[0] == 110.0  # mean of two sticks in one slot
    assert f["finger_stick"].isna().sum() == len(f) - 1
    assert list(f["exercise"]) == [6.0, 6.0, 6.0, 6.0, 0.0]  # span 0-15 min, centred slots
    assert list(f["hypo_event"]) == [0, 0, 0, 0, 1.0]
    assert f["insulin_sc"].iloc[0] == "x 1 U; y 2 U"
    assert str(f["insulin_sc"].dtype) == "string"


def test_empty_events_give_an_empty_valid_frame():
    f, rep = grid(Events())
    assert len(f) == 0 and rep.readings_kept == 0
    assert list(f.columns[:6]) == ["subject_id", "time", "glucose", "basal_u", "bolus_u", "carbs_g"]


def test_table_refuses_naive_times():
    with pytest.raises(ValueError, match="naive"):
        table("readings", subject_id="a", time=[pd.Timestamp("2024-01-01")], glucose=[100.0])


# --------------------------------------------------------------------------- units


def test_units_detection_decides_only_when_the_values_do():
    assert detect_units([90, 150, 240]) == "mg/dL"
    assert detect_units([5.5, 7.1, 12.0]) == "mmol/L"
    with pytest.raises(UnitsError, match="--units") as e:
        detect_units([22, 25, 30], file="x.csv")
    assert e.value.file == "x.csv" and e.value.field == "glucose"
    with pytest.raises(UnitsError, match="look like mmol/L"):
        detect_units([5.5, 6.0, 7.0], declared="mg/dL")
    assert detect_units([22, 25], declared="mg/dL") == "mg/dL"
