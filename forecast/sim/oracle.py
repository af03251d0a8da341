"""Forecast ceilings on simulated data: what a forecaster that knows the simulator could score.

Two oracles forecast the CGM readings of a simulated frame (``glucast simulate``), on the same
windows `forecast.windows.make_windows` cuts for every other model:

- `NoiseStateOracle` ("oracle-noise") re-simulates the run from the frame's metadata (seed,
  patients, sensor, pump, scenario, policy) and knows everything but the sensor's *future*
  noise: the noise-free sensor signal (calibration drift and compression lows included) at
  every future reading, plus the conditional mean of the AR(2) noise given its state at the
  forecast origin. Its error is the AR noise's h-step prediction error, whose SD
  (`ar_prediction_sd`) is the analytic floor: 7.67 mg/dL at 30 min and 7.94 at 60 for the G6
  model (Vettoretti et al. 2019). No forecaster can do better on these readings.
- `FilterOracle` ("oracle-filter") knows each patient's UVA/Padova parameters and the inputs
  as the frame records them (delivered insulin, announced carbs) but sees only the CGM
  readings: an ensemble Kalman filter (Anderson's adjustment filter, one scalar reading at a
  time) over the glucose states and the sensor's error states (two AR(2) components, gain and
  offset drift), run along each patient's record with the members as the simulator kernel's
  batch dimension. Its forecast is the ensemble's predicted reading (mean) with Gaussian
  quantiles from the ensemble spread plus the noise's h-step variance. This is the fair
  ceiling for a forecaster that knows the physiology exactly: the gap between the two is the
  cost of estimating the state from noisy readings (and of not seeing compression lows).

Both are forecasters for held-out *windows of their own frame* (`predict_windows`): they find
each window's patient and origin slot from ``subject_id`` and ``origin``. numpy/numba only.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import numpy as np
import pandas as pd

from forecast.schema import SLOT_MINUTES, GlucastError, get_meta
from forecast.sim import model
from forecast.sim.cohort import SOURCE, simulate_cohort
from forecast.sim.model import ModelConfig
from forecast.sim.patient import Patients, load_patients
from forecast.sim.pump import PumpConfig
from forecast.sim.rng import STREAM_NOISE, stream_seeds
from forecast.sim.scenario import AnnouncementConfig, minute_of_day, to_timestamp
from forecast.sim.sensor import CGM, AR2Noise, AR2Stream, SensorConfig, resolve_noise_model
from forecast.sim.variability import VariabilityConfig

ORACLES = ("oracle-noise", "oracle-filter")
_Z = {}  # quantile -> standard normal quantile (cached)


class OracleError(GlucastError, ValueError):
    """An oracle cannot forecast this frame (not simulated, metadata missing, frame edited)."""


# --------------------------------------------------------------------------- the run


@dataclass(frozen=True)
class SimRun:
    """How a simulated frame was made, read back from its DatasetMeta (enough to re-run it)."""

    seed: int
    days: float
    start: pd.Timestamp
    patients: tuple[str, ...]
    scenario: str
    policy: str
    sensor: SensorConfig | None
    pump: PumpConfig
    announcement: AnnouncementConfig
    model_config: ModelConfig
    variability: VariabilityConfig = VariabilityConfig()

    @classmethod
    def from_frame(cls, frame: pd.DataFrame) -> SimRun:
        """The run behind `frame`; OracleError naming what is missing if it cannot be rebuilt."""
        meta = get_meta(frame)
        if meta is None or meta.source != SOURCE:
            src = None if meta is None else meta.source
            raise OracleError(
                f"the oracles need a frame written by `glucast simulate` (source {SOURCE!r}); "
                f"this frame's source is {src!r}"
            )
        x = meta.extra or {}
        need = ("seed", "days", "start", "patients", "scenario", "policy", "sensor", "pump")
        missing = [k for k in need if k not in x]
        if missing:
            raise OracleError(f"the frame's metadata lacks {missing}: it cannot be re-simulated")
        if x["scenario"] not in ("random", "fixed") or x["policy"] not in (
            "basal-bolus",
            "excitation",
        ):
            raise OracleError(
                f"the frame was simulated with scenario {x['scenario']!r} and policy "
                f"{x['policy']!r}; only the named ones (random|fixed, basal-bolus|excitation) "
                "can be re-simulated from metadata"
            )
        # only the frame's subjects: a patient's streams do not depend on the rest of the cohort
        present = set(frame["subject_id"].astype(str).unique())
        unknown = sorted(present - {str(p) for p in x["patients"]})
        if unknown:
            raise OracleError(f"subjects {unknown[:3]} are not among the run's patients")
        patients = tuple(str(p) for p in x["patients"] if str(p) in present)
        ann = dict(x.get("announcement") or {})
        for k, v in ann.items():  # JSON turned tuples into lists
            if isinstance(v, list):
                ann[k] = tuple(v)
        return cls(
            seed=int(x["seed"]),
            days=float(x["days"]),
            start=to_timestamp(x["start"]),
            patients=patients,
            scenario=str(x["scenario"]),
            policy=str(x["policy"]),
            sensor=None if x["sensor"] is None else SensorConfig(**x["sensor"]),
            pump=PumpConfig(**x["pump"]),
            announcement=AnnouncementConfig(**ann),
            # frames written before the model settings travelled used the defaults
            model_config=ModelConfig(**(x.get("model_config") or {})),
            # frames written before variability existed had none
            variability=VariabilityConfig(**(x.get("variability") or {})),
        )

    @property
    def n_slots(self) -> int:
        return int(round(self.days * 1440 / SLOT_MINUTES))

    def simulate(self) -> pd.DataFrame:
        """The same run again (deterministic from the seed): the frame it wrote."""
        import warnings

        from forecast.sim.errors import PhysiologyWarning

        with warnings.catch_warnings():  # already reported when the frame was written
            warnings.simplefilter("ignore", PhysiologyWarning)
            return self._simulate()

    def _simulate(self) -> pd.DataFrame:
        return simulate_cohort(
            load_patients(list(self.patients)),
            days=self.days,
            scenario=self.scenario,
            seed=self.seed,
            policy=self.policy,
            sensor=self.sensor,
            pump=self.pump,
            start=self.start,
            announcement=self.announcement,
            model_config=self.model_config,
            variability=self.variability,
        )

    def grid(self, frame: pd.DataFrame, column: str) -> np.ndarray:
        """[N, T] `column` of `frame` on the run's grid (patients in run order); NaN where the
        frame has no row. OracleError for a subject or time that is not part of the run."""
        if column not in frame.columns:
            raise OracleError(f"the frame has no {column!r} column")
        out = np.full((len(self.patients), self.n_slots), np.nan)
        row = {p: i for i, p in enumerate(self.patients)}
        subj = frame["subject_id"].astype(str).to_numpy()
        unknown = sorted(set(subj) - set(row))
        if unknown:
            raise OracleError(f"subjects {unknown[:3]} are not among the run's patients")
        slot = self.slots(frame["time"].to_numpy())
        bad = (slot < 0) | (slot >= self.n_slots)
        if bad.any():
            k = int(np.flatnonzero(bad)[0])
            raise OracleError(
                f"frame row {k} ({subj[k]}, {frame['time'].iloc[k]}) is outside the simulated "
                f"run ({self.start}, {self.days:g} days)"
            )
        out[np.array([row[s] for s in subj]), slot] = frame[column].to_numpy(np.float64)
        return out

    def slots(self, times: np.ndarray) -> np.ndarray:
        """Slot index of each time (datetime64 UTC) since the run start; OracleError off-grid."""
        ns = pd.DatetimeIndex(pd.to_datetime(np.asarray(times), utc=True)).asi8
        d = ns - self.start.value
        step = SLOT_MINUTES * 60_000_000_000
        if (d % step != 0).any():
            raise OracleError("a time is not on the run's 5-minute grid")
        return d // step


# --------------------------------------------------------------------------- AR noise algebra


def _ar_psi(a1: float, a2: float, steps: int) -> np.ndarray:
    """MA(∞) weights ψ_0..ψ_{steps-1} of an AR(2) process."""
    psi = np.zeros(max(steps, 2))
    psi[0], psi[1] = 1.0, a1
    for j in range(2, steps):
        psi[j] = a1 * psi[j - 1] + a2 * psi[j - 2]
    return psi[:steps]


def ar_prediction_sd(noise: AR2Noise, steps: int) -> np.ndarray:
    """[steps] SD (mg/dL) of the error of the best h-step prediction (h = 1..steps) of the
    summed AR(2) noise given its current state: sqrt(Σ_c σ_c² Σ_{j<h} ψ_{c,j}²). This is the
    floor no forecaster of the readings can beat (G6: 7.67 at 6 steps, 7.94 at 12)."""
    var = np.zeros(steps)
    for a1, a2, s2 in noise.components:
        var += s2 * np.cumsum(_ar_psi(a1, a2, steps) ** 2)
    return np.sqrt(var)


def ar_mean_weights(noise: AR2Noise, steps: int) -> np.ndarray:
    """[steps, C, 2]: E[e_{k+h} | e_k, e_{k-1}] = w[h-1, c, 0]·e_k + w[h-1, c, 1]·e_{k-1}."""
    w = np.zeros((steps, len(noise.components), 2))
    for c, (a1, a2, _) in enumerate(noise.components):
        prev, cur = np.array([0.0, 1.0]), np.array([1.0, 0.0])  # e_{k-1}, e_k in (e_k, e_{k-1})
        for h in range(steps):
            prev, cur = cur, a1 * cur + a2 * prev
            w[h, c] = cur
    return w


@dataclass
class SensorTrace:
    """A run's readings taken apart: reading = clip(signal + noise), per patient and slot."""

    signal: np.ndarray  # [N, T] noise-free reading: drift and compression lows, no clipping
    noise: np.ndarray  # [N, T] the AR noise added to it
    state: np.ndarray  # [N, T, 2, C] each component's (e_k, e_{k-1}) after reading k
    model: AR2Noise | None  # None: a noise-free sensor


