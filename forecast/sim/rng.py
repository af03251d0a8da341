"""Seeded, per-patient random streams.

Every random effect (meals, announcements, sensor noise, dropouts, excitation dosing...) has a
stream id; a patient's stream is seeded from (run seed, patient id, stream id), so what one
patient experiences does not depend on which other patients share the cohort, and switching
one effect on does not shift the draws of another.
"""

from __future__ import annotations

import numpy as np

# Stream ids (stable: changing one changes every simulated data set).
STREAM_NOISE, STREAM_DROPOUT, STREAM_COMPRESSION, STREAM_DRIFT = 11, 12, 13, 14
STREAM_MEALS, STREAM_ANNOUNCE = 21, 22
STREAM_PUMP = 31
STREAM_EXCITATION = 41
STREAM_DAILY_SI, STREAM_MEAL_ABSORPTION = 51, 52  # forecast.sim.variability


def stream_seeds(seed: int, patient_ids: np.ndarray, stream: int) -> np.ndarray:
    """[N] independent 32-bit seeds, one per patient, for one purpose."""
    ids = np.asarray(patient_ids, dtype=np.int64).ravel()
    return np.array(
        [
            np.random.SeedSequence([int(seed), int(i), int(stream)]).generate_state(1)[0]
            for i in ids
        ],
        dtype=np.uint32,
    )


class PerPatientDraws:
    """Per-patient random streams read one row at a time, drawn in blocks (cheap for big N).

    Patient i's values come only from its own generator, so they do not depend on the cohort.
    """

    def __init__(self, seeds: np.ndarray, width: int, normal: bool = False, block: int = 288):
        self._rngs = [np.random.default_rng(int(s)) for s in seeds]
        self._width, self._normal, self._block = width, normal, block
        self._buf = np.empty((len(self._rngs), 0, width))
        self._pos = 0

    def next(self) -> np.ndarray:
        """[N, width] fresh draws (uniform in [0, 1) or standard normal)."""
        if self._pos >= self._buf.shape[1]:
            shape = (self._block, self._width)
            if self._normal:
                rows = [r.standard_normal(shape) for r in self._rngs]
            else:
                rows = [r.random(shape) for r in self._rngs]
            self._buf = np.stack(rows) if rows else np.empty((0, *shape))
            self._pos = 0
        out = self._buf[:, self._pos]
        self._pos += 1
        return out
