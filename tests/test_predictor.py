"""The predictor trusts only the model its manifest describes, and falls back when it misbehaves.

Models here are real ONNX graphs built with onnx.helper (`linear_model`): a small
physiology-shaped linear forecaster that honours the model contract. Other test modules
import `write_model_dir` from here to drive the MPC and trials with a real ONNX model.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from forecast.insulin import CarbCurve, InsulinCurve  # noqa: E402
from forecast.windows import PAST_FEATURES, WindowConfig  # noqa: E402
from serving.predictor import (  # noqa: E402
    FallbackPredictor,
    ImplausibleForecastError,
    ManifestError,
    ModelIntegrityError,
    ModelManifest,
    ModelMissingError,
    ModelSignatureError,
    Predictor,
    implausible_rows,
    load_predictor,
    match_quantiles,
    steady_state_inputs,
)

QUANTILES = (0.1, 0.5, 0.9)
DEFAULT_WINDOW = WindowConfig()


# --------------------------------------------------------------------------- a real ONNX model


def linear_model(
    config: WindowConfig = DEFAULT_WINDOW,
    quantiles: tuple[float, ...] = QUANTILES,
    *,
    isf: float = 40.0,
    cr: float = 10.0,
    spread: float = 4.0,
    bias: float = 0.0,
    past_name: str = "past",
    future_name: str = "future",
    output_name: str = "glucose",
) -> onnx.ModelProto:
    """glucose[b, h, q] = last glucose − ISF·(insulin acting by h) + ISF/CR·(carbs absorbed by h)
    + bias + spread·z_q·√(h+1).

    Insulin counts relative to the mean basal of the window's older slots (so scheduled
    basal is neutral); the acting/absorbed fractions come from `forecast.insulin` curves, so
    the model responds to planned insulin the way the contract asks (more never raises it).
    """
    L, H, sm = config.past_slots, config.horizon_slots, config.slot_minutes
    ins, carb = InsulinCurve(), CarbCurve()
    p, f = config.past_index, config.future_index
    age = (L - 1 - np.arange(L))[:, None] * sm  # [L, 1]
    ahead = (np.arange(H) + 1)[None, :] * sm  # [1, H]
    w_ip = ins.iob_fraction(age) - ins.iob_fraction(age + ahead)  # [L, H]
    w_cp = carb.cob_fraction(age) - carb.cob_fraction(age + ahead)
    lag = (np.arange(H)[None, :] - np.arange(H)[:, None]) * sm  # [H(s), H(h)]
    w_if = np.where(lag >= 0, 1 - ins.iob_fraction(lag), 0.0)
    w_cf = np.where(lag >= 0, 1 - carb.cob_fraction(lag), 0.0)
    z = np.array(
        [
            {0.05: -1.645, 0.1: -1.2816, 0.5: 0.0, 0.9: 1.2816, 0.95: 1.645}.get(q, 0.0)
            for q in quantiles
        ]
    )
    offs = bias + spread * z[None, :] * np.sqrt(np.arange(H) + 1)[:, None]  # [H, Q]
    n_ref = max(1, L - 6)

    def const(name: str, a) -> onnx.TensorProto:
        arr = np.asarray(a)
        arr = arr.astype(np.int64 if arr.dtype.kind in "iu" else np.float32)
        return numpy_helper.from_array(arr, name)

    inits = [
        const("i_g", p("glucose")), const("i_last", L - 1),
        const("i_pb", p("basal_u")), const("i_pbo", p("bolus_u")), const("i_pc", p("carbs_g")),
        const("i_fb", f("basal_u")), const("i_fbo", f("bolus_u")), const("i_fc", f("carbs_g")),
        const("i_ref", np.arange(n_ref)), const("ax1", [1]), const("ax2", [2]),
        const("w_ip", -isf * w_ip), const("w_if", -isf * w_if),
        const("w_cp", isf / cr * w_cp), const("w_cf", isf / cr * w_cf), const("offs", offs),
    ]  # fmt: skip
    N = helper.make_node
    nodes = [
        N("Gather", [past_name, "i_g"], ["g_all"], axis=2),  # [B, L]
        N("Gather", ["g_all", "i_last"], ["g_last"], axis=1),  # [B]
        N("Unsqueeze", ["g_last", "ax1"], ["g0"]),  # [B, 1]
        N("Gather", [past_name, "i_pb"], ["pb"], axis=2),
        N("Gather", [past_name, "i_pbo"], ["pbo"], axis=2),
        N("Gather", [past_name, "i_pc"], ["pc"], axis=2),
        N("Gather", [future_name, "i_fb"], ["fb"], axis=2),
        N("Gather", [future_name, "i_fbo"], ["fbo"], axis=2),
        N("Gather", [future_name, "i_fc"], ["fc"], axis=2),
        N("Gather", ["pb", "i_ref"], ["pb_old"], axis=1),  # [B, L-6]
        N("ReduceMean", ["pb_old", "ax1"], ["ref"], keepdims=1),  # [B, 1]
        N("Add", ["pb", "pbo"], ["pi"]),
        N("Sub", ["pi", "ref"], ["pin"]),  # [B, L]
        N("Add", ["fb", "fbo"], ["fi"]),
        N("Sub", ["fi", "ref"], ["fin"]),  # [B, H]
        N("MatMul", ["pin", "w_ip"], ["e1"]),
        N("MatMul", ["fin", "w_if"], ["e2"]),
        N("MatMul", ["pc", "w_cp"], ["e3"]),
        N("MatMul", ["fc", "w_cf"], ["e4"]),
        N("Add", ["e1", "e2"], ["e12"]),
        N("Add", ["e3", "e4"], ["e34"]),
        N("Add", ["e12", "e34"], ["delta"]),
        N("Add", ["g0", "delta"], ["med"]),  # [B, H]
        N("Unsqueeze", ["med", "ax2"], ["med3"]),  # [B, H, 1]
        N("Add", ["med3", "offs"], [output_name]),  # [B, H, Q]
    ]
    graph = helper.make_graph(
        nodes,
        "linear_glucose",
        [
            helper.make_tensor_value_info(
                past_name, TensorProto.FLOAT, ["batch", L, len(config.past_features)]
            ),
            helper.make_tensor_value_info(
                future_name, TensorProto.FLOAT, ["batch", H, len(config.future_features)]
            ),
        ],
        [
            helper.make_tensor_value_info(
                output_name, TensorProto.FLOAT, ["batch", H, len(quantiles)]
            )
        ],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    return model


def write_model_dir(
    directory: Path,
    config: WindowConfig = DEFAULT_WINDOW,
    quantiles: tuple[float, ...] = QUANTILES,
    *,
    manifest_overrides: dict | None = None,
    **model_kw,
) -> Path:
    """A model directory as `training.export` writes it (model.onnx + manifest.json)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    blob = linear_model(config, quantiles, **model_kw).SerializeToString()
    (directory / "model.onnx").write_bytes(blob)
    L, H = config.past_slots, config.horizon_slots
    manifest = {
        "format": "glucast-forecaster/1",
        "model": "linear-test",
        "onnx_file": "model.onnx",
        "sha256": hashlib.sha256(blob).hexdigest(),
        "inputs": {
            "past": {"dtype": "float32", "shape": ["batch", L, len(config.past_features)]},
            "future": {"dtype": "float32", "shape": ["batch", H, len(config.future_features)]},
        },
        "output": {"name": "glucose", "dtype": "float32", "shape": ["batch", H, len(quantiles)]},
        "past_features": list(config.past_features),
        "future_features": list(config.future_features),
        "past_slots": L,
        "horizon_slots": H,
        "slot_minutes": config.slot_minutes,
        "quantiles": list(quantiles),
        "window_config": config.to_dict(),
        "training_data_hash": "test",
        "mlflow_run_id": "",
    }
    manifest.update(manifest_overrides or {})
    (directory / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return directory


@pytest.fixture
def model_dir(tmp_path) -> Path:
    return write_model_dir(tmp_path / "model")


# --------------------------------------------------------------------------- loading


def test_loads_and_predicts_batched(model_dir):
    pred = Predictor(model_dir)
    past, future = steady_state_inputs(pred.config, batch=5, glucose=130.0)
    fc = pred.forecast(past, future)
    assert fc.glucose.shape == (5, 12, 3)
    assert fc.glucose.dtype == np.float32
    assert not fc.used_fallback and fc.source == "model"
    # steady state on scheduled basal: the median stays near the last reading
    assert np.allclose(fc.glucose[:, :, 1], 130.0, atol=1.0)
    assert (np.diff(fc.glucose, axis=-1) >= 0).all()
    assert pred.manifest.quantiles == QUANTILES
    opts = pred.model.session.get_session_options()
    assert opts.intra_op_num_threads == 1 and opts.inter_op_num_threads == 1


def test_planned_insulin_lowers_the_forecast(model_dir):
    pred = Predictor(model_dir)
    past, future = steady_state_inputs(pred.config, batch=2)
    future[1, 0, pred.config.future_index("bolus_u")] = 2.0
    g = pred.predict(past, future)
    assert (g[1] <= g[0] + 1e-4).all() and g[1, -1, 1] < g[0, -1, 1] - 10


def test_refuses_tampered_file(model_dir):
    path = model_dir / "model.onnx"
    blob = bytearray(path.read_bytes())
    blob[-5] ^= 0x01
    path.write_bytes(bytes(blob))
    with pytest.raises(ModelIntegrityError, match="sha256"):
        Predictor(model_dir)


def test_refuses_manifest_from_another_model(tmp_path):
    a = write_model_dir(tmp_path / "a")
    b = write_model_dir(tmp_path / "b", isf=80.0)
    (a / "manifest.json").write_bytes((b / "manifest.json").read_bytes())
    with pytest.raises(ModelIntegrityError):
        Predictor(a)


def test_refuses_wrong_feature_names(tmp_path):
    cfg = WindowConfig()
    swapped = list(cfg.past_features)
    swapped[2], swapped[3] = swapped[3], swapped[2]  # bolus where basal should be
    d = write_model_dir(
        tmp_path / "m",
        manifest_overrides={
            "past_features": swapped,
            "window_config": {**cfg.to_dict(), "past_features": swapped},
        },
    )
    with pytest.raises(ModelSignatureError, match="past_features"):
        Predictor(d)  # the runtime builds inputs with forecast.windows' order


def test_refuses_window_the_runtime_does_not_use(model_dir):
    with pytest.raises(ModelSignatureError, match="horizon_slots"):
        Predictor(model_dir, config=WindowConfig(horizon_slots=6))


def test_refuses_self_contradicting_manifest(tmp_path):
    d = write_model_dir(tmp_path / "m", manifest_overrides={"horizon_slots": 24})
    with pytest.raises(ManifestError, match="contradicts"):
        Predictor(d)


def test_refuses_graph_with_other_input_names(tmp_path):
    d = write_model_dir(tmp_path / "m", past_name="x")
    with pytest.raises(ModelSignatureError, match="inputs"):
        Predictor(d)


def test_refuses_graph_with_other_quantiles(tmp_path):
    cfg = WindowConfig()
    d = write_model_dir(tmp_path / "m", quantiles=(0.05, 0.5, 0.95))
    # the manifest claims 5 quantiles, the graph gives 3
    m = json.loads((d / "manifest.json").read_text())
    m["quantiles"] = [0.05, 0.25, 0.5, 0.75, 0.95]
    m["output"]["shape"] = ["batch", cfg.horizon_slots, 5]
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ModelSignatureError, match="glucose"):
        Predictor(d)


