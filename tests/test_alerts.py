"""The alert engine: right alarm, once per episode, never a predicted low from a gap."""

import json
import math

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from serving.alerts import (
    ESCALATION,
    Alert,
    AlertConfigError,
    AlertEngine,
    AlertForecast,
    AlertKind,
    AlertThresholds,
    Severity,
    journal_sink,
)
from serving.types import CGMStatus, Reading

T0 = pd.Timestamp("2024-05-01 08:00", tz="UTC")
Q = (0.05, 0.5, 0.95)


def at(i: int) -> pd.Timestamp:
    return T0 + pd.Timedelta(minutes=5 * i)


def flat_forecast(t, lo, med=None, hi=None, source="model", h=12):
    med = lo + 20 if med is None else med
    hi = med + 20 if hi is None else hi
    g = np.column_stack([np.full(h, lo), np.full(h, med), np.full(h, hi)])
    return AlertForecast(t, g, Q, source=source)


def run(engine, values, *, start=0, forecasts=None):
    """Feed readings (NaN = none) one per 5-min cycle; return alerts per cycle index."""
    out = {}
    for k, v in enumerate(values):
        i = start + k
        r = None if v is None or (isinstance(v, float) and math.isnan(v)) else Reading(at(i), v)
        fc = forecasts(i, v) if forecasts else None
        got = engine.update(at(i), r, forecast=fc)
        if got:
            out[i] = got
    return out


def kinds(alerts_by_cycle):
    return [a.kind.value for v in alerts_by_cycle.values() for a in v]


# --------------------------------------------------------------------------- thresholds


def test_urgent_low_is_raised_at_once_and_covers_the_low():
    eng = AlertEngine()
    got = run(eng, [120, 100, 50])
    assert list(got) == [2]
    (a,) = got[2]
    assert a.kind is AlertKind.URGENT_LOW and a.severity is Severity.URGENT
    assert a.value == 50 and a.source == "cgm" and a.repeat == 0
    assert "50 mg/dL" in a.message


def test_low_then_urgent_low_is_an_escalation():
    eng = AlertEngine()
    got = run(eng, [90, 68, 60, 52])
    assert [(i, a.kind.value) for i, v in got.items() for a in v] == [
        (1, "low"),
        (3, "urgent_low"),
    ]
    assert got[3][0].detail == ESCALATION


def test_no_repeated_low_within_an_episode_and_hysteresis_ends_it():
    eng = AlertEngine()
    # wobbles around 70 but never recovers to 80: one episode
    got = run(eng, [90, 68, 72, 66, 75, 69, 78, 67])
    assert kinds(got) == ["low"]
    # recovers past 80 (70 + 10): the next dip is a new episode
    got = run(eng, [85, 90, 66], start=8)
    assert kinds(got) == ["low"]


def test_urgent_low_re_alerts_every_30_minutes_while_it_lasts():
    eng = AlertEngine()
    got = run(eng, [50] * 14)  # 65 minutes below 55
    urgent = [a for v in got.values() for a in v if a.kind is AlertKind.URGENT_LOW]
    assert [a.repeat for a in urgent] == [0, 1, 2]
    assert [a.time for a in urgent] == [at(0), at(6), at(12)]
    assert all(a.episode_start == at(0) for a in urgent)


def test_snooze_postpones_and_announces_a_low_that_lasts():
    eng = AlertEngine()
    run(eng, [100, 90])
    eng.snooze(AlertKind.LOW, 20, now=at(1))
    got = run(eng, [68, 66, 65, 64, 63], start=2)  # snoozed until at(5)
    assert list(got) == [5] and got[5][0].kind is AlertKind.LOW


def test_snooze_hides_an_episode_that_ends_within_it():
    eng = AlertEngine()
    eng.snooze("low", 60, now=at(0))
    got = run(eng, [100, 68, 66, 85, 95, 100, 100, 100, 100, 100, 100, 100, 100, 100])
    assert got == {}


