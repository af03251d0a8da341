"""Interventional accuracy: does the forecaster respond to *planned* insulin like the patient?

The controller asks "what if I give this insulin?". Observational accuracy (RMSE) cannot tell
whether a model answers that correctly, so on simulator data we measure it directly:

1. rebuild each held-out subject's per-minute inputs from the frame (a slot's basal + bolus
   and its carbs spread evenly over the slot's five minutes) and replay them through the
   UVA/Padova model from the subject's initial basal state, which gives the patient's full
   13-dimensional state at every minute (the frame only holds glucose);
2. for each held-out window, restart the model from the state at the start of the first
   future slot and simulate the horizon three times: as recorded, with +1 U bolus in the
   first future slot, and with the basal over the horizon halved. The true change at horizon
   h is the difference in subcutaneous glucose (what the CGM reads; sensor noise, identical
   in both arms, cancels) at the time of the target reading;
3. ask the forecaster the same questions by editing `future[..., basal_u / bolus_u]` — exactly
   what the MPC does with a plan — and take the difference of the median forecasts.

Reported per intervention and horizon: mean true and predicted change, the relative error of
the mean change (|mean pred − mean true| / |mean true|, the "on average" figure), the
window-weighted relative error Σ|pred − true| / Σ|true|, their correlation, and the share of
windows where more planned insulin *raised* the predicted median at any horizon (or less
insulin lowered it) — which must be 0 % for a model the controller may use.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pandas as pd

from forecast.schema import GlucastError

PredictFn = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (past, future) -> [B, H, Q]


class InterventionalError(GlucastError, ValueError):
    """The data cannot be re-simulated (not simulator output, unknown patients...)."""


def per_minute_inputs(
    frame: pd.DataFrame, slot_minutes: int = 5, eat_rate_g_per_min: float = 5.0
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, pd.Timestamp]]:
    """Per subject: carbs eaten (g/min) and insulin delivered (U/min) per minute from its
    first slot, and that first slot's time (minute 0 of the replay).

    Insulin: the slot's basal + bolus spread evenly over its minutes. Carbs: the grams
    actually eaten (``carbs_eaten_g`` when the simulator recorded it, else ``carbs_g``) put
    on the plate at the slot start and eaten at the simulator's 5 g/min.
    """
    cho, ins, start = {}, {}, {}
    carb_col = "carbs_g"
    if "carbs_eaten_g" in frame.columns:
        # Use the truth only where it is complete: a frame whose carbs_eaten_g records far
        # fewer meals than carbs_g announces has lost them (not "did not eat").
        eaten_meals = int((frame["carbs_eaten_g"].fillna(0) > 0).sum())
        announced_meals = int((frame["carbs_g"].fillna(0) > 0).sum())
        if eaten_meals >= 0.8 * announced_meals:
            carb_col = "carbs_eaten_g"
    for sid, g in frame.groupby("subject_id", sort=False, observed=True):
        t = pd.to_datetime(g["time"], utc=True)
        t0 = t.iloc[0]
        slot = ((t - t0) / pd.Timedelta(minutes=slot_minutes)).to_numpy().astype(np.int64)
        n = int(slot[-1]) + 1
        per_slot_ins = np.zeros(n)
        per_slot_ins[slot] = g["basal_u"].to_numpy(float) + g["bolus_u"].to_numpy(float)
        plate = np.zeros(n * slot_minutes)
        plate[slot * slot_minutes] = np.nan_to_num(g[carb_col].to_numpy(float), nan=0.0)
        ins[str(sid)] = np.repeat(per_slot_ins / slot_minutes, slot_minutes)
        cho[str(sid)] = eaten_per_minute(plate, eat_rate_g_per_min)
        start[str(sid)] = t0
    return cho, ins, start


def eaten_per_minute(plate: np.ndarray, rate: float = 5.0) -> np.ndarray:
    """Grams eaten per minute when food put on the plate is eaten at `rate` g/min (the
    simulator's eating rule), [T] -> [T]."""
    eaten = np.zeros_like(plate)
    left = 0.0
    for m in range(int(np.argmax(plate > 0)) if (plate > 0).any() else len(plate), len(plate)):
        left += plate[m]
        if left > 0.0:
            e = min(rate, left)
            eaten[m] = e
            left -= e
    return eaten


def sample_windows(windows: Any, n: int, seed: int, what: str) -> Any:
    """A deterministic random subset of (up to) `n` windows, in their original order."""
    if len(windows) == 0:
        raise InterventionalError(f"no {what} windows to re-simulate")
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(len(windows), size=min(n, len(windows)), replace=False))
    return windows.subset(pick)