def sensor_trace(run: SimRun, patients: Patients, gsub: np.ndarray) -> SensorTrace:
    """Replay the run's sensor on its subcutaneous glucose `gsub` [N, T] (slot starts).

    The sensor's effects draw from separate per-patient streams (forecast.sim.rng), so the
    signal is the same sensor with the noise switched off and no clipping or dropouts, and the
    noise is the noise stream regenerated from the run's seed with its states.
    """
    cfg = run.sensor
    if cfg is None:
        raise OracleError("the frame was simulated without a sensor: there are no readings")
    n, t = gsub.shape
    quiet = replace(cfg, noise=False, dropout=False, min_mgdl=-np.inf, max_mgdl=np.inf)
    cgm = CGM(quiet, patients.ids, run.seed, start_minute_of_day=minute_of_day(run.start))
    signal = np.empty((n, t))
    for s in range(t):
        signal[:, s] = cgm.read(s * cfg.sample_minutes, gsub[:, s])
    if not cfg.noise:
        return SensorTrace(signal, np.zeros((n, t)), np.zeros((n, t, 2, 0)), None)
    noise_model = resolve_noise_model(cfg.noise_model, cfg.sample_minutes)
    if not isinstance(noise_model, AR2Noise):
        raise OracleError(
            f"the noise-state oracle needs an AR(2) noise model (G6); this frame's sensor "
            f"uses simglucose's {cfg.noise_model!r} noise"
        )
    stream = AR2Stream(noise_model, stream_seeds(run.seed, patients.ids, STREAM_NOISE))
    noise, state = stream.take_with_states(t)
    return SensorTrace(signal, noise, state, noise_model)


