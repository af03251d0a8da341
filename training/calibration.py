"""Split-conformal calibration of the predicted quantiles on the validation split.

A quantile regressor's intervals are often too narrow or too wide out of sample. For every
non-median quantile q and horizon h we find the offset c such that, on validation windows
the model never trained on, a fraction q of the real readings lies below the adjusted
quantile (the one-sided conformal quantile with the finite-sample (n + 1) correction).
Offsets are stored in the model's `conformal` buffer, added to the spreads *inside* the
graph, so the exported ONNX model and serving get calibrated intervals with no extra code.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from training.models.common import ForecastHead


@torch.no_grad()
def predict_numpy(model: ForecastHead, past: np.ndarray, future: np.ndarray, batch: int = 4096):
    model.eval()
    out = []
    for i in range(0, len(past), batch):
        p = torch.from_numpy(np.ascontiguousarray(past[i : i + batch], dtype=np.float32))
        f = torch.from_numpy(np.ascontiguousarray(future[i : i + batch], dtype=np.float32))
        out.append(model(p, f).numpy())
    if not out:
        return np.zeros((0, model.H, model.Q), dtype=np.float32)
    return np.concatenate(out)


@torch.no_grad()
def conformal_calibrate(
    model: ForecastHead, past: np.ndarray, future: np.ndarray, target: np.ndarray
) -> dict[str, list[float]]:
    """Set `model.conformal` from validation windows; return the offsets per quantile.

    Coverage of the (q_lo, q_hi) interval before and after is returned too, for the record.
    """
    quantiles = model.layout.quantiles
    m = model.layout.median
    model.conformal.zero_()
    pred = predict_numpy(model, past, future)  # [N, H, Q]
    H, Q = pred.shape[1], pred.shape[2]
    offsets = np.zeros((H, Q), dtype=np.float64)
    for h in range(H):
        ok = np.isfinite(target[:, h])
        n = int(ok.sum())
        if n < 20:  # too few readings to calibrate this horizon: leave it as trained
            continue
        y = target[ok, h].astype(np.float64)
        for i, q in enumerate(quantiles):
            if i == m:
                continue
            r = y - pred[ok, h, i]  # want P(r <= c) = q
            level = math.ceil((n + 1) * q) / n if q > 0.5 else math.floor((n + 1) * q) / n
            c = float(np.quantile(r, min(max(level, 0.0), 1.0), method="higher"))
            # Spreads grow outward: below the median a positive c narrows, above it widens.
            offsets[h, i] = -c if q < 0.5 else c
        # Keep offsets non-decreasing outward so more than three quantiles stay ordered.
        for side in (range(m - 1, -1, -1), range(m + 1, Q)):
            best = -np.inf
            for i in side:
                best = max(best, offsets[h, i])
                offsets[h, i] = best
    model.conformal.copy_(torch.from_numpy(offsets).float())
    after = predict_numpy(model, past, future)
    return {
        "offsets_mgdl": offsets.tolist(),
        "coverage_before": _coverage(pred, target),
        "coverage_after": _coverage(after, target),
    }


def _coverage(pred: np.ndarray, target: np.ndarray) -> float:
    ok = np.isfinite(target)
    if not ok.any():
        return float("nan")
    y = target[ok]
    lo, hi = pred[..., 0][ok], pred[..., -1][ok]
    return float(np.mean((y >= lo) & (y <= hi)))