def test_missing_model_is_typed_and_lenient_load_says_why(tmp_path):
    with pytest.raises(ModelMissingError):
        Predictor(tmp_path / "nowhere")
    d = write_model_dir(tmp_path / "m")
    (d / "model.onnx").unlink()
    with pytest.raises(ModelMissingError):
        Predictor(d)
    p = load_predictor(d, strict=False)
    assert p.primary is None and "model refused" in p.degraded_reason
    past, future = steady_state_inputs(p.config, batch=3)
    fc = p.forecast(past, future)
    assert fc.fallback.all() and fc.source == "fallback"
    assert np.isfinite(fc.glucose).all()


def test_manifest_parsing_errors_are_typed(tmp_path):
    with pytest.raises(ManifestError):
        ModelManifest.from_dict({"sha256": "x"})
    d = write_model_dir(tmp_path / "m", manifest_overrides={"format": "other/9"})
    with pytest.raises(ManifestError, match="format"):
        Predictor(d)
    (d / "manifest.json").write_text("{not json")
    with pytest.raises(ManifestError):
        Predictor(d)


# --------------------------------------------------------------------------- run-time checks


def test_falls_back_on_nan_output(tmp_path):
    d = write_model_dir(tmp_path / "m", bias=float("nan"))
    pred = Predictor(d)
    past, future = steady_state_inputs(pred.config, batch=4, glucose=140.0)
    fc = pred.forecast(past, future)
    assert fc.fallback.all() and fc.source == "fallback"
    assert any("non-finite" in r for r in fc.reasons)
    assert np.isfinite(fc.glucose).all()
    assert np.allclose(fc.glucose[:, 0, 1], 140.0, atol=20)  # physiological, from the last reading
    assert pred.fallback_rows == 4


