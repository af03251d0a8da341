"""Alert evaluation: episodes, hand-checkable scores, and a replay with known answers."""

import json

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from forecast.windows import WindowConfig
from serving.insilico.alert_eval import (
    HIGH_EPISODE,
    LOW_EPISODE,
    EpisodeRule,
    evaluate_alerts,
    find_episodes,
    known_future,
    score_alerts,
)

nan = float("nan")


def episodes(values, rule=LOW_EPISODE):
    g = np.asarray(values, dtype=float)
    return find_episodes(np.arange(len(g)) * 5.0, g, rule).tolist()


# --------------------------------------------------------------------------- episodes


def test_one_or_two_readings_below_are_not_an_episode_three_are():
    # the consensus CGM episode: >= 15 minutes, i.e. 3 consecutive 5-minute readings
    assert episodes([100, 65, 100]) == []
    assert episodes([100, 65, 66, 100]) == []  # a 10-minute dip (noise, mostly) is no episode
    assert episodes([100, 65, 66, 67, 100]) == [[5.0, 15.0]]
    assert LOW_EPISODE.min_readings == 3
    assert episodes([100, 65, 66, 100], EpisodeRule(min_readings=2)) == [[5.0, 10.0]]


def test_runs_close_together_are_one_episode():
    # 20 minutes apart, even with a recovery to 85 in between
    assert episodes([100, 65, 66, 64, 85, 85, 85, 66, 65, 64, 100]) == [[5.0, 45.0]]


def test_runs_without_recovery_are_one_episode_however_far_apart():
    g = [100, 65, 66, 64] + [75] * 10 + [66, 65, 64, 100]  # 50 min at 75: never back to 80
    assert episodes(g) == [[5.0, 80.0]]


def test_separated_and_recovered_runs_are_two_episodes():
    g = [100, 65, 66, 64] + [85] * 10 + [66, 65, 64, 100]
    assert episodes(g) == [[5.0, 15.0], [70.0, 80.0]]


def test_a_long_gap_breaks_a_run():
    assert episodes([100, 65, nan, nan, nan, 66, 67, 100]) == []  # 20 min between readings
    assert episodes([100, 65, nan, nan, 66, 67, 100]) == [[5.0, 25.0]]  # 15 min still counts


def test_high_episodes_mirror_lows():
    g = [200, 260, 255, 258, 245, 260, 265, 262, 200] + [200] * 8 + [270, 280, 275]
    assert episodes(g, HIGH_EPISODE) == [[5.0, 35.0], [85.0, 95.0]]


