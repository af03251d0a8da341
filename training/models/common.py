"""What every deep forecaster shares: raw-unit normalisation, the monotone insulin head,
quantiles built around the median, and the conformal offsets.

A backbone (lstm.py, transformer.py) only maps normalised inputs to features:

    backbone(past_n [B, L, F_past], known_n [B, H, F_known]) -> (seq [B, H, D], ctx [B, D])

where `known_n` are the future known inputs *without* the planned insulin (and without the
announced carbs, which get their own structured head). The forecast is

    median[h] = g_last + free[h] + Σ_{j≤h} c[h, j] · carbs_j − Σ_{j≤h} k[h, j] · (u_j − û_j)
    q-th quantile = median ∓ spread_q[h],   spread_q ≥ 0

and `free` = the backbone's median change + a linear skip: a linear function (per horizon)
of the normalised inputs at the origin and the last `skip_lags` glucose differences, fitted
by ridge on the training windows before training starts (DLinear / N-BEATS style). The deep
model starts where an autoregressive ridge ends and learns the residual, so on small data it
is not worse than a linear model at short horizons. The skip reads only the past.
(Measured, test RMSE 30/60 min, mean of seeds 0 and 1: ShanghaiT1DM LSTM 14.27/27.01 ->
13.45/26.76, Transformer 16.28/28.61 -> 13.60/26.54, ridge 13.70/27.61; simulated cohort
LSTM 16.70/24.99 -> 16.41/24.97. Glucose-only skip inputs, or a skip learned from zero
instead of the ridge start, lost on ShanghaiT1DM: 13.63/28.01 and 15.16/28.10, seed 0.)

with u_j the planned insulin (basal + bolus, U per slot) and û_j the insulin one expects
from the past context and the announced carbs (a small head trained only to predict the
plan; it does not depend on the plan, so it merely centres u). The insulin gain is ISF-like and non-negative:

    k[h, j] = isf_prior · softplus(a) · (ū_ref / ū)^β · s[h − j]

— a learned gain a, a dose scaling by the window's mean past basal ū (insulin sensitivity
falls as insulin needs rise, the clinical "1800 rule"), and one shared lag profile s ≥ 0
that starts from oref0's exponential insulin curve. Neither `free`, the carb term nor the
spreads see u, so every quantile is non-increasing in every u_j *by construction*: more
planned insulin can never raise a predicted quantile, which is what the MPC relies on.
(HeadConfig.insulin_gain = "full" and gain_context = True give k a free per-(h, j) or
per-window context dependence instead; see training/config.py for why they are off.)

Everything is in raw units at the boundary (mg/dL, U per slot, g per slot), so the exported
ONNX graph carries the normalisation and serving never re-implements it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from training.models.kinetics import KineticsConfig, PastKinetics


@dataclass(frozen=True)
class Layout:
    """Where things are in the raw input tensors (from the window config)."""

    past_features: tuple[str, ...]
    future_features: tuple[str, ...]
    past_slots: int
    horizon_slots: int
    quantiles: tuple[float, ...]
    carb_head: bool = False  # future carbs go through the structured carb head only

    @property
    def glucose(self) -> int:
        return self.past_features.index("glucose")

    @property
    def past_basal(self) -> int:
        return self.past_features.index("basal_u")

    @property
    def insulin(self) -> tuple[int, int]:
        return (self.future_features.index("basal_u"), self.future_features.index("bolus_u"))

    @property
    def carbs(self) -> int:
        return self.future_features.index("carbs_g")

    @property
    def known(self) -> tuple[int, ...]:
        """Future features the free part may see: everything but the planned insulin (and
        the announced carbs when the carb head models them)."""
        drop = set(self.insulin) | ({self.carbs} if self.carb_head else set())
        return tuple(i for i in range(len(self.future_features)) if i not in drop)

    @property
    def median(self) -> int:
        return self.quantiles.index(0.5)


def inverse_softplus(y: np.ndarray) -> np.ndarray:
    y = np.maximum(y, 1e-4)
    return y + np.log(-np.expm1(-y))


def insulin_effect_prior(
    horizon_slots: int, slot_minutes: int, peak_min: float, dia_min: float
) -> np.ndarray:
    """[H, H] fraction of 1 U's glucose effect realised at target h when given in slot j.

    oref0's exponential curve (the same one forecast.insulin implements): the effect realised
    after t minutes is 1 − IOB(t). Insulin in future slot j starts acting at the slot start;
    target h is read one slot after slot h starts, so the lag is (h − j + 1) slots.
    """
    tau = peak_min * (1 - peak_min / dia_min) / (1 - 2 * peak_min / dia_min)
    a = 2 * tau / dia_min
    s = 1 / (1 - a + (1 + a) * math.exp(-dia_min / tau))

    def iob(t: np.ndarray) -> np.ndarray:
        t = np.clip(t, 0, dia_min)
        return 1 - s * (1 - a) * (
            (t**2 / (tau * dia_min * (1 - a)) - t / tau - 1) * np.exp(-t / tau) + 1
        )

    h = np.arange(horizon_slots)[:, None]
    j = np.arange(horizon_slots)[None, :]
    lag_min = (h - j + 1) * slot_minutes
    frac = np.where(j <= h, 1 - iob(lag_min.astype(np.float64)), 0.0)
    return np.clip(frac, 0.0, 1.0)


def carb_effect_prior(horizon_slots: int, slot_minutes: int, absorption_min: float = 180.0):
    """[H] fraction of a meal absorbed after a lag of d + 1 slots (triangular absorption)."""
    t = (np.arange(horizon_slots) + 1.0) * slot_minutes / absorption_min
    t = np.clip(t, 0.0, 1.0)
    return np.where(t <= 0.5, 2 * t**2, 1 - 2 * (1 - t) ** 2)


class ForecastHead(nn.Module):
    """Wraps a backbone into the raw-unit, monotone, quantile forecaster of the contract."""

    def __init__(
        self,
        backbone: nn.Module,
        layout: Layout,
        d_model: int,
        *,
        slot_minutes: int = 5,
        isf_prior: float = 40.0,
        insulin_peak_min: float = 75.0,
        insulin_dia_min: float = 360.0,
        insulin_gain: str = "lag",
        csf_prior: float = 3.0,
        dose_scaling: bool = True,
        center: str = "expected",
        gain_context: bool = False,
        dose_feature: str = "basal_u",
        skip_lags: int = 12,
        kinetics: bool = False,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.layout = layout
        L, H, Q = layout.past_slots, layout.horizon_slots, len(layout.quantiles)
        fp, ff = len(layout.past_features), len(layout.future_features)
        # Normalisation statistics: fitted on the training split only (fit_normalisation),
        # saved in the state dict and baked into the exported graph.
        self.register_buffer("past_mean", torch.zeros(fp))
        self.register_buffer("past_std", torch.ones(fp))
        self.register_buffer("future_mean", torch.zeros(ff))
        self.register_buffer("future_std", torch.ones(ff))
        self.register_buffer("delta_scale", torch.full((H,), 10.0))  # mg/dL per horizon
        # Split-conformal offsets added to each spread (mg/dL, 0 for the median column).
        self.register_buffer("conformal", torch.zeros(H, Q))
        self.register_buffer("tril", torch.tril(torch.ones(H, H)))
        self.register_buffer("known_idx", torch.tensor(layout.known, dtype=torch.long))
        # side[i] = −1 below the median, +1 above, 0 for the median column itself.
        self.register_buffer(
            "side", torch.tensor([float(np.sign(q - 0.5)) for q in layout.quantiles])
        )
        # outward[k, i] = 1 where quantile k lies between the median and quantile i (same
        # side, i included): spreads are cumulative sums of non-negative increments, so the
        # quantiles stay ordered whatever their number.
        m = layout.median
        outward = np.zeros((Q, Q), dtype=np.float32)
        for i in range(Q):
            for k in range(Q):
                if k != m and i != m and (k - m) * (i - m) > 0 and abs(k - m) <= abs(i - m):
                    outward[k, i] = 1.0
        self.register_buffer("outward", torch.from_numpy(outward))
        # Free part: median change and Q spreads per horizon step.
        self.out = nn.Linear(d_model, Q)
        # Linear skip into the median change: the F_past inputs at the origin and the last
        # `skip_lags` glucose differences, one linear map per horizon. Past only, so it cannot
        # touch the monotonicity in the plan. Its weights are set by ridge in
        # fit_normalisation; the median column of `out` starts at zero, so the model starts
        # at that linear forecast and the backbone learns what it misses.
        self.skip_lags = max(0, min(int(skip_lags), L - 1))
        self.skip = nn.Linear(fp + self.skip_lags, H) if self.skip_lags else None
        if self.skip is not None:
            with torch.no_grad():
                self.skip.weight.zero_()
                self.skip.bias.zero_()
                self.out.weight[layout.median].zero_()
                self.out.bias[layout.median].zero_()
        # Insulin gain k[h, j] ≥ 0 from the past context; starts at isf_prior × the insulin
        # curve. "lag": k = isf_prior · g(ctx) · s[h − j], an ISF-like gain per window times
        # one shared lag profile (every dose at every lag informs the same few numbers);
        # "full": every (h, j) has its own context-dependent gain.
        self.isf_prior = float(isf_prior)
        self.insulin_gain = insulin_gain
        prior = insulin_effect_prior(H, slot_minutes, insulin_peak_min, insulin_dia_min)
        h_idx, j_idx = np.meshgrid(np.arange(H), np.arange(H), indexing="ij")
        self.register_buffer("lag_idx", torch.from_numpy(np.maximum(h_idx - j_idx, 0)).long())
        if insulin_gain == "full":
            self.gain = nn.Linear(d_model, H * H)
            with torch.no_grad():
                self.gain.weight.mul_(0.1)  # context modulates the prior gently at first
                self.gain.bias.copy_(torch.from_numpy(inverse_softplus(prior).reshape(-1)))
        elif insulin_gain == "lag":
            # Only parameters that reach the loss exist (DDP insists): a context-free gain
            # is one number.
            self.gain = nn.Linear(d_model, 1) if gain_context else None
            self.gain_bias = nn.Parameter(torch.tensor(float(inverse_softplus(np.array(1.0)))))
            self.lag_shape = nn.Parameter(torch.from_numpy(inverse_softplus(prior[:, 0])).float())
            if self.gain is not None:
                with torch.no_grad():
                    self.gain.weight.mul_(0.1)
                    self.gain.bias.zero_()
        else:
            raise ValueError(f"insulin_gain {insulin_gain!r} must be 'lag' or 'full'")
        # Insulin sensitivity scales inversely with a person's insulin needs (the clinical
        # "1800 rule": ISF ≈ 1800 / total daily dose). The window's mean past basal is a
        # per-person dose scale, so the gain is multiplied by (ref / ū)^β with β learned
        # (starting at 1) and ū clamped to [0.2, 5] × ref; ū is past data, so the effect
        # stays linear and non-negative in the planned insulin.
        self.dose_scaling = dose_scaling
        self.register_buffer("basal_ref", torch.tensor(1.0))  # dose scale of the training data
        self.dose_idx = layout.past_features.index(dose_feature)
        self.dose_beta = nn.Parameter(torch.tensor(1.0)) if dose_scaling else None
        # Centering of the planned insulin: the head acts on u_j − û_j. With "expected", û
        # is the insulin the past context leads one to expect (a small head trained only to
        # predict the plan, never through the forecast loss). The free part then carries
        # the effect of the *expected* insulin and the gain is learned from deviations
        # from it — without this, whatever the free part can foresee of the plan (more
        # insulin when glucose is high, meal boluses...) is counted twice and the gain is
        # shrunk to compensate. "basal": û = the window's mean past basal. Either way û
        # does not depend on the plan, so monotonicity in the plan is untouched.
        if center not in ("expected", "basal"):
            raise ValueError(f"center {center!r} must be 'expected' or 'basal'")
        self.center = center
        self.register_buffer("plan_scale", torch.tensor(1.0))  # U/slot, training mean
        self.register_buffer("plan_std", torch.tensor(1.0))  # U/slot, training std
        self.plan = nn.Linear(d_model, H)
        # ...plus the meal boluses the announced carbs lead one to expect: carbs_j × an
        # insulin-to-carb ratio read from the context. Partialling the meals out of u this
        # way leaves the gain to be learned from insulin that varies independently of the
        # meals (corrections, temp basals, extra boluses), not from the meal boluses whose
        # effect is entangled with the carbs'.
        self.plan_ratio = nn.Linear(d_model, 1)
        self.register_buffer("ratio_scale", torch.tensor(0.1))  # U per g, training ratio
        with torch.no_grad():
            self.plan.weight.mul_(0.1)
            self.plan.bias.fill_(float(inverse_softplus(np.array(1.0))))
            self.plan_ratio.weight.mul_(0.1)
            self.plan_ratio.bias.fill_(float(inverse_softplus(np.array(1.0))))
        # Optional structured carb head: c[h, j] = csf_prior · g_c(ctx) · r[h − j] ≥ 0.
        self.carb_head = layout.carb_head
        self.csf_prior = float(csf_prior)
        if self.carb_head:
            self.carb_gain = nn.Linear(d_model, 1)
            cprior = carb_effect_prior(H, slot_minutes)
            self.carb_shape = nn.Parameter(torch.from_numpy(inverse_softplus(cprior)).float())
            with torch.no_grad():
                self.carb_gain.weight.mul_(0.1)
                self.carb_gain.bias.fill_(float(inverse_softplus(np.array(1.0))))
        self.gain_context = gain_context
        self.L, self.H, self.Q = L, H, Q
        # Optional compartmental term (kinetics.py): past insulin/carbs through kinetic
        # curves with per-window weights, and the person's ISF scaling the plan gain.
        self.kinetics = (
            PastKinetics(
                KineticsConfig(
                    past_slots=L,
                    horizon_slots=H,
                    d_model=d_model,
                    slot_minutes=slot_minutes,
                    isf_prior=isf_prior,
                    csf_prior=csf_prior,
                ),
                layout.past_features,
            )
            if kinetics
            else None
        )

    def insulin_parameters(self) -> list[nn.Parameter]:
        """The parameters of the insulin-effect head (gain, lag profile, dose exponent)."""
        params = [] if self.gain is None else list(self.gain.parameters())
        if self.dose_beta is not None:
            params.append(self.dose_beta)
        if self.insulin_gain == "lag":
            params += [self.gain_bias, self.lag_shape]
        return params

    @torch.no_grad()
    def fit_normalisation(self, past: np.ndarray, future: np.ndarray, target: np.ndarray) -> None:
        """Set the normalisation buffers from training windows (raw units)."""
        p = past.reshape(-1, past.shape[-1]).astype(np.float64)  # [N*L, F_past]
        f = future.reshape(-1, future.shape[-1]).astype(np.float64)  # [N*H, F_future]
        self.past_mean.copy_(torch.from_numpy(np.nanmean(p, 0)).float())
        self.past_std.copy_(torch.from_numpy(np.maximum(np.nanstd(p, 0), 1e-3)).float())
        self.future_mean.copy_(torch.from_numpy(np.nanmean(f, 0)).float())
        self.future_std.copy_(torch.from_numpy(np.maximum(np.nanstd(f, 0), 1e-3)).float())
        last = past[:, -1, self.layout.glucose][:, None]  # [N, 1]
        delta = target - last  # [N, H]
        scale = np.sqrt(np.nanmean(delta.astype(np.float64) ** 2, 0))
        scale = np.where(np.isfinite(scale), np.maximum(scale, 1.0), 10.0)
        self.delta_scale.copy_(torch.from_numpy(scale).float())
        if self.kinetics is not None:
            # the skip fits what the compartmental term's starting point leaves
            delta = delta - self.kinetics.fit(past)
        ref = float(np.nanmean(past[:, :, self.dose_idx]))
        self.basal_ref.fill_(ref if np.isfinite(ref) and ref > 0 else 1.0)
        ib, il = self.layout.insulin
        plan = float(np.nanmean(future[:, :, ib] + future[:, :, il]))
        self.plan_scale.fill_(plan if np.isfinite(plan) and plan > 0 else 1.0)
        sd = float(np.nanstd(future[:, :, ib] + future[:, :, il]))
        self.plan_std.fill_(sd if np.isfinite(sd) and sd > 0 else 1.0)
        carbs = future[:, :, self.layout.carbs].astype(np.float64)
        meal = carbs > 0
        if meal.any():
            ratio = float(np.nanmedian(future[:, :, il][meal] / carbs[meal]))
            self.ratio_scale.fill_(ratio if np.isfinite(ratio) and ratio > 0 else 0.1)
        if self.skip is not None:
            self._fit_skip(past, delta / scale[None, :])

    @torch.no_grad()
    def _fit_skip(self, past: np.ndarray, y: np.ndarray, alpha: float = 1.0) -> None:
        """Ridge (closed form, per horizon, over the windows with a reading there) of the
        normalised glucose change y [N, H] on the skip inputs."""
        x = self._skip_inputs(torch.from_numpy(past.astype(np.float32))).double().numpy()
        x = np.nan_to_num(x)  # [N, P]
        P = x.shape[1]
        for h in range(self.H):
            ok = np.isfinite(y[:, h])
            if ok.sum() <= P:
                continue  # too few readings at this horizon: keep "no change"
            xo, yo = x[ok], y[ok, h]
            mx, my, sx = xo.mean(0), yo.mean(), np.maximum(xo.std(0), 1e-6)
            xc = (xo - mx) / sx  # [n, P] standardised, so alpha shrinks every input alike
            w = np.linalg.solve(xc.T @ xc + alpha * np.eye(P), xc.T @ (yo - my)) / sx  # [P]
            self.skip.weight[h] = torch.from_numpy(w).float()
            self.skip.bias[h] = float(my - mx @ w)

    def _skip_inputs(self, past: torch.Tensor) -> torch.Tensor:
        """past [B, L, F_past] raw -> [B, F_past + skip_lags]: the normalised origin slot and
        the glucose differences g[t − k] − g[t], k = 1 … skip_lags, in glucose std units."""
        gi = self.layout.glucose
        origin = (past[:, -1] - self.past_mean) / self.past_std  # [B, F_past]
        g = past[..., gi]  # [B, L]
        K = self.skip_lags
        lags = g[:, -1 - K : -1].flip(1) - g[:, -1:]  # [B, K], k = 1 … K
        return torch.cat([origin, lags / self.past_std[gi]], dim=1)  # [B, F_past + K]

    def parts(self, past: torch.Tensor, future: torch.Tensor) -> dict[str, torch.Tensor]:
        """The pieces of the forecast (all mg/dL unless said):

        g_last [B]; free [B, H] median change without the plan; spread [B, H, Q];
        k [B, H, H] insulin gain (mg/dL per U); u [B, H] planned insulin (U per slot);
        u_ref [B, H] its centring; u_hat [B, H] the expected plan (for the auxiliary loss).
        """
        past_n = (past - self.past_mean) / self.past_std  # [B, L, F_past]
        future_n = (future - self.future_mean) / self.future_std  # [B, H, F_future]
        known_n = future_n.index_select(2, self.known_idx)  # [B, H, F_known]
        seq, ctx = self.backbone(past_n, known_n)  # [B, H, D], [B, D]
        raw = self.out(seq)  # [B, H, Q]
        scale = self.delta_scale[None, :, None]  # [1, H, 1]
        free = raw[..., self.layout.median]  # [B, H] in delta_scale units
        if self.skip is not None:
            free = free + self.skip(self._skip_inputs(past))  # [B, H]
        free = free * self.delta_scale  # [B, H] mg/dL
        inc = F.softplus(raw) * scale * 0.5  # [B, H, Q] non-negative increments
        spread = inc @ self.outward + self.conformal  # [B, H, Q]
        spread = torch.relu(spread)  # conformal may narrow, never cross the median
        if self.insulin_gain == "full":
            k = F.softplus(self.gain(ctx)).view(-1, self.H, self.H)  # [B, H, H]
        else:
            shape = F.softplus(self.lag_shape)[self.lag_idx]  # [H, H] Toeplitz in the lag
            a = self.gain_bias.expand(ctx.shape[0], 1)  # [B, 1]
            if self.gain is not None:
                a = a + self.gain(ctx)  # [B, 1]
            k = F.softplus(a)[:, :, None] * shape  # [B, 1, 1] × [H, H]
        basal = past[..., self.layout.past_basal].mean(1)  # [B] U/slot
        if self.dose_beta is not None:
            dose = past[..., self.dose_idx].mean(1)  # [B] this window's insulin scale
            rel = torch.clamp(dose / self.basal_ref, 0.2, 5.0)  # [B]
            k = k * torch.exp(-self.dose_beta * torch.log(rel))[:, None, None]  # [B, H, H]
        k = k * self.tril * self.isf_prior  # [B, H, H], zero above the diagonal (causal)
        if self.kinetics is not None:
            effect, isf_rel, csf_rel = self.kinetics(past, ctx)  # [B, H], [B], [B]
            free = free + effect  # [B, H]
            k = k * isf_rel[:, None, None]  # [B, H, H]: still ≥ 0 and independent of the plan
        if self.carb_head:
            cshape = F.softplus(self.carb_shape)[self.lag_idx]  # [H, H]
            c = F.softplus(self.carb_gain(ctx))[:, :, None] * cshape * self.tril  # [B, H, H]
            if self.kinetics is not None:
                c = c * csf_rel[:, None, None]  # [B, H, H]
            carbs = future[..., self.layout.carbs]  # [B, H] g per slot
            free = free + self.csf_prior * torch.einsum("bhj,bj->bh", c, carbs)  # [B, H]
        ib, il = self.layout.insulin
        u = future[..., ib] + future[..., il]  # [B, H] U per slot
        # The expectation reads the backbone's summary but does not train it (detach): the
        # backbone stays shaped by the forecast alone.
        cd = ctx.detach()
        carbs_in = future[..., self.layout.carbs]  # [B, H] g per slot (known, not planned)
        ratio = F.softplus(self.plan_ratio(cd)) * self.ratio_scale  # [B, 1] U per g
        u_hat = F.softplus(self.plan(cd)) * self.plan_scale + ratio * carbs_in  # [B, H]
        if self.center == "expected":
            u_ref = u_hat.detach()  # the forecast loss must not shape the expectation
        else:
            u_ref = basal[:, None].expand_as(u)  # [B, H]
        g_last = past[:, -1, self.layout.glucose]  # [B]
        return {
            "g_last": g_last,
            "free": free,
            "spread": spread,
            "k": k,
            "u": u,
            "u_ref": u_ref,
            "u_hat": u_hat,
        }

    def _assemble(self, p: dict[str, torch.Tensor]) -> torch.Tensor:
        effect = torch.einsum("bhj,bj->bh", p["k"], p["u"] - p["u_ref"])  # [B, H] mg/dL
        median = p["g_last"][:, None] + p["free"] - effect  # [B, H]
        return median[..., None] + p["spread"] * self.side  # [B, H, Q]

    def forward(self, past: torch.Tensor, future: torch.Tensor) -> torch.Tensor:
        """Raw units in, mg/dL quantiles out: past [B, L, F_past], future [B, H, F_future]
        -> glucose [B, H, Q]."""
        return self._assemble(self.parts(past, future))

    def forward_train(
        self, past: torch.Tensor, future: torch.Tensor, *, detach_insulin: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(forecast [B, H, Q], auxiliary loss): the expected-plan head's squared error.

        `detach_insulin`: the forecast uses the insulin gain but does not train it (when
        counterfactual twins teach it instead, see training/twins.py)."""
        p = self.parts(past, future)
        aux = (((p["u_hat"] - p["u"]) / self.plan_std) ** 2).mean()
        if detach_insulin:
            p["k"] = p["k"].detach()
        return self._assemble(p), aux

    def plan_response(
        self, past: torch.Tensor, future: torch.Tensor, extra_u: torch.Tensor
    ) -> torch.Tensor:
        """[B, H] change of the median (mg/dL) when `extra_u` [B, H] U per slot is added to
        the planned insulin: −k·extra_u, exactly, since nothing else in the forecast sees
        the plan (one pass, where two forecasts and a difference would run the backbone
        twice)."""
        k = self.parts(past, future)["k"]  # [B, H, H]
        return -torch.einsum("bhj,bj->bh", k, extra_u)  # [B, H]