def test_falls_back_on_implausible_output(tmp_path):
    d = write_model_dir(tmp_path / "m", bias=700.0)
    pred = Predictor(d)
    past, future = steady_state_inputs(pred.config, batch=2)
    fc = pred.forecast(past, future)
    assert fc.fallback.all()
    assert any("outside" in r for r in fc.reasons)
    assert fc.glucose.max() <= 600


def test_without_fallback_implausible_output_raises(tmp_path):
    from serving.predictor import OnnxForecaster

    d = write_model_dir(tmp_path / "m", bias=float("nan"))
    p = FallbackPredictor(OnnxForecaster(d), None)
    past, future = steady_state_inputs(p.config, batch=1)
    with pytest.raises(ImplausibleForecastError):
        p.forecast(past, future)


def test_a_failing_row_takes_its_whole_group_to_the_fallback(model_dir):
    pred = Predictor(model_dir)
    past, future = steady_state_inputs(pred.config, batch=6, glucose=120.0)
    past[4, :, pred.config.past_index("glucose")] = 5000.0  # → forecast outside 20–600
    groups = np.array([0, 0, 0, 1, 1, 1])
    fc = pred.forecast(past, future, groups=groups)
    assert fc.fallback.tolist() == [False, False, False, True, True, True]
    assert fc.source == "mixed"


