"""The therapy profile (carb ratio, ISF) as a forecaster's static inputs, end to end:
frame columns → windows → training config → manifest → runtime (loop, trial)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from forecast.schema import PROFILE_COLUMNS, SchemaError, validate_frame
from forecast.windows import PAST_FEATURES, PROFILE_FEATURES, WindowConfig, make_windows
from training.config import ConfigError, TrainConfig

PROFILE_WINDOW = WindowConfig(past_features=PAST_FEATURES + PROFILE_FEATURES)


def frame(n: int = 60, cr: float = 12.0, isf: float = 45.0, profile: bool = True) -> pd.DataFrame:
    t = pd.date_range("2024-01-01", periods=n, freq="5min", tz="UTC")
    f = pd.DataFrame(
        {
            "subject_id": "a",
            "time": t,
            "glucose": 120 + 20 * np.sin(np.arange(n) / 10),
            "basal_u": 0.08,
            "bolus_u": 0.0,
            "carbs_g": 0.0,
        }
    )
    if profile:
        f["carb_ratio_g_per_u"] = cr
        f["isf_mgdl_per_u"] = isf
    return f


# --------------------------------------------------------------------------- the frame


def test_profile_columns_are_optional_and_checked():
    validate_frame(frame(profile=False))
    validate_frame(frame())
    f = frame()
    f.loc[7, "isf_mgdl_per_u"] = np.nan
    with pytest.raises(SchemaError, match=r"'isf_mgdl_per_u'.*row 7.*subject 'a'"):
        validate_frame(f)
    f = frame()
    f.loc[3, "carb_ratio_g_per_u"] = 0.2  # a ratio in U/g, not g/U
    with pytest.raises(SchemaError, match="1–150"):
        validate_frame(f)


def test_the_simulator_writes_the_profile_it_doses_with():
    from forecast.sim import load_patients, simulate_cohort

    names = "adult#002,child#003"
    f = simulate_cohort(names, days=0.1, seed=1)
    p = load_patients(names)
    for i, name in enumerate(p.names):
        sub = f[f["subject_id"] == name]
        assert (sub["carb_ratio_g_per_u"] == p.cr[i]).all()
        assert (sub["isf_mgdl_per_u"] == p.cf[i]).all()
    assert set(PROFILE_COLUMNS) <= set(f.columns)


# --------------------------------------------------------------------------- windows


def test_windows_carry_the_profile_as_static_inputs():
    w = make_windows(frame(cr=12.0, isf=45.0), PROFILE_WINDOW)
    assert len(w) > 0
    cfg = w.config
    np.testing.assert_array_equal(w.past[:, :, cfg.past_index("carb_ratio_g_per_u")], 12.0)
    np.testing.assert_array_equal(w.past[:, :, cfg.past_index("isf_mgdl_per_u")], 45.0)
    plain = make_windows(frame(), WindowConfig())
    np.testing.assert_array_equal(w.past[:, :, : len(PAST_FEATURES)], plain.past)


def test_a_profile_model_on_a_frame_without_profile_says_what_to_do():
    with pytest.raises(SchemaError, match="therapy profile.*data.profile: off"):
        make_windows(frame(profile=False), PROFILE_WINDOW)


# --------------------------------------------------------------------------- training config


@pytest.mark.parametrize(
    ("mode", "has_profile", "expected"),
    [("auto", True, True), ("auto", False, False), ("off", True, False), ("on", True, True)],
)
def test_data_profile_decides_the_inputs(mode, has_profile, expected):
    cfg = TrainConfig().override({"data": {"profile": mode}})
    wc = cfg.window_config(frame(profile=has_profile))
    assert (wc.past_features == PROFILE_WINDOW.past_features) is expected
    assert wc.past_features[: len(PAST_FEATURES)] == PAST_FEATURES


def test_data_profile_on_needs_the_columns_and_modes_are_checked():
    with pytest.raises(ConfigError, match="lacks the therapy-profile columns"):
        TrainConfig().override({"data": {"profile": "on"}}).window_config(frame(profile=False))
    with pytest.raises(ConfigError, match="data.profile"):
        TrainConfig().override({"data": {"profile": "sometimes"}})


# --------------------------------------------------------------------------- the runtime


class InputSpy:
    """A predictor that records the inputs the loop builds and forecasts with a real one."""

    def __init__(self, predictor):
        self.inner, self.config, self.quantiles = predictor, predictor.config, predictor.quantiles
        self.pasts = []

    def forecast(self, past, future, **kw):
        self.pasts.append(np.array(past))
        return self.inner.forecast(past, future, **kw)

    # the rest of serving.predictor.Forecaster, from the real one
    calls = property(lambda self: self.inner.calls)
    last = property(lambda self: self.inner.last)
    label = property(lambda self: self.inner.label)
    physiological = property(lambda self: self.inner.physiological)


def run_spied_loop(tmp_path, backend, predictor, **run):
    from serving.controllers import make_controller
    from serving.journal import Journal
    from serving.loop import ControlLoop, run_loop

    spy = InputSpy(predictor)
    loop = ControlLoop(backend, Journal(tmp_path / "j.db"), make_controller("pid"), spy)
    loop.start()
    run_loop(loop, **run)
    assert spy.pasts, "the loop never asked the predictor"
    return loop, spy


def test_the_runtime_accepts_a_profile_model_and_fills_it_from_the_settings(tmp_path):
    pytest.importorskip("onnxruntime")
    from test_predictor import write_model_dir

    from serving.insilico.backends import SimBackend
    from serving.insilico.simulated import SimulatedCohort, WorldConfig
    from serving.predictor import Predictor

    predictor = Predictor(write_model_dir(tmp_path / "m", PROFILE_WINDOW))
    assert predictor.config.past_features == PROFILE_WINDOW.past_features
    world = SimulatedCohort(WorldConfig(patients="adult#001", sensor="none", seed=3))
    loop, spy = run_spied_loop(tmp_path, SimBackend(world, ()), predictor, max_cycles=3)
    s = loop.settings[0]
    past = spy.pasts[-1][0]  # [L, F_past]
    cfg = predictor.config
    np.testing.assert_allclose(past[:, cfg.past_index("carb_ratio_g_per_u")], s.carb_ratio_g_per_u)
    np.testing.assert_allclose(past[:, cfg.past_index("isf_mgdl_per_u")], s.isf_mgdl_per_u)


def test_replayed_records_take_their_settings_from_the_profile_columns():
    from serving.insilico.backends import settings_from_frame

    s = settings_from_frame(frame(cr=8.0, isf=60.0), "a")
    assert (s.carb_ratio_g_per_u, s.isf_mgdl_per_u) == (8.0, 60.0)
    s = settings_from_frame(frame(profile=False), "a")
    assert (s.carb_ratio_g_per_u, s.isf_mgdl_per_u) == (10.0, 40.0)  # population values


def test_a_replay_without_profile_refuses_a_profile_model_instead_of_guessing_it():
    from serving.insilico.backends import ReplayBackend
    from serving.loop import LoopError

    rec = frame(n=80, profile=False)
    with pytest.raises(LoopError, match="therapy profile.*data.profile: off"):
        ReplayBackend(rec, "a", window=PROFILE_WINDOW)
    ReplayBackend(rec, "a", window=WindowConfig())  # a model without the profile is fine
    b = ReplayBackend(frame(n=80, cr=9.0, isf=55.0), "a", window=PROFILE_WINDOW)
    assert b.settings(0).profile() == {"carb_ratio_g_per_u": 9.0, "isf_mgdl_per_u": 55.0}


def test_describe_shows_the_profile_a_model_would_get():
    from forecast.commands.data import describe_frame

    info = describe_frame(frame(cr=12.0, isf=45.0))
    assert info["therapy_profile"] == list(PROFILE_COLUMNS)
    s = info["subjects"][0]
    assert (s["carb_ratio_g_per_u"], s["isf_mgdl_per_u"]) == (12.0, 45.0)
    bare = describe_frame(frame(profile=False))
    assert bare["therapy_profile"] == [] and "isf_mgdl_per_u" not in bare["subjects"][0]


def test_a_replay_follows_the_recorded_profile_schedule(tmp_path):
    pytest.importorskip("onnxruntime")
    from test_predictor import write_model_dir

    from serving.insilico.backends import ReplayBackend
    from serving.predictor import Predictor

    rec = frame(n=120, cr=10.0, isf=45.0)
    rec.loc[60:, "isf_mgdl_per_u"] = 60.0  # the ISF schedule changes at slot 60
    predictor = Predictor(write_model_dir(tmp_path / "m", PROFILE_WINDOW))
    backend = ReplayBackend(rec, "a", window=predictor.config)
    times = pd.DatetimeIndex(rec["time"])
    np.testing.assert_array_equal(backend.profile(0, times[[0, 59, 60, 119]])["isf_mgdl_per_u"],
                                  [45.0, 45.0, 60.0, 60.0])  # fmt: skip
    _, spy = run_spied_loop(tmp_path, backend, predictor, until=backend.until)
    isf = [p[0, :, predictor.config.past_index("isf_mgdl_per_u")] for p in spy.pasts]
    assert any(set(v) == {45.0, 60.0} for v in isf), "no window saw the schedule change"
    assert set(isf[0]) == {45.0} and set(isf[-1]) == {60.0}