def test_urgent_low_snooze_is_capped():
    eng = AlertEngine()
    until = eng.snooze(AlertKind.URGENT_LOW, 240, now=at(0))
    assert until == at(6)  # 30 minutes at most
    got = run(eng, [50] * 8)
    assert [i for i, v in got.items() for a in v if a.kind is AlertKind.URGENT_LOW] == [6]


def test_high_needs_thirty_minutes_above_250():
    eng = AlertEngine()
    got = run(eng, [240, 252, 255, 258, 260, 262, 262, 261, 258, 255])
    assert [(i, a.kind.value) for i, v in got.items() for a in v] == [(7, "high")]
    # dips to 245 (above the 240 hysteresis floor): same episode, no new alarm
    got = run(eng, [245] + [260] * 8, start=10)
    assert kinds(got) == []


def test_high_resets_when_a_reading_is_not_above():
    eng = AlertEngine()
    got = run(eng, [260, 260, 260, 250, 260, 260, 260, 260, 260])
    assert kinds(got) == []  # never 30 min in a row


def test_rapid_fall_from_the_trend():
    eng = AlertEngine()
    got = run(eng, [200, 200, 180, 160, 140, 130, 128, 127, 126])
    falls = [(i, a) for i, v in got.items() for a in v if a.kind is AlertKind.RAPID_FALL]
    assert len(falls) == 1
    assert falls[0][1].value <= -3
    assert "↓↓" in falls[0][1].message


def test_pump_fault_once_per_code_until_it_clears():
    eng = AlertEngine(AlertThresholds(signal_loss_min=None))  # no CGM in this test
    assert [a.detail for a in eng.update(at(0), pump_faults=["occlusion"])] == ["occlusion"]
    assert eng.update(at(1), pump_faults=["occlusion"]) == []
    assert eng.update(at(2)) == []  # no news from the pump: the fault stands
    got = eng.update(at(3), pump_faults=["occlusion", "low_reservoir"])
    assert [a.detail for a in got] == ["low_reservoir"]
    assert got[0].severity is Severity.URGENT and got[0].source == "pump"
    assert eng.update(at(4), pump_faults=[]) == []
    assert [a.detail for a in eng.update(at(5), pump_faults=["occlusion"])] == ["occlusion"]


# --------------------------------------------------------------------------- predicted


LOWER_Q_TWO_CYCLES = AlertThresholds(
    predicted_low_quantile=None, predicted_cycles=2, predicted_clear_cycles=1
)


def test_predicted_low_by_default_is_the_interpolated_0_4_quantile_on_one_cycle():
    eng = AlertEngine()
    # q0.4 lies 7/9 of the way from the 0.05 to the median column: 75.6, then 65.6 mg/dL
    # (the median itself, 70, never goes below 70)
    got = run(
        eng,
        [130, 125, 120, 115, 110],
        forecasts=lambda i, v: flat_forecast(at(i), *((50, 70) if i >= 3 else (60, 80))),
    )
    assert list(got) == [3] and got[3][0].kind is AlertKind.PREDICTED_LOW
    assert got[3][0].value == pytest.approx(50 + 20 * 7 / 9) and got[3][0].detail == "q0.4"


def test_forecast_column_interpolates_between_quantiles_and_clamps():
    fc = flat_forecast(at(0), 40, med=80, hi=120)
    np.testing.assert_allclose(fc.column(0.5), 80)
    np.testing.assert_allclose(fc.column(0.275), 60)  # half way from 0.05 to 0.5
    np.testing.assert_allclose(fc.column(0.7), 80 + 40 * 0.2 / 0.45)
    np.testing.assert_allclose(fc.column(0.01), 40)  # below the lowest: the lowest
    np.testing.assert_allclose(fc.column(None), 40)
    assert fc.quantile_used(0.01) == 0.05 and fc.quantile_used(0.4) == 0.4