def _z(q: float) -> float:
    if q not in _Z:
        from scipy.stats import norm

        _Z[q] = float(norm.ppf(q))
    return _Z[q]


def _gaussian_quantiles(
    mean: np.ndarray, sd: np.ndarray, quantiles: tuple[float, ...], lo: float, hi: float
) -> np.ndarray:
    """[..., Q] quantiles of N(mean, sd²), clipped to the sensor's reporting range."""
    z = np.array([_z(q) for q in quantiles])
    return np.clip(mean[..., None] + sd[..., None] * z, lo, hi)


def _window_slots(run: SimRun, windows: Any) -> tuple[np.ndarray, np.ndarray]:
    """(patient row [B], origin slot [B]) of each window in the run's arrays."""
    row = {p: i for i, p in enumerate(run.patients)}
    subj = np.asarray(windows.subject_id).astype(str)
    unknown = sorted(set(subj) - set(row))
    if unknown:
        raise OracleError(f"windows of subjects {unknown[:3]} are not from this simulated run")
    slot = run.slots(np.asarray(windows.origin))
    h = windows.config.horizon_slots
    if len(slot) and ((slot < 0) | (slot + h >= run.n_slots)).any():
        raise OracleError("a window reaches outside the simulated run")
    return np.array([row[s] for s in subj], dtype=np.int64), slot


