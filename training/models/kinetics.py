"""A differentiable compartmental ("digital twin") term inside the forecast head.

What the network does not know but a physiological model does is how the insulin and carbs
already given keep acting over the horizon, and how strongly *this* person responds. This
module writes that part down explicitly:

    past_effect[h] = Σ_k isf · a_k(ctx) · Σ_i M^ins_k[h, i] · (u_i − ū)
                   − Σ_k csf · b_k(ctx) · Σ_i M^carb_k[h, i] · c_i       (subtracted from g)

with u_i / c_i the insulin (U) and carbs (g) of past slot i, ū the window's mean past basal
(what holds glucose steady), M_k[h, i] ≥ 0 the fraction of a dose in past slot i that acts
between the forecast origin and target h under the k-th kinetic curve (oref0's insulin curve
with peaks `insulin_peaks_min`, triangular carb absorption over `carb_absorption_min` —
forecast/insulin.py's closed forms), and a_k, b_k ≥ 0 per-window weights the encoder reads
from the history: a mix of curves is a per-window absorption speed, their sum a per-window
sensitivity around the person's own.

`isf` and `csf` (mg/dL per U and per g) are the therapy profile (isf_mgdl_per_u, and
isf / carb_ratio_g_per_u) when the window carries it, else the head's priors. The same
per-person factor `isf / isf_ref` scales the head's planned-insulin gain (`plan_scale`),
which keeps that gain non-negative and independent of the plan: the forecast stays
non-increasing in every planned dose by construction.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from forecast.insulin import CarbCurve, InsulinCurve


@dataclass
class KineticsConfig:
    past_slots: int
    horizon_slots: int
    d_model: int
    slot_minutes: int = 5
    insulin_peaks_min: tuple[float, ...] = (50.0, 75.0, 100.0)
    insulin_dia_min: float = 360.0
    carb_absorption_min: tuple[float, ...] = (90.0, 180.0, 300.0)
    isf_prior: float = 40.0  # mg/dL per U without a therapy profile
    csf_prior: float = 3.0  # mg/dL per g without a therapy profile


def past_kernel(acted: np.ndarray, past_slots: int, horizon_slots: int) -> np.ndarray:
    """[H, L]: the fraction of a past slot's dose that acts between the origin and target h.

    `acted[m]` is the fraction acted m slots after the dose (m ≥ 0, acted[0] = 0). Past slot i
    (0 … L−1, L−1 the origin's slot) is future slot i − L in the head's convention, where a dose
    in future slot j reaches target h after h − j + 1 slots (common.insulin_effect_prior), so
    at the origin (h = −1) it has acted L − i slots and at target h, h + L − i + 1 slots.
    """
    h = np.arange(horizon_slots)[:, None]  # [H, 1]
    i = np.arange(past_slots)[None, :]  # [1, L]
    m_end = np.minimum(h + past_slots - i + 1, len(acted) - 1)  # [H, L]
    m_start = np.minimum(past_slots - i, len(acted) - 1)  # [1, L]
    return (acted[m_end] - acted[m_start]).astype(np.float32)  # [H, L]


class PastKinetics(nn.Module):
    """Per-window mechanistic effect of past insulin and carbs, plus the per-person gain."""

    def __init__(
        self,
        cfg: KineticsConfig,
        past_features: tuple[str, ...],
    ) -> None:
        super().__init__()
        self.cfg = cfg
        L, H, slot = cfg.past_slots, cfg.horizon_slots, cfg.slot_minutes
        n = L + H + 2  # lags needed: up to L + H + 1 slots
        t = np.arange(n) * float(slot)  # [n] minutes after the dose
        ins = [
            1 - InsulinCurve(p, cfg.insulin_dia_min).iob_fraction(t) for p in cfg.insulin_peaks_min
        ]
        carb = [1 - CarbCurve(a).cob_fraction(t) for a in cfg.carb_absorption_min]
        mi = np.stack([past_kernel(a, L, H) for a in ins])  # [Ki, H, L]
        mc = np.stack([past_kernel(a, L, H) for a in carb])  # [Kc, H, L]
        self.register_buffer("m_ins", torch.from_numpy(mi))
        self.register_buffer("m_carb", torch.from_numpy(mc))
        self.ki, self.kc = len(ins), len(carb)
        # Per-window curve weights from the encoder's summary: softplus ≥ 0, starting at an
        # even mix that sums to 1 (the profile's sensitivity, the middle absorption speed).
        self.weights = nn.Linear(cfg.d_model, self.ki + self.kc)
        with torch.no_grad():
            self.weights.weight.mul_(0.1)
            start = np.r_[np.full(self.ki, 1.0 / self.ki), np.full(self.kc, 1.0 / self.kc)]
            self.weights.bias.copy_(torch.from_numpy(np.log(np.expm1(start))).float())
        f = past_features
        self.basal_idx, self.bolus_idx = f.index("basal_u"), f.index("bolus_u")
        self.carb_idx = f.index("carbs_g")
        self.isf_idx = f.index("isf_mgdl_per_u") if "isf_mgdl_per_u" in f else -1
        self.cr_idx = f.index("carb_ratio_g_per_u") if "carb_ratio_g_per_u" in f else -1
        # The training windows' mean ISF and CSF: the planned-insulin and announced-carb gains
        # are learned relative to them.
        self.register_buffer("isf_ref", torch.tensor(float(cfg.isf_prior)))
        self.register_buffer("csf_ref", torch.tensor(float(cfg.csf_prior)))

    def sensitivity(self, past: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(isf [B], csf [B]) mg/dL per U and per g: the profile at the origin, or the priors."""
        B = past.shape[0]
        if self.isf_idx < 0:
            isf = past.new_full((B,), self.cfg.isf_prior)
        else:
            isf = past[:, -1, self.isf_idx].clamp(5.0, 600.0)  # [B]
        if self.cr_idx < 0:
            csf = isf * (self.cfg.csf_prior / self.cfg.isf_prior)
        else:
            csf = isf / past[:, -1, self.cr_idx].clamp(1.0, 150.0)  # [B]
        return isf, csf

    def forward(
        self, past: torch.Tensor, ctx: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """past [B, L, F_past] raw, ctx [B, D] -> (glucose change [B, H] mg/dL, per-person
        factors [B] ≥ 0 of the plan gain, isf / isf_ref, and of the carb gain, csf / csf_ref)."""
        isf, csf = self.sensitivity(past)  # [B], [B]
        w = F.softplus(self.weights(ctx))  # [B, Ki + Kc]
        wi, wc = w[:, : self.ki], w[:, self.ki :]  # [B, Ki], [B, Kc]
        basal = past[..., self.basal_idx]  # [B, L] U per slot
        u = basal + past[..., self.bolus_idx] - basal.mean(1, keepdim=True)  # [B, L] net of ū
        c = past[..., self.carb_idx]  # [B, L] g per slot
        ins = torch.einsum("khl,bl->bkh", self.m_ins, u)  # [B, Ki, H] U acting by target h
        carb = torch.einsum("khl,bl->bkh", self.m_carb, c)  # [B, Kc, H] g absorbed by h
        ins = (wi[:, :, None] * ins).sum(1) * isf[:, None]  # [B, H] mg/dL lowered
        carb = (wc[:, :, None] * carb).sum(1) * csf[:, None]  # [B, H] mg/dL raised
        return carb - ins, isf / self.isf_ref, csf / self.csf_ref  # [B, H], [B], [B]

    @torch.no_grad()
    def fit(self, past: np.ndarray) -> np.ndarray:
        """Set isf_ref and csf_ref from training windows (raw units); returns the starting
        effect [N, H] mg/dL (the even mix, no context) for the head's ridge skip to fit around."""
        x = torch.from_numpy(np.ascontiguousarray(past, dtype=np.float32))
        isf, csf = self.sensitivity(x)
        for buf, v in ((self.isf_ref, isf), (self.csf_ref, csf)):
            ref = float(torch.nanmean(v))
            if np.isfinite(ref) and ref > 0:
                buf.fill_(ref)
        ctx = x.new_zeros((x.shape[0], self.cfg.d_model))  # [N, D]: the bias alone
        return self(x, ctx)[0].double().numpy()