@settings(max_examples=60, deadline=None)
@given(
    g=st.lists(st.one_of(st.floats(40, 120), st.just(nan)), min_size=0, max_size=80),
    k=st.integers(1, 4),
)
def test_episodes_are_ordered_disjoint_and_start_below(g, k):
    rule = EpisodeRule(min_readings=k)
    ep = np.asarray(episodes(g, rule)).reshape(-1, 2)
    arr = np.asarray(g, dtype=float)
    assert (ep[:, 0] <= ep[:, 1]).all()
    assert (ep[1:, 0] > ep[:-1, 1]).all()
    for onset, end in ep:
        assert arr[int(onset // 5)] < 70 and arr[int(end // 5)] < 70
    assert len(ep) <= int(np.sum(arr < 70)) // k


# --------------------------------------------------------------------------- scoring


def test_score_by_hand():
    eps = {"s1": np.array([[100.0, 120.0], [300.0, 320.0]])}
    # 75: warns ep1 (lead 25); 200: false; 310: during ep2 (late, not false)
    s = score_alerts({"s1": np.array([75.0, 200.0, 310.0])}, eps, days=2.0, window_min=30)
    assert (s.episodes, s.warned, s.alerts, s.false_alerts) == (2, 1, 3, 1)
    assert s.sensitivity == 0.5 and s.lead_min == 25.0 and s.false_per_day == 0.5


def test_alert_at_onset_is_lead_zero_and_too_early_is_false():
    eps = {"s1": np.array([[100.0, 120.0]])}
    s = score_alerts({"s1": np.array([100.0])}, eps, days=1.0)
    assert (s.sensitivity, s.lead_min, s.false_alerts) == (1.0, 0.0, 0)
    s = score_alerts({"s1": np.array([65.0])}, eps, days=1.0)  # 35 min before: too early
    assert (s.sensitivity, s.false_alerts) == (0.0, 1)
    assert np.isnan(s.lead_min)


def test_episodes_before_the_replay_could_warn_are_not_scored():
    eps = {"s1": np.array([[10.0, 20.0], [300.0, 310.0]])}
    s = score_alerts({"s1": np.array([0.0])}, eps, days=1.0, scored_from={"s1": 150.0})
    assert (s.episodes, s.warned, s.false_alerts) == (1, 0, 0)


def test_no_episodes_no_sensitivity():
    s = score_alerts({"s1": np.array([10.0])}, {}, days=1.0)
    assert np.isnan(s.sensitivity) and s.false_alerts == 1
    assert json.loads(json.dumps(s.to_dict()))["sensitivity"] is None


# --------------------------------------------------------------------------- replay


class Extrapolate:
    """Last reading + last 5-minute change, continued; every quantile the same."""

    config = WindowConfig()
    quantiles = (0.05, 0.5, 0.95)

    def predict(self, past, future):
        g = past[:, :, self.config.past_index("glucose")]
        step = g[:, -1] - g[:, -2]
        med = g[:, -1:] + step[:, None] * np.arange(1, self.config.horizon_slots + 1)
        return np.repeat(med[:, :, None], 3, axis=2).astype(np.float32)


def synthetic_days(days=3):
    """Per day: two lows (150 → 50 at 2 mg/dL/min) and one near miss (150 → 80, flat)."""
    g = np.full(288 * days, 150.0)
    low = np.r_[np.arange(140, 49, -10), [50, 50, 50], np.arange(60, 151, 10)]
    miss = np.r_[np.arange(140, 79, -10), np.full(12, 80.0), np.arange(90, 151, 10)]
    for d in range(days):
        for start, shape in ((60, low), (130, miss), (200, low)):
            i = 288 * d + start
            g[i : i + len(shape)] = shape
    return pd.DataFrame(
        {
            "subject_id": "syn",
            "time": pd.date_range("2024-01-01", periods=len(g), freq="5min", tz="UTC"),
            "glucose": g,
            "basal_u": 0.1,
            "bolus_u": 0.0,
            "carbs_g": 0.0,
        }
    )


def test_replay_with_known_answers():
    from serving.alerts import AlertThresholds

    two = AlertThresholds(
        predicted_low_quantile=None, predicted_cycles=2, predicted_low_realert_min=None
    )
    res = evaluate_alerts(synthetic_days(3), Extrapolate(), thresholds=two)
    pl, tl = res["predicted_low"], res["threshold_low"]
    # extrapolation reaches < 70 within 30 min at 120 mg/dL, confirmed one cycle later at
    # 110: 25 minutes before the first reading below 70 (60 mg/dL)
    assert (pl["episodes"], pl["warned"], pl["lead_min"]) == (6, 6, 25.0)
    assert pl["sensitivity"] == 1.0
    # each near miss (150 → 80) draws one alert that no low follows
    assert (pl["alerts"], pl["false_alerts"]) == (9, 3)
    assert res["days"] == 3.0 and pl["false_per_day"] == 1.0
    # the threshold alert fires at onset (the urgent low at 50 escalates it, not counted)
    assert (tl["sensitivity"], tl["lead_min"], tl["false_per_day"]) == (1.0, 0.0, 0.0)
    assert res["predicted_high"]["episodes"] == 0
    assert res["forecast_sources"] == {"model": res["forecasts"]}
    # the default rule (one cycle) alerts at 120 mg/dL: 30 minutes ahead; the prediction
    # still stands 20 minutes later (at 80 mg/dL) and is said once more — before each low
    # and before each near miss, whose second alarm is false too
    res = evaluate_alerts(synthetic_days(3), Extrapolate())
    pl = res["predicted_low"]
    assert (pl["sensitivity"], pl["lead_min"], pl["false_alerts"]) == (1.0, 30.0, 6)
    assert pl["alerts"] == 2 * 6 + 2 * 3


def test_a_gap_before_a_low_gives_signal_loss_not_a_prediction():
    f = synthetic_days(1)
    f.loc[52:57, "glucose"] = nan  # 30 minutes without readings just before the first descent
    res = evaluate_alerts(f, Extrapolate())
    assert res["predicted_low"]["episodes"] == 2
    assert res["predicted_low"]["warned"] == 2  # the gap ends 15 min before the fall starts


def test_known_future_hides_future_boluses_and_carbs():
    cfg = WindowConfig()
    f = synthetic_days(1)
    f.loc[100, ["bolus_u", "carbs_g"]] = [4.0, 50.0]
    from forecast.windows import make_windows

    w = make_windows(f, cfg)
    k = known_future(w)
    assert k.future[..., cfg.future_index("bolus_u")].max() == 0
    assert k.future[..., cfg.future_index("carbs_g")].max() == 0
    assert w.future[..., cfg.future_index("bolus_u")].max() == 4.0
    np.testing.assert_array_equal(k.past, w.past)


def test_cli_prints_one_json_object(tmp_path, capsys):
    pytest.importorskip("forecast.baselines")
    from forecast.cli import main
    from forecast.schema import write_parquet

    path = write_parquet(synthetic_days(3), tmp_path / "syn.parquet")
    rc = main(["alerts", "evaluate", "--model", "persistence", "--data", str(path), "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    for key in ("predicted_low", "threshold_low", "predicted_high", "threshold_high"):
        assert {"sensitivity", "false_per_day", "lead_min", "episodes"} <= set(out[key])
    assert out["split"] == "test" and out["days"] > 0


def test_cli_replays_an_onnx_model_directory(tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    from test_predictor import write_model_dir

    from forecast.cli import main
    from forecast.schema import write_parquet

    model = write_model_dir(tmp_path / "model", quantiles=(0.05, 0.5, 0.95))
    path = write_parquet(synthetic_days(2), tmp_path / "syn.parquet")
    rc = main(["alerts", "evaluate", "--model", str(model), "--data", str(path), "--json",
               "--split", "all"])  # fmt: skip
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["forecasts"] > 0 and set(out["forecast_sources"]) <= {"model", "physio"}
    assert out["threshold_low"]["sensitivity"] == 1.0


def test_unknown_model_is_a_clear_error(tmp_path, capsys):
    from forecast.cli import main
    from forecast.schema import write_parquet

    path = write_parquet(synthetic_days(1), tmp_path / "syn.parquet")
    rc = main(["alerts", "evaluate", "--model", str(tmp_path / "nope"), "--data", str(path),
               "--split", "all"])  # fmt: skip
    assert rc == 2
    assert "neither a baseline" in capsys.readouterr().err


def test_episodes_can_come_from_true_glucose():
    f = synthetic_days(1)
    f["bg_true"] = f["glucose"] + 30.0  # the sensor reads 30 low: its lows are artefacts
    res = evaluate_alerts(f, Extrapolate(), episodes_from="bg_true")
    assert res["threshold_low"]["episodes"] == 0 and res["episodes_from"] == "bg_true"
    assert res["threshold_low"]["false_alerts"] == res["threshold_low"]["alerts"] == 2
    from serving.insilico.alert_eval import AlertEvalError

    with pytest.raises(AlertEvalError, match="not a column"):
        evaluate_alerts(f, Extrapolate(), episodes_from="gsub")


def test_days_follow_the_sensor_period():
    from forecast.schema import DatasetMeta, set_meta

    f = synthetic_days(2)
    f.loc[f.index % 3 != 0, "glucose"] = nan  # a reading every 15 minutes
    set_meta(f, DatasetMeta(sampling_minutes=15))
    res = evaluate_alerts(f, None)
    assert res["days"] == 2.0
    assert res["predicted_low"]["alerts"] == 0  # no forecaster, no predictions


def test_a_two_reading_dip_is_no_episode_and_its_low_alarm_is_false():
    f = synthetic_days(1)
    f.loc[20:21, "glucose"] = 65.0  # 10 minutes below 70 from 150: a sensor dip, not a low
    res = evaluate_alerts(f, None)
    tl = res["threshold_low"]
    assert res["episode_rules"]["low"]["min_readings"] == 3
    assert tl["episodes"] == 2  # the two real lows of the day
    assert tl["false_alerts"] == 1 and tl["warned"] == 2


# --------------------------------------------------------------------------- personal models


class Flat(Extrapolate):
    """Last reading carried forward: never predicts a low."""

    def predict(self, past, future):
        g = past[:, -1:, self.config.past_index("glucose")]
        med = np.repeat(g, self.config.horizon_slots, axis=1)
        return np.repeat(med[:, :, None], 3, axis=2).astype(np.float32)


def test_each_subject_can_have_its_own_model():
    two = pd.concat(
        [synthetic_days(2), synthetic_days(2).assign(subject_id="syn2")], ignore_index=True
    )
    alone = evaluate_alerts(synthetic_days(2), Extrapolate())["predicted_low"]
    res = evaluate_alerts(two, Flat(), subject_models={"syn2": Extrapolate()})
    pl = res["predicted_low"]
    # syn2 gets the extrapolation and is warned of all its lows; syn keeps the flat model
    assert (pl["episodes"], pl["warned"]) == (2 * alone["episodes"], alone["warned"])
    assert pl["alerts"] == alone["alerts"]


def test_subject_models_are_found_by_their_manifests(tmp_path):
    from serving.insilico.alert_eval import AlertEvalError, find_subject_models

    def manifest(path, **m):
        path.mkdir(parents=True)
        (path / "manifest.json").write_text(json.dumps(m))

    manifest(tmp_path / "a" / "model", subject="adult#001", sha256="x")
    manifest(tmp_path / "a" / "mlruns" / "1" / "r" / "model", subject="adult#001", sha256="x")
    manifest(tmp_path / "population" / "model", sha256="p")  # no subject: not personal
    found = find_subject_models(tmp_path)
    assert found == {"adult#001": tmp_path / "a" / "model"}  # the copy below is the same
    manifest(tmp_path / "b" / "model", subject="adult#001", sha256="y")
    with pytest.raises(AlertEvalError, match="two different models"):
        find_subject_models(tmp_path)
    with pytest.raises(AlertEvalError, match="no per-subject model"):
        find_subject_models(tmp_path / "population")


def test_consensus_readings_follow_the_sensor_period():
    from serving.insilico.alert_eval import consensus_readings

    assert consensus_readings(5) == 3  # 15 min of 5-minute readings
    assert consensus_readings(15) == 2  # a Libre export: two readings span 15 min
    assert consensus_readings(1) == 15