# --------------------------------------------------------------------------- oracle (a)


class NoiseStateOracle:
    """The noise-state oracle: future signal (re-simulated) + E[noise | its state at origin].

    Built from the *full* simulated frame: the run is re-simulated from its metadata and
    checked against the frame's readings (OracleError if the frame is not that run).
    """

    name = "oracle-noise"

    def __init__(self, frame: pd.DataFrame, quantiles: tuple[float, ...] = (0.1, 0.5, 0.9)):
        self.quantiles = tuple(float(q) for q in quantiles)
        self.run = SimRun.from_frame(frame)
        self.patients = load_patients(list(self.run.patients))
        again = self.run.simulate()
        g_frame = self.run.grid(frame, "glucose")
        g_again = self.run.grid(again, "glucose")
        _check_same(g_frame, g_again, self.run.patients, self.run, "glucose")
        self.trace = sensor_trace(self.run, self.patients, self.run.grid(again, "gsub"))
        cfg = self.run.sensor
        recon = np.clip(self.trace.signal + self.trace.noise, cfg.min_mgdl, cfg.max_mgdl)
        seen = np.isfinite(g_again)
        _check_same(np.where(seen, recon, np.nan), g_again, self.run.patients, self.run, "sensor")

    def describe(self) -> dict[str, Any]:
        cfg = self.run.sensor
        return {
            "oracle": self.name,
            "seed": self.run.seed,
            "noise_model": cfg.noise_model if cfg.noise else None,
        }

    def predict_windows(self, windows: Any) -> np.ndarray:
        """[B, H, Q] forecasts of `windows` (cut from this run's frame)."""
        h = windows.config.horizon_slots
        i, s = _window_slots(self.run, windows)
        steps = np.arange(1, h + 1)
        mean = self.trace.signal[i[:, None], s[:, None] + steps]  # [B, H]
        cfg = self.run.sensor
        if self.trace.model is None:
            sd = np.zeros(h)
        else:
            w = ar_mean_weights(self.trace.model, h)  # [H, C, 2]
            st = self.trace.state[i, s]  # [B, 2, C]
            mean = mean + np.einsum("hck,bkc->bh", w, st)
            sd = ar_prediction_sd(self.trace.model, h)
        return _gaussian_quantiles(
            mean, np.broadcast_to(sd, mean.shape), self.quantiles, cfg.min_mgdl, cfg.max_mgdl
        ).astype(np.float32)

    def predict(self, past: np.ndarray, future: np.ndarray) -> np.ndarray:
        raise OracleError(
            "the oracles forecast the windows of their own simulated frame "
            "(predict_windows); they cannot answer what-if inputs or other data"
        )


