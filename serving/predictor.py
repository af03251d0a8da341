"""The exported forecaster behind the model contract, with a physiological fallback.

The closed loop asks one question many times a cycle: "what will glucose do over the next
hour if I give this insulin?" This module answers it with the ONNX model that training
exported, and refuses to answer with a model it cannot vouch for:

* the file's sha256 must equal the manifest's (a tampered or swapped file is refused);
* the graph's inputs/outputs must be `past` float32 [B, L, F_past], `future` float32
  [B, H, F_future] → `glucose` float32 [B, H, Q] with the manifest's L, H, F and Q;
* the manifest's feature names, their order, L, H and the slot length must equal the
  `WindowConfig` the runtime builds inputs with (`forecast.windows`), so training and
  serving cannot disagree about what column 3 means.

At run time every forecast is checked (finite, inside 20–600 mg/dL, no absurd jumps between
consecutive 5-minute steps or away from the last reading). A failing group of rows is
answered by `forecast.baselines.PhysioForecaster` instead, and the `Forecast` says so, so
the loop can journal that the model was bypassed. Model loading errors are typed
(`ModelMissingError`, `ManifestError`, `ModelIntegrityError`, `ModelSignatureError`) so the
runtime can tell "no model" from "a model we must not trust".

Imports: numpy, onnxruntime, stdlib and `forecast` only (serving never loads torch).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from forecast.schema import GLUCOSE_MAX_MGDL, GLUCOSE_MIN_MGDL, GlucastError
from forecast.windows import WindowConfig

MODEL_FILE = "model.onnx"
MANIFEST_FORMAT = "glucast-forecaster/1"
MANIFEST_FILE = "manifest.json"
INPUT_PAST = "past"
INPUT_FUTURE = "future"
OUTPUT_GLUCOSE = "glucose"
_FLOAT_TENSOR = "tensor(float)"


# --------------------------------------------------------------------------- errors


class PredictorError(GlucastError):
    """Base of the errors a predictor raises on purpose."""


class ModelMissingError(PredictorError, FileNotFoundError):
    """There is no model (file or manifest) where the runtime was told to look."""


class ManifestError(PredictorError, ValueError):
    """The manifest is unreadable or lacks a field the contract requires."""


class ModelIntegrityError(PredictorError):
    """The model file is not the file the manifest describes (tampered, swapped, truncated)."""


class ModelSignatureError(PredictorError):
    """Inputs/outputs/features of the model disagree with the manifest or the runtime."""


class ImplausibleForecastError(PredictorError):
    """A forecast failed the plausibility checks (raised only when no fallback is set)."""


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
            raise ModelMissingError(f"no manifest at {path}")
        try:
            d = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ManifestError(f"{path}: unreadable manifest: {e}") from e
        return cls.from_dict(d, source=str(path))

    @property
    def quantile_index_median(self) -> int:
        return int(np.argmin(np.abs(np.asarray(self.quantiles) - 0.5)))


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
    """Anything that maps window arrays to quantile forecasts (ONNX model or a baseline)."""

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
        config: WindowConfig | None = None,
        threads: int = 1,
    ) -> None:
        import onnxruntime as ort

        os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
        self.model_dir = Path(model_dir)
        if not self.model_dir.is_dir():
            raise ModelMissingError(f"no model directory at {self.model_dir}")
        self.manifest = ModelManifest.read(self.model_dir / MANIFEST_FILE)
        path = self.model_dir / self.manifest.model_file
        if not path.is_file():
            raise ModelMissingError(f"no model file at {path}")
        blob = path.read_bytes()
        digest = hashlib.sha256(blob).hexdigest()
        if digest != self.manifest.sha256:
            raise ModelIntegrityError(
                f"{path}: sha256 {digest[:16]}… does not match the manifest's "
                f"{self.manifest.sha256[:16]}… (tampered file, or a manifest from another model)"
            )
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

    def predict(self, past: np.ndarray, future: np.ndarray) -> np.ndarray:
        """[B, L, F_past], [B, H, F_future] → [B, H, Q] mg/dL (raw, unchecked)."""
        past = np.ascontiguousarray(past, dtype=np.float32)
        future = np.ascontiguousarray(future, dtype=np.float32)
        check_input_shapes(self.config, past, future)
        out = self._run(past, future)  # [B, H, Q]
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


# --------------------------------------------------------------------------- plausibility


@dataclass(frozen=True)
class PlausibilityConfig:
    """What a believable 5-minute-grid glucose forecast looks like.

    Bounds apply to every quantile (the CGM range 20–600). Step limits apply to the median:
    plasma glucose rarely moves 4 mg/dL/min, so > 25 mg/dL per 5-minute step between
    horizon steps, or > 60 mg/dL between the last reading and the first step, is a model
    failure, not physiology.
    """

    min_mgdl: float = GLUCOSE_MIN_MGDL
    max_mgdl: float = GLUCOSE_MAX_MGDL
    max_step_mgdl: float = 25.0
    max_first_step_mgdl: float = 60.0


def implausible_rows(
    glucose: np.ndarray,
    last_glucose: np.ndarray | None,
    *,
    median_index: int,
    rules: PlausibilityConfig = PlausibilityConfig(),
) -> tuple[np.ndarray, list[str]]:
    """Boolean [B] of rows that fail, and a short reason per failing kind."""
    bad = ~np.isfinite(glucose).all(axis=(1, 2))  # [B]
    reasons: list[str] = []
    if bad.any():
        reasons.append("non-finite output")
    g = np.where(np.isfinite(glucose), glucose, rules.min_mgdl)
    out = ((g < rules.min_mgdl) | (g > rules.max_mgdl)).any(axis=(1, 2)) & ~bad
    if out.any():
        reasons.append(f"outside {rules.min_mgdl:g}–{rules.max_mgdl:g} mg/dL")
    med = g[:, :, median_index]  # [B, H]
    jump = (np.abs(np.diff(med, axis=1)) > rules.max_step_mgdl).any(axis=1)
    if last_glucose is not None:
        last = np.asarray(last_glucose, dtype=np.float64)
        ok = np.isfinite(last)
        jump |= ok & (np.abs(med[:, 0] - np.where(ok, last, 0.0)) > rules.max_first_step_mgdl)
    jump &= ~bad & ~out
    if jump.any():
        reasons.append("absurd step change")
    return bad | out | jump, reasons


def match_quantiles(pred: np.ndarray, have: Sequence[float], want: Sequence[float]) -> np.ndarray:
    """Re-express [B, H, Qhave] forecasts at quantile levels `want` (linear interpolation)."""
    have_a, want_a = np.asarray(have, float), np.asarray(want, float)
    if have_a.shape == want_a.shape and np.allclose(have_a, want_a):
        return pred
    if len(have_a) == 1:
        return np.repeat(pred, len(want_a), axis=-1)
    idx = np.clip(np.searchsorted(have_a, want_a) - 1, 0, len(have_a) - 2)
    lo, hi = have_a[idx], have_a[idx + 1]
    w = np.clip((want_a - lo) / (hi - lo), -0.5, 1.5)  # mild extrapolation at the tails
    return pred[..., idx] * (1 - w) + pred[..., idx + 1] * w


# --------------------------------------------------------------------------- predictor


@dataclass
class Forecast:
    """A batch of forecasts and which rows came from the fallback (for the journal)."""

    glucose: np.ndarray  # [B, H, Q] mg/dL, quantiles non-decreasing along Q
    fallback: np.ndarray  # [B] bool: row answered by the fallback forecaster
    reasons: list[str] = field(default_factory=list)
    source: str = "model"  # "model" | "fallback" | "mixed"

    @property
    def used_fallback(self) -> bool:
        return bool(self.fallback.any())


class FallbackPredictor:
    """A primary forecaster guarded by plausibility checks, a fallback behind it.

    `primary=None` means "no trustworthy model": every row goes to the fallback, and
    `degraded_reason` says why (the loop journals it each cycle). `groups` lets a caller
    that scores many candidate plans per patient keep a patient's candidates on one
    forecaster: if any row of a group fails, the whole group is re-answered by the fallback,
    so candidates are never compared across two different models.
    """

    def __init__(
        self,
        primary: ArrayForecaster | None,
        fallback: ArrayForecaster | None,
        *,
        rules: PlausibilityConfig = PlausibilityConfig(),
        degraded_reason: str = "",
    ) -> None:
        if primary is None and fallback is None:
            raise PredictorError("a predictor needs a model or a fallback")
        base = primary if primary is not None else fallback
        self.primary = primary
        self.fallback = fallback
        self.config: WindowConfig = base.config
        self.quantiles: tuple[float, ...] = tuple(base.quantiles)
        self.rules = rules
        self.degraded_reason = degraded_reason
        self.calls = 0  # batched calls made (the MPC promises one per cycle)
        self.fallback_rows = 0
        self.last: Forecast | None = None
        self._median = int(np.argmin(np.abs(np.asarray(self.quantiles) - 0.5)))
        self._glucose_col = self.config.past_features.index("glucose")

    @property
    def median_index(self) -> int:
        return self._median

    def forecast(
        self,
        past: np.ndarray,
        future: np.ndarray,
        *,
        groups: np.ndarray | None = None,
        settings: Sequence[Any] | None = None,
    ) -> Forecast:
        """Checked forecasts for a batch; failing rows (or their groups) use the fallback.

        `settings` (`PatientSettings`, one per group — or per row when `groups` is None)
        parameterise a settings-aware forecaster (`SettingsPhysio`): the fallback answers
        each patient with that patient's ISF and carb ratio.
        """
        past = np.ascontiguousarray(past, dtype=np.float32)  # [B, L, F_past]
        future = np.ascontiguousarray(future, dtype=np.float32)  # [B, H, F_future]
        check_input_shapes(self.config, past, future)
        self.calls += 1
        b = past.shape[0]
        last = past[:, -1, self._glucose_col].astype(np.float64)  # [B]
        reasons: list[str] = []
        row_params = _row_params(settings, groups, b)
        if self.primary is None:
            out = self._from_fallback(past, future, row_params)
            bad = np.ones(b, dtype=bool)
            reasons.append(self.degraded_reason or "no model")
        else:
            try:
                out = np.asarray(_call(self.primary, past, future, row_params), np.float64)
                bad, reasons = implausible_rows(
                    out, last, median_index=self._median, rules=self.rules
                )
            except PredictorError:
                raise
            except Exception as e:  # onnxruntime failures at run time are untyped
                out = np.full((b, self.config.horizon_slots, len(self.quantiles)), np.nan)
                bad = np.ones(b, dtype=bool)
                reasons = [f"model failed: {type(e).__name__}: {e}"]
            if bad.any() and groups is not None:
                groups = np.asarray(groups)
                bad = np.isin(groups, groups[bad])
            if bad.any():
                if self.fallback is None:
                    raise ImplausibleForecastError("; ".join(reasons))
                idx = np.flatnonzero(bad)
                out = out.copy()
                sub = None if row_params is None else [row_params[i] for i in idx]
                out[idx] = self._from_fallback(past[idx], future[idx], sub)
        out = np.sort(out, axis=-1).astype(np.float32)  # quantiles never cross
        n_bad = int(bad.sum())
        self.fallback_rows += n_bad
        source = "model" if n_bad == 0 else ("fallback" if n_bad == b else "mixed")
        self.last = Forecast(glucose=out, fallback=bad, reasons=reasons, source=source)
        return self.last

    def predict(self, past: np.ndarray, future: np.ndarray) -> np.ndarray:
        """[B, L, F_past], [B, H, F_future] → [B, H, Q] (checked; see `forecast`)."""
        return self.forecast(past, future).glucose

    def _from_fallback(
        self, past: np.ndarray, future: np.ndarray, params: list[PhysioParams] | None
    ) -> np.ndarray:
        assert self.fallback is not None
        pred = np.asarray(_call(self.fallback, past, future, params), dtype=np.float64)
        pred = match_quantiles(pred, self.fallback.quantiles, self.quantiles)
        return np.clip(pred, self.rules.min_mgdl, self.rules.max_mgdl)


@dataclass(frozen=True)
class PhysioParams:
    """One patient's physiological model, from the therapy settings a clinician programs."""

    isf_mgdl_per_u: float = 40.0  # population-typical when no settings are known
    carb_ratio_g_per_u: float = 10.0
    basal_u_per_h: float = 1.0  # insulin at exactly this rate leaves glucose flat

    @classmethod
    def from_settings(cls, s) -> PhysioParams:
        return cls(float(s.isf_mgdl_per_u), float(s.carb_ratio_g_per_u), float(s.basal_u_per_h))


