"""The LightningModule: pinball loss over all horizons and quantiles, validation metrics.

The wrapped `ForecastHead` (training/models/common.py) takes and returns raw units, so the
module is thin: it scores quantiles against targets (NaN where no real reading was taken)
and logs the validation RMSE of the median at 30 and 60 minutes next to the loss.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import numpy as np
import torch

from training.models import model_from_spec

AUX_WEIGHT = 1.0
TWIN_BATCH = 64  # twins per step: the head they train has ~14 parameters, not the backbone


def pinball_loss(
    pred: torch.Tensor, target: torch.Tensor, quantiles: torch.Tensor, scale: torch.Tensor
) -> torch.Tensor:
    """Mean quantile (pinball) loss over real readings.

    pred [B, H, Q] mg/dL, target [B, H] mg/dL with NaN = no reading, quantiles [Q],
    scale [H] mg/dL. Errors are divided by the per-horizon scale (the training RMS of the
    glucose change) so every horizon counts about equally, not just the far ones.
    """
    mask = torch.isfinite(target)  # [B, H]
    y = torch.where(mask, target, torch.zeros_like(target))
    err = (y[..., None] - pred) / scale[None, :, None]  # [B, H, Q]
    loss = torch.maximum(quantiles * err, (quantiles - 1) * err)  # [B, H, Q]
    loss = loss * mask[..., None]
    n = mask.sum().clamp_min(1) * pred.shape[-1]
    return loss.sum() / n


def median_mse(median: torch.Tensor, target: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Mean squared error of the median [B, H] over real readings (target NaN = none), in
    units of the per-horizon scale [H] as the pinball loss."""
    mask = torch.isfinite(target)  # [B, H]
    err = torch.where(mask, (target - median) / scale, torch.zeros_like(median))  # [B, H]
    return (err**2).sum() / mask.sum().clamp_min(1)


class ForecastModule(L.LightningModule):
    def __init__(
        self,
        spec: dict[str, Any],
        lr: float = 3e-3,
        weight_decay: float = 1e-4,
        max_epochs: int = 10,
        freeze_insulin_epochs: int = 0,
        twin_weight: float = 1.0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.twins: tuple[torch.Tensor, ...] | None = None  # see set_twins
        self.model = model_from_spec(spec)
        q = torch.tensor(spec["layout"]["quantiles"], dtype=torch.float32)
        self.register_buffer("quantiles", q)
        self.median = self.model.layout.median
        # optional squared error of the median next to the pinball loss (config lstm.median_mse)
        self.mse_weight = float(spec.get("options", {}).get("median_mse", 0.0))
        slot = int(spec["slot_minutes"])
        H = self.model.H
        # Validation RMSE is reported where those horizons exist.
        self.report = {m: m // slot - 1 for m in (30, 60) if m // slot <= H}
        self._val: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, past: torch.Tensor, future: torch.Tensor) -> torch.Tensor:
        return self.model(past, future)

    def set_twins(self, twins: Any) -> None:
        """Supervise the insulin-effect head with counterfactual twins (training/twins.py).

        From then on the head learns only from the twins' true glucose changes; the forecast
        loss uses its output but no longer moves it (on simulator data the recorded insulin
        is confounded with glucose by the dosing policy's feedback)."""
        change = torch.from_numpy(np.ascontiguousarray(twins.change, dtype=np.float32))
        # One scale for all horizons: the RMS true change (the first horizons barely move).
        self.twin_scale = float(torch.sqrt((change**2).mean()).clamp_min(0.5))
        ib, il = self.model.layout.insulin
        d = twins.future_twin - twins.future  # [N, H, F_future]
        extra = d[:, :, ib] + d[:, :, il]  # [N, H] U per slot added to the plan
        self.twins = tuple(
            torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
            for a in (twins.past, twins.future, extra)
        ) + (change,)

    def twin_loss(self, batch_size: int) -> torch.Tensor:
        """Squared error of the predicted median change against the twins' true change."""
        assert self.twins is not None
        past, fut, extra, change = self.twins
        i = torch.randint(len(change), (min(batch_size, len(change)),))
        p, f, e, y = (a[i].to(self.device) for a in (past, fut, extra, change))
        pred = self.model.plan_response(p, f, e)  # [B, H] twin − recorded
        return (((pred - y) / self.twin_scale) ** 2).mean()

    def on_after_backward(self) -> None:
        # Early in training the free part has not learned what meals do, so glucose rising
        # after a meal bolus reads as "insulin raises glucose" and would drive the insulin
        # gain to zero, where softplus saturates and it cannot come back. Holding the
        # insulin head at its physiological prior for the first epochs avoids that trap.
        # (Gradients are zeroed rather than requires_grad switched off: DDP needs the same
        # parameters to take part in every step; Adam makes no step on a zero gradient.)
        if self.twins is None and self.current_epoch < self.hparams.freeze_insulin_epochs:
            for p in self.model.insulin_parameters():
                if p.grad is not None:
                    p.grad.zero_()

    def _loss(
        self, batch: tuple[torch.Tensor, ...]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(pinball loss, expected-plan loss, forecast)."""
        past, future, target = batch
        # with twins, the insulin gain is theirs to learn: the forecast loss leaves it alone
        pred, aux = self.model.forward_train(
            past, future, detach_insulin=self.twins is not None
        )  # [B, H, Q], scalar
        loss = pinball_loss(pred, target, self.quantiles, self.model.delta_scale)
        if self.mse_weight > 0:
            loss = loss + self.mse_weight * median_mse(
                pred[..., self.median], target, self.model.delta_scale
            )
        return loss, aux, pred

    def training_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> torch.Tensor:
        loss, aux, _ = self._loss(batch)
        self.log("train_loss", loss, prog_bar=True, batch_size=batch[0].shape[0])
        self.log("train_plan_loss", aux, batch_size=batch[0].shape[0])
        # The expected-plan head sees only detached features and is detached in the
        # forecast, so adding its loss trains it without touching anything else.
        total = loss + AUX_WEIGHT * aux
        if self.twins is not None and self.training:
            twin = self.twin_loss(TWIN_BATCH)
            self.log("train_twin_loss", twin, batch_size=batch[0].shape[0])
            total = total + self.hparams.twin_weight * twin
        return total

    def validation_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> None:
        loss, _, pred = self._loss(batch)
        self.log("val_loss", loss, prog_bar=True, batch_size=batch[0].shape[0], sync_dist=True)
        self._val.append((pred[..., self.median].detach(), batch[2]))

    def on_validation_epoch_end(self) -> None:
        if not self._val:
            return
        pred = torch.cat([p for p, _ in self._val])  # [N, H]
        target = torch.cat([t for _, t in self._val])  # [N, H]
        self._val.clear()
        for minutes, h in self.report.items():
            ok = torch.isfinite(target[:, h])
            if ok.any():
                rmse = torch.sqrt(((pred[ok, h] - target[ok, h]) ** 2).mean())
                self.log(f"val_rmse_{minutes}", rmse, prog_bar=minutes == 30, sync_dist=True)

    def configure_optimizers(self):
        opt = torch.optim.AdamW(
            self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay
        )
        # Cosine decay over the planned epochs: a short schedule that still ends cool, so
        # early stopping and the last epoch both give a settled model.
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(
            opt, T_max=max(1, self.hparams.max_epochs), eta_min=self.hparams.lr * 0.05
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}
