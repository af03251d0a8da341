"""Damaged forecasters and models: faulty forecasters, a hand-built ONNX model, its damage."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from serving.insilico.faultmatrix.cases import FaultMatrixError
from serving.insilico.faults import Window
from serving.predictor import SettingsPhysio

# --------------------------------------------------------------------------- faulty forecasters


class ForecasterFault:
    """When and how a forecaster misbehaves: NaN, ±inf or an exception, during `windows`."""

    def __init__(self, clock: Any, windows: Sequence[Window], mode: str) -> None:
        if mode not in ("nan", "inf", "raise"):
            raise FaultMatrixError(f"unknown forecaster fault {mode!r}")
        self.clock, self.windows, self.mode = clock, list(windows), mode
        self.calls = 0

    def wrap(self, run: Callable[[], np.ndarray], shape: tuple[int, ...]) -> np.ndarray:
        if not any(w.active(self.clock.now()) for w in self.windows):
            return run()
        self.calls += 1
        if self.mode == "raise":  # untyped, as onnxruntime's own failures are
            raise RuntimeError("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION (injected fault)")
        out = np.asarray(run(), dtype=np.float32).copy()
        if self.mode == "nan":
            out[:] = np.nan
        else:
            out[..., ::2] = np.inf
            out[..., 1::2] = -np.inf
        return out.reshape(shape)


class FaultySettingsPhysio(SettingsPhysio):
    """The settings-based physiological forecaster, misbehaving during a fault window.

    A subclass rather than a wrapper so `FallbackPredictor` still hands it each patient's
    parameters: the forecaster is the real one, only its answers are damaged.
    """

    def __init__(self, config, quantiles, fault: ForecasterFault) -> None:
        super().__init__(config, quantiles)
        self.fault = fault

    def predict(self, past, future, params=None):
        shape = (len(past), self.config.horizon_slots, len(self.quantiles))
        return self.fault.wrap(lambda: super(FaultySettingsPhysio, self).predict(past, future, params), shape)  # fmt: skip


class FaultyModel:
    """Any array forecaster (an ONNX model), misbehaving during a fault window."""

    def __init__(self, inner: Any, fault: ForecasterFault) -> None:
        self.inner, self.fault = inner, fault
        self.config, self.quantiles = inner.config, inner.quantiles

    def predict(self, past, future):
        shape = (len(past), self.config.horizon_slots, len(self.quantiles))
        return self.fault.wrap(lambda: self.inner.predict(past, future), shape)


# --------------------------------------------------------------------------- a real ONNX model


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(num: int, payload: bytes | int | str) -> bytes:
    if isinstance(payload, int):
        return _varint(num << 3) + _varint(payload)
    data = payload.encode() if isinstance(payload, str) else payload
    return _varint(num << 3 | 2) + _varint(len(data)) + data


def persistence_model_bytes(window, quantiles: Sequence[float] = (0.1, 0.5, 0.9)) -> bytes:
    """A small, real ONNX forecaster honouring the model contract, encoded by hand.

    glucose[b, h, q] = last past glucose − 30 mg/dL × planned bolus up to h + a band that
    widens with √h. `serving` may not import the `onnx` package, and the matrix needs a model
    whose corruption it can show being refused, so the protobuf is written directly
    (ModelProto/GraphProto/NodeProto/TensorProto field numbers from onnx.proto).
    """
    L, H = window.past_slots, window.horizon_slots
    Fp, Ff, Q = len(window.past_features), len(window.future_features), len(quantiles)
    sel = np.zeros((H, L))
    sel[:, L - 1] = 1.0  # picks the last past slot
    wg = np.zeros((Fp, Q))
    wg[window.past_index("glucose"), :] = 1.0  # ... its glucose, for every quantile
    cum = np.tril(np.ones((H, H)))  # planned insulin summed up to each horizon
    wf = np.zeros((Ff, Q))
    wf[window.future_index("bolus_u"), :] = -30.0
    z = np.linspace(-1.0, 1.0, Q)
    band = np.array([[10.0 * math.sqrt(h + 1) * zq for zq in z] for h in range(H)])

    def tensor(name: str, a: np.ndarray) -> bytes:
        a = np.ascontiguousarray(a, dtype=np.float32)
        return b"".join(_field(1, int(d)) for d in a.shape) + _field(2, 1) + _field(8, name) + _field(9, a.tobytes())  # fmt: skip

    def node(op: str, ins: Sequence[str], out: str) -> bytes:
        return b"".join(_field(1, i) for i in ins) + _field(2, out) + _field(3, out) + _field(4, op)  # fmt: skip

    def value(name: str, dims: Sequence[int | str]) -> bytes:
        shape = b"".join(_field(1, _field(2, d) if isinstance(d, str) else _field(1, d)) for d in dims)  # fmt: skip
        return _field(1, name) + _field(2, _field(1, _field(1, 1) + _field(2, shape)))

    nodes = [("MatMul", ("S", "past"), "last"), ("MatMul", ("last", "Wg"), "g"),
             ("MatMul", ("T", "future"), "cum"), ("MatMul", ("cum", "Wf"), "ins"),
             ("Add", ("g", "ins"), "gi"), ("Add", ("gi", "B"), "glucose")]  # fmt: skip
    graph = (
        b"".join(_field(1, node(*n)) for n in nodes)
        + _field(2, "glucast-faultmatrix-persistence")
        + b"".join(
            _field(5, tensor(n, a))
            for n, a in (("S", sel), ("Wg", wg), ("T", cum), ("Wf", wf), ("B", band))
        )  # fmt: skip
        + _field(11, value("past", ["batch", L, Fp]))
        + _field(11, value("future", ["batch", H, Ff]))
        + _field(12, value("glucose", ["batch", H, Q]))
    )
    return _field(1, 8) + _field(2, "glucast") + _field(7, graph) + _field(8, _field(1, "") + _field(2, 17))  # fmt: skip


def write_model_dir(path: Path, window=None, quantiles: Sequence[float] = (0.1, 0.5, 0.9)) -> Path:
    """model.onnx + manifest.json (the contract's format) in `path`."""
    from forecast.windows import WindowConfig

    window = window or WindowConfig()
    path.mkdir(parents=True, exist_ok=True)
    blob = persistence_model_bytes(window, quantiles)
    (path / "model.onnx").write_bytes(blob)
    manifest = {
        "format": "glucast-forecaster/1",
        "model": "persistence (glucast faults)",
        "sha256": hashlib.sha256(blob).hexdigest(),
        "window": window.to_dict(),
        "quantiles": list(quantiles),
    }
    (path / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return path


def damage_model_dir(src: Path, dst: Path, how: str) -> Path:
    """A copy of a model directory with a flipped byte (corrupt) or another window (mismatch)."""
    shutil.copytree(src, dst)
    manifest = json.loads((dst / "manifest.json").read_text())
    model = dst / (manifest.get("onnx_file") or manifest.get("model_file") or "model.onnx")
    if how == "corrupt":
        blob = bytearray(model.read_bytes())
        blob[len(blob) // 2] ^= 0xFF
        model.write_bytes(bytes(blob))
    elif how == "mismatch":  # the manifest of a model with a 3-hour past, beside this graph
        for key in ("window", "window_config", "config"):
            if isinstance(manifest.get(key), dict):
                manifest[key]["past_slots"] = 36
        if "past_slots" in manifest:
            manifest["past_slots"] = 36
        past = (manifest.get("inputs") or {}).get("past")
        if isinstance(past, dict) and isinstance(past.get("shape"), list):
            past["shape"][1] = 36
        (dst / "manifest.json").write_text(json.dumps(manifest))
    else:
        raise FaultMatrixError(f"unknown model damage {how!r}")
    return dst
