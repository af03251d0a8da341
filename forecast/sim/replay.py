"""Replay recorded per-minute inputs through the model: the open-loop entry point.

`replay` is what the oracle checks use (simglucose's recorded eaten carbs and delivered
insulin in, plasma BG out) and what an interventional check uses to ask "what would glucose
have done with this insulin instead".
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
from numba import njit

from forecast.sim import model
from forecast.sim.errors import PhysiologyWarning, SimInputError
from forecast.sim.patient import Patients

BG_LOW_LIMIT = 10.0  # mg/dL; simglucose's `done` condition
BG_HIGH_LIMIT = 600.0


@dataclass
class ReplayResult:
    """Per-minute trajectories of a replay; index 0 is the initial state."""

    bg: np.ndarray  # [N, T+1] plasma glucose Gp/Vg, mg/dL
    gsub: np.ndarray  # [N, T+1] subcutaneous glucose Gs/Vg, mg/dL
    states: np.ndarray | None  # [N, T+1, 13] or None when not requested
    eaten: np.ndarray  # [N, T] g/min that entered the stomach
    out_of_range: np.ndarray  # [N] bool: BG left [10, 600] mg/dL at some minute
    names: np.ndarray  # [N] patient names


@njit(cache=True)
def _all_finite_nonneg(a):  # pragma: no cover - compiled
    for v in a:
        if not (v >= 0.0 and v < np.inf):
            return False
    return True


def check_inputs(name: str, values: np.ndarray | float, n: int, t: int | None = None) -> np.ndarray:
    """Validate a per-patient input (finite, ≥ 0) and broadcast it to [N] or [N, T]."""
    a = np.asarray(values, dtype=np.float64)
    want = (n,) if t is None else (n, t)
    # Fast paths (a closed-loop step validates two [N] commands): all good, nothing to report.
    if a.ndim == 0 and 0.0 <= float(a) < np.inf:
        return np.full(want, float(a))
    if a.shape == want and a.ndim == 1 and _all_finite_nonneg(a):
        return a
    try:
        a = np.broadcast_to(a, want)
    except ValueError:
        raise SimInputError(
            f"{name} has shape {np.shape(values)}; expected {want} (patients"
            + (" x minutes)" if t is not None else ")")
        ) from None
    bad = ~np.isfinite(a)
    if bad.any():
        idx = tuple(int(i) for i in np.argwhere(bad)[0])
        raise SimInputError(f"{name} is not finite ({a[idx]!r}) at index {idx}")
    if (a < 0).any():
        idx = tuple(int(i) for i in np.argwhere(a < 0)[0])
        raise SimInputError(f"{name} is negative ({a[idx]!r}) at index {idx}")
    return a


def _kernel_array(a: np.ndarray) -> np.ndarray:
    """C-contiguous and writable, so the kernel compiles one signature for every caller."""
    if a.flags.c_contiguous and a.flags.writeable:
        return a
    return np.array(a, dtype=np.float64, order="C")


def flag_out_of_range(names: np.ndarray, bg: np.ndarray, where: str = "") -> np.ndarray:
    """[N] bool of patients whose BG left [10, 600] mg/dL (or went NaN); warns once per call."""
    with np.errstate(invalid="ignore"):
        bad = ~np.all((bg >= BG_LOW_LIMIT) & (bg <= BG_HIGH_LIMIT), axis=tuple(range(1, bg.ndim)))
    if bad.any():
        lo = np.nanmin(bg.reshape(len(names), -1)[bad], axis=1)
        hi = np.nanmax(bg.reshape(len(names), -1)[bad], axis=1)
        detail = ", ".join(
            f"{n} (BG {a:.1f}..{b:.1f})" for n, a, b in zip(names[bad], lo, hi, strict=True)
        )
        warnings.warn(
            f"{where}BG left the physiological range [{BG_LOW_LIMIT:g}, {BG_HIGH_LIMIT:g}] "
            f"mg/dL for {int(bad.sum())} patient(s): {detail}",
            PhysiologyWarning,
            stacklevel=3,
        )
    return bad


def replay(
    patients: Patients,
    cho_g_per_min: np.ndarray,
    insulin_u_per_min: np.ndarray,
    *,
    x0: np.ndarray | None = None,
    config: model.ModelConfig | None = None,
    return_states: bool = True,
) -> ReplayResult:
    """Integrate recorded inputs: eaten carbs (g/min) and delivered insulin (U/min), [N, T].

    Inputs are per minute and held over the minute; carbs are what was *eaten* in that minute
    (simglucose's ``CHO_eaten``, already limited to 5 g/min), so no eating queue applies, but
    the meal-size state D̄ follows the same rule. Starts from each patient's basal state unless
    ``x0`` [N, 13] is given. A 1-D input is broadcast to every patient.
    """
    cfg = config or model.ModelConfig()
    n = len(patients)
    if n == 0:
        raise SimInputError("replay needs at least one patient")
    cho = np.asarray(cho_g_per_min, dtype=np.float64)
    t = cho.shape[-1] if cho.ndim else 0
    if t == 0:
        raise SimInputError("cho_g_per_min must have at least one minute (shape [N, T])")
    cho = _kernel_array(check_inputs("cho_g_per_min", cho, n, t))
    ins = _kernel_array(check_inputs("insulin_u_per_min", insulin_u_per_min, n, t))
    x = patients.x0.copy() if x0 is None else np.array(x0, dtype=np.float64, copy=True)
    if x.shape != (n, 13) or not np.isfinite(x).all():
        raise SimInputError(f"x0 must be a finite [N, 13] = [{n}, 13] array, got {x.shape}")
    meal = model.initial_meal_state(n)
    meal[:, model.MEAL_QLAST] = x[:, 0] + x[:, 1]
    bg = np.empty((n, t + 1))
    gsub = np.empty((n, t + 1))
    eaten = np.empty((n, t))
    states = np.empty((n, t + 1, 13) if return_states else (0, 0, 13))
    bg_range = np.repeat((x[:, 3] / patients.vg)[:, None], 2, axis=1)
    model.run_minutes(
        x, meal, patients.params, cho, ins, np.inf, cfg.substeps, cfg.meal_substeps,
        cfg.stomach_fraction, bg, gsub, eaten, states, bg_range,
    )  # fmt: skip
    oor = flag_out_of_range(patients.names, bg, "replay: ")
    return ReplayResult(
        bg=bg,
        gsub=gsub,
        states=states if return_states else None,
        eaten=eaten,
        out_of_range=oor,
        names=patients.names,
    )
