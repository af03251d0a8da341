"""Controllers: the MPC's batching and its safety property, basal–bolus, PID.

The MPC runs over real ONNX models (`write_model_dir` from test_predictor builds them with
onnx.helper) and over the settings-based physiological forecaster.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_predictor import write_model_dir

from forecast.windows import WindowConfig
from serving.controllers import (
    UnknownControllerError,
    basal_iob_u,
    make_controller,
    meal_bolus_u,
    net_iob_u,
)
from serving.controllers.basal_bolus import BasalBolusController
from serving.controllers.mpc import MPCController
from serving.controllers.pid import PIDController
from serving.predictor import (
    FallbackPredictor,
    OnnxForecaster,
    PlausibilityConfig,
    Predictor,
    steady_state_inputs,
)
from serving.types import ControlInput, PatientSettings

T0 = pd.Timestamp("2024-01-01 08:00", tz="UTC")
CFG = WindowConfig()


def patient(name="p1", basal=1.0, cr=10.0, isf=40.0, **kw) -> PatientSettings:
    return PatientSettings(
        name=name,
        basal_u_per_h=basal,
        carb_ratio_g_per_u=cr,
        isf_mgdl_per_u=isf,
        max_basal_u_per_h=4 * basal,
        max_bolus_u=kw.pop("max_bolus_u", 10.0),
        max_iob_u=kw.pop("max_iob_u", 20.0),
        **kw,
    )


def control_input(
    glucose=120.0, s: PatientSettings | None = None, *, carbs=0.0, iob=None, slope=0.0
):
    """A window of a patient on scheduled basal whose glucose moves `slope` mg/dL per slot."""
    s = s or patient()
    past, future = steady_state_inputs(CFG, glucose=glucose, basal_u_per_h=s.basal_u_per_h)
    gi = CFG.past_index("glucose")
    past[0, :, gi] = glucose + slope * (np.arange(CFG.past_slots) - (CFG.past_slots - 1))
    if carbs:
        past[0, -1, CFG.past_index("carbs_g")] = carbs
        past[0, -1, CFG.past_index("cob_g")] += carbs
    steady = float(basal_iob_u(s.basal_u_per_h))
    return ControlInput(
        time=T0,
        past=past[0],
        future=future[0],
        glucose_mgdl=glucose,
        iob_u=steady if iob is None else iob,
        settings=s,
        carbs_announced_g=carbs,
    )


def total_insulin(p, s: PatientSettings, minutes: int = 30) -> float:
    return p.bolus_u + (p.temp_basal_u_per_h - s.basal_u_per_h) * minutes / 60.0


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_model_dir(tmp_path_factory.mktemp("mpc") / "model")


@pytest.fixture(scope="module")
def predictor(model_dir):
    return Predictor(model_dir)


@pytest.fixture(scope="module")
def onnx_model(model_dir):
    return OnnxForecaster(model_dir)


# --------------------------------------------------------------------------- MPC


def test_mpc_makes_one_batched_forecaster_call_per_cycle(predictor):
    mpc = MPCController(predictor)
    inputs = [control_input(g, patient(f"p{i}")) for i, g in enumerate((90, 120, 180, 250))]
    inputs.append(control_input(float("nan"), patient("blind")))  # no reading: no forecast
    before = predictor.calls
    props = mpc.propose(inputs)
    assert predictor.calls - before == 1
    assert len(props) == 5
    lad = mpc.last_ladder
    k = lad.basal.shape[1]
    plans = np.concatenate([lad.basal, lad.bolus], axis=2)  # [N, K, 2(1+H)]
    distinct = sum(len(np.unique(p, axis=0)) for p in plans)  # equal rungs are sent once
    rows = mpc.last_forecast.glucose.shape[0]
    assert rows == distinct <= 4 * k  # [R ≤ N*K, H, Q] in one call
    assert mpc.last_forecast.glucose.shape[1:] == (CFG.horizon_slots, 3)
    assert props[4].bolus_u == 0 and "no glucose reading" in props[4].reason
    for p in props[:4]:
        assert p.predicted_mgdl.shape == (CFG.horizon_slots, 3)


def test_mpc_suspends_when_low_and_corrects_when_high(predictor):
    mpc = MPCController(predictor)
    low, mid, high = mpc.propose(
        [control_input(75, slope=-2.0), control_input(115), control_input(260, slope=2.0)]
    )
    s = patient()
    assert low.temp_basal_u_per_h == 0 and low.bolus_u == 0
    assert total_insulin(high, s) > 0.2
    assert total_insulin(low, s) < total_insulin(mid, s) < total_insulin(high, s)


def test_mpc_boluses_for_an_announced_meal_within_limits(predictor):
    mpc = MPCController(predictor)
    s = patient(max_bolus_u=4.0)
    (meal,) = mpc.propose([control_input(130, s, carbs=60.0)])
    assert 1.0 < meal.bolus_u <= 4.0  # some of the 6 U carb bolus, never above max bolus
    (small,) = mpc.propose([control_input(130, patient(), carbs=60.0)])
    assert small.bolus_u <= 1.2 * 60.0 / 10.0 + 1e-9  # never more than the carbs justify


def test_mpc_does_not_stack_insulin_on_board(predictor):
    mpc = MPCController(predictor)
    s = patient()
    heavy = float(basal_iob_u(s.basal_u_per_h)) + 8.0  # 8 U of net IOB already
    (p,) = mpc.propose([control_input(220, s, iob=heavy, slope=1.0)])
    assert p.bolus_u == 0.0


def test_mpc_over_the_physiological_forecaster_uses_each_patients_settings():
    mpc = make_controller("physio-mpc")
    adult, child = (
        patient("adult", basal=1.2, isf=20, cr=10),
        patient("child", basal=0.4, isf=80, cr=25),
    )
    before = mpc.predictor.calls
    pa, pc = mpc.propose([control_input(200, adult), control_input(200, child)])
    assert mpc.predictor.calls - before == 1
    assert total_insulin(pa, adult) > total_insulin(pc, child)  # the child is 4x as sensitive


class Shifted:
    """A real forecaster seen through a uniform offset (what "predictions lower by δ" means)."""

    def __init__(self, base, delta: float) -> None:
        self.base, self.delta = base, delta
        self.config, self.quantiles = base.config, base.quantiles

    def predict(self, past, future):
        return self.base.predict(past, future) - np.float32(self.delta)


@settings(max_examples=40, deadline=None)
@given(
    glucose=st.floats(70, 320),
    slope=st.floats(-3, 3),
    delta=st.floats(0.5, 60),
    extra_iob=st.floats(-1, 6),
    carbs=st.sampled_from([0.0, 0.0, 30.0, 80.0]),
    isf=st.floats(10, 100),
    basal=st.floats(0.2, 2.0),
)
def test_lower_predictions_never_buy_more_insulin(
    onnx_model, glucose, slope, delta, extra_iob, carbs, isf, basal
):
    """The MPC's safety property: shift every forecast down uniformly → no more insulin."""
    s = patient(basal=basal, isf=isf, cr=10.0)
    inp = control_input(
        glucose, s, carbs=carbs, slope=slope, iob=float(basal_iob_u(basal)) + extra_iob
    )
    anything = PlausibilityConfig(
        min_mgdl=-1e9, max_mgdl=1e9, max_step_mgdl=1e9, max_first_step_mgdl=1e9
    )
    as_is = MPCController(FallbackPredictor(onnx_model, None, rules=anything))
    lower = MPCController(FallbackPredictor(Shifted(onnx_model, delta), None, rules=anything))
    (a,) = as_is.propose([inp])
    (b,) = lower.propose([inp])
    assert total_insulin(b, s) <= total_insulin(a, s) + 1e-9
    assert b.bolus_u <= a.bolus_u + 1e-9 or b.temp_basal_u_per_h < a.temp_basal_u_per_h


