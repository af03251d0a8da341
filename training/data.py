"""The LightningDataModule over the windows of a frame's splits (see training/splits.py)."""

from __future__ import annotations

from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, RandomSampler, TensorDataset

from training.splits import DataError, Splits, build_splits, split_frame, split_info

__all__ = ["DataError", "GlucoseDataModule", "Splits", "build_splits", "split_frame", "split_info"]


def fill_target_gaps(
    target: np.ndarray, origin_glucose: np.ndarray, max_gap_slots: int
) -> np.ndarray:
    """[N, H] targets with short gaps filled by straight lines between real readings.

    The reading at the origin (slot 0, `origin_glucose` [N]) anchors the first gap; a gap is
    filled only where the readings on both sides are at most `max_gap_slots` slots apart, so
    a trailing gap or a long sensor outage stays NaN. Why: the loss only sees slots with a
    reading, and on a 15-minute sensor (FreeStyle Libre exports) the window origins fall on
    readings, so slots +5, +10, +20... min would never be trained and the forecast there is
    arbitrary (a saw-tooth that the serving plausibility check rejects). Training targets
    only: validation and every metric stay on real readings.
    """
    y = np.concatenate([np.asarray(origin_glucose, dtype=np.float64)[:, None], target], axis=1)
    n, h1 = y.shape  # [N, H+1]
    cols = np.broadcast_to(np.arange(h1), (n, h1))
    real = np.isfinite(y)
    prev = np.maximum.accumulate(np.where(real, cols, -1), axis=1)  # last real slot <= j
    nxt = np.minimum.accumulate(np.where(real, cols, h1)[:, ::-1], axis=1)[:, ::-1]  # first >= j
    ok = ~real & (prev >= 0) & (nxt < h1) & (nxt - prev <= max_gap_slots)
    rows = np.arange(n)[:, None]
    lo = y[rows, np.clip(prev, 0, h1 - 1)]
    hi = y[rows, np.clip(nxt, 0, h1 - 1)]
    frac = (cols - prev) / np.maximum(nxt - prev, 1)
    out = np.where(ok, lo + frac * (hi - lo), y)[:, 1:]
    return out.astype(target.dtype, copy=False)


FILL_GAP_SLOTS = 3  # fill gaps between readings up to 15 min apart (a Libre's period)


def training_targets(w: Any, fill_gap_slots: int = FILL_GAP_SLOTS) -> np.ndarray:
    """[N, H] the targets a model is fitted on: `w.target` with short gaps filled.

    Everything fitted on training windows uses these — the loss, and the per-slot scales and
    skip weights of `fit_normalisation` (an unfilled slot would keep a default scale there).
    """
    if fill_gap_slots <= 1:
        return w.target
    g0 = w.past[:, -1, w.config.past_index("glucose")]  # [N] the origin's reading
    return fill_target_gaps(w.target, g0, fill_gap_slots)


class GlucoseDataModule(L.LightningDataModule):
    """Serves the windows of a `Splits` as (past, future, target) float32 batches.

    Windows with no real target at all are dropped from training (nothing to learn).
    Training targets have gaps of up to `fill_gap_slots` slots filled (`fill_target_gaps`).
    `max_train_windows` > 0 makes every epoch that many windows drawn at random (without
    replacement from a big cohort, with replacement from a small one), so training time and
    the number of optimiser steps do not depend on the data size.
    """

    def __init__(
        self,
        splits: Splits,
        batch_size: int = 256,
        max_train_windows: int = 0,
        seed: int = 0,
        fill_gap_slots: int = FILL_GAP_SLOTS,
    ) -> None:
        super().__init__()
        self.splits = splits
        self.fill_gap_slots = fill_gap_slots
        self.batch_size = batch_size
        self.max_train_windows = max_train_windows
        self.seed = seed

    @staticmethod
    def dataset(w: Any, fill_gap_slots: int = 0) -> TensorDataset:
        target = training_targets(w, fill_gap_slots)
        keep = np.isfinite(target).any(axis=1)
        return TensorDataset(
            torch.from_numpy(np.ascontiguousarray(w.past[keep], dtype=np.float32)),
            torch.from_numpy(np.ascontiguousarray(w.future[keep], dtype=np.float32)),
            torch.from_numpy(np.ascontiguousarray(target[keep], dtype=np.float32)),
        )

    def setup(self, stage: str | None = None) -> None:
        self.train = self.dataset(self.splits.windows["train"], self.fill_gap_slots)
        self.val = self.dataset(self.splits.windows["val"])

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(self.seed)
        if self.max_train_windows:
            # A fixed number of windows per epoch, whatever the data size: a big cohort is
            # subsampled, a small one is cycled through several times, so the default
            # epoch count means the same amount of training on both.
            sampler = RandomSampler(
                self.train,
                replacement=self.max_train_windows > len(self.train),
                num_samples=self.max_train_windows,
                generator=g,
            )
            return DataLoader(self.train, batch_size=self.batch_size, sampler=sampler)
        return DataLoader(self.train, batch_size=self.batch_size, shuffle=True, generator=g)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val, batch_size=max(self.batch_size, 1024), shuffle=False)
