"""Baseline forecasters on window arrays, scikit-learn style (fit / predict), JSON-serialisable.

Every forecaster takes ``past [B, L, F_past]`` and ``future [B, H, F_future]`` exactly as
`forecast.windows` builds them (raw units) and returns ``[B, H, Q]`` mg/dL, one column per
quantile. The quantiles are the point forecast plus per-horizon quantiles of the training
residuals (``calibrate`` recomputes them on held-out windows); the columns are monotone in the
quantile by construction. Parameters travel as plain JSON (`to_dict`/`from_dict`), never
pickle: serving loads the physiological model from JSON as its fallback.

- `PersistenceForecaster`: the last reading, held.
- `LinearTrendForecaster`: the last reading plus the least-squares slope of the real readings
  of the last ``trend_min`` minutes.
- `RidgeForecaster`: predicts the glucose change from the last reading with a ridge
  regression per horizon on past glucose deltas and exogenous insulin/carb effects
  (insulin and carbs acting by each horizon, from the same curves as IOB/COB). The
  coefficients of insulin effects are constrained ≤ 0 and those of carb effects ≥ 0, so more
  planned insulin can never raise the forecast.
- `PhysioForecaster`: Loop/oref0 in spirit — last reading + decaying momentum of the
  *unexplained* glucose velocity (oref0's "deviation") − ISF × (insulin acting beyond a
  basal-neutral rate) + CSF × carbs absorbed. ISF, CSF ≥ 0 are fitted by non-negative least
  squares on training windows (or given).

Why a constrained solver and not `sklearn.linear_model.Ridge`: Ridge cannot bound individual
coefficients and clipping after the fit gives a model that is not the constrained optimum;
the bounded problem here is tiny (a few dozen coefficients), solved exactly with
`scipy.optimize.lsq_linear` on the Cholesky factor of the ridge normal equations.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar, Protocol, Self, runtime_checkable

import numpy as np
from scipy.optimize import lsq_linear
from sklearn.exceptions import NotFittedError
from sklearn.preprocessing import StandardScaler

from forecast.insulin import carb_absorption, insulin_activity
from forecast.schema import GLUCOSE_MAX_MGDL, GLUCOSE_MIN_MGDL, GlucastError
from forecast.windows import WindowConfig, Windows

__all__ = [
    "BASELINES",
    "DEFAULT_QUANTILES",
    "BaselineError",
    "Forecaster",
    "LinearTrendForecaster",
    "PersistenceForecaster",
    "PhysioForecaster",
    "RidgeForecaster",
    "load_baseline",
]

DEFAULT_QUANTILES: tuple[float, ...] = (0.05, 0.5, 0.95)
_FORMAT = 1


class BaselineError(GlucastError, ValueError):
    """Bad input to a baseline forecaster (shapes, features, parameters, a serialised model)."""


@runtime_checkable
class Forecaster(Protocol):
    """What training, evaluation and serving expect of any forecaster."""

    quantiles: tuple[float, ...]

    @property
    def config(self) -> WindowConfig | None: ...

    def fit(self, windows: Windows) -> Self: ...

    def predict(self, past: np.ndarray, future: np.ndarray) -> np.ndarray: ...

    def to_dict(self) -> dict[str, Any]: ...


# --------------------------------------------------------------------------- input handling


def _check_quantiles(q: Any) -> tuple[float, ...]:
    qs = tuple(float(x) for x in q)
    if not qs:
        raise BaselineError("quantiles must not be empty")
    if any(not 0 < x < 1 for x in qs) or any(b <= a for a, b in zip(qs, qs[1:])):
        raise BaselineError(f"quantiles must be strictly increasing and inside (0, 1), got {qs}")
    return qs


def _check_arrays(
    past: np.ndarray, future: np.ndarray, config: WindowConfig
) -> tuple[np.ndarray, np.ndarray]:
    """Shapes and values at the boundary; returns float64 copies."""
    p = np.asarray(past, dtype=np.float64)
    f = np.asarray(future, dtype=np.float64)
    L, H = config.past_slots, config.horizon_slots
    fp, ff = len(config.past_features), len(config.future_features)
    if p.ndim != 3 or p.shape[1:] != (L, fp):
        raise BaselineError(
            f"past must be [B, {L}, {fp}] (features {config.past_features}), got {p.shape}; "
            "build it with forecast.windows"
        )
    if f.ndim != 3 or f.shape[1:] != (H, ff):
        raise BaselineError(
            f"future must be [B, {H}, {ff}] (features {config.future_features}), got {f.shape}"
        )
    if p.shape[0] != f.shape[0]:
        raise BaselineError(f"past and future batch sizes differ: {p.shape[0]} vs {f.shape[0]}")
    if not np.isfinite(p).all():
        raise BaselineError("past has NaN/inf; windows carry glucose forward and fill inputs")
    if not np.isfinite(f).all():
        raise BaselineError("future has NaN/inf; write 0 for no planned insulin or carbs")
    return p, f


def _past_col(p: np.ndarray, config: WindowConfig, name: str) -> np.ndarray:
    """A past feature ``[B, L]``, zeros when the config does not carry it."""
    if name in config.past_features:
        return p[:, :, config.past_index(name)]
    return np.zeros(p.shape[:2])


def _future_col(f: np.ndarray, config: WindowConfig, name: str) -> np.ndarray:
    """A future feature ``[B, H]``, zeros when the config does not carry it."""
    if name in config.future_features:
        return f[:, :, config.future_index(name)]
    return np.zeros(f.shape[:2])


def _last_glucose(p: np.ndarray, config: WindowConfig) -> np.ndarray:
    return p[:, -1, config.past_index("glucose")]  # [B]


def _slope(p: np.ndarray, config: WindowConfig, slots: int) -> np.ndarray:
    """Least-squares glucose slope (mg/dL per slot) over the real readings of the last slots.

    Uses the ``observed`` mask where the config has it (carried values are not readings);
    fewer than two readings give 0 (no trend rather than a guess).
    """
    k = min(slots + 1, p.shape[1])
    g = p[:, -k:, config.past_index("glucose")]  # [B, k]
    if "observed" in config.past_features:
        w = (p[:, -k:, config.past_index("observed")] > 0.5).astype(np.float64)
    else:
        w = np.ones_like(g)
    t = np.arange(-k + 1, 1, dtype=np.float64)[None, :]  # [1, k]
    n = w.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        t_mean = (w * t).sum(1) / n
        g_mean = (w * g).sum(1) / n
        tc = (t - t_mean[:, None]) * w
        sxx = (tc * tc).sum(1)
        sxy = (tc * (g - g_mean[:, None])).sum(1)
        s = sxy / sxx
    return np.where((n >= 2) & (sxx > 0), s, 0.0)


def _effects(p: np.ndarray, f: np.ndarray, config: WindowConfig, recent_slots: int) -> dict:
    """Insulin and carb action around the origin, per window, from the window alone.

    Returns cumulative action by each target (``[B, H]``: units of insulin / grams of carbs
    acting in slots ``t0 … t0+h``, the interval over which the glucose at ``t0+h+1`` changed
    from the last reading), split into past (window doses + the older remainder) and planned
    future doses, plus the mean action per slot over the last `recent_slots` slots before the
    origin (what the recent glucose slope already reflects).

    Insulin older than the window is known only through the ``iob_u`` series (and carbs
    through ``cob_g``); see `_old_dose` for how its remaining action is extrapolated.
    """
    L, H = config.past_slots, config.horizon_slots
    slot = config.slot_minutes
    out = {}
    specs = (
        ("ins", ("basal_u", "bolus_u"), "iob_u", config.insulin_curve, insulin_activity),
        ("carb", ("carbs_g",), "cob_g", config.carb_curve, carb_absorption),
    )
    for key, names, on_board_name, curve, action_fn in specs:
        dose_p = sum(_past_col(p, config, n) for n in names)  # [B, L]
        dose_f = sum(_future_col(f, config, n) for n in names)  # [B, H]
        if key == "ins":
            ob_kernel, act_kernel = curve.iob_kernel(slot), curve.activity_kernel(slot)
        else:
            ob_kernel, act_kernel = curve.cob_kernel(slot), curve.absorption_kernel(slot)
        # On board at the origin from the window's own doses (dose at t0-m has age m slots).
        window_ob = (dose_p[:, ::-1] * _padded(ob_kernel, L)[None, :]).sum(1)  # [B]
        old_dose, old_age = _old_dose(p, config, on_board_name, dose_p, window_ob, ob_kernel)
        n_tab = len(ob_kernel) + 2 * L + H + 2
        act_k = _padded(act_kernel, n_tab)
        # Action from window doses in slots t0-L+1 … t0+H-1.
        act_p = action_fn(np.concatenate([dose_p, np.zeros((len(p), H))], axis=1), slot, curve)
        # The old dose is `old_age` slots old at the window's first slot, so old_age + L - 1 + j
        # at slot t0+j.
        j = np.arange(-L, H)[None, :]  # [1, L+H] slots t0-L … t0+H-1
        old_act = old_dose[:, None] * act_k[np.clip(old_age[:, None] + L - 1 + j, 0, n_tab - 1)]
        past_future = act_p[:, L - 1 : L - 1 + H] + old_act[:, L:]  # [B, H] slots t0 … t0+H-1
        out[f"{key}_past"] = np.cumsum(past_future, axis=1)  # [B, H]
        act_f = action_fn(dose_f, slot, curve)  # [B, H] slots t0+1 … t0+H
        cum_f = np.cumsum(act_f, axis=1)
        out[f"{key}_future"] = np.concatenate([np.zeros((len(p), 1)), cum_f[:, :-1]], axis=1)
        r = max(1, min(recent_slots, L - 1))
        recent = act_p[:, L - 1 - r : L - 1] + old_act[:, L - r : L]  # [B, r] slots t0-r … t0-1
        out[f"{key}_recent"] = recent.mean(axis=1)  # [B] per slot
    return out


def _old_dose(
    p: np.ndarray,
    config: WindowConfig,
    on_board_name: str,
    dose_p: np.ndarray,
    window_ob: np.ndarray,
    ob_kernel: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Doses given before the window, summarised as one dose of an effective age.

    The on-board series tells how much of the pre-window doses remained at the window's first
    slot (R0) and at the origin (R). One dose whose on-board fraction falls from F(a) to
    F(a + L − 1) over the window reproduces both when F(a + L − 1) / F(a) = R / R0: pick the
    age `a` (slots, at the first window slot) closest to that, and the dose R0 / F(a). Its
    action after the origin then continues the observed decay instead of guessing it.
    Returns (dose ``[B]``, age ``[B]`` int); zeros when the config has no on-board feature.
    """
    b, L = len(p), config.past_slots
    if on_board_name not in config.past_features:
        return np.zeros(b), np.ones(b, dtype=np.intp)
    ob = _past_col(p, config, on_board_name)  # [B, L]
    r0 = np.maximum(ob[:, 0] - dose_p[:, 0] * ob_kernel[0], 0.0)  # pre-window, at t0-L+1
    r = np.maximum(ob[:, -1] - window_ob, 0.0)  # pre-window, at t0
    f = _padded(ob_kernel, len(ob_kernel) + L + 1)
    ages = np.arange(1, len(ob_kernel))  # [A] a dose before the window is >= 1 slot old
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio_tab = np.where(f[ages] > 0, f[ages + L - 1] / f[ages], 0.0)  # [A]
        ratio = np.where(r0 > 0, r / r0, 0.0)  # [B]
    best = np.abs(ratio_tab[None, :] - np.minimum(ratio, 1.0)[:, None]).argmin(axis=1)  # [B]
    age = ages[best]
    dose = np.where(r0 > 0, r0 / f[age], 0.0)
    return dose, age