def resimulate(
    frame: pd.DataFrame,
    windows: Any,
    extra_u: Sequence[np.ndarray],
    *,
    reading_offset_min: int = 0,
) -> tuple[list[np.ndarray], np.ndarray, float | None]:
    """True glucose changes when the planned insulin of each window changes.

    `windows` are forecast.windows.Windows of simulated subjects whose full records are in
    `frame` (each subject from its first slot: the replay starts there, at the basal state).
    Each array of `extra_u` is ``[N, H]``: U per slot added to the window's future insulin
    (negative to take some away; a slot never goes below zero insulin). Returns, per array,
    ``[N, H]`` the change in subcutaneous glucose at the target readings (arm − recorded),
    the ``[N]`` mask of windows whose horizon lies inside the record, and the RMSE of the
    recorded replay against ``bg_true`` (None without it).
    """
    from forecast.sim import load_patients, replay
    from forecast.sim.errors import UnknownPatientError

    cfg = windows.config
    slot, H = int(cfg.slot_minutes), int(cfg.horizon_slots)
    if len(windows) == 0:
        raise InterventionalError("no windows to re-simulate")
    subjects = sorted(set(map(str, windows.subject_id)))
    try:
        patients = load_patients(subjects)
    except UnknownPatientError as e:
        raise InterventionalError(
            f"interventional accuracy needs simulator data (subject ids like 'adult#001'): {e}"
        ) from e
    cho, ins, start = per_minute_inputs(frame[frame["subject_id"].isin(subjects)], slot)

    # 1. replay each subject once from its basal state: states at every minute.
    T = max(len(ins[s]) for s in subjects)
    cho_a = np.zeros((len(subjects), T))
    ins_a = np.zeros((len(subjects), T))
    for i, s in enumerate(subjects):
        cho_a[i, : len(cho[s])] = cho[s]
        ins_a[i, : len(ins[s])] = ins[s]
    full = replay(patients, cho_a, ins_a, return_states=True)
    recon = _reconstruction_error(frame, subjects, start, full.bg, slot, reading_offset_min)

    # 2. restart at the first future slot of each window: the recorded arm and one per change.
    row = {s: i for i, s in enumerate(subjects)}
    w = windows
    n = len(w)
    minutes = H * slot + reading_offset_min + 1
    x0 = np.empty((n, 13))
    base_cho = np.zeros((n, minutes))
    base_ins = np.zeros((n, minutes))
    idx = np.empty(n, dtype=np.int64)
    ok = np.ones(n, dtype=bool)
    for k in range(n):
        s = str(w.subject_id[k])
        i = row[s]
        idx[k] = i
        m0 = int((pd.Timestamp(w.origin[k], tz="UTC") - start[s]) / pd.Timedelta(minutes=1)) + slot
        if m0 + minutes > len(ins[s]):
            ok[k] = False
            m0 = max(0, len(ins[s]) - minutes)
        x0[k] = full.states[i, m0]
        base_cho[k] = cho_a[i, m0 : m0 + minutes]
        base_ins[k] = ins_a[i, m0 : m0 + minutes]
    arms = [base_ins]
    for extra in extra_u:
        e = np.asarray(extra, dtype=np.float64)
        if e.shape != (n, H):
            raise InterventionalError(f"extra insulin must be [N, H] = [{n}, {H}], got {e.shape}")
        per_min = np.zeros((n, minutes))
        per_min[:, : H * slot] = np.repeat(e / slot, slot, axis=1)
        arms.append(np.maximum(base_ins + per_min, 0.0))
    k_arms = len(arms)
    sim = replay(
        patients.subset(idx).subset(np.tile(np.arange(n), k_arms)),
        np.concatenate([base_cho] * k_arms),
        np.concatenate(arms),
        x0=np.concatenate([x0] * k_arms),
        return_states=False,
    )
    read = np.arange(H) * slot + reading_offset_min  # minute of each target reading
    g = sim.gsub[:, read].reshape(k_arms, n, H)  # [arm, N, H]
    return [g[a] - g[0] for a in range(1, k_arms)], ok, recon


