"""Insulin pumps in consistent units: bolus in U, basal in U/h, limits that actually bind.

simglucose treats basal and bolus both as U/min rates, rounds them to 0.05 *pmol/min* and
clips at 30 U/min, so neither its increments nor its limits mean anything (issue #71). Here
the rows of pump_params.csv are read the way the devices define them: `inc_bolus` in U,
`inc_basal` in U/h, `max_bolus` in U, `max_basal` in U/h (boluses round down, basal rates to the nearest
programmable rate). A bolus is delivered at
`bolus_rate_u_per_min` (Omnipod: 1.5 U/min) and carries over into the next step if it does
not fit; basal is delivered at the quantised rate. An occlusion makes the pump deliver only a
fraction of what it was told to while it believes it delivered everything; the simulator
records what the patient really received.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from functools import lru_cache

import numpy as np
from numba import njit

from forecast.sim.errors import SimInputError
from forecast.sim.patient import data_dir
from forecast.sim.rng import PerPatientDraws


@dataclass(frozen=True)
class PumpConfig:
    """A pump's increments and limits (U and U/h), bolus speed and random occlusion faults.

    Random occlusions: each patient independently starts one with probability
    `occlusion_prob_per_day` per day (spread uniformly in time); it lasts
    `occlusion_hours` and lets `occlusion_delivery_fraction` of the insulin through.
    """

    name: str = "Insulet"
    bolus_increment_u: float = 0.05
    basal_increment_u_per_h: float = 0.05
    max_bolus_u: float = 30.0
    max_basal_u_per_h: float = 30.0
    bolus_rate_u_per_min: float = 1.5
    occlusion_prob_per_day: float = 0.0
    occlusion_hours: float = 4.0
    occlusion_delivery_fraction: float = 0.0

    def __post_init__(self) -> None:
        for f in ("bolus_increment_u", "basal_increment_u_per_h"):
            if not getattr(self, f) >= 0:
                raise SimInputError(f"pump {f} must be >= 0 (0 = no quantisation)")
        for f in ("max_bolus_u", "max_basal_u_per_h", "bolus_rate_u_per_min", "occlusion_hours"):
            if not getattr(self, f) > 0:
                raise SimInputError(f"pump {f} must be > 0, got {getattr(self, f)!r}")
        for f in ("occlusion_prob_per_day", "occlusion_delivery_fraction"):
            if not 0.0 <= getattr(self, f) <= 1.0:
                raise SimInputError(f"pump {f} must be in [0, 1], got {getattr(self, f)!r}")

    @classmethod
    def named(cls, name: str, **overrides) -> PumpConfig:
        """A pump from pump_params.csv (Insulet, Cozmo), or 'ideal' (no quantisation)."""
        if name.lower() == "ideal":
            return replace(
                cls(name="ideal", bolus_increment_u=0.0, basal_increment_u_per_h=0.0,
                    max_bolus_u=1e9, max_basal_u_per_h=1e9, bolus_rate_u_per_min=1e9),
                **overrides,
            )  # fmt: skip
        table = _pump_table(str(data_dir()))
        try:
            row = table[name.lower()]
        except KeyError:
            raise SimInputError(
                f"unknown pump {name!r}; known: {sorted(table)} and 'ideal'"
            ) from None
        return replace(cls(**row), **overrides)


@lru_cache(maxsize=4)
def _pump_table(folder: str) -> dict[str, dict]:
    import pandas as pd

    t = pd.read_csv(data_dir() / "pump_params.csv")
    return {
        str(r.Name).lower(): dict(
            name=str(r.Name),
            bolus_increment_u=float(r.inc_bolus),
            basal_increment_u_per_h=float(r.inc_basal),
            max_bolus_u=float(r.max_bolus),
            max_basal_u_per_h=float(r.max_basal),
        )
        for r in t.itertuples()
    }


@njit(cache=True)
def _deliver(
    k, want_basal, want_bolus, inc_basal, inc_bolus, max_basal, max_bolus, bolus_rate,
    occlusion, pending, insulin, out,
):  # fmt: skip  # pragma: no cover - compiled
    """Commands → per-minute insulin for N pumps over k minutes (in place).

    want_basal U/h and want_bolus U [N] are cut at the limits, then quantised: boluses
    round down (a pump never gives more than asked), basal rates to the nearest programmable
    rate (unbiased over a day). pending [N] (U of bolus not yet delivered) is updated.
    insulin [N, k] U/min that reach the patient (occlusion applied); out [N, 5]: delivered
    basal U, delivered bolus U, commanded basal U, accepted bolus U, limited (1/0).
    """
    for i in range(want_basal.shape[0]):
        wb = want_basal[i]
        rate = min(wb, max_basal)
        if inc_basal > 0:
            rate = np.round(rate / inc_basal) * inc_basal
        bol = min(want_bolus[i], max_bolus)
        if inc_bolus > 0:
            bol = np.floor(bol / inc_bolus + 1e-9) * inc_bolus
        p = pending[i] + bol
        per_min = rate / 60.0
        occ = occlusion[i]
        given = 0.0
        for j in range(k):
            b = min(p, bolus_rate)
            p -= b
            given += b
            insulin[i, j] = (per_min + b) * occ
        pending[i] = p if p > 1e-12 else 0.0
        out[i, 0] = per_min * k * occ
        out[i, 1] = given * occ
        out[i, 2] = per_min * k
        out[i, 3] = bol
        out[i, 4] = 1.0 if (wb > max_basal or want_bolus[i] > max_bolus) else 0.0


@dataclass
class Delivery:
    """What the pump did over one step of k minutes, per patient."""

    insulin_u_per_min: np.ndarray  # [N, k] reached the patient
    basal_u: np.ndarray  # [N] delivered basal
    bolus_u: np.ndarray  # [N] delivered bolus (part of this and earlier boluses)
    commanded_basal_u: np.ndarray  # [N] after rounding and limits, before occlusion
    commanded_bolus_u: np.ndarray  # [N] bolus accepted this step, after rounding and limits
    limited: np.ndarray  # [N] bool: a max basal or max bolus limit cut the command


class Pump:
    """N pumps. `deliver(k, basal_u_per_h, bolus_u)` turns commands into per-minute insulin."""

    def __init__(self, config: PumpConfig, n: int, seeds: np.ndarray | None = None):
        """seeds: [N] per-patient seeds of the random-occlusion streams."""
        self.config = config
        self.n = n
        self.pending_bolus_u = np.zeros(n)  # accepted, not yet delivered
        self.occlusion = np.ones(n)  # fraction of insulin that gets through (1 = healthy)
        self._occlusion_until = np.full(n, -1.0)
        self._draws = PerPatientDraws(np.arange(n) if seeds is None else seeds, 1)
        self.minute = 0

    def copy(self) -> Pump:
        return copy.deepcopy(self)

    def occlude(self, mask: np.ndarray, fraction: float = 0.0, minutes: float = np.inf) -> None:
        """Start an occlusion on the selected pumps: only `fraction` gets through for a while."""
        if not 0.0 <= fraction <= 1.0:
            raise SimInputError(f"occlusion fraction must be in [0, 1], got {fraction}")
        m = np.broadcast_to(np.asarray(mask, dtype=bool), (self.n,))
        self.occlusion[m] = fraction
        self._occlusion_until[m] = self.minute + minutes

    def clear_occlusion(self, mask: np.ndarray | None = None) -> None:
        m = (
            np.ones(self.n, bool)
            if mask is None
            else np.broadcast_to(np.asarray(mask, bool), (self.n,))
        )
        self.occlusion[m] = 1.0
        self._occlusion_until[m] = -1.0

    def _random_occlusions(self, k: int) -> None:
        c = self.config
        ended = (self._occlusion_until >= 0) & (self.minute >= self._occlusion_until)
        if ended.any():
            self.clear_occlusion(ended)
        if c.occlusion_prob_per_day <= 0:
            return
        p = c.occlusion_prob_per_day * k / 1440.0
        start = (self._draws.next()[:, 0] < p) & (self.occlusion >= 1.0)
        if start.any():
            self.occlude(start, c.occlusion_delivery_fraction, c.occlusion_hours * 60.0)

    def deliver(self, k: int, basal_u_per_h: np.ndarray, bolus_u: np.ndarray) -> Delivery:
        """Accept commands (validated [N] arrays) and deliver them over the next k minutes."""
        c = self.config
        if self._occlusion_until.max() >= 0 or c.occlusion_prob_per_day > 0:
            self._random_occlusions(k)
        insulin = np.empty((self.n, k))
        out = np.empty((self.n, 5))
        _deliver(
            k, basal_u_per_h, bolus_u, c.basal_increment_u_per_h, c.bolus_increment_u,
            c.max_basal_u_per_h, c.max_bolus_u, c.bolus_rate_u_per_min, self.occlusion,
            self.pending_bolus_u, insulin, out,
        )  # fmt: skip
        self.minute += k
        return Delivery(
            insulin_u_per_min=insulin,
            basal_u=out[:, 0],
            bolus_u=out[:, 1],
            commanded_basal_u=out[:, 2],
            commanded_bolus_u=out[:, 3],
            limited=out[:, 4] > 0,
        )