class SettingsPhysio:
    """`forecast.baselines.PhysioForecaster` parameterised per patient from its settings.

    The fallback must work the moment the model is refused, with no training data at hand,
    and it must be right for *this* patient: a child's ISF is five times an adult's. So
    ISF, CSF = ISF / carb ratio and the basal-neutral rate come from `PatientSettings` (as
    in oref0 and Loop) and the forecaster is rebuilt from JSON (`PhysioForecaster.from_dict`,
    never fitted here). The band widens with the square root of the horizon
    (`spread_mgdl` at 5 minutes): a deliberately modest, symmetric interval.
    """

    def __init__(
        self,
        config: WindowConfig,
        quantiles: Sequence[float] = (0.05, 0.5, 0.95),
        *,
        momentum_min: float = 30.0,
        spread_mgdl: float = 5.0,
        default: PhysioParams = PhysioParams(),
    ) -> None:
        from statistics import NormalDist

        self.config = config
        self.quantiles = tuple(float(q) for q in quantiles)
        self.momentum_min = momentum_min
        self.default = default
        z = np.array([NormalDist().inv_cdf(q) for q in self.quantiles])  # [Q]
        steps = np.sqrt(np.arange(1, config.horizon_slots + 1))[:, None]  # [H, 1]
        self._offsets = (spread_mgdl * steps * z[None, :]).tolist()  # [H, Q]
        self._cache: dict[PhysioParams, Any] = {}

    def forecaster(self, params: PhysioParams):
        """The (cached) fitted-from-settings PhysioForecaster of one patient."""
        f = self._cache.get(params)
        if f is None:
            from forecast.baselines import PhysioForecaster

            f = PhysioForecaster.from_dict(
                {
                    "name": "physio",
                    "format": 1,
                    "params": {
                        "isf": params.isf_mgdl_per_u,
                        "csf": params.isf_mgdl_per_u / params.carb_ratio_g_per_u,
                        "momentum_min": self.momentum_min,
                        "neutral": "global",
                        "quantiles": list(self.quantiles),
                    },
                    "config": self.config.to_dict(),
                    "offsets": self._offsets,
                    "state": {
                        "isf": params.isf_mgdl_per_u,
                        "csf": params.isf_mgdl_per_u / params.carb_ratio_g_per_u,
                        "momentum_min": self.momentum_min,
                        "neutral": "global",
                        "neutral_rate_u_per_slot": params.basal_u_per_h
                        * self.config.slot_minutes
                        / 60.0,
                    },
                }
            )
            self._cache[params] = f
        return f

    def predict(
        self,
        past: np.ndarray,
        future: np.ndarray,
        params: Sequence[PhysioParams] | None = None,
    ) -> np.ndarray:
        """[B, L, Fp], [B, H, Ff] → [B, H, Q]; `params` per row (default: population)."""
        if params is None:
            return self.forecaster(self.default).predict(past, future)
        out = np.empty((len(past), self.config.horizon_slots, len(self.quantiles)), np.float32)
        keys = list(params)
        for key in dict.fromkeys(keys):  # one call per distinct patient, rows in order
            rows = np.fromiter((k == key for k in keys), bool, len(keys))
            out[rows] = self.forecaster(key).predict(past[rows], future[rows])
        return out


