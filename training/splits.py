"""From a canonical glucose frame to train/validation/test splits and their windows.

Splits (forecast.windows does the cutting; IOB/COB are computed on the full record first so
a split's first hours still see the insulin given just before it):

- ``chronological``: every subject's record is cut by time into train/val/test fractions;
- ``subjects``: the listed subjects are the test set; the others are cut by time into
  train/val.

The test split's `dataset_hash` identifies the test data: MLflow runs are only compared
when it is equal. Training windows may be strided; validation and test use every window.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pandas as pd

from forecast.schema import GlucastError, SchemaError, dataset_hash, validate_frame
from training.config import DataConfig

SPLITS = ("train", "val", "test")


class DataError(GlucastError, ValueError):
    """The frame cannot give the windows training or evaluation needs."""


@dataclass
class Splits:
    frames: dict[str, pd.DataFrame]  # train / val / test frames (with feature columns)
    windows: dict[str, Any]  # forecast.windows.Windows per split
    hashes: dict[str, str]  # forecast.schema.dataset_hash of each split frame
    window_config: Any

    @property
    def test_hash(self) -> str:
        return self.hashes["test"]

    def describe(self) -> dict[str, Any]:
        return {
            name: {
                "subjects": int(self.frames[name]["subject_id"].nunique()),
                "rows": len(self.frames[name]),
                "windows": len(self.windows[name]),
                "dataset_hash": self.hashes[name],
            }
            for name in self.frames
        }


def split_info(data: DataConfig) -> dict[str, Any]:
    """What the manifest records so `glucast evaluate` can rebuild the same test split."""
    return {
        "split": data.split,
        "fractions": list(data.fractions),
        "test_subjects": list(data.test_subjects),
    }


def split_frame(
    frame: pd.DataFrame, data: DataConfig, window_config: Any
) -> dict[str, pd.DataFrame]:
    """train/val/test frames following `data.split` (see the module docstring)."""
    from forecast.windows import add_features, split_chronological, split_subjects

    frame = validate_frame(frame)
    if len(frame) == 0:
        raise DataError("the frame has no rows")
    wc = window_config
    try:
        if data.split == "chronological":
            return split_chronological(frame, tuple(data.fractions), config=wc)
        full = add_features(frame, wc.insulin_curve, wc.carb_curve)
        rest, test = split_subjects(full, list(data.test_subjects))
        ftr, fva, _ = data.fractions
        two = split_chronological(rest, (ftr / (ftr + fva), fva / (ftr + fva)), config=wc)
        return {"train": two["train"], "val": two["test"], "test": test}
    except SchemaError as e:
        raise DataError(f"cannot split the frame: {e}") from e


def build_splits(
    frame: pd.DataFrame,
    data: DataConfig,
    window_config: Any,
    *,
    need: tuple[str, ...] = SPLITS,
    stride: int | None = None,
) -> Splits:
    """Split `frame` and cut windows from each split; DataError if a needed split is empty."""
    from forecast.windows import make_windows

    frames = split_frame(frame, data, window_config)
    windows = {}
    for name, f in frames.items():
        s = (stride or data.stride) if name == "train" else 1
        windows[name] = make_windows(f, window_config, stride=s)
    for name in need:
        if len(windows[name]) == 0:
            L, H = window_config.past_slots, window_config.horizon_slots
            raise DataError(
                f"the {name} split has no windows: every window needs {L + H} consecutive slots "
                f"({(L + H) * window_config.slot_minutes} min) with a reading at its origin and "
                f"no CGM gap over {window_config.max_past_gap_slots} slots in its past. "
                f"Give more data per subject, shorten data.past_min/horizon_min, or change "
                f"data.fractions"
            )
    hashes = {name: dataset_hash(f) for name, f in frames.items()}
    return Splits(frames, windows, hashes, window_config)


def subject_frame(frame: pd.DataFrame, subject: str) -> pd.DataFrame:
    ids = frame["subject_id"].astype(str)
    if subject not in set(ids):
        known = sorted(set(ids))
        raise DataError(f"subject {subject!r} is not in the frame; it holds {known[:20]}")
    out = frame[ids == subject].reset_index(drop=True)
    out.attrs = dict(frame.attrs)
    return out