def _check_same(a: np.ndarray, b: np.ndarray, names: tuple[str, ...], run: SimRun, what: str):
    """OracleError naming the first slot where the frame and its re-simulation differ."""
    both = np.isfinite(a) & np.isfinite(b)
    bad = (np.isfinite(a) != np.isfinite(b)) & np.isfinite(a)
    bad |= both & ~np.isclose(np.where(both, a, 0), np.where(both, b, 0), rtol=0, atol=1e-6)
    if bad.any():
        i, s = (int(v) for v in np.argwhere(bad)[0])
        t = run.start + pd.Timedelta(minutes=s * SLOT_MINUTES)
        raise OracleError(
            f"{what}: the frame does not match its re-simulation from the metadata "
            f"(subject {names[i]}, {t}: {a[i, s]!r} vs {b[i, s]!r}); was it edited, or "
            "simulated by another version of the simulator?"
        )


# --------------------------------------------------------------------------- oracle (b)


@dataclass(frozen=True)
class FilterSettings:
    """The filter oracle's knobs (chosen on validation windows, see the benchmark).

    members: ensemble size per patient. burn_in_days: the filter starts this long before the
    first window's origin, from the patient's basal state scaled to the first reading (it
    does not know the true state). obs_var: variance (mg/dL²) given to a reading beyond the
    modelled sensor error (a regulariser; the G6 model has no white component). process_sd:
    SD (mg/dL per 5 min) of random changes of plasma and tissue glucose, standing for what
    the frame's inputs do not say exactly (when in the 5 minutes a meal or bolus began).
    """

    members: int = 32
    burn_in_days: float = 1.0
    obs_var: float = 4.0
    process_sd: float = 1.0
    init_glucose_cv: float = 0.15
    seed: int = 0

    def __post_init__(self) -> None:
        if not (isinstance(self.members, int) and self.members >= 4):
            raise OracleError(f"members must be an integer >= 4, got {self.members!r}")
        for f in ("burn_in_days", "obs_var", "process_sd", "init_glucose_cv"):
            if not getattr(self, f) >= 0:
                raise OracleError(f"{f} must be >= 0, got {getattr(self, f)!r}")


# Filtered states: plasma, tissue and subcutaneous glucose (mass per kg). The insulin and gut
# compartments are driven by the known inputs and forget their initial values within hours.
_GP, _GT, _GS = 3, 4, 12


