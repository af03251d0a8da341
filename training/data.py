"""The LightningDataModule over the windows of a frame's splits (see training/splits.py)."""

from __future__ import annotations

from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, RandomSampler, TensorDataset

from training.splits import DataError, Splits, build_splits, split_frame, split_info

__all__ = ["DataError", "GlucoseDataModule", "Splits", "build_splits", "split_frame", "split_info"]


class GlucoseDataModule(L.LightningDataModule):
    """Serves the windows of a `Splits` as (past, future, target) float32 batches.

    Windows with no real target at all are dropped from training (nothing to learn).
    `max_train_windows` > 0 makes every epoch that many windows drawn at random (without
    replacement from a big cohort, with replacement from a small one), so training time and
    the number of optimiser steps do not depend on the data size.
    """

    def __init__(
        self, splits: Splits, batch_size: int = 256, max_train_windows: int = 0, seed: int = 0
    ) -> None:
        super().__init__()
        self.splits = splits
        self.batch_size = batch_size
        self.max_train_windows = max_train_windows
        self.seed = seed

    @staticmethod
    def dataset(w: Any) -> TensorDataset:
        keep = np.isfinite(w.target).any(axis=1)
        return TensorDataset(
            torch.from_numpy(np.ascontiguousarray(w.past[keep], dtype=np.float32)),
            torch.from_numpy(np.ascontiguousarray(w.future[keep], dtype=np.float32)),
            torch.from_numpy(np.ascontiguousarray(w.target[keep], dtype=np.float32)),
        )

    def setup(self, stage: str | None = None) -> None:
        self.train = self.dataset(self.splits.windows["train"])
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
