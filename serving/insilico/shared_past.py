"""An exact speed-up for the MPC's batched forecaster call: encode each distinct past once.

The MPC asks the forecaster about K candidate plans per patient in one call. Its plans only
change the *future* insulin (`MPCConfig.decision_slot = "future"`), so the K rows of a
patient share one `past` window, and a recurrent forecaster's encoder (an LSTM over the 24
past slots: two thirds of the graph's arithmetic) computes the same state K times.

`SharedPastForecaster` splits the verified ONNX graph at the encoder's final state (the
``Y_h``/``Y_c`` outputs of the LSTM that reads `past`, which the decoder LSTM takes as its
initial state): part A maps `past` to that state and runs once per *distinct* past row;
part B maps (state, past, future) to glucose for every row. The result is the same
function of the same inputs — checked at load on random windows against the whole graph
(`tolerance_mgdl`); a graph that cannot be split that way, or whose split disagrees, is run
whole, as before. The bytes split are the bytes the `OnnxForecaster` verified (sha256 checked
again here), and the wrapped forecaster stays the `FallbackPredictor`'s primary, so the
plausibility checks and the physiological fallback are unchanged.

Measured with benchmarks/mpc_latency.py (30 patients, recorded basal-bolus states, one
thread pinned to one core, this project's 2-core machine): one decision (predict + optimise +
supervise) p50 / p99 7.0 / 9.3 ms with the whole graph, 4.7 / 6.4 ms split (default LSTM);
7.8 / 10.6 → 4.8 / 8.5 ms for the LSTM with the tdd_u feature. Outcomes are identical.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

from serving.predictor import (
    INPUT_FUTURE,
    INPUT_PAST,
    OUTPUT_GLUCOSE,
    FallbackPredictor,
    OnnxForecaster,
    check_input_shapes,
    session_options,
    steady_state_inputs,
)


class SharedPastForecaster:
    """`OnnxForecaster`'s `predict`, with the encoder run once per run of equal `past` rows."""

    def __init__(
        self, base: OnnxForecaster, *, threads: int = 1, tolerance_mgdl: float = 1e-2
    ) -> None:
        self.base = base
        self.config = base.config
        self.quantiles = base.quantiles
        self.manifest = base.manifest
        self.split = False
        self.reason = ""
        try:
            self._build(threads)
            self._verify(tolerance_mgdl)
            self.split = True
        except Exception as e:  # any graph we cannot split exactly runs whole
            self.reason = f"{type(e).__name__}: {e}"
            self._enc = self._dec = None

    # -- setup ---------------------------------------------------------------------------

    def _build(self, threads: int) -> None:
        import onnx
        import onnxruntime as ort
        from onnx.utils import Extractor

        path = self.base.model_dir / self.base.manifest.model_file
        blob = path.read_bytes()
        if hashlib.sha256(blob).hexdigest() != self.base.sha256:
            raise ValueError(f"{path} changed since it was verified")
        model = onnx.shape_inference.infer_shapes(onnx.load_from_string(blob))
        state = _encoder_state(model)
        if state is None:
            raise ValueError("no LSTM encoder over 'past' whose final state feeds the decoder")
        ex = Extractor(model)
        enc = ex.extract_model([INPUT_PAST], list(state))
        dec = ex.extract_model([*state, INPUT_PAST, INPUT_FUTURE], [OUTPUT_GLUCOSE])
        dec_inputs = {i.name for i in dec.graph.input}
        if set(state) - dec_inputs:
            raise ValueError("the decoder part does not take the encoder state")
        recurrent = [n for n in dec.graph.node if n.op_type in ("LSTM", "GRU", "RNN")]
        if any(INPUT_PAST in _ancestors(dec, n) for n in recurrent):
            raise ValueError("the decoder part still runs a recurrence over 'past'")
        opts = session_options(threads)
        prov = ["CPUExecutionProvider"]
        self._enc = ort.InferenceSession(enc.SerializeToString(), opts, providers=prov)
        self._dec = ort.InferenceSession(dec.SerializeToString(), opts, providers=prov)
        self._state = state
        self._dec_inputs = [i.name for i in self._dec.get_inputs()]

    def _verify(self, tol: float) -> None:
        rng = np.random.default_rng(0)
        past, future = steady_state_inputs(self.config, batch=6)
        gi = self.config.past_index("glucose")
        past[:, :, gi] = rng.uniform(60, 300, (6, 1)) + rng.normal(0, 10, past.shape[:2])
        past = np.concatenate([past, past[:3]])  # repeated pasts, as the MPC sends them
        future = np.concatenate([future, future[:3]])
        future[3:, :, self.config.future_index("bolus_u")] = rng.uniform(0, 3, (6, 1))
        whole = self.base.predict(past, future)
        split = self._predict_split(past, future)
        err = float(np.max(np.abs(whole - split)))
        if not np.isfinite(err) or err > tol:
            raise ValueError(f"split graph differs from the whole graph by {err:.3g} mg/dL")

    # -- inference -----------------------------------------------------------------------

    def _predict_split(self, past: np.ndarray, future: np.ndarray) -> np.ndarray:
        first, inv = _distinct_rows(past)
        h, c = self._enc.run(list(self._state), {INPUT_PAST: past[first]})  # [1, U, hidden]
        feed: dict[str, Any] = {
            self._state[0]: np.ascontiguousarray(h[:, inv]),
            self._state[1]: np.ascontiguousarray(c[:, inv]),
            INPUT_PAST: past,
            INPUT_FUTURE: future,
        }
        (out,) = self._dec.run([OUTPUT_GLUCOSE], {k: feed[k] for k in self._dec_inputs})
        return out

    def predict(self, past: np.ndarray, future: np.ndarray) -> np.ndarray:
        """[B, L, F_past], [B, H, F_future] → [B, H, Q] mg/dL (raw, unchecked), as the base."""
        if not self.split:
            return self.base.predict(past, future)
        past = np.ascontiguousarray(past, dtype=np.float32)
        future = np.ascontiguousarray(future, dtype=np.float32)
        check_input_shapes(self.config, past, future)
        return self._predict_split(past, future)