class FilterOracle:
    """The filter oracle: an ensemble Kalman filter over glucose and sensor-error states."""

    name = "oracle-filter"

    def __init__(
        self,
        frame: pd.DataFrame,
        quantiles: tuple[float, ...] = (0.1, 0.5, 0.9),
        settings: FilterSettings | None = None,
    ):
        self.quantiles = tuple(float(q) for q in quantiles)
        self.settings = settings or FilterSettings()
        self.run = SimRun.from_frame(frame)
        cfg = self.run.sensor
        if cfg is None:
            raise OracleError("the frame was simulated without a sensor: there are no readings")
        if cfg.sample_minutes != SLOT_MINUTES:
            raise OracleError(f"the filter oracle needs one reading per {SLOT_MINUTES}-min slot")
        if cfg.noise:
            nm = resolve_noise_model(cfg.noise_model, cfg.sample_minutes)
            if not isinstance(nm, AR2Noise):
                raise OracleError(
                    f"the filter oracle models AR(2) sensor noise (G6); this frame's sensor "
                    f"uses simglucose's {cfg.noise_model!r} noise"
                )
            self.noise: AR2Noise | None = nm
        else:
            self.noise = None
        self.patients = load_patients(list(self.run.patients))
        self.glucose = self.run.grid(frame, "glucose")
        self.basal = self.run.grid(frame, "basal_u")
        self.bolus = self.run.grid(frame, "bolus_u")
        carbs = self.run.grid(frame, "carbs_g")
        if "meal_announced" in frame.columns:  # only announced meals are inputs (windows.py)
            ann = self.run.grid(frame, "meal_announced") > 0
            carbs = np.where(ann, carbs, 0.0)
        self.carbs = np.nan_to_num(carbs, nan=0.0)  # a meal of unknown size enters as 0 g
        self.seconds: float | None = None  # wall time of the last predict_windows

    def describe(self) -> dict[str, Any]:
        return {"oracle": self.name, **asdict(self.settings), "seconds": self.seconds}

    # -- inputs per minute for slots [s0, s1) of every member
    def _inputs(self, s0: int, s1: int, member_row: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        span = slice(s0, s1)
        for name, a in (("basal_u", self.basal), ("bolus_u", self.bolus)):
            if not np.isfinite(a[:, span]).all():
                raise OracleError(f"{name} is missing in slots {s0}..{s1 - 1} of the record")
        k = s1 - s0
        food = np.zeros((len(self.run.patients), k * SLOT_MINUTES))
        food[:, ::SLOT_MINUTES] = self.carbs[:, span]
        # a slot's basal at a constant rate; its bolus from the slot start at the pump's speed
        # (what a slot holds is what was delivered in it, so it fits in the slot)
        rate = self.run.pump.bolus_rate_u_per_min
        ins = np.repeat(self.basal[:, span] / SLOT_MINUTES, SLOT_MINUTES, axis=1)
        left = self.bolus[:, span].copy()
        for m in range(SLOT_MINUTES):
            d = np.minimum(left, rate)
            ins[:, m::SLOT_MINUTES] += d
            left -= d
        ins[:, SLOT_MINUTES - 1 :: SLOT_MINUTES] += left  # rounding remainder, if any
        return (
            np.ascontiguousarray(food[member_row]),
            np.ascontiguousarray(ins[member_row]),
        )

    def predict_windows(self, windows: Any) -> np.ndarray:
        """[B, H, Q]: run the filter along each patient's record and forecast every window."""
        import time

        t_start = time.perf_counter()
        h = windows.config.horizon_slots
        i_win, s_win = _window_slots(self.run, windows)
        if len(s_win) == 0:
            return np.zeros((0, h, len(self.quantiles)), np.float32)
        mean, var = self._run(int(s_win.min()), int(s_win.max()), h, set(s_win.tolist()))
        s_rel = s_win - int(s_win.min())
        cfg = self.run.sensor
        out = _gaussian_quantiles(
            mean[i_win, s_rel], np.sqrt(var[i_win, s_rel]), self.quantiles, cfg.min_mgdl,
            cfg.max_mgdl,
        )  # fmt: skip
        self.seconds = round(time.perf_counter() - t_start, 2)
        return out.astype(np.float32)

    def predict(self, past: np.ndarray, future: np.ndarray) -> np.ndarray:
        raise OracleError(
            "the oracles forecast the windows of their own simulated frame "
            "(predict_windows); they cannot answer what-if inputs or other data"
        )

    def _run(
        self, first: int, last: int, h: int, origins: set[int]
    ) -> tuple[np.ndarray, np.ndarray]:
        """Filter from `burn_in_days` before slot `first` to slot `last`; at each slot in
        `origins` forecast h slots: (mean, variance) [N, last-first+1, h] of the reading."""
        st, cfg, mc = self.settings, self.run.sensor, self.run.model_config
        n, p = len(self.run.patients), st.members
        rng = np.random.default_rng(st.seed)
        row = np.repeat(np.arange(n), p)  # member -> patient
        params = np.ascontiguousarray(self.patients.params[row])
        vg = self.patients.vg[row]
        begin = max(0, first - int(round(st.burn_in_days * 1440 / SLOT_MINUTES)))

        # -- initial ensemble: basal state, glucose scaled to the first reading (with spread)
        x = self.patients.x0[row].copy()
        g0 = _first_reading(self.glucose, begin)[row]
        scale = g0 / (x[:, _GS] / vg) * np.exp(st.init_glucose_cv * rng.standard_normal(n * p))
        for j in (_GP, _GT, _GS):
            x[:, j] *= scale
        meal = model.initial_meal_state(n * p)
        meal[:, model.MEAL_QLAST] = x[:, 0] + x[:, 1]
        comps = self.noise.components if self.noise is not None else ()
        a1 = np.array([c[0] for c in comps])
        a2 = np.array([c[1] for c in comps])
        sd = np.sqrt([c[2] for c in comps])
        e = np.zeros((n * p, 2, len(comps)))  # (e_k, e_{k-1}) per component
        for _ in range(200):  # a draw from the stationary distribution
            e = _ar_step(e, a1, a2, sd, rng)
        gain_sd = cfg.drift_gain_sd if cfg.drift else 0.0
        off_sd = cfg.drift_offset_sd_mgdl if cfg.drift else 0.0
        gain = 1.0 + gain_sd * rng.standard_normal(n * p)
        offset = off_sd * rng.standard_normal(n * p)
        a_drift = math.exp(-SLOT_MINUTES / 1440.0 / cfg.drift_tau_days)

        w_mean = ar_mean_weights(self.noise, h) if self.noise is not None else None
        ar_var = ar_prediction_sd(self.noise, h) ** 2 if self.noise is not None else np.zeros(h)
        steps = np.arange(1, h + 1)
        a_h = a_drift**steps  # drift's decay over 1..h slots
        drift_var_h = (1 - a_h**2)[None, :]  # × (gain_sd²·gs² + off_sd²)
        n_out = last - first + 1
        mean = np.full((n, n_out, h), np.nan)
        var = np.full((n, n_out, h), np.nan)
        mins = SLOT_MINUTES
        bg_range = np.zeros((n * p, 2))
        empty = np.empty((0, 0, 13))

        def advance(xx, mm, s0, s1):
            food, ins = self._inputs(s0, s1, row)
            k = (s1 - s0) * mins
            gs = np.empty((n * p, k + 1))
            model.run_minutes(
                xx, mm, params, food, ins, mc.eat_rate_g_per_min, mc.substeps,
                mc.meal_substeps, mc.stomach_fraction, np.empty((n * p, k + 1)), gs,
                np.empty((n * p, k)), empty, bg_range,
            )  # fmt: skip
            return gs

        lo, hi = cfg.min_mgdl, cfg.max_mgdl
        for s in range(begin, last + 1):
            # -- analysis: the reading at the start of slot s
            y = self.glucose[:, s]
            ok = np.isfinite(y)
            if ok.any():
                # a reading at the range limit says only "at or beyond it": it pulls members
                # whose mean is inside the range out to the limit, and leaves them otherwise
                pm = _predicted_reading(x, e, gain, offset, vg).reshape(n, p).mean(axis=1)
                ok &= ~(((y <= lo) & (pm <= lo)) | ((y >= hi) & (pm >= hi)))
                x, e, gain, offset = _eakf_update(
                    x, e, gain, offset, vg, y, ok, n, p, st.obs_var, gain_sd > 0, off_sd > 0
                )
            # -- forecast h slots from here
            if s in origins and s + h < self.run.n_slots:
                gs = advance(x.copy(), meal.copy(), s, s + h)[:, steps * mins]  # [M, h]
                g_h = 1.0 + a_h[None, :] * (gain[:, None] - 1.0)
                pred = g_h * gs + a_h[None, :] * offset[:, None]
                if w_mean is not None:
                    pred = pred + np.einsum("hck,mkc->mh", w_mean, e)
                pm = pred.reshape(n, p, h)
                k = s - first
                mean[:, k] = pm.mean(axis=1)
                gs_m = gs.reshape(n, p, h).mean(axis=1)
                var[:, k] = (
                    pm.var(axis=1, ddof=1)
                    + ar_var[None, :]
                    + drift_var_h * (gain_sd**2 * gs_m**2 + off_sd**2)
                )
            if s == last:
                break
            # -- propagate to the next slot
            advance(x, meal, s, s + 1)
            if st.process_sd > 0:
                kick = st.process_sd * vg * rng.standard_normal(n * p)
                x[:, _GP] += kick
                x[:, _GT] += kick * 0.5
            if len(comps):
                e = _ar_step(e, a1, a2, sd, rng)
            if gain_sd > 0 or off_sd > 0:
                z = rng.standard_normal((2, n * p))
                q = math.sqrt(1 - a_drift**2)
                gain = 1.0 + a_drift * (gain - 1.0) + q * gain_sd * z[0]
                offset = a_drift * offset + q * off_sd * z[1]
        return mean, var


def _predicted_reading(x, e, gain, offset, vg) -> np.ndarray:
    """[M] each member's reading: gain·Gs/Vg + offset + Σ_c e_c (no clipping)."""
    return gain * x[:, _GS] / vg + offset + e[:, 0].sum(axis=1)


def _first_reading(glucose: np.ndarray, begin: int) -> np.ndarray:
    """[N] the first reading at or after slot `begin` (the filter's only clue to start)."""
    g = glucose[:, begin:]
    ok = np.isfinite(g)
    if not ok.any(axis=1).all():
        raise OracleError("a patient has no CGM reading in the span the filter runs over")
    return g[np.arange(len(g)), ok.argmax(axis=1)]


def _ar_step(e: np.ndarray, a1: np.ndarray, a2: np.ndarray, sd: np.ndarray, rng) -> np.ndarray:
    """One step of each member's AR(2) components; e [M, 2, C] = (e_k, e_{k-1})."""
    new = a1 * e[:, 0] + a2 * e[:, 1] + sd * rng.standard_normal(e[:, 0].shape)
    return np.stack([new, e[:, 0]], axis=1)


def _eakf_update(x, e, gain, offset, vg, y, ok, n, p, obs_var, fit_gain, fit_offset):
    """Anderson's ensemble adjustment Kalman filter for one scalar reading per patient.

    The reading is gain·Gs/Vg + offset + Σ_c e_c; the members' predicted readings are moved
    deterministically to the posterior mean and spread, and every filtered state follows by
    its ensemble regression on the predicted reading.
    """
    m = n * p
    cols = [x[:, _GP], x[:, _GT], x[:, _GS]]
    cols += [e[:, k, c] for c in range(e.shape[2]) for k in (0, 1)]
    if fit_gain:
        cols.append(gain)
    if fit_offset:
        cols.append(offset)
    z = np.stack(cols, axis=1).reshape(n, p, -1)  # [N, P, D]
    yhat = _predicted_reading(x, e, gain, offset, vg).reshape(n, p)
    ym = yhat.mean(axis=1, keepdims=True)
    dy = yhat - ym
    vp = np.maximum((dy**2).sum(axis=1, keepdims=True) / (p - 1), 1e-9)
    va = 1.0 / (1.0 / vp + 1.0 / obs_var)
    ya = va * (ym / vp + y[:, None] / obs_var)
    shift = ya + np.sqrt(va / vp) * dy - yhat  # [N, P] increments of the predicted reading
    shift[~ok] = 0.0
    cov = np.einsum("npd,np->nd", z - z.mean(axis=1, keepdims=True), dy) / (p - 1)
    z = z + (cov / vp)[:, None, :] * shift[:, :, None]
    z = z.reshape(m, -1)
    x = x.copy()
    # no clipping at 0: the model's own guard freezes a negative mass, as it does in the
    # simulated patient whose BG ran below 0 (an out-of-range patient the filter must follow)
    x[:, _GP], x[:, _GT], x[:, _GS] = z[:, 0], z[:, 1], z[:, 2]
    j = 3
    e = e.copy()
    for c in range(e.shape[2]):
        e[:, 0, c], e[:, 1, c] = z[:, j], z[:, j + 1]
        j += 2
    if fit_gain:
        gain = np.maximum(z[:, j], 0.1)
        j += 1
    if fit_offset:
        offset = z[:, j]
    return x, e, gain, offset


def make_oracle(name: str, frame: pd.DataFrame, quantiles: tuple[float, ...], **kw: Any) -> Any:
    """An oracle by name ('oracle-noise' or 'oracle-filter') for the full simulated `frame`."""
    if name == "oracle-noise":
        return NoiseStateOracle(frame, quantiles)
    if name == "oracle-filter":
        known = {f.name for f in fields(FilterSettings)}
        return FilterOracle(
            frame, quantiles, FilterSettings(**{k: kw[k] for k in kw if k in known})
        )
    raise OracleError(f"unknown oracle {name!r}; choose from {ORACLES}")
