"""How much earlier does a forecast warn than a threshold? Alert evaluation by replay.

`evaluate_alerts` replays a canonical frame through the runtime's own `AlertEngine`, one
cycle per slot, with a forecast at every reading (batched, from any forecaster with
``predict(past, future) -> [B, H, Q]``: a baseline or an ONNX model via `serving.predictor`).
It scores the alerts the person would have received against the glucose episodes that
actually followed.

Episodes (`EpisodeRule`, defaults follow the international consensus on CGM outcomes,
Battelino et al., Diabetes Care 2023: a CGM episode lasts at least 15 minutes):

* a *low episode* is a run of at least ``min_readings`` (3, i.e. 15 minutes of 5-minute
  readings) consecutive real readings below 70 mg/dL — consecutive meaning no more than
  ``max_gap_min`` (15) minutes between them; a *high episode* the same above 250 mg/dL.
  (Until December 2026 the default was 2 readings / 10 minutes; a one- or two-reading dip
  below 70 is now not an episode — an alert before it counts as false, the threshold alarm
  it raises included.) `--min-readings 2` gives the old definition;
* a run belongs to the previous episode unless it starts at least ``min_separation_min``
  (30) minutes after it ended *and* glucose recovered past the threshold by
  ``recovery_mgdl`` (10: to 80 mg/dL, resp. 240) in between — the alert engine's own
  hysteresis, so glucose wobbling around 70 is one low, not three;
* the episode's *onset* is its first reading beyond the threshold.
* Episodes whose onset falls before the replay could have warned (the first L slots of a
  subject's record plus the alert horizon) are left out of every score, for both alerts alike.

Scores (`AlertScore`), for each of ``predicted_low``, ``threshold_low``, ``predicted_high``,
``threshold_high``:

* ``sensitivity``: share of episodes with an alert at or before onset, no earlier than
  ``window_min`` (the alert horizon, 30 min) before it;
* ``lead_min``: median over warned episodes of onset minus the earliest such alert;
* ``false_per_day``: alerts with no episode onset in the ``window_min`` after them (and not
  raised during an episode), per day of CGM data (real readings × the sensor's sampling
  period, 5 min or e.g. 15 for a Libre export);
* ``episodes``, ``warned``, ``alerts``, ``false_alerts``.

The threshold alerts are the engine's ``low``/``urgent_low`` alerts and its ``high`` alert
with the 30-minute persistence switched off, so they fire at the first reading past the
threshold (lead 0 by construction) — the forecast's gain is the difference in lead at the
cost of its false alerts.

Episodes are found in the CGM (``glucose``, what the person sees) by default. On simulated
frames ``episodes_from="bg_true"`` (or ``"gsub"``) scores the same CGM-driven alerts against
the *true* hypoglycaemia instead — sensor artefacts (compression lows, noise dips) then stop
counting as episodes, and sensor lag shows up as threshold alerts that come late.

Forecasts only get what the runtime would know: by default (``future_inputs="known"``) the
future insulin is the current basal carried forward and future boluses and carbs are zero —
a meal eaten in 20 minutes is not an input at the origin (with ``"actual"`` the frame's
future inputs are used, as in training windows). A cycle has a forecast where
`forecast.windows.make_windows` builds a window (a reading at the origin, a short enough gap
in the past, the next hour's rows present): the last hour of a split replays without
forecasts, so a low there can only be caught by the threshold.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from forecast.schema import SLOT_MINUTES, GlucastError, get_meta, validate_frame
from forecast.trend import TrendConfig
from forecast.windows import WindowConfig, Windows, make_windows
from serving.alerts import ESCALATION, AlertEngine, AlertForecast, AlertKind, AlertThresholds
from serving.types import Reading

BASELINE_NAMES = ("persistence", "linear", "ridge", "physio")


class AlertEvalError(GlucastError, ValueError):
    """The evaluation cannot run as asked (no data in the split, unknown model...)."""


# --------------------------------------------------------------------------- episodes


@dataclass(frozen=True)
class EpisodeRule:
    """What counts as a low (``below=True``) or high episode; see the module docstring."""

    threshold_mgdl: float = 70.0
    below: bool = True
    min_readings: int = 3  # >= 15 min of 5-minute readings (consensus); was 2 until 12/2026
    max_gap_min: float = 15.0
    min_separation_min: float = 30.0
    recovery_mgdl: float = 10.0


def consensus_readings(sampling_minutes: float) -> int:
    """Readings that make the consensus' 15 minutes at a sensor's period: 3 at 5 min (a CGM),
    2 at 15 min (a Libre export: two readings below span 15 min; one is never an episode)."""
    return max(2, math.ceil(15.0 / max(float(sampling_minutes), 1.0) - 1e-9))


LOW_EPISODE = EpisodeRule()
HIGH_EPISODE = EpisodeRule(threshold_mgdl=250.0, below=False)


def find_episodes(times_min: np.ndarray, glucose: np.ndarray, rule: EpisodeRule) -> np.ndarray:
    """Episodes of one subject as an ``[E, 2]`` array of (onset, end) times in minutes.

    ``times_min`` ascending; ``glucose`` NaN where there is no reading (NaN slots neither
    start nor break a run; only the time between real readings does).
    """
    t = np.asarray(times_min, dtype=float)
    g = np.asarray(glucose, dtype=float)
    real = np.isfinite(g)
    t, g = t[real], g[real]
    if len(g) == 0:
        return np.zeros((0, 2))
    sign = 1.0 if rule.below else -1.0  # lows as they are, highs mirrored
    beyond = sign * g < sign * rule.threshold_mgdl
    recovered = sign * g >= sign * (rule.threshold_mgdl + sign * rule.recovery_mgdl)
    # a run continues while readings stay beyond and arrive within max_gap_min of each other
    joined = np.r_[False, beyond[1:] & beyond[:-1] & (np.diff(t) <= rule.max_gap_min + 1e-9)]
    start = beyond & ~joined
    run_id = np.cumsum(start) - 1  # [n] run index (meaningful where beyond)
    n_runs = int(start.sum())
    if n_runs == 0:
        return np.zeros((0, 2))
    counts = np.bincount(run_id[beyond], minlength=n_runs)
    first = np.flatnonzero(start)
    last = np.zeros(n_runs, dtype=np.intp)
    np.maximum.at(last, run_id[beyond], np.flatnonzero(beyond))
    keep = counts >= rule.min_readings
    first, last = first[keep], last[keep]
    cum_rec = np.r_[0, np.cumsum(recovered)]
    out: list[list[float]] = []
    prev_last = -1
    for i0, i1 in zip(first, last):
        if out:
            soon = t[i0] - out[-1][1] < rule.min_separation_min - 1e-9
            no_recovery = cum_rec[i0] - cum_rec[prev_last + 1] == 0
            if soon or no_recovery:
                out[-1][1] = t[i1]
                prev_last = i1
                continue
        out.append([t[i0], t[i1]])
        prev_last = i1
    return np.asarray(out, dtype=float).reshape(-1, 2)


# --------------------------------------------------------------------------- scoring


@dataclass(frozen=True)
class AlertScore:
    """How one kind of alert did against one kind of episode (see the module docstring)."""

    sensitivity: float
    false_per_day: float
    lead_min: float
    episodes: int
    warned: int
    alerts: int
    false_alerts: int

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k, v in d.items():
            if isinstance(v, float) and not math.isfinite(v):
                d[k] = None
        return d


def score_alerts(
    alerts: Mapping[str, np.ndarray],
    episodes: Mapping[str, np.ndarray],
    *,
    days: float,
    window_min: float = 30.0,
    scored_from: Mapping[str, float] | None = None,
) -> AlertScore:
    """Score alert times (minutes, per subject) against episodes ``[E, 2]`` (per subject).

    An episode is warned by an alert in ``[onset - window_min, onset]``; its lead is onset
    minus the earliest such alert. An alert is false when no onset lies in
    ``[alert, alert + window_min]`` and it was not raised inside an episode. Episodes with
    an onset before ``scored_from[subject]`` do not enter sensitivity or lead (nothing could
    have warned of them) but still make the alerts before them true.
    """
    eps = 1e-9
    leads: list[float] = []
    n_ep = n_alert = n_false = 0
    for sid in sorted(set(alerts) | set(episodes)):
        a = np.sort(np.asarray(alerts.get(sid, np.zeros(0)), dtype=float))
        ep = np.asarray(episodes.get(sid, np.zeros((0, 2))), dtype=float).reshape(-1, 2)
        onset, end = ep[:, 0], ep[:, 1]
        start = -np.inf if scored_from is None else scored_from.get(sid, -np.inf)
        for o in onset[onset >= start - eps]:
            n_ep += 1
            i = int(np.searchsorted(a, o - window_min - eps, side="left"))
            if i < len(a) and a[i] <= o + eps:
                leads.append(float(o - a[i]))
        n_alert += len(a)
        if len(a) == 0:
            continue
        if len(onset) == 0:
            n_false += len(a)
            continue
        j = np.searchsorted(onset, a - eps, side="left")  # first onset at or after each alert
        followed = (j < len(onset)) & (onset[np.minimum(j, len(onset) - 1)] <= a + window_min + eps)
        k = j - 1  # the last onset before the alert
        inside = (k >= 0) & (end[np.maximum(k, 0)] >= a - eps)
        n_false += int((~followed & ~inside).sum())
    warned = len(leads)
    return AlertScore(
        sensitivity=warned / n_ep if n_ep else math.nan,
        false_per_day=n_false / days if days > 0 else math.nan,
        lead_min=float(np.median(leads)) if leads else math.nan,
        episodes=n_ep,
        warned=warned,
        alerts=n_alert,
        false_alerts=n_false,
    )


# --------------------------------------------------------------------------- forecasts


@dataclass
class ForecastTable:
    """Forecasts at the origins of a frame (one per window): what each cycle would have seen."""

    subject_id: np.ndarray  # [N] str
    origin: np.ndarray  # [N] datetime64[ns] UTC-naive
    glucose: np.ndarray  # [N, H, Q] mg/dL
    source: np.ndarray  # [N] "model" | "physio"
    quantiles: tuple[float, ...]
    slot_minutes: int = SLOT_MINUTES


def known_future(windows: Windows) -> Windows:
    """Windows whose future holds only what is known at the origin.

    Future basal = the basal of the origin slot carried forward (the scheduled rate, as far
    as the replay knows); future boluses and carbs = 0 (unannounced); time of day kept.
    """
    c = windows.config
    fut = windows.future.copy()
    if "basal_u" in c.future_features and "basal_u" in c.past_features:
        fut[..., c.future_index("basal_u")] = windows.past[:, -1:, c.past_index("basal_u")]
    for name in ("bolus_u", "carbs_g"):
        if name in c.future_features:
            fut[..., c.future_index(name)] = 0.0
    return replace(windows, future=fut)


def forecast_table(
    frame: pd.DataFrame,
    forecaster: Any,
    *,
    config: WindowConfig,
    future_inputs: str = "known",
    batch: int = 8192,
) -> ForecastTable:
    """Forecasts at every window origin of `frame`, batched.

    A forecaster with ``forecast(past, future)`` returning an object with ``glucose`` and a
    per-row ``fallback`` flag (`serving.predictor.FallbackPredictor`) reports which rows the
    physiological fallback answered; any other forecaster is a single source.
    """
    if future_inputs not in ("known", "actual"):
        raise AlertEvalError(f"future_inputs must be 'known' or 'actual', got {future_inputs!r}")
    w = make_windows(frame, config)
    if future_inputs == "known":
        w = known_future(w)
    q = tuple(float(x) for x in forecaster.quantiles)
    h = config.horizon_slots
    out = np.empty((len(w), h, len(q)), np.float32)
    src = np.full(len(w), _source_name(forecaster), dtype=object)
    for i in range(0, len(w), batch):
        past, fut = w.past[i : i + batch], w.future[i : i + batch]
        if hasattr(forecaster, "forecast"):
            f = forecaster.forecast(past, fut)
            out[i : i + batch] = f.glucose
            src[i : i + batch] = np.where(np.asarray(f.fallback, bool), "physio", "model")
        else:
            out[i : i + batch] = np.asarray(forecaster.predict(past, fut), dtype=np.float32)
    return ForecastTable(
        subject_id=w.subject_id.astype(str),
        origin=w.origin,
        glucose=out,
        source=src.astype(str),
        quantiles=q,
        slot_minutes=config.slot_minutes,
    )


def forecast_table_by_subject(
    frame: pd.DataFrame,
    forecaster: Any,
    subject_models: Mapping[str, Any],
    *,
    config: WindowConfig,
    future_inputs: str = "known",
) -> ForecastTable:
    """`forecast_table` with each subject's own model where it has one (e.g. fine-tuned by
    `glucast finetune`), `forecaster` for the others; one table, as the engine replays it.
    The subjects without a model of their own are forecast together, in big batches."""
    ids = frame["subject_id"].astype(str)
    own = sorted(set(ids) & set(subject_models))
    parts = [(frame[~ids.isin(own)], forecaster, "the population model")]
    parts += [(frame[ids == s], subject_models[s], f"the model for {s}") for s in own]
    tables = []
    for sub, model, what in parts:
        if len(sub) == 0:
            continue
        cfg = getattr(model, "config", None) or config
        if cfg.past_slots != config.past_slots or cfg.horizon_slots != config.horizon_slots:
            raise AlertEvalError(
                f"{what} has L={cfg.past_slots}, H={cfg.horizon_slots}; the population model "
                f"{config.past_slots}, {config.horizon_slots}: one replay needs one window shape"
            )
        tables.append(forecast_table(sub, model, config=cfg, future_inputs=future_inputs))
    quantiles = {t.quantiles for t in tables}
    if len(quantiles) != 1:
        raise AlertEvalError(f"subject models disagree on their quantiles: {sorted(quantiles)}")
    return replace(
        tables[0],
        subject_id=np.concatenate([t.subject_id for t in tables]),
        origin=np.concatenate([t.origin for t in tables]),
        glucose=np.concatenate([t.glucose for t in tables]),
        source=np.concatenate([t.source for t in tables]),
    )


def find_subject_models(root: str | Path) -> dict[str, Path]:
    """{subject_id: model dir} for every exported model under `root` whose manifest names a
    subject (what `glucast finetune --out root/<name>` writes)."""
    import json

    out: dict[str, Path] = {}
    sha: dict[str, str] = {}
    # shallowest first, so a model dir wins over its copy in an MLflow artifact store below
    manifests = sorted(Path(root).rglob("manifest.json"), key=lambda m: (len(m.parts), str(m)))
    for manifest in manifests:
        try:
            m = json.loads(manifest.read_text())
        except (OSError, ValueError) as e:
            raise AlertEvalError(f"{manifest}: not a readable model manifest ({e})") from e
        subject = m.get("subject")
        if subject is None:
            continue
        if str(subject) in out:
            if m.get("sha256") == sha[str(subject)]:
                continue  # the same model again (a copy)
            raise AlertEvalError(
                f"two different models for subject {subject!r}: {out[str(subject)]} and "
                f"{manifest.parent}; keep one"
            )
        out[str(subject)] = manifest.parent
        sha[str(subject)] = str(m.get("sha256"))
    if not out:
        raise AlertEvalError(
            f"no per-subject model under {root} (a manifest.json with a 'subject', as written "
            "by `glucast finetune`)"
        )
    return out


def _source_name(forecaster: Any) -> str:
    name = type(forecaster).__name__.lower()
    return "physio" if "physio" in name else "model"


# --------------------------------------------------------------------------- replay


def replay_alerts(
    frame: pd.DataFrame,
    table: ForecastTable | None,
    thresholds: AlertThresholds,
    *,
    trend: TrendConfig | None = None,
    subject_thresholds: Mapping[str, AlertThresholds] | None = None,
) -> pd.DataFrame:
    """Run the `AlertEngine` over every slot of every subject; one row per raised alert.

    Columns: subject_id, time (UTC), kind, repeat, value, source, eta_min, detail, message.
    Each slot row is one cycle (its reading, or None when glucose is NaN; the forecast at that
    origin when the table has one; the slot's carbs, which only the carb suppression rule
    reads). A slot missing from the frame is a cycle the loop did not run.
    `subject_thresholds` {subject_id: settings} replace `thresholds` for those subjects (a
    person's own calibration).
    """
    f = validate_frame(frame)
    if trend is None:
        trend = TrendConfig.for_sampling(float(get_meta(frame).sampling_minutes or SLOT_MINUTES))
    rows: list[dict[str, Any]] = []
    fc_index: dict[tuple[str, int], int] = {}
    if table is not None:
        org = table.origin.astype("datetime64[ns]").astype(np.int64)
        fc_index = {(s, int(o)): i for i, (s, o) in enumerate(zip(table.subject_id, org))}
    for sid, sub in f.groupby("subject_id", sort=True, observed=True):
        sid = str(sid)
        th = (subject_thresholds or {}).get(sid, thresholds)
        eng = AlertEngine(th, trend=trend)
        times = sub["time"]
        t_ns = pd.DatetimeIndex(times).as_unit("ns").asi8
        g = sub["glucose"].to_numpy(dtype=float)
        carbs = (
            sub["carbs_g"].to_numpy(dtype=float)
            if "carbs_g" in sub.columns
            else np.full(len(sub), np.nan)
        )
        for tn, gv, ts, cg in zip(t_ns, g, times, carbs):
            reading = Reading(ts, float(gv)) if math.isfinite(gv) else None
            fc = None
            if table is not None:
                i = fc_index.get((sid, int(tn)))
                if i is not None:
                    fc = AlertForecast(
                        ts,
                        table.glucose[i],
                        table.quantiles,
                        source=str(table.source[i]),
                        slot_minutes=table.slot_minutes,
                    )
            for a in eng.update(ts, reading, forecast=fc, carbs_g=float(cg)):
                rows.append(
                    {
                        "subject_id": sid,
                        "time": a.time,
                        "kind": a.kind.value,
                        "repeat": a.repeat,
                        "value": a.value,
                        "source": a.source,
                        "eta_min": a.eta_min,
                        "detail": a.detail,
                        "message": a.message,
                    }
                )
    cols = ["subject_id", "time", "kind", "repeat", "value", "source", "eta_min", "detail"]
    cols.append("message")
    return pd.DataFrame(rows, columns=cols)


# --------------------------------------------------------------------------- evaluation


@dataclass(frozen=True)
class ScoringTruth:
    """What alerts are scored against: per rule, per subject the episodes ``[E, 2]``; per
    subject the first minute an episode counts (`score_alerts`' ``scored_from``); the real
    readings and the days they make."""

    episodes: tuple[dict[str, np.ndarray], ...]
    scored_from: dict[str, float]
    readings: int
    days: float
    subject_days: dict[str, float] = field(default_factory=dict)


def scoring_truth(
    frame: pd.DataFrame,
    rules: tuple[EpisodeRule, ...],
    past_slots: int,
    window_min: float,
    episodes_from: str = "glucose",
) -> ScoringTruth:
    """Episodes of `frame` under each rule, where scoring starts, and the days of data.

    Scoring starts once a forecast could have warned: the first reading + L slots + the
    alert window. A day of data is a day of readings at the sensor's own period (15 min for
    Libre exports).
    """
    episodes: tuple[dict[str, np.ndarray], ...] = tuple({} for _ in rules)
    scored_from: dict[str, float] = {}
    n_real = 0
    per_subject: dict[str, int] = {}
    skip = past_slots * SLOT_MINUTES + window_min
    for sid, sub in frame.groupby("subject_id", sort=True, observed=True):
        t = _minutes(sub["time"])
        g = sub["glucose"].to_numpy(dtype=float)
        n_real += int(np.isfinite(g).sum())
        per_subject[str(sid)] = int(np.isfinite(g).sum())
        first = t[np.isfinite(g)][0] if np.isfinite(g).any() else t[0]
        scored_from[str(sid)] = first + skip
        truth = sub[episodes_from].to_numpy(dtype=float)
        for eps, rule in zip(episodes, rules):
            eps[str(sid)] = find_episodes(t, truth, rule)
    sampling = max(float(get_meta(frame).sampling_minutes or SLOT_MINUTES), SLOT_MINUTES)
    subject_days = {s: n * sampling / 1440.0 for s, n in per_subject.items()}
    return ScoringTruth(episodes, scored_from, n_real, n_real * sampling / 1440.0, subject_days)


def evaluation_thresholds(base: AlertThresholds) -> AlertThresholds:
    """The user's thresholds as scored: the high alert without its persistence (fires at onset)."""
    return replace(base, high_sustain_min=0.0)


def _minutes(times: pd.Series | np.ndarray) -> np.ndarray:
    return pd.DatetimeIndex(times).as_unit("ns").asi8.astype(float) / 60e9


def replay_forecasts(
    frame: pd.DataFrame,
    forecaster: Any | None,
    *,
    config: WindowConfig,
    future_inputs: str = "known",
    subject_models: Mapping[str, Any] | None = None,
) -> ForecastTable | None:
    """The forecasts a replay of `frame` sees (None without a forecaster): `forecast_table`,
    or `forecast_table_by_subject` when some subjects have their own model."""
    if forecaster is None:
        return None
    if subject_models:
        return forecast_table_by_subject(
            frame, forecaster, subject_models, config=config, future_inputs=future_inputs
        )
    return forecast_table(frame, forecaster, config=config, future_inputs=future_inputs)


def evaluate_alerts(
    frame: pd.DataFrame,
    forecaster: Any | None,
    *,
    config: WindowConfig | None = None,
    thresholds: AlertThresholds | None = None,
    low: EpisodeRule = LOW_EPISODE,
    high: EpisodeRule = HIGH_EPISODE,
    window_min: float | None = None,
    future_inputs: str = "known",
    episodes_from: str = "glucose",
    subject_models: Mapping[str, Any] | None = None,
    subject_thresholds: Mapping[str, AlertThresholds] | None = None,
) -> dict[str, Any]:
    """Replay `frame`, score predicted vs threshold alerts; the dict `--json` prints.

    `forecaster=None` scores the threshold alerts only (the predicted ones are then empty).
    `subject_models` {subject_id: forecaster} replace `forecaster` for those subjects, and
    `subject_thresholds` {subject_id: settings} `thresholds` (e.g. a personal calibration).
    """
    cfg = config if config is not None else getattr(forecaster, "config", None) or WindowConfig()
    f = validate_frame(frame)
    table = replay_forecasts(
        f, forecaster, config=cfg, future_inputs=future_inputs, subject_models=subject_models
    )
    out = evaluate_table(
        f,
        table,
        past_slots=cfg.past_slots,
        thresholds=thresholds,
        low=low,
        high=high,
        window_min=window_min,
        episodes_from=episodes_from,
        subject_thresholds=subject_thresholds,
    )
    out["future_inputs"] = future_inputs
    return out


def evaluate_table(
    frame: pd.DataFrame,
    table: ForecastTable | None,
    *,
    past_slots: int = WindowConfig().past_slots,
    thresholds: AlertThresholds | None = None,
    low: EpisodeRule = LOW_EPISODE,
    high: EpisodeRule = HIGH_EPISODE,
    window_min: float | None = None,
    episodes_from: str = "glucose",
    subject_thresholds: Mapping[str, AlertThresholds] | None = None,
) -> dict[str, Any]:
    """`evaluate_alerts` on forecasts already made (compare alert rules on one forecast run).

    Pooled scores per alert kind, and under ``by_subject`` the same four scores for each
    subject on its own days (`per_subject_summary` gives their spread).
    """
    th = evaluation_thresholds(thresholds if thresholds is not None else AlertThresholds())
    personal = {s: evaluation_thresholds(t) for s, t in (subject_thresholds or {}).items()}
    window = th.predicted_horizon_min if window_min is None else float(window_min)
    f = validate_frame(frame)
    if len(f) == 0 or not np.isfinite(f["glucose"].to_numpy(dtype=float)).any():
        raise AlertEvalError("no CGM readings to replay")
    if episodes_from not in f.columns:
        raise AlertEvalError(
            f"episodes_from={episodes_from!r} is not a column of the frame (simulated frames "
            "have 'bg_true', plasma glucose, and 'gsub', the noise-free sensor signal)"
        )
    alerts = replay_alerts(f, table, th, subject_thresholds=personal)
    truth = scoring_truth(f, (low, high), past_slots, window, episodes_from)
    (eps_low, eps_high), scored_from, days = truth.episodes, truth.scored_from, truth.days
    heard = alerts  # every alarm the person hears counts, re-alerts included

    def times_of(kinds: tuple[AlertKind, ...]) -> dict[str, np.ndarray]:
        sel = heard[heard["kind"].isin([k.value for k in kinds])]
        return {str(s): _minutes(x["time"]) for s, x in sel.groupby("subject_id")}

    if len(heard):  # an urgent low after a low is the same warning, escalated
        heard = heard[heard["detail"] != ESCALATION]
    pred_low = times_of((AlertKind.PREDICTED_LOW,))
    thr_low = times_of((AlertKind.URGENT_LOW, AlertKind.LOW))
    pred_high = times_of((AlertKind.PREDICTED_HIGH,))
    thr_high = times_of((AlertKind.HIGH,))
    kw = {"days": days, "window_min": window, "scored_from": scored_from}
    kinds = {
        "predicted_low": (pred_low, eps_low),
        "threshold_low": (thr_low, eps_low),
        "predicted_high": (pred_high, eps_high),
        "threshold_high": (thr_high, eps_high),
    }
    score = {k: score_alerts(a, e, **kw) for k, (a, e) in kinds.items()}
    out: dict[str, Any] = {k: v.to_dict() for k, v in score.items()}
    by_subject: dict[str, dict[str, Any]] = {}
    for sid, sdays in sorted(truth.subject_days.items()):
        one = {"days": sdays, "window_min": window, "scored_from": scored_from}
        by_subject[sid] = {"days": round(sdays, 3)}
        for k, (a, e) in kinds.items():
            pick_a = {sid: a[sid]} if sid in a else {}
            pick_e = {sid: e[sid]} if sid in e else {}
            by_subject[sid][k] = score_alerts(pick_a, pick_e, **one).to_dict()
    out["by_subject"] = by_subject
    sources: dict[str, int] = {}
    if table is not None:
        vals, counts = np.unique(table.source, return_counts=True)
        sources = {str(v): int(c) for v, c in zip(vals, counts)}
    out.update(
        days=round(days, 3),
        subjects=int(f["subject_id"].nunique()),
        readings=truth.readings,
        forecasts=0 if table is None else len(table.origin),
        forecast_sources=sources,
        window_min=window,
        episodes_from=episodes_from,
        episode_rules={"low": asdict(low), "high": asdict(high)},
        thresholds=th.to_dict(),
    )
    return out


def per_subject_summary(result: Mapping[str, Any], key: str = "predicted_low") -> dict:
    """The spread over subjects of one alert kind's scores (`evaluate_table`'s
    ``by_subject``): median and range of sensitivity (subjects with episodes), lead and
    false alerts a day, and how many subjects had episodes."""
    rows = [r[key] | {"days": r["days"]} for r in result.get("by_subject", {}).values()]

    def spread(name: str) -> dict[str, float | None]:
        v = np.array([r[name] for r in rows if r[name] is not None], dtype=float)
        if len(v) == 0:
            return {"median": None, "min": None, "max": None}
        return {
            "median": float(np.median(v)),
            "min": float(v.min()),
            "max": float(v.max()),
        }

    return {
        "subjects": len(rows),
        "subjects_with_episodes": sum(1 for r in rows if r["episodes"]),
        "sensitivity": spread("sensitivity"),
        "lead_min": spread("lead_min"),
        "false_per_day": spread("false_per_day"),
    }


# --------------------------------------------------------------------------- models


def load_forecaster(
    spec: str,
    train: pd.DataFrame | None,
    *,
    config: WindowConfig | None = None,
    future_inputs: str = "known",
    quantiles: tuple[float, ...] | None = None,
) -> Any:
    """A baseline fitted on `train` (``persistence|linear|ridge|physio``) or an ONNX model dir.

    Baselines are fitted on the training split's windows, with the same future-input masking
    the replay uses, so a model never learns from inputs it will not get; ``quantiles`` (the
    baseline's default when None) lets an alert rule ask for e.g. the 0.3 quantile. ONNX
    models come through `serving.predictor.Predictor` (hash and signature checked,
    physiological fallback for implausible rows) with the quantiles they were trained for.
    """
    if spec in BASELINE_NAMES:
        from forecast.baselines import BASELINES

        if train is None:
            raise AlertEvalError(f"baseline {spec!r} needs a training frame to be fitted on")
        cfg = config or WindowConfig()
        model = BASELINES[spec]() if quantiles is None else BASELINES[spec](quantiles=quantiles)
        w = make_windows(train, cfg)
        if len(w) == 0:
            raise AlertEvalError(f"the training split gives no windows to fit {spec!r}")
        if future_inputs == "known":
            w = known_future(w)
        return model.fit(w) or model
    path = Path(spec)
    if not path.exists():
        raise AlertEvalError(
            f"--model {spec!r} is neither a baseline ({', '.join(BASELINE_NAMES)}) nor a model "
            "directory"
        )
    from serving.predictor import Predictor

    return Predictor(path, config=config)