def interventional_accuracy(
    predict: PredictFn,
    frame: pd.DataFrame,
    windows: Any,
    *,
    max_windows: int = 300,
    bolus_u: float = 1.0,
    basal_factor: float = 0.5,
    reading_offset_min: int = 0,
    seed: int = 0,
    quantiles: tuple[float, ...] | None = None,
) -> dict[str, Any]:
    """Compare predicted and re-simulated glucose changes under planned-insulin changes.

    `frame` is the full frame of the subjects (the replay needs each subject's history from
    its start), `windows` the held-out forecast.windows.Windows to test (a deterministic
    random subset of `max_windows` is used). `reading_offset_min` is where in its slot the
    CGM reading was taken by the simulator (0 = at the slot start).
    """
    cfg = windows.config
    slot, H = int(cfg.slot_minutes), int(cfg.horizon_slots)
    w = sample_windows(windows, max_windows, seed, "held-out")
    n = len(w)
    ib, il = cfg.future_index("basal_u"), cfg.future_index("bolus_u")
    more = np.zeros((n, H))
    more[:, 0] = bolus_u
    less = -(1 - basal_factor) * w.future[:, :, ib].astype(np.float64)
    (true_bolus, true_less), ok, recon = resimulate(
        frame, w, [more, less], reading_offset_min=reading_offset_min
    )

    # 3. the forecaster's answers to the same questions.
    fut_bolus = w.future.copy()
    fut_bolus[:, 0, il] += bolus_u
    fut_less = w.future.copy()
    fut_less[:, :, ib] *= basal_factor
    preds = [np.asarray(predict(w.past, f)) for f in (w.future, fut_bolus, fut_less)]
    q = preds[0].shape[-1]
    mi = list(quantiles).index(0.5) if quantiles and 0.5 in quantiles else q // 2
    pred_bolus = preds[1][..., mi] - preds[0][..., mi]
    pred_less = preds[2][..., mi] - preds[0][..., mi]

    out: dict[str, Any] = {
        "windows": int(ok.sum()),
        "subjects": len(set(map(str, w.subject_id))),
        "reconstruction_rmse_mgdl": recon,
        "interventions": {
            f"bolus_plus_{bolus_u:g}u": _summary(
                pred_bolus[ok], true_bolus[ok], preds[1][ok] - preds[0][ok], slot, more=True
            ),
            f"basal_times_{basal_factor:g}": _summary(
                pred_less[ok], true_less[ok], preds[2][ok] - preds[0][ok], slot, more=False
            ),
        },
    }
    # Headline numbers (what the issue asks for).
    b = out["interventions"][f"bolus_plus_{bolus_u:g}u"]
    key = str(60 if H * slot >= 60 else H * slot)
    out["relative_error_60"] = b["horizons"][key]["relative_error_of_mean"]
    out["monotonicity_violation_pct"] = max(
        v["monotonicity_violation_pct"] for v in out["interventions"].values()
    )
    # The 60-minute bolus response by kind of subject (adult, adolescent, child...).
    h = min(H, 60 // slot) - 1
    kinds = np.array([str(s).split("#")[0] for s in w.subject_id])[ok]
    out["bolus_by_group"] = {
        g: {
            "windows": int((kinds == g).sum()),
            "mean_true_change": float(true_bolus[ok][kinds == g, h].mean()),
            "mean_predicted_change": float(pred_bolus[ok][kinds == g, h].mean()),
        }
        for g in sorted(set(kinds.tolist()))
    }
    return out


def _summary(
    pred: np.ndarray, true: np.ndarray, all_q: np.ndarray, slot: int, more: bool
) -> dict[str, Any]:
    """pred/true [N, H] changes of the median; all_q [N, H, Q] change of every quantile."""
    H = pred.shape[1]
    horizons: dict[str, Any] = {}
    for h in range(H):
        minutes = (h + 1) * slot
        if minutes not in (15, 30, 45, 60, 90, 120) and h != H - 1:
            continue
        p, t = pred[:, h].astype(float), true[:, h].astype(float)
        mean_t, mean_p = float(np.mean(t)), float(np.mean(p))
        horizons[str(minutes)] = {
            "mean_true_change": mean_t,
            "mean_predicted_change": mean_p,
            "relative_error_of_mean": abs(mean_p - mean_t) / abs(mean_t)
            if abs(mean_t) > 1e-9
            else None,
            "weighted_relative_error": float(np.sum(np.abs(p - t)) / np.sum(np.abs(t)))
            if np.sum(np.abs(t)) > 1e-9
            else None,
            "correlation": float(np.corrcoef(p, t)[0, 1])
            if np.std(p) > 1e-9 and np.std(t) > 1e-9
            else None,
        }
    eps = 1e-4  # mg/dL: float32 noise, not a response
    if more:  # more insulin must not raise the median (nor any quantile)
        bad_median = (pred > eps).any(axis=1)
        bad_any = (all_q > eps).any(axis=(1, 2))
    else:  # less insulin must not lower it
        bad_median = (pred < -eps).any(axis=1)
        bad_any = (all_q < -eps).any(axis=(1, 2))
    return {
        "horizons": horizons,
        "monotonicity_violation_pct": 100.0 * float(bad_median.mean()) if len(pred) else None,
        "any_quantile_violation_pct": 100.0 * float(bad_any.mean()) if len(pred) else None,
    }


def _reconstruction_error(
    frame: pd.DataFrame,
    subjects: list[str],
    start: dict[str, pd.Timestamp],
    bg: np.ndarray,
    slot: int,
    offset: int,
) -> float | None:
    """RMSE between the replayed plasma BG and the frame's `bg_true` (if present): a check
    that the per-minute reconstruction of the inputs reproduces the recorded patient."""
    if "bg_true" not in frame.columns:
        return None
    errs = []
    for i, s in enumerate(subjects):
        g = frame[frame["subject_id"] == s]
        m = ((pd.to_datetime(g["time"], utc=True) - start[s]) / pd.Timedelta(minutes=1)).to_numpy()
        m = m.astype(np.int64) + offset
        keep = (m < bg.shape[1]) & np.isfinite(g["bg_true"].to_numpy(float))
        errs.append(bg[i, m[keep]] - g["bg_true"].to_numpy(float)[keep])
    e = np.concatenate(errs) if errs else np.zeros(0)
    return float(np.sqrt(np.mean(e**2))) if e.size else None