# --------------------------------------------------------------------------- basal–bolus


def test_basal_bolus_meal_and_correction_with_iob():
    bb = BasalBolusController()
    s = patient(isf=40.0, cr=10.0)
    steady = float(basal_iob_u(s.basal_u_per_h))
    none, meal, high, high_iob, low_meal = bb.propose(
        [
            control_input(200, s),  # no meal: no bolus, whatever the glucose
            control_input(120, s, carbs=50),
            control_input(230, s, carbs=50),
            control_input(230, s, carbs=50, iob=steady + 2.0),
            control_input(90, s, carbs=50),
        ]
    )
    assert none.bolus_u == 0 and none.temp_basal_u_per_h == s.basal_u_per_h
    assert meal.bolus_u == pytest.approx(5.0)
    assert high.bolus_u == pytest.approx(5.0 + (230 - 110) / 40)
    assert high_iob.bolus_u == pytest.approx(5.0 + (230 - 110) / 40 - 2.0)
    assert low_meal.bolus_u == pytest.approx(5.0)  # no negative correction below 150


def test_helpers():
    s = patient()
    assert meal_bolus_u(0, s) == 0 and meal_bolus_u(float("nan"), s) == 0
    assert meal_bolus_u(25, s) == 2.5
    inp = control_input(120, s)
    assert net_iob_u(inp.iob_u, inp.settings.basal_u_per_h) == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(UnknownControllerError):
        make_controller("bang-bang")
    with pytest.raises(ValueError, match="predictor"):
        make_controller("mpc")