def _padded(kernel: np.ndarray, n: int) -> np.ndarray:
    """The first n taps of a kernel, zero-padded past its end."""
    out = np.zeros(n)
    m = min(n, len(kernel))
    out[:m] = kernel[:m]
    return out


def _bounded_ridge(
    x: np.ndarray, y: np.ndarray, alpha: float, lower: np.ndarray, upper: np.ndarray
) -> tuple[float, np.ndarray]:
    """min ||y - b - X w||² + alpha ||w||² with lower <= w <= upper, intercept b free.

    Solved exactly on the (P+1)×(P+1) normal equations: with G = AᵀA + D and its Cholesky
    factor R (G = RᵀR), ||R w - R⁻ᵀ Aᵀy||² equals the objective up to a constant.
    """
    a = np.concatenate([np.ones((len(x), 1)), x], axis=1)  # [N, P+1]
    g = a.T @ a
    g[np.arange(1, g.shape[0]), np.arange(1, g.shape[0])] += alpha
    g += np.eye(g.shape[0]) * 1e-9 * max(1.0, np.trace(g) / g.shape[0])
    r = np.linalg.cholesky(g).T  # upper, G = RᵀR
    rhs = np.linalg.solve(r.T, a.T @ y)
    lb = np.r_[-np.inf, lower]
    ub = np.r_[np.inf, upper]
    res = lsq_linear(r, rhs, bounds=(lb, ub), method="bvls", tol=1e-12)
    return float(res.x[0]), res.x[1:]


