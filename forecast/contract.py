"""The model contract between training and the runtime, in one place (numpy + json).

An exported forecaster is a directory with two files:

- ``model.onnx``: one self-contained graph. Inputs in raw units, ``past`` float32
  ``[B, L, F_past]`` and ``future`` float32 ``[B, H, F_future]``; output ``glucose`` float32
  ``[B, H, Q]`` mg/dL, one column per quantile; normalisation inside the graph.
- ``manifest.json``: what a consumer needs to build inputs and to trust the file
  (`manifest_dict` writes it, `ModelManifest` reads it): the format, the graph's sha256,
  the window (`forecast.windows.WindowConfig`: features in order, L, H, slot length), the
  quantiles, the tensor names and shapes, and the provenance (training data hash, MLflow
  run id, validation metrics).

`OnnxForecaster` is the one loader: it checks the file's sha256 against the manifest (the
bytes hashed are the bytes handed to onnxruntime), the graph's signature against the
window, and runs a probe. `training.export` writes the contract, `serving.predictor` and
the evaluation read it, so the two sides cannot drift. onnxruntime is imported only when
a model is loaded, so this module (and `forecast`) stays importable without it.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np

from forecast.schema import GlucastError
from forecast.windows import WindowConfig

MODEL_FILE = "model.onnx"
MANIFEST_FORMAT = "glucast-forecaster/1"
MANIFEST_FILE = "manifest.json"
INPUT_PAST = "past"
INPUT_FUTURE = "future"
OUTPUT_GLUCOSE = "glucose"
_FLOAT_TENSOR = "tensor(float)"


# --------------------------------------------------------------------------- errors


class ContractError(GlucastError):
    """A model directory the contract refuses (base of the errors below)."""


class ModelMissingError(ContractError, FileNotFoundError):
    """There is no model (file or manifest) where the caller was told to look."""


class ManifestError(ContractError, ValueError):
    """The manifest is unreadable, lacks a field the contract requires, or contradicts itself."""


class ModelIntegrityError(ContractError):
    """The model file is not the file the manifest describes (tampered, swapped, truncated)."""


class ModelSignatureError(ContractError):
    """Inputs/outputs/features of the model disagree with the manifest or the runtime."""


# --------------------------------------------------------------------------- manifest


@dataclass(frozen=True)
class ModelManifest:
    """What `manifest.json` promises about the model beside it.

    Canonical keys (what `training.export` writes): ``sha256``, ``window`` (a
    `WindowConfig.to_dict()`), ``quantiles``; optional ``model_file``, ``inputs``/``outputs``
    (name → shape), ``training_data_hash``, ``mlflow_run_id``, ``metrics``. A few spellings
    seen in the wild are accepted on reading (``model_sha256``, top-level ``past_features``
    and friends) so an older export is refused for a real reason, not for a key name.
    """

    sha256: str
    window: WindowConfig
    quantiles: tuple[float, ...]
    model_file: str = MODEL_FILE
    training_data_hash: str = ""
    mlflow_run_id: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, source: str = MANIFEST_FILE) -> ModelManifest:
        if not isinstance(d, dict):
            raise ManifestError(f"{source}: expected a JSON object, got {type(d).__name__}")
        sha = d.get("sha256") or d.get("model_sha256") or (d.get("model") or {}).get("sha256")
        if not isinstance(sha, str) or len(sha) != 64:
            raise ManifestError(f"{source}: missing or malformed 'sha256' of the model file")
        window = _window_from_manifest(d, source)
        q = d.get("quantiles")
        if not isinstance(q, list | tuple) or not q:
            raise ManifestError(f"{source}: missing 'quantiles'")
        try:
            quantiles = tuple(float(x) for x in q)
        except (TypeError, ValueError) as e:
            raise ManifestError(f"{source}: quantiles {q!r} are not numbers") from e
        if any(not 0.0 < x < 1.0 for x in quantiles) or list(quantiles) != sorted(quantiles):
            raise ManifestError(f"{source}: quantiles {quantiles} must be increasing in (0, 1)")
        fmt = d.get("format")
        if fmt is not None and fmt != MANIFEST_FORMAT:
            raise ManifestError(f"{source}: format {fmt!r}, this runtime reads {MANIFEST_FORMAT!r}")
        _check_manifest_consistent(d, window, len(quantiles), source)
        return cls(
            sha256=sha.lower(),
            window=window,
            quantiles=quantiles,
            model_file=str(d.get("onnx_file") or d.get("model_file") or MODEL_FILE),
            training_data_hash=str(d.get("training_data_hash") or d.get("data_hash") or ""),
            mlflow_run_id=str(d.get("mlflow_run_id") or d.get("run_id") or ""),
            metrics=dict(d.get("validation_metrics") or d.get("metrics") or {}),
            raw=d,
        )

    @classmethod
    def read(cls, path: str | Path) -> ModelManifest:
        path = Path(path)
        if not path.is_file():
            raise ModelMissingError(
                f"{path.parent} has no {path.name} (a model directory holds {MODEL_FILE} + "
                f"{MANIFEST_FILE}; export one with `glucast train`)"
            )
        try:
            d = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ManifestError(f"{path}: unreadable manifest: {e}") from e
        return cls.from_dict(d, source=str(path))

    # the manifest's other fields (split, calibration, config, ...) as in the file
    def get(self, key: str, default: Any = None) -> Any:
        return self.raw.get(key, default)

    def __getitem__(self, key: str) -> Any:
        return self.raw[key]

    def __contains__(self, key: object) -> bool:
        return key in self.raw

    @property
    def quantile_index_median(self) -> int:
        return int(np.argmin(np.abs(np.asarray(self.quantiles) - 0.5)))


def manifest_dict(
    *,
    kind: str,
    sha256: str,
    window: WindowConfig,
    quantiles: tuple[float, ...] | list[float],
    model_file: str = MODEL_FILE,
    **extra: Any,
) -> dict[str, Any]:
    """The manifest of an export: the contract's fields from the window and quantiles, then
    `extra` (provenance and export facts: split, data hashes, MLflow run id, metrics, ...)."""
    L, H, Q = window.past_slots, window.horizon_slots, len(quantiles)
    m: dict[str, Any] = {
        "format": MANIFEST_FORMAT,
        "model": kind,
        "onnx_file": model_file,
        "sha256": sha256,
        "inputs": {
            INPUT_PAST: {"dtype": "float32", "shape": ["batch", L, len(window.past_features)]},
            INPUT_FUTURE: {"dtype": "float32", "shape": ["batch", H, len(window.future_features)]},
        },
        "output": {
            "name": OUTPUT_GLUCOSE,
            "dtype": "float32",
            "shape": ["batch", H, Q],
            "units": "mg/dL",
        },  # fmt: skip
        "past_features": list(window.past_features),
        "future_features": list(window.future_features),
        "past_slots": L,
        "horizon_slots": H,
        "slot_minutes": int(window.slot_minutes),
        "horizons_min": [int(window.slot_minutes) * (h + 1) for h in range(H)],
        "quantiles": [float(q) for q in quantiles],
        "window_config": window.to_dict(),
    }
    m.update(extra)
    return m


def write_manifest(model_dir: str | Path, manifest: Mapping[str, Any]) -> Path:
    """`manifest.json` in `model_dir`, checked by reading it back with `ModelManifest`."""
    path = Path(model_dir) / MANIFEST_FILE
    path.write_text(json.dumps(manifest, indent=2, default=_jsonable) + "\n")
    ModelManifest.read(path)  # what the runtime will read must parse, here and now
    return path


def _jsonable(o: Any) -> Any:
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def _window_from_manifest(d: dict[str, Any], source: str) -> WindowConfig:
    w = d.get("window") or d.get("window_config") or d.get("config")
    if isinstance(w, dict) and "past_features" in w:
        try:
            return WindowConfig.from_dict(w)
        except (TypeError, ValueError, KeyError) as e:
            raise ManifestError(f"{source}: bad window config {w!r}: {e}") from e
    # flat spelling: features and sizes at the top level
    try:
        return WindowConfig(
            past_slots=int(d.get("past_slots", d.get("L"))),
            horizon_slots=int(d.get("horizon_slots", d.get("H"))),
            slot_minutes=int(d.get("slot_minutes", 5)),
            past_features=tuple(d["past_features"]),
            future_features=tuple(d["future_features"]),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise ManifestError(
            f"{source}: no window config (need 'window' or past/future features, L, H)"
        ) from e


def _check_manifest_consistent(
    d: dict[str, Any], window: WindowConfig, n_quantiles: int, source: str
) -> None:
    """A manifest that contradicts itself (flat fields vs window config vs shapes) is refused."""
    problems = []
    for key, want in (
        ("past_features", list(window.past_features)),
        ("future_features", list(window.future_features)),
        ("past_slots", window.past_slots),
        ("horizon_slots", window.horizon_slots),
        ("slot_minutes", window.slot_minutes),
    ):
        if key in d and (list(d[key]) if isinstance(want, list) else d[key]) != want:
            problems.append(f"{key} {d[key]!r} vs window config {want!r}")
    shapes = {
        INPUT_PAST: [window.past_slots, len(window.past_features)],
        INPUT_FUTURE: [window.horizon_slots, len(window.future_features)],
    }
    for name, dims in shapes.items():
        spec = (d.get("inputs") or {}).get(name)
        if isinstance(spec, dict) and "shape" in spec and list(spec["shape"])[1:] != dims:
            problems.append(f"inputs.{name}.shape {spec['shape']} vs {dims}")
    out = d.get("output")
    if isinstance(out, dict) and "shape" in out:
        if list(out["shape"])[1:] != [window.horizon_slots, n_quantiles]:
            problems.append(
                f"output.shape {out['shape']} vs [{window.horizon_slots}, {n_quantiles}]"
            )
    if problems:
        raise ManifestError(f"{source}: the manifest contradicts itself: " + "; ".join(problems))


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def runtime_window(manifest: WindowConfig) -> WindowConfig:
    """The window the runtime builds by default: the model's sizes and curves, and the
    canonical feature lists of `forecast.windows` — the features this runtime computes —
    followed by the therapy profile (`PROFILE_FEATURES`) when the model takes it (the runtime
    fills it from the patient's settings).

    A model trained on other features (or another order) is refused unless the caller
    passes a config that says so explicitly.
    """
    from dataclasses import replace

    from forecast.windows import FUTURE_FEATURES, PAST_FEATURES, PROFILE_FEATURES

    profile = tuple(f for f in PROFILE_FEATURES if f in manifest.past_features)
    return replace(manifest, past_features=PAST_FEATURES + profile, future_features=FUTURE_FEATURES)


def check_window_matches(manifest: WindowConfig, runtime: WindowConfig) -> None:
    """Refuse a model whose window differs from the runtime's in anything that matters.

    `max_past_gap_slots` is a data-selection rule of training, not part of what a column
    means, so it may differ.
    """
    problems = []
    sizes = ("past_slots", "horizon_slots", "slot_minutes")
    curves = ("insulin_peak_min", "insulin_dia_min", "carb_absorption_min")  # IOB/COB features
    for name in sizes + tuple(c for c in curves if hasattr(manifest, c)):
        a, b = getattr(manifest, name), getattr(runtime, name)
        if a != b:
            problems.append(f"{name}: model {a} vs runtime {b}")
    for name in ("past_features", "future_features"):
        a, b = tuple(getattr(manifest, name)), tuple(getattr(runtime, name))
        if a != b:
            problems.append(f"{name}: model {list(a)} vs runtime {list(b)}")
    if problems:
        raise ModelSignatureError(
            "model and runtime disagree on the window: " + "; ".join(problems)
        )


# --------------------------------------------------------------------------- forecasters


@runtime_checkable
class ArrayForecaster(Protocol):
    """Anything that maps window arrays to quantile forecasts (ONNX model or a baseline):
    the consumer's side of the contract."""

    config: WindowConfig
    quantiles: tuple[float, ...]

    def predict(self, past: np.ndarray, future: np.ndarray) -> np.ndarray: ...


def session_options(threads: int = 1):
    """One intra-op and one inter-op thread: the loop runs beside other work on small CPUs."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    return so


class OnnxForecaster:
    """A verified ONNX forecaster: hash, signature and window checked once, at load.

    The bytes that are hashed are the bytes handed to onnxruntime, so the file cannot change
    between the check and the load.
    """

    def __init__(
        self,
        model_dir: str | Path,
        *,
        config: WindowConfig | Literal["manifest"] | None = None,
        threads: int = 1,
    ) -> None:
        """`config`: the window inputs are built with — None: the runtime's
        (`runtime_window`, the canonical features); ``"manifest"``: the manifest's own."""
        import onnxruntime as ort

        os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
        self.model_dir = Path(model_dir)
        if not self.model_dir.is_dir():
            raise ModelMissingError(
                f"{self.model_dir} is not a model directory (expected {MODEL_FILE} + "
                f"{MANIFEST_FILE})"
            )
        self.manifest = ModelManifest.read(self.model_dir / MANIFEST_FILE)
        path = self.model_dir / self.manifest.model_file
        if not path.is_file():
            raise ModelMissingError(f"no model file at {path}")
        blob = path.read_bytes()
        digest = hashlib.sha256(blob).hexdigest()
        if digest != self.manifest.sha256:
            raise ModelIntegrityError(
                f"{path} does not match its manifest: sha256 {digest[:16]}… but the manifest "
                f"says {self.manifest.sha256[:16]}… (a changed file, or a manifest from another "
                "export: re-export, do not edit the manifest)"
            )
        if config == "manifest":
            config = self.manifest.window
        self.config = config if config is not None else runtime_window(self.manifest.window)
        check_window_matches(self.manifest.window, self.config)
        self.quantiles = self.manifest.quantiles
        self.sha256 = digest
        try:
            self.session = ort.InferenceSession(
                blob, sess_options=session_options(threads), providers=["CPUExecutionProvider"]
            )
        except Exception as e:  # onnxruntime raises its own untyped errors on a bad graph
            raise ModelIntegrityError(f"{path}: onnxruntime cannot load the graph: {e}") from e
        self._check_signature()
        self._probe()

    @classmethod
    def load(cls, model_dir: str | Path, threads: int = 1) -> OnnxForecaster:
        """The model on its own window, as the manifest states it (evaluation, comparisons):
        no runtime feature list is imposed, the file and graph checks are the same."""
        return cls(model_dir, config="manifest", threads=threads)

    @property
    def window_config(self) -> WindowConfig:
        return self.config

    # -- checks ------------------------------------------------------------------------

    def _check_signature(self) -> None:
        c = self.config
        inputs = {i.name: i for i in self.session.get_inputs()}
        outputs = {o.name: o for o in self.session.get_outputs()}
        if set(inputs) != {INPUT_PAST, INPUT_FUTURE}:
            raise ModelSignatureError(
                f"model inputs {sorted(inputs)} are not ['future', 'past'] (the model contract)"
            )
        if OUTPUT_GLUCOSE not in outputs:
            raise ModelSignatureError(f"model outputs {sorted(outputs)} lack 'glucose'")
        want = {
            INPUT_PAST: (inputs[INPUT_PAST], (c.past_slots, len(c.past_features))),
            INPUT_FUTURE: (inputs[INPUT_FUTURE], (c.horizon_slots, len(c.future_features))),
            OUTPUT_GLUCOSE: (outputs[OUTPUT_GLUCOSE], (c.horizon_slots, len(self.quantiles))),
        }
        for name, (arg, dims) in want.items():
            if arg.type != _FLOAT_TENSOR:
                raise ModelSignatureError(f"'{name}' is {arg.type}, the contract says float32")
            shape = list(arg.shape)
            if len(shape) != 3:
                raise ModelSignatureError(f"'{name}' has rank {len(shape)}, expected 3")
            if isinstance(shape[0], int) and shape[0] != 1 and shape[0] > 0:
                raise ModelSignatureError(f"'{name}' has a fixed batch {shape[0]}; need dynamic")
            for got, exp, what in zip(shape[1:], dims, ("time", "feature/quantile")):
                if isinstance(got, int) and got > 0 and got != exp:
                    raise ModelSignatureError(
                        f"'{name}' {what} axis is {got} in the graph, {exp} in the manifest"
                    )
        b = inputs[INPUT_PAST].shape[0]
        # a graph exported with batch 1 still works, one window at a time (slower, correct)
        self._dynamic_batch = not (isinstance(b, int) and b == 1)

    def _probe(self) -> None:
        """Run two steady-state windows once: dims the graph leaves symbolic are checked."""
        past, future = steady_state_inputs(self.config, batch=2)
        out = self._run(past, future)
        h, q = self.config.horizon_slots, len(self.quantiles)
        if out.shape != (2, h, q):
            raise ModelSignatureError(
                f"model returned {out.shape} for a batch of 2, want (2,{h},{q})"
            )

    # -- inference ---------------------------------------------------------------------

    def _run(self, past: np.ndarray, future: np.ndarray) -> np.ndarray:
        if not self._dynamic_batch and past.shape[0] != 1:
            return np.concatenate(
                [self._run(past[i : i + 1], future[i : i + 1]) for i in range(past.shape[0])]
            )
        (out,) = self.session.run([OUTPUT_GLUCOSE], {INPUT_PAST: past, INPUT_FUTURE: future})
        return out

    def predict(self, past: np.ndarray, future: np.ndarray, batch: int = 4096) -> np.ndarray:
        """[B, L, F_past], [B, H, F_future] → [B, H, Q] mg/dL (raw, unchecked), `batch` rows
        per onnxruntime call (bounded memory on a whole test split)."""
        past = np.ascontiguousarray(past, dtype=np.float32)
        future = np.ascontiguousarray(future, dtype=np.float32)
        check_input_shapes(self.config, past, future)
        if len(past) == 0:
            return np.zeros((0, self.config.horizon_slots, len(self.quantiles)), np.float32)
        out = np.concatenate(
            [
                self._run(past[i : i + batch], future[i : i + batch])
                for i in range(0, len(past), batch)
            ]
        )  # [B, H, Q]
        if out.shape != (past.shape[0], self.config.horizon_slots, len(self.quantiles)):
            raise ModelSignatureError(f"model returned shape {out.shape}")
        return out


def check_input_shapes(config: WindowConfig, past: np.ndarray, future: np.ndarray) -> None:
    want_p = (config.past_slots, len(config.past_features))
    want_f = (config.horizon_slots, len(config.future_features))
    if past.ndim != 3 or past.shape[1:] != want_p:
        raise ModelSignatureError(
            f"past has shape {past.shape}, want [B, {want_p[0]}, {want_p[1]}]"
        )
    if future.ndim != 3 or future.shape[1:] != want_f or future.shape[0] != past.shape[0]:
        raise ModelSignatureError(
            f"future has shape {future.shape}, want [{past.shape[0]}, {want_f[0]}, {want_f[1]}]"
        )


def steady_state_inputs(
    config: WindowConfig, *, batch: int = 1, glucose: float = 120.0, basal_u_per_h: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """Window arrays of a patient resting at `glucose` on scheduled basal (for probes/benchmarks).

    IOB is the steady-state basal IOB under the default insulin curve; time features are
    noon. Only feature names from `forecast.windows` are used, so this follows the config.
    """
    from forecast.insulin import InsulinCurve

    per_slot = basal_u_per_h * config.slot_minutes / 60.0
    ages = np.arange(0, InsulinCurve().dia_min, config.slot_minutes, dtype=np.float64)
    iob = float(per_slot * InsulinCurve().iob_fraction(ages).sum())
    values = {
        "glucose": glucose,
        "observed": 1.0,
        "basal_u": per_slot,
        "bolus_u": 0.0,
        "carbs_g": 0.0,
        "iob_u": iob,
        "cob_g": 0.0,
        "tod_sin": 0.0,
        "tod_cos": -1.0,
    }
    past = np.zeros((batch, config.past_slots, len(config.past_features)), np.float32)
    future = np.zeros((batch, config.horizon_slots, len(config.future_features)), np.float32)
    for i, name in enumerate(config.past_features):
        past[:, :, i] = values.get(name, 0.0)
    for i, name in enumerate(config.future_features):
        future[:, :, i] = values.get(name, 0.0)
    return past, future