# --------------------------------------------------------------------------- PID


def test_pid_responds_to_error_and_damps_with_insulin_feedback():
    s = patient()
    lo, mid, hi = PIDController(), PIDController(), PIDController()
    (p_lo,) = lo.propose([control_input(80, s)])
    (p_mid,) = mid.propose([control_input(110, s)])
    (p_hi,) = hi.propose([control_input(200, s)])
    assert p_lo.temp_basal_u_per_h < p_mid.temp_basal_u_per_h < p_hi.temp_basal_u_per_h
    assert p_mid.temp_basal_u_per_h == pytest.approx(s.basal_u_per_h)
    fb = PIDController()
    (p_fb,) = fb.propose([control_input(200, s, iob=float(basal_iob_u(1.0)) + 3.0)])
    assert p_fb.temp_basal_u_per_h < p_hi.temp_basal_u_per_h
    for p in (p_lo, p_mid, p_hi, p_fb):
        assert 0.0 <= p.temp_basal_u_per_h <= 4 * s.basal_u_per_h


def test_pid_integrates_over_cycles_and_keeps_patients_apart():
    pid = PIDController()
    a, b = patient("a"), patient("b")
    rates = []
    for _ in range(6):
        pa, pb = pid.propose([control_input(180, a), control_input(110, b)])
        rates.append(pa.temp_basal_u_per_h)
        assert pb.temp_basal_u_per_h == pytest.approx(b.basal_u_per_h)
    assert rates[-1] > rates[0]  # a steady error accumulates
    (blind,) = pid.propose([control_input(float("nan"), a)])
    assert blind.temp_basal_u_per_h == a.basal_u_per_h


def test_autosens_makes_the_mpc_gentler_after_a_low(predictor):
    mpc = MPCController(predictor)
    s = patient("kid", basal=0.4, isf=40, cr=20)
    (before,) = mpc.propose([control_input(140, s, carbs=60.0)])
    assert mpc.sensitivity(control_input(140, s)) == 1.0
    low = control_input(62, s)
    mpc.propose([low])  # a low episode: evidence the settings underestimate sensitivity
    mpc.propose([control_input(60, s)])  # the same episode counts once
    assert mpc.sensitivity(low) == pytest.approx(mpc.config.autosens_step)
    later = control_input(140, s, carbs=60.0)
    later.time = low.time + pd.Timedelta(minutes=30)
    (after,) = mpc.propose([later])
    assert after.bolus_u < before.bolus_u
    later.time = low.time + pd.Timedelta(days=10)  # the factor relaxes back without lows
    mpc.propose([later])
    assert mpc.sensitivity(later) < 1.05
