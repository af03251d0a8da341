"""The MPC's shared-past forecaster: exactly the whole graph's answer, encoder run once per past.

A tiny encoder-decoder LSTM graph (onnx.helper, no torch) stands in for the exported LSTM:
an LSTM over `past` whose final state starts an LSTM over `future`, plus a direct path from
`past` to the output, as the real graph has.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from test_predictor import write_model_dir

from forecast.windows import WindowConfig
from serving.insilico.shared_past import SharedPastForecaster, shared_past_predictor
from serving.predictor import Predictor, steady_state_inputs

CFG = WindowConfig()


def lstm_graph(config: WindowConfig, hidden: int = 8, q: int = 3, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    fp, ff = len(config.past_features), len(config.future_features)
    h = hidden

    def init(name, *shape, scale=0.3):
        return numpy_helper.from_array((rng.normal(0, scale, shape)).astype(np.float32), name)

    inits = [
        init("We", 1, 4 * h, fp, scale=0.01),
        init("Re", 1, 4 * h, h),
        init("Wd", 1, 4 * h, ff),
        init("Rd", 1, 4 * h, h),
        init("Wo", h, q, scale=5.0),
        numpy_helper.from_array(np.array([1], np.int64), "ax1"),
        numpy_helper.from_array(np.array([-1], np.int64), "axm1"),
        numpy_helper.from_array(np.array([0, 1], np.int64), "g_idx"),
        numpy_helper.from_array(np.array([-5.0, 0.0, 5.0], np.float32), "spread"),
    ]
    nodes = [
        helper.make_node("Transpose", ["past"], ["past_t"], perm=[1, 0, 2]),
        helper.make_node("LSTM", ["past_t", "We", "Re"], ["ye", "yh", "yc"], hidden_size=h),
        helper.make_node("Transpose", ["future"], ["fut_t"], perm=[1, 0, 2]),
        helper.make_node(
            "LSTM", ["fut_t", "Wd", "Rd", "", "", "yh", "yc"], ["yd", "", ""], hidden_size=h
        ),
        helper.make_node("Squeeze", ["yd", "ax1"], ["yd2"]),  # [H, B, h]
        helper.make_node("Transpose", ["yd2"], ["yd3"], perm=[1, 0, 2]),  # [B, H, h]
        helper.make_node("MatMul", ["yd3", "Wo"], ["delta"]),  # [B, H, Q]
        # a direct path from past: the window's mean glucose (feature 0)
        helper.make_node("Gather", ["past", "g_idx"], ["g2"], axis=2),  # [B, L, 2]
        helper.make_node("ReduceMean", ["g2"], ["gm"], axes=[1, 2], keepdims=1),  # [B, 1, 1]
        helper.make_node("Add", ["gm", "delta"], ["base"]),
        helper.make_node("Add", ["base", "spread"], ["glucose"]),
    ]
    graph = helper.make_graph(
        nodes,
        "enc-dec",
        [
            helper.make_tensor_value_info("past", TensorProto.FLOAT, ["batch", 24, fp]),
            helper.make_tensor_value_info("future", TensorProto.FLOAT, ["batch", 12, ff]),
        ],
        [helper.make_tensor_value_info("glucose", TensorProto.FLOAT, ["batch", 12, q])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


@pytest.fixture(scope="module")
def lstm_dir(tmp_path_factory):
    d = write_model_dir(tmp_path_factory.mktemp("shared") / "model")
    blob = lstm_graph(CFG)
    (d / "model.onnx").write_bytes(blob)
    man = json.loads((d / "manifest.json").read_text())
    man["sha256"] = hashlib.sha256(blob).hexdigest()
    (d / "manifest.json").write_text(json.dumps(man))
    return d


def candidate_batch(n=5, k=4, seed=1):
    rng = np.random.default_rng(seed)
    past, future = steady_state_inputs(CFG, batch=n)
    past[:, :, CFG.past_index("glucose")] += rng.normal(0, 40, (n, 1)).astype(np.float32)
    past = np.repeat(past, k, axis=0)  # the MPC: K candidate rows per patient share a past
    future = np.repeat(future, k, axis=0)
    future[:, :, CFG.future_index("bolus_u")] = rng.uniform(0, 3, (n * k, 1))
    return past, future


def test_split_equals_the_whole_graph(lstm_dir):
    pred = Predictor(lstm_dir)
    fast = SharedPastForecaster(pred.model)
    assert fast.split, fast.reason
    past, future = candidate_batch()
    whole = pred.model.predict(past, future)
    np.testing.assert_allclose(fast.predict(past, future), whole, atol=1e-4)
    # rows in any order, all distinct, or a single row: still the same function
    perm = np.random.default_rng(2).permutation(len(past))
    np.testing.assert_allclose(fast.predict(past[perm], future[perm]), whole[perm], atol=1e-4)
    np.testing.assert_allclose(fast.predict(past[:1], future[:1]), whole[:1], atol=1e-4)


def test_checked_predictor_keeps_fallback_and_rules(lstm_dir):
    pred = Predictor(lstm_dir)
    fast = shared_past_predictor(pred)
    assert fast is not pred and fast.fallback is pred.fallback and fast.rules == pred.rules
    past, future = candidate_batch()
    a = pred.forecast(past, future, groups=np.repeat(np.arange(5), 4))
    b = fast.forecast(past, future, groups=np.repeat(np.arange(5), 4))
    np.testing.assert_allclose(a.glucose, b.glucose, atol=1e-4)
    assert (a.fallback == b.fallback).all()


def test_a_graph_without_an_lstm_encoder_is_run_whole(tmp_path):
    pred = Predictor(write_model_dir(tmp_path / "linear"))
    assert not SharedPastForecaster(pred.model).split
    assert shared_past_predictor(pred) is pred


def test_a_model_file_changed_after_verification_is_not_split(lstm_dir, tmp_path):
    import shutil

    d = tmp_path / "m"
    shutil.copytree(lstm_dir, d)
    pred = Predictor(d)
    (d / "model.onnx").write_bytes(lstm_graph(CFG, seed=5))  # swapped after the check
    fast = SharedPastForecaster(pred.model)
    assert not fast.split and "changed" in fast.reason