def _row_params(
    settings: Sequence[Any] | None, groups: np.ndarray | None, b: int
) -> list[PhysioParams] | None:
    if settings is None:
        return None
    per = [PhysioParams.from_settings(s) for s in settings]
    if groups is None:
        if len(per) != b:
            raise PredictorError(f"{len(per)} settings for a batch of {b} rows")
        return per
    return [per[int(g)] for g in np.asarray(groups)]


def _call(
    f: ArrayForecaster, past: np.ndarray, future: np.ndarray, params: list[PhysioParams] | None
) -> np.ndarray:
    if params is not None and isinstance(f, SettingsPhysio):
        return f.predict(past, future, params)
    return f.predict(past, future)


def physio_fallback(config: WindowConfig, quantiles: Sequence[float]) -> SettingsPhysio:
    """The physiological forecaster the runtime falls back to (from settings, no fitting)."""
    return SettingsPhysio(config, quantiles)


class Predictor(FallbackPredictor):
    """The runtime's forecaster: a verified ONNX model with the physiological fallback.

    Raises `ModelMissingError` / `ManifestError` / `ModelIntegrityError` /
    `ModelSignatureError` when the model cannot be trusted; use `load_predictor(...,
    strict=False)` to get a fallback-only predictor that says why instead.
    """

    def __init__(
        self,
        model_dir: str | Path,
        *,
        config: WindowConfig | None = None,
        rules: PlausibilityConfig = PlausibilityConfig(),
        threads: int = 1,
        fallback: ArrayForecaster | None = None,
    ) -> None:
        model = OnnxForecaster(model_dir, config=config, threads=threads)
        self.model = model
        self.manifest = model.manifest
        fb = fallback if fallback is not None else physio_fallback(model.config, model.quantiles)
        super().__init__(model, fb, rules=rules)

    def inputs_at(self, frame, origin=None) -> tuple[np.ndarray, np.ndarray]:
        """Model inputs from a canonical frame, built by THE window builder."""
        from forecast.windows import inputs_at

        return inputs_at(frame, self.config, origin)


def load_predictor(
    model_dir: str | Path | None,
    *,
    config: WindowConfig | None = None,
    strict: bool = True,
    quantiles: Sequence[float] = (0.05, 0.5, 0.95),
) -> FallbackPredictor:
    """The model in `model_dir`, or (strict=False) the fallback alone with the reason kept."""
    if model_dir is not None:
        try:
            return Predictor(model_dir, config=config)
        except PredictorError as e:
            if strict:
                raise
            reason = f"model refused: {e}"
    else:
        reason = "no model configured"
    cfg = config if config is not None else WindowConfig()
    return FallbackPredictor(None, physio_fallback(cfg, quantiles), degraded_reason=reason)
