"""The nouns the closed loop passes between its parts (numpy + stdlib only).

A control cycle: the CGM gives a `Reading`; the runtime builds one `ControlInput` per
patient (model inputs from `forecast.windows`, insulin on board, settings); a controller
turns a batch of inputs into `Proposal`s; the supervisor (`serving.safety`) turns each
proposal into a `Verdict`, the only thing that reaches the pump.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum

import numpy as np
import pandas as pd

from forecast.schema import PROFILE_COLUMNS, GlucastError


class JournalError(GlucastError):
    """The journal could not do what was asked. `serving.journal` raises it (and subclasses);
    the supervisor catches it without importing the journal, so it is defined here."""


class CGMStatus(StrEnum):
    OK = "ok"
    WARMUP = "warmup"
    ERROR = "error"  # sensor error code (e.g. LOW/HIGH, 38/39)
    NO_DATA = "no_data"


@dataclass(frozen=True)
class Reading:
    """One CGM reading as a device reports it (timestamp from the sensor's clock)."""

    time: pd.Timestamp
    glucose_mgdl: float  # NaN when status is not OK
    status: CGMStatus = CGMStatus.OK
    trend_mgdl_per_min: float = float("nan")


@dataclass(frozen=True)
class PatientSettings:
    """Therapy settings a clinician would program, plus the supervisor's hard limits."""

    name: str
    basal_u_per_h: float  # scheduled basal
    carb_ratio_g_per_u: float
    isf_mgdl_per_u: float
    max_basal_u_per_h: float  # pump/clinician maximum; supervisor also applies oref0's caps
    max_bolus_u: float
    max_iob_u: float
    max_daily_basal_u_per_h: float | None = None  # highest scheduled rate of the day
    target_mgdl: float = 110.0
    low_suspend_mgdl: float = 80.0  # predictive low-glucose suspend threshold

    def profile(self) -> dict[str, float]:
        """The therapy profile as a forecaster's static inputs (`forecast.windows`'s
        ``PROFILE_FEATURES``, the frame's profile columns)."""
        return {k: float(getattr(self, k)) for k in PROFILE_COLUMNS}  # same names as fields


def constant_profile(settings: PatientSettings, n: int) -> dict[str, np.ndarray]:
    """A profile that does not change: the settings' values at `n` times."""
    return {k: np.full(n, v) for k, v in settings.profile().items()}


def profile_arrays(settings: Sequence[PatientSettings]) -> dict[str, np.ndarray]:
    """The profiles of a cohort, one ``[N]`` array per profile feature."""
    rows = [s.profile() for s in settings]
    return {k: np.array([r[k] for r in rows], np.float64) for k in (rows[0] if rows else {})}


@dataclass(frozen=True)
class SlotHistory:
    """One patient's recent record on the 5-minute grid, oldest first, ending at the current
    slot (whose insulin is what was delivered before this cycle's decision).

    What a controller that reasons over the raw record (oref0's IOB and meal COB, Loop's
    glucose effects) needs beyond the model windows; the canonical frame's column names.
    """

    time: np.ndarray  # [T] datetime64[ns], UTC slot starts
    glucose: np.ndarray  # [T] mg/dL CGM, NaN = no reading
    basal_u: np.ndarray  # [T] U delivered in the slot
    bolus_u: np.ndarray  # [T] U delivered in the slot
    carbs_g: np.ndarray  # [T] g announced in the slot (0 = none)


@dataclass
class ControlInput:
    """Everything a controller may look at for one patient in one cycle."""

    time: pd.Timestamp
    past: np.ndarray  # [L, F_past] raw units, built by forecast.windows
    future: np.ndarray  # [H, F_future] known future inputs (scheduled basal, announced carbs)
    glucose_mgdl: float  # latest reading (NaN if none)
    iob_u: float
    settings: PatientSettings
    carbs_announced_g: float = 0.0  # meal announced for this cycle (bolus decision)
    # the raw record, for controllers that need more than windows (the peers' adapters)
    history: SlotHistory | None = None


@dataclass
class Proposal:
    """What a controller wants: a temp basal for a while and/or a bolus."""

    temp_basal_u_per_h: float
    duration_min: int = 30
    bolus_u: float = 0.0
    reason: str = ""
    predicted_mgdl: np.ndarray | None = None  # [H, Q] forecast under the chosen plan


@dataclass
class Verdict:
    """What the supervisor lets through, and every veto with its reason."""

    temp_basal_u_per_h: float
    duration_min: int
    bolus_u: float
    suspend: bool = False
    vetoes: list[str] = field(default_factory=list)
    fallback: str = ""  # "" | "scheduled_basal" | "suspend"
