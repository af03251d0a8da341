"""Security: serving verifies model hashes, never unpickles, and binds servers to 127.0.0.1."""

from __future__ import annotations

import ast
import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from forecast.windows import WindowConfig
from serving.predictor import (
    FallbackPredictor,
    ModelIntegrityError,
    Predictor,
    load_predictor,
    steady_state_inputs,
)

SERVING = Path(__file__).resolve().parents[1] / "serving"
QUANTILES = (0.05, 0.5, 0.95)


def tiny_model(path: Path, spread: float = 10.0) -> Path:
    """A real ONNX forecaster (last glucose ± spread) with its manifest, built with onnx.helper."""
    w = WindowConfig()
    L, H, fp, ff, q = w.past_slots, w.horizon_slots, len(w.past_features), len(w.future_features), 3
    const = lambda name, arr, dt=TensorProto.INT64: helper.make_tensor(  # noqa: E731
        name, dt, np.shape(arr), np.asarray(arr).ravel().tolist()
    )
    g = w.past_index("glucose")
    graph = helper.make_graph(
        [
            helper.make_node("Slice", ["past", "starts", "ends", "axes"], ["last"]),
            helper.make_node("Expand", ["last", "shape"], ["flat"]),
            helper.make_node("Add", ["flat", "offsets"], ["glucose"]),
        ],
        "tiny",
        [
            helper.make_tensor_value_info("past", TensorProto.FLOAT, ["B", L, fp]),
            helper.make_tensor_value_info("future", TensorProto.FLOAT, ["B", H, ff]),
        ],
        [helper.make_tensor_value_info("glucose", TensorProto.FLOAT, ["B", H, q])],
        initializer=[
            const("starts", [L - 1, g]),
            const("ends", [L, g + 1]),
            const("axes", [1, 2]),
            const("shape", [1, H, q]),
            const("offsets", np.array([[[-spread, 0.0, spread]]]), TensorProto.FLOAT),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.mkdir(parents=True, exist_ok=True)
    blob = model.SerializeToString()
    (path / "model.onnx").write_bytes(blob)
    manifest = {
        "format": "glucast-forecaster/1",
        "sha256": hashlib.sha256(blob).hexdigest(),
        "window": w.to_dict(),
        "quantiles": list(QUANTILES),
    }
    (path / "manifest.json").write_text(json.dumps(manifest))
    return path


# --------------------------------------------------------------------------- model hashes


def test_a_verified_model_loads_and_predicts(tmp_path):
    p = Predictor(tiny_model(tmp_path / "m"))
    past, future = steady_state_inputs(p.config, batch=2)
    out = p.predict(past, future)
    assert out.shape == (2, 12, 3)
    assert np.allclose(out[:, :, 1], past[:, -1, p.config.past_index("glucose")][:, None])


def test_a_tampered_model_is_refused(tmp_path):
    d = tiny_model(tmp_path / "m")
    blob = bytearray((d / "model.onnx").read_bytes())
    blob[-1] ^= 0x01  # one bit
    (d / "model.onnx").write_bytes(bytes(blob))
    with pytest.raises(ModelIntegrityError, match="does not match"):
        Predictor(d)


def test_a_manifest_from_another_model_is_refused(tmp_path):
    a, b = tiny_model(tmp_path / "a", 10.0), tiny_model(tmp_path / "b", 20.0)
    (a / "manifest.json").write_text((b / "manifest.json").read_text())
    with pytest.raises(ModelIntegrityError):
        Predictor(a)


def test_the_loop_falls_back_and_says_why_on_a_refused_model(tmp_path):
    from serving.controllers import build_controller

    d = tiny_model(tmp_path / "m")
    (d / "model.onnx").write_bytes((d / "model.onnx").read_bytes() + b"\0")
    pred = load_predictor(d, strict=False)
    assert isinstance(pred, FallbackPredictor) and pred.primary is None
    assert "sha256" in pred.degraded_reason
    built = build_controller("mpc", str(d))
    _, used = built.controller, built.predictor
    assert used.primary is None and "model refused" in used.degraded_reason
    from forecast.cli import main as cli_main
    from serving.journal import Journal

    db = tmp_path / "j.db"
    argv = ["loop", "--model", str(d), "--backend", "sim", "--journal", str(db), "--speed", "fast",
            "--hours", "0.25", "--sensor", "none", "--quiet"]  # fmt: skip
    assert cli_main(argv) == 0  # the loop runs on, on the physiological fallback
    j = Journal(db, readonly=True)
    why = j.events("predictor")["detail"].iloc[0]
    assert "model refused" in why and "sha256" in why
    assert j.cycles()["predictor"].str.startswith("fallback").all()


# --------------------------------------------------------------------------- no unpickling

UNPICKLERS = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}


def _sources() -> list[Path]:
    files = sorted(SERVING.rglob("*.py"))
    assert len(files) > 10
    return files


def unpickling(source: str, name: str = "<src>") -> list[str]:
    """Every import of an unpickler and every call that unpickles, in Python source."""
    out = []
    for node in ast.walk(ast.parse(source, filename=name)):
        bad: list[str] = []
        if isinstance(node, ast.Import):
            bad = [a.name for a in node.names if a.name.split(".")[0] in UNPICKLERS]
        elif isinstance(node, ast.ImportFrom):
            bad = [node.module] if (node.module or "").split(".")[0] in UNPICKLERS else []
        elif isinstance(node, ast.Call):
            fn = ast.unparse(node.func)
            bad = [fn] if fn in ("torch.load", "pd.read_pickle", "pandas.read_pickle") else []
            bad += [
                f"{fn}(allow_pickle=...)"
                for k in node.keywords
                if k.arg == "allow_pickle"
                and not (isinstance(k.value, ast.Constant) and k.value.value is False)
            ]
        out += [f"{name}:{node.lineno}: {b}" for b in bad]
    return out


def test_nothing_in_serving_unpickles():
    problems = [p for f in _sources() for p in unpickling(f.read_text(), str(f))]
    assert problems == []


def test_the_unpickling_scan_can_fail():
    src = "import pickle\nimport numpy as np\nx = np.load('f', allow_pickle=True)\n"
    src += "from joblib import load\nimport torch\ntorch.load('m')\n"
    assert len(unpickling(src)) == 4
    assert unpickling('"""never pickle"""\nimport json\n') == []  # prose is not code


# --------------------------------------------------------------------------- servers

LOCAL = {"127.0.0.1", "localhost", "::1"}
SERVER_CALLS = ("HTTPServer", "ThreadingHTTPServer", "TCPServer", "ThreadingTCPServer", "UDPServer",
                "create_server", "make_server", "bind", "start_server")  # fmt: skip


def listening(source: str, name: str = "<src>") -> list[str]:
    """Wildcard addresses, non-local host defaults and non-local binds in Python source."""
    problems = []
    for node in ast.walk(ast.parse(source, filename=name)):
        at = f"{name}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Constant) and node.value in ("0.0.0.0", "::"):
            problems.append(f"{at}: wildcard address {node.value!r}")
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            a = node.args
            pos = [None] * (len(a.args) - len(a.defaults)) + list(a.defaults)
            for arg, d in zip(a.args + a.kwonlyargs, pos + list(a.kw_defaults)):
                if arg.arg in ("host", "bind", "bind_host", "address", "listen") and d is not None:
                    if not (isinstance(d, ast.Constant) and d.value in LOCAL):
                        problems.append(f"{at}: {arg.arg} defaults to {ast.unparse(d)}")
        if isinstance(node, ast.Call) and ast.unparse(node.func).split(".")[-1] in SERVER_CALLS:
            for arg in list(node.args[:1]) + [k.value for k in node.keywords if k.arg == "host"]:
                host = None
                if (
                    isinstance(arg, ast.Tuple)
                    and arg.elts
                    and isinstance(arg.elts[0], ast.Constant)
                ):
                    host = arg.elts[0].value
                elif isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                    host = arg.value
                if host is not None and host not in LOCAL:
                    problems.append(f"{at}: binds {host!r}")
    return problems


def test_servers_bind_localhost_by_default():
    problems = [p for f in _sources() for p in listening(f.read_text(), str(f))]
    assert problems == [], problems


def test_the_listening_scan_can_fail():
    src = "def serve(host='0.0.0.0'):\n    HTTPServer((host, 8080), H)\n"
    src += "def ok(host='127.0.0.1'):\n    HTTPServer(('127.0.0.1', 80), H)\n"
    src += "s.bind(('10.0.0.1', 1))\n"
    got = listening(src)
    assert len(got) == 3 and any("10.0.0.1" in g for g in got)