def test_predicted_low_on_the_lower_quantile_for_two_cycles_says_its_source():
    eng = AlertEngine(LOWER_Q_TWO_CYCLES)
    got = run(
        eng,
        [130, 125, 120, 115, 110],
        forecasts=lambda i, v: flat_forecast(at(i), 60 if i >= 3 else 90, source="physio"),
    )
    assert list(got) == [4]
    (a,) = got[4]
    assert a.kind is AlertKind.PREDICTED_LOW and a.severity is Severity.URGENT
    assert a.source == "physio" and "physiological" in a.message
    assert a.value == 60 and a.eta_min == 5


def test_predicted_low_looks_only_within_the_horizon():
    eng = AlertEngine(LOWER_Q_TWO_CYCLES)
    lo = np.r_[np.full(6, 90.0), np.full(6, 50.0)]  # the dip is 35+ minutes away
    g = np.column_stack([lo, lo + 20, lo + 40])
    got = run(eng, [130, 125, 120, 115, 110], forecasts=lambda i, v: AlertForecast(at(i), g, Q))
    assert got == {}


def test_predicted_low_is_not_repeated_until_the_forecast_clears():
    eng = AlertEngine(LOWER_Q_TWO_CYCLES)
    lows = {2: 60, 3: 60, 4: 72, 5: 60, 6: 60, 7: 95, 8: 60, 9: 60}

    def fc(i, v):
        return flat_forecast(at(i), lows.get(i, 100))

    got = run(eng, [130] * 10, forecasts=fc)
    pred = [i for i, v in got.items() for a in v if a.kind is AlertKind.PREDICTED_LOW]
    assert pred == [3, 9]  # 72 is inside the 70–75 band; 95 clears it


def test_predicted_low_clears_only_after_enough_clear_cycles():
    eng = AlertEngine()  # median, one cycle to alert, two clear cycles to end
    meds = {2: 60, 3: 95, 4: 60, 5: 95, 6: 95, 7: 60}
    got = run(eng, [130] * 8, forecasts=lambda i, v: flat_forecast(at(i), 40, med=meds.get(i, 95)))
    pred = [i for i, v in got.items() for a in v if a.kind is AlertKind.PREDICTED_LOW]
    assert pred == [2, 7]  # one clear cycle (3) is not enough; two (5, 6) are


def test_a_low_that_arrives_ends_its_prediction():
    eng = AlertEngine()
    fc = lambda i, v: flat_forecast(at(i), 40, med=60)  # noqa: E731 — always predicting a low
    got = run(eng, [100, 90, 80, 68, 66, 75, 85, 90, 88], forecasts=fc)
    kinds_at = [(i, a.kind.value) for i, v in got.items() for a in v]
    # predicted at 2; the low at 3 takes over; after recovery (85) a new prediction speaks
    assert kinds_at == [(2, "predicted_low"), (3, "low"), (6, "predicted_low")]


def test_signal_loss_instead_of_predicted_low_across_a_gap():
    eng = AlertEngine(LOWER_Q_TWO_CYCLES)
    nan = float("nan")
    values = [150, 148, 146] + [nan] * 5 + [140, 138, 136, 134]

    def fc(i, v):  # the forecaster, fed carried-forward data, insists on a low every cycle
        return flat_forecast(at(i), 50)

    got = run(eng, values, forecasts=fc)
    flat = [(i, a.kind.value) for i, v in got.items() for a in v]
    # 3 readings span 10 min at cycle 2: the 1st low forecast counts, the gap voids it;
    # after the gap, three readings (cycles 8-10) are needed before counting starts again
    assert (6, "signal_loss") in flat  # 20 min after the last reading
    assert all(k != "predicted_low" for i, k in flat if i < 11)
    assert flat[-1] == (11, "predicted_low")
    assert eng.active().count(AlertKind.SIGNAL_LOSS) == 0  # readings are back