def _floats(a: np.ndarray) -> list:
    return np.asarray(a, dtype=np.float64).tolist()


# --------------------------------------------------------------------------- base class


class _Baseline:
    """Common fit/predict/serialisation; subclasses give the point forecast."""

    name: ClassVar[str] = ""

    def __init__(self, *, quantiles: tuple[float, ...] = DEFAULT_QUANTILES) -> None:
        self.quantiles = quantiles
        self.config_: WindowConfig | None = None
        self.offsets_: np.ndarray | None = None  # [H, Q]

    # sklearn-style parameter access (constructor arguments only)
    def get_params(self, deep: bool = True) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self._param_names()}

    def set_params(self, **params: Any) -> Self:
        for k, v in params.items():
            if k not in self._param_names():
                raise BaselineError(f"{type(self).__name__} has no parameter {k!r}")
            setattr(self, k, v)
        return self

    @classmethod
    def _param_names(cls) -> tuple[str, ...]:
        return ("quantiles",)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({args})"

    @property
    def config(self) -> WindowConfig | None:
        """The window geometry the model was fitted on (None before `fit`)."""
        return self.config_

    # ---- fitting
    def fit(self, windows: Windows) -> Self:
        """Fit on training windows, then set the interval from their residuals."""
        self._check_windows(windows)
        self.quantiles = _check_quantiles(self.quantiles)
        self._validate_params()
        self.config_ = windows.config
        p, f = _check_arrays(windows.past, windows.future, windows.config)
        self._fit_point(p, f, windows.target.astype(np.float64))
        self.offsets_ = self._residual_offsets(p, f, windows.target)
        return self

    def calibrate(self, windows: Windows) -> Self:
        """Recompute the interval from residuals on other (e.g. validation) windows."""
        self._require_fitted()
        self._check_windows(windows)
        if windows.config != self.config_:
            raise BaselineError("calibration windows were built with a different WindowConfig")
        p, f = _check_arrays(windows.past, windows.future, windows.config)
        self.offsets_ = self._residual_offsets(p, f, windows.target)
        return self

    def _check_windows(self, windows: Windows) -> None:
        if not isinstance(windows, Windows):
            raise BaselineError(
                f"fit expects forecast.windows.Windows, got {type(windows).__name__}"
            )
        if len(windows) == 0:
            raise BaselineError("no windows to fit on; the frame is too short or too gappy")
        if not np.isfinite(windows.target).any():
            raise BaselineError("the windows have no real target readings to fit on")
        if "glucose" not in windows.config.past_features:
            raise BaselineError("baselines need 'glucose' among the past features")

    def _residual_offsets(self, p: np.ndarray, f: np.ndarray, target: np.ndarray) -> np.ndarray:
        """Per-horizon quantiles of target − point forecast: ``[H, Q]``, monotone in Q."""
        resid = target.astype(np.float64) - self._point(p, f)  # [N, H]
        q = np.asarray(self.quantiles)
        out = np.zeros((resid.shape[1], len(q)))
        finite_all = resid[np.isfinite(resid)]
        for h in range(resid.shape[1]):
            r = resid[:, h]
            r = r[np.isfinite(r)]
            out[h] = np.quantile(r if len(r) else finite_all, q)
        return np.maximum.accumulate(out, axis=1)

    # ---- prediction
    def predict(self, past: np.ndarray, future: np.ndarray) -> np.ndarray:
        """``[B, H, Q]`` float32 mg/dL: point forecast + residual quantiles, clipped to the
        CGM range (a monotone map, so quantile order and insulin monotonicity survive)."""
        self._require_fitted()
        assert self.config_ is not None and self.offsets_ is not None
        p, f = _check_arrays(past, future, self.config_)
        point = self._point(p, f)  # [B, H]
        out = point[:, :, None] + self.offsets_[None, :, :]  # [B, H, Q]
        return np.clip(out, GLUCOSE_MIN_MGDL, GLUCOSE_MAX_MGDL).astype(np.float32)

    def predict_windows(self, windows: Windows) -> np.ndarray:
        """`predict` on a `Windows` batch."""
        return self.predict(windows.past, windows.future)

    def _require_fitted(self) -> None:
        if self.config_ is None or self.offsets_ is None:
            raise NotFittedError(
                f"{type(self).__name__} is not fitted; call fit(windows) or load it with from_dict"
            )

    # ---- hooks
    def _validate_params(self) -> None:
        pass

    def _fit_point(self, p: np.ndarray, f: np.ndarray, target: np.ndarray) -> None:
        pass

    def _point(self, p: np.ndarray, f: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _state(self) -> dict[str, Any]:
        return {}

    def _load_state(self, state: dict[str, Any]) -> None:
        pass

    # ---- serialisation
    def to_dict(self) -> dict[str, Any]:
        """JSON-safe parameters (numbers, strings, lists): ``json.dumps`` works on it."""
        self._require_fitted()
        assert self.config_ is not None and self.offsets_ is not None
        params = {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.get_params().items()}
        return {
            "name": self.name,
            "format": _FORMAT,
            "params": params,
            "config": self.config_.to_dict(),
            "offsets": _floats(self.offsets_),
            "state": self._state(),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Self:
        """Rebuild a fitted forecaster from `to_dict` output (predictions are identical)."""
        if not isinstance(d, dict):
            raise BaselineError(f"from_dict expects a dict, got {type(d).__name__}")
        if d.get("name") != cls.name:
            raise BaselineError(f"dict describes {d.get('name')!r}, not {cls.name!r}")
        if d.get("format") != _FORMAT:
            raise BaselineError(
                f"unsupported baseline format {d.get('format')!r} (expected {_FORMAT})"
            )
        try:
            params = dict(d["params"])
            if "quantiles" in params:
                params["quantiles"] = tuple(params["quantiles"])
            model = cls(**params)
            model.quantiles = _check_quantiles(model.quantiles)
            model.config_ = WindowConfig.from_dict(d["config"])
            offsets = np.asarray(d["offsets"], dtype=np.float64)
            want = (model.config_.horizon_slots, len(model.quantiles))
            if offsets.shape != want:
                raise BaselineError(f"offsets have shape {offsets.shape}, expected {want}")
            model.offsets_ = offsets
            model._load_state(d.get("state", {}))
        except (KeyError, TypeError) as e:
            raise BaselineError(f"malformed {cls.name} model dict: {e!r}") from e
        return model


# --------------------------------------------------------------------------- baselines


class PersistenceForecaster(_Baseline):
    """The last reading, held for every horizon (the floor every forecaster must beat)."""

    name = "persistence"

    def _point(self, p: np.ndarray, f: np.ndarray) -> np.ndarray:
        g = _last_glucose(p, self.config_)  # [B]
        return np.repeat(g[:, None], self.config_.horizon_slots, axis=1)  # [B, H]


class LinearTrendForecaster(_Baseline):
    """Last reading + least-squares slope of the real readings of the last `trend_min` minutes.

    The slope is clipped to ±`max_rate_mgdl_min` (faster CGM changes are artefacts).
    """

    name = "linear"

    def __init__(
        self,
        *,
        trend_min: float = 25.0,
        max_rate_mgdl_min: float = 4.0,
        quantiles: tuple[float, ...] = DEFAULT_QUANTILES,
    ) -> None:
        super().__init__(quantiles=quantiles)
        self.trend_min = trend_min
        self.max_rate_mgdl_min = max_rate_mgdl_min

    @classmethod
    def _param_names(cls) -> tuple[str, ...]:
        return ("trend_min", "max_rate_mgdl_min", "quantiles")

    def _validate_params(self) -> None:
        if not self.trend_min >= 5:
            raise BaselineError(f"trend_min must be >= 5 minutes, got {self.trend_min}")
        if not self.max_rate_mgdl_min > 0:
            raise BaselineError("max_rate_mgdl_min must be positive")

    def _point(self, p: np.ndarray, f: np.ndarray) -> np.ndarray:
        cfg = self.config_
        slots = max(1, int(round(self.trend_min / cfg.slot_minutes)))
        lim = self.max_rate_mgdl_min * cfg.slot_minutes
        s = np.clip(_slope(p, cfg, slots), -lim, lim)  # [B] mg/dL per slot
        steps = np.arange(1, cfg.horizon_slots + 1, dtype=np.float64)  # [H]
        return _last_glucose(p, cfg)[:, None] + s[:, None] * steps[None, :]  # [B, H]


class RidgeForecaster(_Baseline):
    """Ridge regression of the glucose change per horizon, with sign-constrained exogenous terms.

    Features (per window; the effect features per horizon): past glucose deltas against the
    last reading (``lags`` slots), the last level, IOB and COB at the origin, time of day,
    the basal-neutral insulin expectation (median past basal × horizon), and insulin/carbs
    acting by the horizon from past and from planned doses. Standardised with a scaler fitted
    on the training windows only. Insulin-effect coefficients are bounded ≤ 0 and carb-effect
    coefficients ≥ 0 (`monotone=True`), so more planned insulin never raises the median.
    """

    name = "ridge"

    def __init__(
        self,
        *,
        alpha: float = 1.0,
        lags: int = 12,
        trend_min: float = 20.0,
        monotone: bool = True,
        quantiles: tuple[float, ...] = DEFAULT_QUANTILES,
    ) -> None:
        super().__init__(quantiles=quantiles)
        self.alpha = alpha
        self.lags = lags
        self.trend_min = trend_min
        self.monotone = monotone
        self.feature_names_: list[str] = []
        self.mean_: np.ndarray | None = None  # [H, P]
        self.scale_: np.ndarray | None = None  # [H, P]
        self.coef_: np.ndarray | None = None  # [H, P]
        self.intercept_: np.ndarray | None = None  # [H]

    @classmethod
    def _param_names(cls) -> tuple[str, ...]:
        return ("alpha", "lags", "trend_min", "monotone", "quantiles")

    def _validate_params(self) -> None:
        if not (np.isfinite(self.alpha) and self.alpha >= 0):
            raise BaselineError(f"alpha must be >= 0, got {self.alpha}")
        if (
            isinstance(self.lags, bool)
            or not isinstance(self.lags, (int, np.integer))
            or self.lags < 1
        ):
            raise BaselineError(f"lags must be a positive integer, got {self.lags!r}")
        if not self.trend_min >= 5:
            raise BaselineError(f"trend_min must be >= 5 minutes, got {self.trend_min}")

    def _design(self, p: np.ndarray, f: np.ndarray) -> tuple[np.ndarray, list[str], np.ndarray]:
        """Design tensor ``[B, H, P]``, feature names, and the sign of each feature's effect
        (−1: must not raise glucose, +1: must not lower it, 0: free)."""
        cfg = self.config_
        H, L = cfg.horizon_slots, cfg.past_slots
        gi = cfg.past_index("glucose")
        g = p[:, :, gi]  # [B, L]
        last = g[:, -1]
        n_lags = int(min(self.lags, L - 1))
        recent = max(1, int(round(self.trend_min / cfg.slot_minutes)))
        eff = _effects(p, f, cfg, recent)
        steps = np.arange(1, H + 1, dtype=np.float64)[None, :]  # [1, H]
        common: list[tuple[str, np.ndarray, int]] = [("level", last - 120.0, 0)]
        for k in range(1, n_lags + 1):
            common.append((f"delta_{k}", g[:, -1 - k] - last, 0))
        for name in ("iob_u", "cob_g", "tod_sin", "tod_cos"):
            if name in cfg.past_features:
                common.append((name, p[:, -1, cfg.past_index(name)], 0))
        basal_med = np.median(_past_col(p, cfg, "basal_u"), axis=1)  # [B]
        per_h: list[tuple[str, np.ndarray, int]] = [
            ("basal_neutral", basal_med[:, None] * steps, 0),
            ("insulin_past", eff["ins_past"], -1),
            ("insulin_planned", eff["ins_future"], -1),
            ("carbs_past", eff["carb_past"], +1),
            ("carbs_planned", eff["carb_future"], +1),
        ]
        b = len(p)
        x = np.empty((b, H, len(common) + len(per_h)))  # [B, H, P]
        for j, (_, v, _) in enumerate(common):
            x[:, :, j] = v[:, None]
        for j, (_, v, _) in enumerate(per_h):
            x[:, :, len(common) + j] = v
        names = [n for n, _, _ in common] + [n for n, _, _ in per_h]
        signs = np.array([s for _, _, s in common] + [s for _, _, s in per_h])
        return x, names, signs

    def _fit_point(self, p: np.ndarray, f: np.ndarray, target: np.ndarray) -> None:
        x, names, signs = self._design(p, f)  # [N, H, P]
        y = target - p[:, -1, self.config_.past_index("glucose")][:, None]  # [N, H] change
        H, P = x.shape[1], x.shape[2]
        self.feature_names_ = names
        self.mean_ = np.zeros((H, P))
        self.scale_ = np.ones((H, P))
        self.coef_ = np.zeros((H, P))
        self.intercept_ = np.zeros(H)
        lower = np.where(self.monotone & (signs > 0), 0.0, -np.inf)
        upper = np.where(self.monotone & (signs < 0), 0.0, np.inf)
        for h in range(H):
            ok = np.isfinite(y[:, h])
            if ok.sum() < 2:
                continue  # no data at this horizon: predict no change
            scaler = StandardScaler().fit(x[ok, h])  # train windows only
            self.mean_[h] = scaler.mean_
            self.scale_[h] = scaler.scale_
            xs = (x[ok, h] - self.mean_[h]) / self.scale_[h]  # [n, P]
            b, w = _bounded_ridge(xs, y[ok, h], float(self.alpha), lower, upper)
            self.intercept_[h] = b
            self.coef_[h] = w

    def _point(self, p: np.ndarray, f: np.ndarray) -> np.ndarray:
        if self.coef_ is None:
            raise NotFittedError("RidgeForecaster is not fitted")
        x, names, _ = self._design(p, f)  # [B, H, P]
        if names != self.feature_names_:
            raise BaselineError(
                f"feature layout changed since fitting: {names} vs {self.feature_names_}"
            )
        xs = (x - self.mean_[None]) / self.scale_[None]  # [B, H, P]
        # Elementwise product and a per-row sum (not BLAS): the same bits whatever the batch.
        delta = self.intercept_[None, :] + (xs * self.coef_[None]).sum(axis=2)  # [B, H]
        return p[:, -1, self.config_.past_index("glucose")][:, None] + delta

    def _state(self) -> dict[str, Any]:
        return {
            "feature_names": list(self.feature_names_),
            "mean": _floats(self.mean_),
            "scale": _floats(self.scale_),
            "coef": _floats(self.coef_),
            "intercept": _floats(self.intercept_),
        }

    def _load_state(self, state: dict[str, Any]) -> None:
        self.feature_names_ = list(state["feature_names"])
        self.mean_ = np.asarray(state["mean"], dtype=np.float64)
        self.scale_ = np.asarray(state["scale"], dtype=np.float64)
        self.coef_ = np.asarray(state["coef"], dtype=np.float64)
        self.intercept_ = np.asarray(state["intercept"], dtype=np.float64)
        H, P = self.config_.horizon_slots, len(self.feature_names_)
        for k, v in (("mean", self.mean_), ("scale", self.scale_), ("coef", self.coef_)):
            if v.shape != (H, P):
                raise BaselineError(f"ridge state {k!r} has shape {v.shape}, expected {(H, P)}")
        if self.monotone:
            signs = {"insulin_past": -1, "insulin_planned": -1, "carbs_past": 1, "carbs_planned": 1}
            for j, n in enumerate(self.feature_names_):
                s = signs.get(n, 0)
                if s and (np.sign(self.coef_[:, j]) == -s).any():
                    raise BaselineError(
                        f"ridge coefficient of {n!r} has the wrong sign for a monotone model"
                    )


class PhysioForecaster(_Baseline):
    """Last reading + decaying momentum + insulin effect + carb effect (Loop/oref0 in spirit).

    For the glucose ``h`` slots after the origin::

        g + D_h·dev − ISF·(I_h − r·h) + CSF·C_h

    - ``I_h``: units of insulin acting from the origin to ``h`` (past and planned doses, the
      oref0 exponential curve), ``r`` the basal-neutral rate (U/slot): the insulin a body in
      balance uses, so insulin at exactly that rate leaves glucose flat;
    - ``C_h``: grams of announced carbs absorbed by ``h``;
    - ``dev``: the recent glucose slope minus what insulin and carbs explain (oref0's
      deviation), carried on and fading linearly to 0 over `momentum_min`; ``D_h`` is its
      cumulative weight.

    ISF (mg/dL/U) and CSF (mg/dL/g) are non-negative: fitted by least squares on the training
    windows unless given. `neutral` chooses ``r``: "window" (median basal of the window's past,
    adapts per subject), "global" (median basal of the training windows), or "auto" (whichever
    fits the training windows better). `momentum_min=None` picks it from a small grid. More
    planned insulin can only lower the forecast: ISF ≥ 0 and ``I_h`` grows with every dose.
    """

    name = "physio"
    _MOMENTUM_GRID: ClassVar[tuple[float, ...]] = (0.0, 15.0, 30.0, 45.0, 60.0)

    def __init__(
        self,
        *,
        isf: float | None = None,
        csf: float | None = None,
        momentum_min: float | None = None,
        neutral: str = "auto",
        trend_min: float = 20.0,
        quantiles: tuple[float, ...] = DEFAULT_QUANTILES,
    ) -> None:
        super().__init__(quantiles=quantiles)
        self.isf = isf
        self.csf = csf
        self.momentum_min = momentum_min
        self.neutral = neutral
        self.trend_min = trend_min
        self.isf_: float | None = None
        self.csf_: float | None = None
        self.momentum_min_: float | None = None
        self.neutral_: str | None = None
        self.neutral_rate_: float = 0.0  # U/slot, for neutral == "global"

    @classmethod
    def _param_names(cls) -> tuple[str, ...]:
        return ("isf", "csf", "momentum_min", "neutral", "trend_min", "quantiles")

    def _validate_params(self) -> None:
        for k in ("isf", "csf", "momentum_min"):
            v = getattr(self, k)
            if v is not None and not (np.isfinite(v) and v >= 0):
                raise BaselineError(f"{k} must be a non-negative number or None, got {v!r}")
        if self.neutral not in ("auto", "window", "global"):
            raise BaselineError(
                f"neutral must be 'auto', 'window' or 'global', got {self.neutral!r}"
            )
        if not self.trend_min >= 5:
            raise BaselineError(f"trend_min must be >= 5 minutes, got {self.trend_min}")

    # the model is linear in (ISF, CSF) once momentum and neutral are fixed:
    #   pred - g = D·slope + ISF·a + CSF·c
    def _inputs(self, p: np.ndarray, f: np.ndarray) -> tuple[dict, np.ndarray]:
        """Insulin/carb effects and the recent slope (independent of momentum and neutral)."""
        recent = max(1, int(round(self.trend_min / self.config_.slot_minutes)))
        return _effects(p, f, self.config_, recent), _slope(p, self.config_, recent)

    def _terms(
        self,
        p: np.ndarray,
        eff: dict,
        slope: np.ndarray,
        momentum_min: float,
        neutral: str,
        rate: float,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        cfg = self.config_
        H = cfg.horizon_slots
        if neutral == "window":
            r = np.median(_past_col(p, cfg, "basal_u"), axis=1)  # [B]
        else:
            r = np.full(len(p), rate)
        steps = np.arange(1, H + 1, dtype=np.float64)[None, :]  # [1, H]
        m = momentum_min / cfg.slot_minutes
        if m > 0:
            w = np.clip(1 - np.arange(H) / m, 0.0, None)  # velocity weight of step k
            d = np.cumsum(w)[None, :]  # [1, H]
        else:
            d = np.zeros((1, H))
        ins = eff["ins_past"] + eff["ins_future"]  # [B, H]
        carb = eff["carb_past"] + eff["carb_future"]
        # dev = slope − (−ISF·(ins_recent − r) + CSF·carb_recent), carried with weight D.
        a = -(ins - r[:, None] * steps) + d * (eff["ins_recent"] - r)[:, None]  # [B, H]
        c = carb - d * eff["carb_recent"][:, None]  # [B, H]
        base = d * slope[:, None]  # [B, H]
        return base, a, c

    def _solve(self, base, a, c, y) -> tuple[float, float, float]:
        """ISF, CSF ≥ 0 minimising the squared error (given values stay fixed); and the SSE."""
        ok = np.isfinite(y)
        yy = (y - base)[ok]
        cols, free = [], []
        fixed = np.zeros_like(yy)
        for v, given in ((a, self.isf), (c, self.csf)):
            if given is None:
                cols.append(v[ok])
                free.append(True)
            else:
                fixed += float(given) * v[ok]
                free.append(False)
        yy = yy - fixed
        params = []
        if cols:
            x = np.stack(cols, axis=1)  # [n, k]
            g = x.T @ x + np.eye(len(cols)) * 1e-9
            r = np.linalg.cholesky(g).T
            rhs = np.linalg.solve(r.T, x.T @ yy)
            sol = lsq_linear(r, rhs, bounds=(0.0, np.inf), method="bvls", tol=1e-12).x
            params = list(sol)
            resid = yy - x @ sol
        else:
            resid = yy
        it = iter(params)
        isf = float(next(it)) if free[0] else float(self.isf)
        csf = float(next(it)) if free[1] else float(self.csf)
        return isf, csf, float(resid @ resid)

    def _fit_point(self, p: np.ndarray, f: np.ndarray, target: np.ndarray) -> None:
        cfg = self.config_
        y = target - _last_glucose(p, cfg)[:, None]  # [N, H]
        basal = _past_col(p, cfg, "basal_u")
        self.neutral_rate_ = float(np.median(basal[:, -1])) if basal.size else 0.0
        moms = self._MOMENTUM_GRID if self.momentum_min is None else (float(self.momentum_min),)
        neutrals = ("window", "global") if self.neutral == "auto" else (self.neutral,)
        best = None
        eff, slope = self._inputs(p, f)
        for nm in neutrals:
            for mom in moms:
                base, a, c = self._terms(p, eff, slope, mom, nm, self.neutral_rate_)
                isf, csf, sse = self._solve(base, a, c, y)
                if best is None or sse < best[0] - 1e-9 * abs(best[0]):
                    best = (sse, isf, csf, mom, nm)
        _, self.isf_, self.csf_, self.momentum_min_, self.neutral_ = best

    def _point(self, p: np.ndarray, f: np.ndarray) -> np.ndarray:
        if self.isf_ is None:
            raise NotFittedError("PhysioForecaster is not fitted")
        eff, slope = self._inputs(p, f)
        base, a, c = self._terms(
            p, eff, slope, self.momentum_min_, self.neutral_, self.neutral_rate_
        )
        return _last_glucose(p, self.config_)[:, None] + base + self.isf_ * a + self.csf_ * c

    def _state(self) -> dict[str, Any]:
        return {
            "isf": float(self.isf_),
            "csf": float(self.csf_),
            "momentum_min": float(self.momentum_min_),
            "neutral": self.neutral_,
            "neutral_rate_u_per_slot": float(self.neutral_rate_),
        }

    def _load_state(self, state: dict[str, Any]) -> None:
        self.isf_ = float(state["isf"])
        self.csf_ = float(state["csf"])
        self.momentum_min_ = float(state["momentum_min"])
        self.neutral_ = str(state["neutral"])
        self.neutral_rate_ = float(state["neutral_rate_u_per_slot"])
        if self.isf_ < 0 or self.csf_ < 0 or self.momentum_min_ < 0:
            raise BaselineError("physio state has a negative ISF, CSF or momentum")
        if self.neutral_ not in ("window", "global"):
            raise BaselineError(f"physio state has unknown neutral mode {self.neutral_!r}")


BASELINES: dict[str, type[_Baseline]] = {
    "persistence": PersistenceForecaster,
    "linear": LinearTrendForecaster,
    "ridge": RidgeForecaster,
    "physio": PhysioForecaster,
}


def load_baseline(name_or_dict: str | dict[str, Any] | Path) -> _Baseline:
    """A baseline by name (unfitted), from a `to_dict` dict, or from a JSON file of one."""
    if isinstance(name_or_dict, dict):
        name = name_or_dict.get("name")
        if name not in BASELINES:
            raise BaselineError(f"unknown baseline {name!r}; known: {sorted(BASELINES)}")
        return BASELINES[name].from_dict(name_or_dict)
    if isinstance(name_or_dict, (str, Path)):
        key = str(name_or_dict)
        if key in BASELINES:
            return BASELINES[key]()
        path = Path(key)
        if path.suffix == ".json" and path.is_file():
            try:
                d = json.loads(path.read_text())
            except json.JSONDecodeError as e:
                raise BaselineError(f"{path} is not valid JSON: {e}") from e
            return load_baseline(d)
        raise BaselineError(
            f"unknown baseline {key!r}; choose one of {sorted(BASELINES)} or give a model JSON file"
        )
    raise BaselineError(
        f"load_baseline expects a name, a dict or a path, got {type(name_or_dict).__name__}"
    )