def test_implausible_rows_flags_jumps():
    g = np.full((3, 12, 3), 120.0)
    g[1, 5:, :] = 200.0  # +80 mg/dL in 5 minutes
    g[2, :, 0] = 10.0  # lower quantile below 20
    bad, reasons = implausible_rows(g, np.array([120.0, 120.0, 120.0]), median_index=1)
    assert bad.tolist() == [False, True, True]
    assert len(reasons) == 2
    bad, _ = implausible_rows(np.full((1, 12, 3), 120.0), np.array([250.0]), median_index=1)
    assert bad.tolist() == [True]  # 130 mg/dL away from the last reading at the first step


def test_match_quantiles_interpolates():
    pred = np.array([[[100.0, 120.0, 140.0]]])
    out = match_quantiles(pred, (0.05, 0.5, 0.95), (0.275, 0.5, 0.725))
    assert np.allclose(out, [[[110.0, 120.0, 130.0]]])


def test_builds_inputs_with_the_shared_window_builder(model_dir):
    import pandas as pd

    pred = Predictor(model_dir)
    t = pd.date_range("2024-01-01", periods=120, freq="5min", tz="UTC")
    frame = pd.DataFrame(
        {
            "subject_id": "s1",
            "time": t,
            "glucose": 120.0 + np.arange(120) * 0.1,
            "basal_u": 0.1,
            "bolus_u": 0.0,
            "carbs_g": 0.0,
        }
    )
    past, future = pred.inputs_at(frame)
    assert past.shape == (1, 24, len(PAST_FEATURES)) and future.shape == (1, 12, 5)
    assert pred.predict(past, future).shape == (1, 12, 3)


def test_serving_predictor_does_not_load_torch():
    code = (
        "import sys, serving.predictor, serving.controllers.mpc; "
        "bad = [m for m in ('torch', 'lightning', 'mlflow') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])