def test_loop_clock_jump_reports_the_hole_and_no_prediction():
    eng = AlertEngine()
    run(eng, [150, 148, 146, 144], forecasts=lambda i, v: flat_forecast(at(i), 120))
    # the next cycle comes 2 hours later (suspended computer, clock set forward)
    got = eng.update(at(28), Reading(at(28), 140), forecast=flat_forecast(at(28), 50))
    got += eng.update(at(29), Reading(at(29), 138), forecast=flat_forecast(at(29), 50))
    assert [a.kind for a in got] == [AlertKind.SIGNAL_LOSS]
    assert got[0].value == pytest.approx(125)  # minutes since the last reading


def test_sensor_clock_going_backwards_voids_the_trend():
    eng = AlertEngine()
    run(eng, [150, 148, 146, 144], forecasts=lambda i, v: flat_forecast(at(i), 120))
    back = at(4) - pd.Timedelta(hours=1)
    got = eng.update(at(4), Reading(back, 142), forecast=flat_forecast(at(4), 50))
    got += eng.update(
        at(5), Reading(back + pd.Timedelta(minutes=5), 140), forecast=flat_forecast(at(5), 50)
    )
    assert got == []
    assert eng.last_trend.arrow is None


def test_repeated_delivery_of_the_same_reading_is_not_a_fresh_signal():
    eng = AlertEngine()
    r = Reading(at(0), 120)
    got = []
    for i in range(6):  # a stuck receiver keeps handing over the 08:00 reading
        got += eng.update(at(i), r)
    assert [a.kind for a in got] == [AlertKind.SIGNAL_LOSS]


def test_warm_up_suppresses_glucose_alerts_and_signal_loss():
    eng = AlertEngine()
    got = []
    for i in range(24):  # two hours of warm-up, forecasts saying "low"
        r = Reading(at(i), float("nan"), status=CGMStatus.WARMUP)
        got += eng.update(at(i), r, forecast=flat_forecast(at(i), 40))
    assert got == []
    # first real reading: the threshold speaks at once, the forecast not yet (no trend)
    got = eng.update(at(24), Reading(at(24), 65), forecast=flat_forecast(at(24), 40))
    assert [a.kind for a in got] == [AlertKind.LOW]


def test_warm_up_ends_a_running_episode():
    eng = AlertEngine()
    run(eng, [60, 60])
    eng.update(at(2), Reading(at(2), float("nan"), status=CGMStatus.WARMUP))
    assert AlertKind.LOW not in eng.active()


def test_sensor_errors_count_towards_signal_loss():
    eng = AlertEngine()
    got = []
    for i in range(6):
        got += eng.update(at(i), Reading(at(i), float("nan"), status=CGMStatus.ERROR))
    assert [a.kind for a in got] == [AlertKind.SIGNAL_LOSS]
    assert got[0].time == at(4)


# --------------------------------------------------------------------------- plumbing


def test_every_alert_goes_to_the_sink_and_a_failing_sink_loses_none():
    seen: list[Alert] = []
    eng = AlertEngine(sink=seen.append)
    got = run(eng, [90, 60, 50])
    assert [a for v in got.values() for a in v] == seen

    def broken(_):
        raise OSError("disk full")

    eng2 = AlertEngine(sink=broken)
    got2 = eng2.update(at(0), Reading(at(0), 50))
    assert [a.kind for a in got2] == [AlertKind.URGENT_LOW]
    assert len(eng2.sink_errors) == 1


def test_alert_to_dict_is_json():
    eng = AlertEngine()
    (a,) = eng.update(at(0), Reading(at(0), 50))
    d = json.loads(json.dumps(a.to_dict(), allow_nan=False))
    assert d["kind"] == "urgent_low" and d["severity"] == "urgent" and d["eta_min"] is None


def test_journal_sink_writes_alert_events(tmp_path):
    journal = pytest.importorskip("serving.journal")
    with journal.Journal(tmp_path / "j.sqlite") as j:
        eng = AlertEngine(sink=journal_sink(j, patient="adult#001"))
        run(eng, [100, 60, 50])
        ev = j.events(kind="alert")
    assert [json.loads(d)["kind"] for d in ev["detail"]] == ["low", "urgent_low"]
    assert (ev["patient"] == "adult#001").all()