def _distinct_rows(past: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(rows to encode [U], the encoded row of each row [B]) of a batch of pasts.

    The MPC sends a patient's candidates side by side, so equal rows come in runs: runs of
    bit-identical rows are found with one comparison of neighbours (no sort). Equal rows
    that are not neighbours are encoded twice, which gives the same state (rows are
    independent in the encoder), only less cheaply.
    """
    b = past.shape[0]
    if b == 0:
        return np.zeros(0, np.intp), np.zeros(0, np.intp)
    bits = np.ascontiguousarray(past).reshape(b, -1).view(np.int32)  # compare the bits
    new = np.ones(b, dtype=bool)
    new[1:] = (bits[1:] != bits[:-1]).any(axis=1)
    return np.flatnonzero(new), np.cumsum(new) - 1


def shared_past_predictor(predictor: FallbackPredictor) -> FallbackPredictor:
    """The same checked predictor with its ONNX primary wrapped in `SharedPastForecaster`.

    Anything else (no model, the physiological forecaster) is returned unchanged.
    """
    primary = predictor.primary
    if not isinstance(primary, OnnxForecaster):
        return predictor
    fast = SharedPastForecaster(primary)
    if not fast.split:
        return predictor
    out = FallbackPredictor(
        fast, predictor.fallback, rules=predictor.rules, degraded_reason=predictor.degraded_reason
    )
    out.manifest = primary.manifest  # type: ignore[attr-defined]
    return out


def _encoder_state(model) -> tuple[str, str] | None:
    """(Y_h, Y_c) of the LSTM that reads only `past` and whose state another LSTM starts from."""
    nodes = list(model.graph.node)
    lstms = [n for n in nodes if n.op_type == "LSTM" and len(n.output) >= 3]
    for enc in lstms:
        y_h, y_c = enc.output[1], enc.output[2]
        if not y_h or not y_c:
            continue
        feeds_decoder = any(
            d is not enc and len(d.input) >= 7 and d.input[5] == y_h and d.input[6] == y_c
            for d in lstms
        )
        if not feeds_decoder:
            continue
        roots = _ancestors(model, enc)
        if INPUT_PAST in roots and INPUT_FUTURE not in roots:
            return y_h, y_c
    return None


def _ancestors(model, node) -> set[str]:
    """Graph inputs (not initializers) that `node` depends on."""
    producer = {o: n for n in model.graph.node for o in n.output}
    inputs = {i.name for i in model.graph.input}
    seen: set[str] = set()
    out: set[str] = set()
    stack = [t for t in node.input if t]
    while stack:
        t = stack.pop()
        if t in seen:
            continue
        seen.add(t)
        if t in inputs:
            out.add(t)
        elif t in producer:
            stack.extend(x for x in producer[t].input if x)
    return out


__all__ = ["SharedPastForecaster", "shared_past_predictor"]
