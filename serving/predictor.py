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

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from forecast.contract import (  # noqa: F401 - the runtime's names for the contract
    INPUT_FUTURE,
    INPUT_PAST,
    MANIFEST_FILE,
    MANIFEST_FORMAT,
    MODEL_FILE,
    OUTPUT_GLUCOSE,
    ArrayForecaster,
    ContractError,
    ManifestError,
    ModelIntegrityError,
    ModelManifest,
    ModelMissingError,
    ModelSignatureError,
    OnnxForecaster,
    check_input_shapes,
    check_window_matches,
    file_sha256,
    runtime_window,
    session_options,
    steady_state_inputs,
)
from forecast.schema import GLUCOSE_MAX_MGDL, GLUCOSE_MIN_MGDL
from forecast.windows import WindowConfig

# the errors a predictor raises on purpose: the contract's, and one of its own
PredictorError = ContractError


class ImplausibleForecastError(PredictorError):
    """A forecast failed the plausibility checks (raised only when no fallback is set)."""


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
    finite = np.isfinite(glucose)
    reasons: list[str] = []
    if finite.all():  # the usual case, in fewer passes (a cycle's hot path)
        bad = np.zeros(len(glucose), dtype=bool)
        g = glucose
        if g.size == 0 or (rules.min_mgdl <= g.min() and g.max() <= rules.max_mgdl):
            out = bad.copy()
        else:
            out = ((g < rules.min_mgdl) | (g > rules.max_mgdl)).any(axis=(1, 2))
    else:
        bad = ~finite.all(axis=(1, 2))  # [B]
        g = np.where(finite, glucose, rules.min_mgdl)
        out = ((g < rules.min_mgdl) | (g > rules.max_mgdl)).any(axis=(1, 2)) & ~bad
    if bad.any():
        reasons.append("non-finite output")
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


@runtime_checkable
class Forecaster(Protocol):
    """What the runtime (the loop, the controllers, the engine) asks of a forecaster:
    checked quantile forecasts for a batch of windows, and how to name it in the journal.
    `FallbackPredictor` (a model, or the physiological forecaster, behind plausibility
    checks) is the implementation; `forecast.contract.ArrayForecaster` is what it wraps."""

    config: WindowConfig
    quantiles: tuple[float, ...]
    calls: int
    last: Forecast | None

    def forecast(
        self,
        past: np.ndarray,
        future: np.ndarray,
        *,
        groups: np.ndarray | None = None,
        settings: Sequence[Any] | None = None,
    ) -> Forecast: ...

    @property
    def label(self) -> str: ...

    @property
    def physiological(self) -> bool: ...


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
        self.manifest: ModelManifest | None = None  # set when the primary is an exported model
        self._median = int(np.argmin(np.abs(np.asarray(self.quantiles) - 0.5)))
        self._glucose_col = self.config.past_features.index("glucose")

    @property
    def median_index(self) -> int:
        return self._median

    @property
    def label(self) -> str:
        """What the journal calls this forecaster: the model by its hash, or the fallback and
        why it is in use."""
        if self.primary is None:
            return f"fallback ({self.degraded_reason})" if self.degraded_reason else "fallback"
        sha = self.manifest.sha256 if self.manifest is not None else ""
        return f"model {sha[:12]}" if sha else type(self).__name__

    @property
    def physiological(self) -> bool:
        """True when its primary answer is the physiological model (no learned model)."""
        return self.primary is None or isinstance(self.primary, SettingsPhysio)

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
        # per-row physiological parameters: only the fallback (or a settings-aware primary)
        # reads them, and a model that answers every row never needs them (the hot path)
        settings_aware = isinstance(self.primary, SettingsPhysio)
        if settings is not None and groups is None and len(settings) != b:
            raise PredictorError(f"{len(settings)} settings for a batch of {b} rows")
        row_params = (
            _row_params(settings, groups, b) if self.primary is None or settings_aware else None
        )
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
                if row_params is None:
                    row_params = _row_params(settings, groups, b)
                sub = None if row_params is None else [row_params[i] for i in idx]
                out[idx] = self._from_fallback(past[idx], future[idx], sub)
        if not (out[..., 1:] >= out[..., :-1]).all():  # (NaN compares False: sorted too)
            out = np.sort(out, axis=-1)  # quantiles never cross
        out = out.astype(np.float32)
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
        rows: dict[PhysioParams, list[int]] = {}
        for r, key in enumerate(params):  # one call per distinct patient, rows in order
            rows.setdefault(key, []).append(r)
        for key, idx in rows.items():
            out[idx] = self.forecaster(key).predict(past[idx], future[idx])
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
        fb = fallback if fallback is not None else physio_fallback(model.config, model.quantiles)
        super().__init__(model, fb, rules=rules)
        self.manifest = model.manifest

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