def test_restart_from_state_does_not_re_alarm():
    eng = AlertEngine()
    run(eng, [90, 65, 62])
    state = json.loads(json.dumps(eng.state_dict()))
    eng2 = AlertEngine.from_state(state)
    assert run(eng2, [63, 64], start=3) == {}
    assert AlertKind.LOW in eng2.active()


@pytest.mark.parametrize(
    "bad",
    [
        {"urgent_low_mgdl": 0},
        {"low_mgdl": 50},
        {"high_mgdl": 60},
        {"predicted_cycles": 0},
        {"hysteresis_mgdl": -1},
        {"realert_min": {"lowish": 10}},
        {"predicted_low_quantile": 1.5},
    ],
)
def test_contradictory_settings_are_refused(bad):
    with pytest.raises((AlertConfigError, ValueError)):
        AlertThresholds(**bad)


def test_thresholds_round_trip_and_reject_unknown_keys():
    th = AlertThresholds(low_mgdl=75, realert_min={"high": 120})
    assert AlertThresholds.from_dict(th.to_dict()) == th
    with pytest.raises(AlertConfigError):
        AlertThresholds.from_dict({"lowest": 3})


def test_per_user_realert_for_high():
    eng = AlertEngine(AlertThresholds(high_sustain_min=0, realert_min={"high": 60}))
    got = run(eng, [300] * 13)
    highs = [i for i, v in got.items() for a in v if a.kind is AlertKind.HIGH]
    assert highs == [0, 12]


# --------------------------------------------------------------------------- properties

glucose_seq = st.lists(
    st.one_of(st.floats(40, 400), st.just(float("nan"))), min_size=1, max_size=60
)


@settings(max_examples=50, deadline=None)
@given(values=glucose_seq, lows=st.lists(st.floats(30, 200), min_size=60, max_size=60))
def test_one_low_alarm_per_episode(values, lows):
    """Low alerts never outnumber recoveries past the hysteresis band (+1)."""
    eng = AlertEngine()
    got = run(eng, values, forecasts=lambda i, v: flat_forecast(at(i), lows[i]))
    n_low = sum(1 for v in got.values() for a in v if a.kind is AlertKind.LOW)
    recoveries, below = 0, False
    for v in values:
        if v < 70:
            below = True
        elif v >= 80 and below:
            recoveries += 1
            below = False
    assert n_low <= recoveries + 1


@settings(max_examples=50, deadline=None)
@given(values=glucose_seq, lows=st.lists(st.floats(30, 200), min_size=60, max_size=60))
def test_predictions_only_on_fresh_continuous_data(values, lows):
    """A predicted alert only ever comes on a cycle with a reading and 3 readings in 15 min."""
    eng = AlertEngine()
    got = run(eng, values, forecasts=lambda i, v: flat_forecast(at(i), lows[i], lows[i]))
    for i, alerts in got.items():
        for a in alerts:
            if a.kind in (AlertKind.PREDICTED_LOW, AlertKind.PREDICTED_HIGH):
                window = values[max(0, i - 3) : i + 1]
                assert not math.isnan(values[i])
                assert sum(not math.isnan(v) for v in window) >= 3


def test_forecast_from_a_predictor_batch_keeps_the_fallback_source():
    class Batch:  # the shape of serving.predictor.Forecast
        glucose = np.stack([np.full((12, 3), 100.0), np.full((12, 3), 50.0)])
        fallback = np.array([False, True])

    fc = AlertForecast.from_prediction(at(0), Batch(), Q, row=1)
    assert fc.source == "physio" and fc.glucose.shape == (12, 3)
    assert AlertForecast.from_prediction(at(0), Batch(), Q).source == "model"
    with pytest.raises(ValueError):
        AlertForecast(at(0), np.zeros((12, 2)), Q)


def test_pump_status_fault_codes_plug_in_directly():
    from serving.hal.pump import PumpFault

    eng = AlertEngine(AlertThresholds(signal_loss_min=None))
    assert eng.update(at(0), pump_faults=[PumpFault.NONE]) == []
    (a,) = eng.update(at(1), pump_faults=[PumpFault.OCCLUSION])
    assert a.detail == "occlusion" and a.message == "Pump fault: occlusion"
    assert eng.update(at(2), pump_faults=[PumpFault.NONE]) == []
    assert AlertKind.PUMP_FAULT not in eng.active()


# --------------------------------------------------------------------------- the default rule


def _falling_forecast(i, v, *, spread=15.0, roc=-1.0):
    """Median = the reading continued at `roc` mg/dL/min; q0.05 / q0.95 `spread` around it."""
    med = v + roc * 5.0 * np.arange(1, 13)
    return AlertForecast(at(i), np.column_stack([med - spread, med, med + spread]), Q)


def test_default_rule_warns_a_steady_fall_at_least_20_minutes_ahead():
    # 1 mg/dL/min from 120: the first reading below 70 comes at cycle 11 (65 mg/dL)
    values = [120.0 - 5 * k for k in range(14)]
    got = run(AlertEngine(), values, forecasts=_falling_forecast)
    pred = [i for i, v in got.items() for a in v if a.kind is AlertKind.PREDICTED_LOW]
    onset = next(i for i, v in enumerate(values) if v < 70)
    assert pred and (onset - pred[0]) * 5 >= 20
    assert any(a.kind is AlertKind.LOW for a in got.get(onset, []))


def test_standing_prediction_is_said_again_after_20_minutes_only_while_it_stands():
    eng = AlertEngine()
    got = run(eng, [100] * 12, forecasts=lambda i, v: flat_forecast(at(i), 50, med=70))
    pred = [i for i, v in got.items() for a in v if a.kind is AlertKind.PREDICTED_LOW]
    assert pred == [2, 6, 10]  # evaluable from the 3rd reading, then every 20 minutes
    assert [a.repeat for i in pred for a in got[i]] == [0, 1, 2]
    # a forecast that no longer predicts the low is not repeated, even before it clears
    eng = AlertEngine()
    got = run(
        eng,
        [100] * 12,
        forecasts=lambda i, v: flat_forecast(at(i), 50 if i < 4 else 62, med=70 if i < 4 else 80),
    )
    assert [i for i in got] == [2]
    once = AlertEngine(AlertThresholds(predicted_low_realert_min=None))
    got = run(once, [100] * 12, forecasts=lambda i, v: flat_forecast(at(i), 50, med=70))
    assert list(got) == [2]


def test_forecast_that_barely_dips_does_not_alert_on_the_median_alone():
    # q0.4 of (65, 95, 115) is 88.3: a median at 95 with a wide low tail is no "low soon"
    got = run(AlertEngine(), [100] * 8, forecasts=lambda i, v: flat_forecast(at(i), 65, med=95))
    assert got == {}


def test_gap_gives_signal_loss_and_no_prediction_with_the_defaults():
    nan = float("nan")
    values = [120, 115, 110] + [nan] * 5 + [100, 95]
    got = run(AlertEngine(), values, forecasts=lambda i, v: flat_forecast(at(i), 40, med=50))
    flat = [(i, a.kind.value) for i, v in got.items() for a in v]
    assert (6, "signal_loss") in flat
    # after the gap, two readings do not make a trend: the low forecast is not believed
    assert [k for i, k in flat if i >= 3] == ["signal_loss"]


def test_realert_setting_is_validated_and_round_trips():
    with pytest.raises(AlertConfigError):
        AlertThresholds(predicted_low_realert_min=0)
    th = AlertThresholds(predicted_low_realert_min=None)
    assert AlertThresholds.from_dict(th.to_dict()) == th
    assert AlertThresholds().realert_for(AlertKind.PREDICTED_LOW) == 20.0
    assert th.realert_for(AlertKind.PREDICTED_LOW) is None
    user = AlertThresholds(realert_min={"predicted_low": 45})
    assert user.realert_for(AlertKind.PREDICTED_LOW) == 45.0
