"""Glucose alerts for the person wearing the sensor: what to say, when, and when to stay quiet.

The runtime calls `AlertEngine.update` once per cycle with what it has — the new CGM
`Reading` (or None), the cycle's forecast (`AlertForecast`: quantiles over the horizon and
where they came from, the ONNX model or the physiological fallback) and the pump's active
fault codes — and gets back the alerts raised in that cycle. Every raised alert also goes to
the `sink` (the loop passes one that journals it; see `journal_sink`).

Kinds (thresholds per user in `AlertThresholds`):

* ``urgent_low`` reading < 55; re-alerts every 30 min while it lasts (a safety alarm);
* ``low`` reading < 70;
* ``predicted_low`` the forecast goes below 70 within 30 min — by default its 0.4 quantile
  (interpolated between the quantiles the forecast has: "a 40 % chance of a low"), any
  quantile the user picks (lower warns earlier and more often), optionally for several
  consecutive cycles — from the ONNX model or, when the model is unavailable, the
  physiological fallback (the alert says which). A prediction that still stands 20 min after
  its alarm is said again (``predicted_low_realert_min``): it is the same standing risk, and
  a low that comes 40 min after a first warning deserves a second one;
* ``high`` readings > 250 for 30 min; ``predicted_high`` the median forecast above 250
  within 30 min (optional);
* ``rapid_rise`` / ``rapid_fall`` from the trend (`forecast.trend`, ≥ 3 mg/dL/min);
* ``signal_loss`` no usable reading for 20 min;
* ``pump_fault`` once per fault code while the pump reports it.

Episodes, not readings, are what alert. An episode starts when its condition holds and
ends only when the condition clears past a hysteresis band (a low ends at ≥ 80 mg/dL, a
high at < 240), so a reading wobbling around 70 gives one alarm, not ten. Within an episode
the alert is raised once (``urgent_low`` and any kind given a ``realert_min`` repeat on that
period; ``predicted_low`` repeats every 20 min, but only on a cycle whose forecast still
predicts the low). A snoozed kind stays quiet until the snooze ends; an episode that is still going
then is announced (or re-announced) — a snooze postpones, it never hides a low that lasts.

Bad input never produces a predicted low. Predictions are only believed on a cycle with a
fresh reading whose recent history supports a trend (≥ 3 readings over ≥ 10 min): after a
gap, a sensor warm-up or a clock jump the forecaster's input is carried-forward data, so the
engine says ``signal_loss`` (when the gap is long enough) and nothing predictive. Warm-up
readings suppress glucose alerts and reset the signal-loss timer (the sensor is talking,
just not measuring yet).

Imports: numpy, pandas, stdlib and `forecast` only.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from enum import StrEnum
from typing import Any

import numpy as np
import pandas as pd

from forecast.schema import GlucastError
from forecast.trend import Trend, TrendConfig, trend_at
from serving.types import CGMStatus, Reading

# --------------------------------------------------------------------------- nouns


class AlertKind(StrEnum):
    URGENT_LOW = "urgent_low"
    LOW = "low"
    PREDICTED_LOW = "predicted_low"
    HIGH = "high"
    PREDICTED_HIGH = "predicted_high"
    RAPID_RISE = "rapid_rise"
    RAPID_FALL = "rapid_fall"
    SIGNAL_LOSS = "signal_loss"
    PUMP_FAULT = "pump_fault"


class Severity(StrEnum):
    URGENT = "urgent"  # act now (a low, a pump that cannot deliver)
    WARNING = "warning"  # act soon
    INFO = "info"


SEVERITY: Mapping[AlertKind, Severity] = {
    AlertKind.URGENT_LOW: Severity.URGENT,
    AlertKind.LOW: Severity.WARNING,
    AlertKind.PREDICTED_LOW: Severity.URGENT,
    AlertKind.HIGH: Severity.WARNING,
    AlertKind.PREDICTED_HIGH: Severity.INFO,
    AlertKind.RAPID_RISE: Severity.INFO,
    AlertKind.RAPID_FALL: Severity.WARNING,
    AlertKind.SIGNAL_LOSS: Severity.WARNING,
    AlertKind.PUMP_FAULT: Severity.URGENT,
}

_LOW_FAMILY = (AlertKind.URGENT_LOW, AlertKind.LOW)
_PREDICTED = (AlertKind.PREDICTED_LOW, AlertKind.PREDICTED_HIGH)
ESCALATION = "escalation"  # Alert.detail of an urgent low raised during an announced low


class AlertConfigError(GlucastError, ValueError):
    """Alert thresholds that contradict each other or switch off a safety alarm."""


@dataclass(frozen=True)
class Alert:
    """One alarm as the person would get it, and as the journal records it.

    ``value`` is mg/dL for glucose alerts (the reading, or the lowest/highest predicted
    value), mg/dL/min for rapid changes, minutes without data for signal loss, NaN for pump
    faults. ``source`` says what the alert rests on: ``cgm``, ``model``, ``physio``,
    ``pump``. ``repeat`` is 0 for the first alarm of an episode.
    """

    kind: AlertKind
    severity: Severity
    time: pd.Timestamp
    value: float
    message: str
    source: str = "cgm"
    repeat: int = 0
    episode_start: pd.Timestamp | None = None
    detail: str = ""  # pump fault code, predicted quantile...
    eta_min: float = math.nan  # predicted alerts: minutes until the forecast crosses

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (what the journal stores)."""
        d = asdict(self)
        d["kind"] = self.kind.value
        d["severity"] = self.severity.value
        d["time"] = self.time.isoformat()
        d["episode_start"] = None if self.episode_start is None else self.episode_start.isoformat()
        for k in ("value", "eta_min"):
            d[k] = None if not math.isfinite(d[k]) else float(d[k])
        return d


@dataclass(frozen=True)
class AlertThresholds:
    """One person's alert settings (mg/dL, minutes, mg/dL/min).

    Defaults are the usual CGM defaults; the predicted-low rule defaults were tuned on held-out
    simulated days (`glucast alerts evaluate`). ``None`` switches an optional alert off;
    ``urgent_low`` cannot be switched off.
    """

    urgent_low_mgdl: float = 55.0
    low_mgdl: float | None = 70.0
    high_mgdl: float | None = 250.0
    high_sustain_min: float = 30.0
    # predicted low: the `predicted_low_quantile` forecast (linearly interpolated between the
    # quantiles the forecast has, clamped to their range; None = its lowest) below
    # `predicted_low_mgdl + predicted_low_margin_mgdl` within the horizon, on
    # `predicted_cycles` consecutive evaluable cycles, said again every
    # `predicted_low_realert_min` while the prediction stands (None: once per episode).
    # Chosen on the *validation* split of a simulated cohort (30 patients x 14 days, G6-like
    # sensor, `glucast alerts evaluate`, the LSTM): the most sensitive rule with <= 1 false
    # alert a day. There the median warned 57 % of lows (it expects a fall towards 75 to level
    # off, and usually it does); the 0.4 quantile with a 20-min re-alert 87 % at 0.98 false a
    # day; two cycles cost a third of the warnings (most forecasts cross only in the last
    # cycles before a low); the 0.05 quantile fired hours early and 4-5 times a day.
    # Re-measured with the published G6 noise model (December 2026, demo cohort, held out,
    # the LSTM with the therapy profile as inputs): 84.5 % of 58 lows warned, median lead
    # 15 min, 0.84 false a day; 0.35 gives 91 %, 15 min, 1.2 a day (on validation days the
    # <= 1 a day rule picks 0.45: 0.4 stays, between the two). The >= 90 % / >= 20 min /
    # <= 1 a day goal is NOT met: an oracle that knows the future glucose exactly and only
    # not the sensor's future noise reaches 93 %, 20 min, 0.77 a day
    # (benchmarks/alert_ceiling.py), so the goal needs near-perfect 30-minute foresight.
    # `glucast alerts evaluate --sweep` shows the trade-off for any model.
    predicted_low_mgdl: float | None = 70.0
    predicted_low_margin_mgdl: float = 0.0
    predicted_low_quantile: float | None = 0.4
    predicted_horizon_min: float = 30.0
    predicted_cycles: int = 1
    predicted_low_realert_min: float | None = 20.0
    # a predicted episode ends once the forecast clears the bar by `predicted_hysteresis_mgdl`
    # on `predicted_clear_cycles` consecutive cycles, or when the low it predicted begins
    predicted_hysteresis_mgdl: float = 5.0
    predicted_clear_cycles: int = 2
    # only while the trend falls at least this fast (mg/dL/min, e.g. -0.5); None = any trend
    predicted_low_max_roc: float | None = None
    # Personal calibration (chosen on the person's own recent days, e.g.
    # `serving.insilico.alert_tuning.calibrate_low`): when set, the predicted-low line is the
    # median forecast x exp(offset[k]) at step k (offsets <= 0 lower it; the last one is
    # carried past the tuple's end) instead of `predicted_low_quantile`'s column.
    predicted_low_log_offsets: tuple[float, ...] | None = None
    # Trend-aware re-alerting: say a standing predicted low again only while glucose is still
    # falling (trend < 0); a prediction that has levelled off stays quiet.
    predicted_low_realert_falling: bool = False
    # Suppression: no predicted low for this many minutes after a low (< `low_mgdl`) ended — a
    # treated low's recovery — nor after carbs were eaten (`update(carbs_g=...)`), unless the
    # trend falls at least as fast as `predicted_low_suppress_unless_roc` (mg/dL/min, e.g. -2).
    predicted_low_quiet_after_low_min: float | None = None
    predicted_low_quiet_after_carbs_min: float | None = None
    predicted_low_suppress_unless_roc: float | None = None
    # predicted high: the median forecast above this within the horizon
    predicted_high_mgdl: float | None = 250.0
    predicted_high_quantile: float = 0.5
    rapid_rise_mgdl_min: float | None = 3.0
    rapid_fall_mgdl_min: float | None = 3.0
    signal_loss_min: float | None = 20.0
    hysteresis_mgdl: float = 10.0
    rate_hysteresis_mgdl_min: float = 1.0
    urgent_low_realert_min: float = 30.0
    realert_min: Mapping[str, float] = field(default_factory=dict)  # kind -> minutes
    urgent_low_max_snooze_min: float = 30.0
    max_forecast_age_min: float = 10.0

    def __post_init__(self) -> None:
        if not self.urgent_low_mgdl > 0:
            raise AlertConfigError("urgent_low_mgdl is a safety alarm and must be set (> 0)")
        if self.low_mgdl is not None and self.low_mgdl < self.urgent_low_mgdl:
            raise AlertConfigError(
                f"low_mgdl {self.low_mgdl} is below urgent_low_mgdl {self.urgent_low_mgdl}"
            )
        lows = [x for x in (self.low_mgdl, self.predicted_low_mgdl, self.urgent_low_mgdl) if x]
        if self.high_mgdl is not None and self.high_mgdl <= max(lows):
            raise AlertConfigError(f"high_mgdl {self.high_mgdl} must exceed the low thresholds")
        for name in (
            "high_sustain_min",
            "hysteresis_mgdl",
            "rate_hysteresis_mgdl_min",
            "predicted_low_margin_mgdl",
        ):
            if getattr(self, name) < 0:
                raise AlertConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.predicted_horizon_min <= 0 or self.predicted_cycles < 1:
            raise AlertConfigError("predicted_horizon_min must be > 0 and predicted_cycles >= 1")
        if self.predicted_clear_cycles < 1 or self.predicted_hysteresis_mgdl < 0:
            raise AlertConfigError("predicted_clear_cycles must be >= 1, hysteresis >= 0")
        if self.predicted_low_realert_min is not None and self.predicted_low_realert_min <= 0:
            raise AlertConfigError("predicted_low_realert_min must be > 0 (or None: say it once)")
        if self.signal_loss_min is not None and self.signal_loss_min <= 0:
            raise AlertConfigError("signal_loss_min must be > 0 (or None to switch it off)")
        if self.urgent_low_realert_min <= 0 or self.urgent_low_max_snooze_min <= 0:
            raise AlertConfigError("urgent low re-alert and maximum snooze must be > 0 minutes")
        for k, v in self.realert_min.items():
            AlertKind(k)  # raises ValueError on an unknown kind
            if v <= 0:
                raise AlertConfigError(f"realert_min[{k!r}] must be > 0 minutes, got {v}")
        for name in ("predicted_low_quiet_after_low_min", "predicted_low_quiet_after_carbs_min"):
            v = getattr(self, name)
            if v is not None and not v > 0:
                raise AlertConfigError(f"{name} must be > 0 minutes (or None), got {v}")
        offs = self.predicted_low_log_offsets
        if offs is not None:
            if len(offs) == 0 or not all(math.isfinite(float(x)) for x in offs):
                raise AlertConfigError(f"predicted_low_log_offsets must be finite numbers: {offs}")
            object.__setattr__(self, "predicted_low_log_offsets", tuple(float(x) for x in offs))
        for q in (self.predicted_low_quantile, self.predicted_high_quantile):
            if q is not None and not 0 < q < 1:
                raise AlertConfigError(f"quantile {q} must be in (0, 1)")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["realert_min"] = dict(self.realert_min)
        if self.predicted_low_log_offsets is not None:
            d["predicted_low_log_offsets"] = list(self.predicted_low_log_offsets)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> AlertThresholds:
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise AlertConfigError(f"unknown alert setting(s) {sorted(unknown)}")
        d = dict(d)
        if d.get("predicted_low_log_offsets") is not None:
            d["predicted_low_log_offsets"] = tuple(d["predicted_low_log_offsets"])
        return cls(**d)

    def predicted_low_line(self, fc: AlertForecast) -> np.ndarray:
        """[H] the forecast line a predicted low looks at: the calibrated median when the
        person has `predicted_low_log_offsets`, else the `predicted_low_quantile` column."""
        offs = self.predicted_low_log_offsets
        if offs is None:
            return fc.column(self.predicted_low_quantile)
        h = fc.glucose.shape[0]
        o = np.asarray(offs, dtype=float)
        o = o[:h] if len(o) >= h else np.r_[o, np.full(h - len(o), o[-1])]
        return fc.column(0.5) * np.exp(o)

    def realert_for(self, kind: AlertKind) -> float | None:
        if kind is AlertKind.URGENT_LOW:
            return self.urgent_low_realert_min
        v = self.realert_min.get(kind.value)
        if v is None and kind is AlertKind.PREDICTED_LOW:
            v = self.predicted_low_realert_min
        return None if v is None else float(v)


@dataclass(frozen=True)
class AlertForecast:
    """The cycle's forecast as the alert engine needs it.

    ``glucose`` is [H, Q] mg/dL (a leading batch axis of 1 is accepted), step k covering
    ``(k + 1) * slot_minutes`` after ``time`` (the origin: the slot of the latest reading the
    forecaster saw). ``source`` is ``model`` or ``physio`` (the fallback).
    """

    time: pd.Timestamp
    glucose: np.ndarray
    quantiles: tuple[float, ...]
    source: str = "model"
    slot_minutes: float = 5.0

    def __post_init__(self) -> None:
        g = np.asarray(self.glucose, dtype=float)
        if g.ndim == 3 and g.shape[0] == 1:
            g = g[0]
        if g.ndim != 2 or g.shape[1] != len(self.quantiles):
            raise ValueError(
                f"forecast glucose must be [H, Q={len(self.quantiles)}], got {np.shape(self.glucose)}"
            )
        object.__setattr__(self, "glucose", g)
        object.__setattr__(self, "time", _utc(self.time))

    @classmethod
    def from_prediction(
        cls, time: pd.Timestamp, prediction: Any, quantiles: Sequence[float], row: int = 0
    ) -> AlertForecast:
        """One row of a `serving.predictor.Forecast` (``glucose [B, H, Q]``, ``fallback [B]``).

        The row's source is ``physio`` when the predictor answered it with its fallback, so
        the alert says that the model was not used.
        """
        fallback = bool(np.asarray(prediction.fallback)[row])
        return cls(
            time,
            np.asarray(prediction.glucose)[row],
            tuple(float(q) for q in quantiles),
            source="physio" if fallback else "model",
        )

    def column(self, quantile: float | None) -> np.ndarray:
        """The forecast at `quantile` (None = the lowest the forecast has).

        A quantile the forecast does not have is interpolated linearly between the two it
        has around it (the 0.4 quantile of a (0.05, 0.5, 0.95) forecast lies 7/9 of the way
        from the 0.05 to the median column); outside their range, the outermost is used.
        """
        if quantile is None:
            return self.glucose[:, self.quantile_index(None)]
        q = np.asarray(self.quantiles, dtype=float)
        order = np.argsort(q, kind="stable")
        pos = float(np.interp(quantile, q[order], np.arange(len(q))))  # clamped to the ends
        a = int(pos)
        w = pos - a
        if w == 0.0:  # a quantile the forecast has (or beyond its range): that column as is
            return self.glucose[:, order[a]]
        return (1.0 - w) * self.glucose[:, order[a]] + w * self.glucose[:, order[a + 1]]

    def quantile_used(self, quantile: float | None) -> float:
        """The quantile `column` gives for `quantile` (clamped to the forecast's range)."""
        q = self.quantiles
        if quantile is None:
            return min(q)
        return float(min(max(quantile, min(q)), max(q)))

    def quantile_index(self, quantile: float | None) -> int:
        q = self.quantiles
        if quantile is None:
            return min(range(len(q)), key=q.__getitem__)
        return min(range(len(q)), key=lambda i: abs(q[i] - quantile))

    def chance_beyond(self, bar: float, steps: int, *, below: bool = True) -> float:
        """How sure the forecast is: the largest probability over the first `steps` steps
        that glucose is below (above) `bar`, read off its quantiles by linear interpolation
        (clamped to the quantiles it has: a (0.05, 0.5, 0.95) forecast says at most 95 %)."""
        q = np.asarray(self.quantiles, dtype=float)
        order = np.argsort(q, kind="stable")
        q = q[order]
        best = 0.0
        for k in range(max(1, min(steps, self.glucose.shape[0]))):
            v = np.maximum.accumulate(self.glucose[k, order])  # quantile lines never cross
            p = float(np.interp(bar, v, q)) if np.all(np.isfinite(v)) else math.nan
            p = p if below else 1.0 - p
            if math.isfinite(p):
                best = max(best, p)
        return best

    def within(self, horizon_min: float) -> int:
        """How many steps lie within `horizon_min` of the origin."""
        k = int(math.floor(horizon_min / self.slot_minutes + 1e-9))
        return max(1, min(k, self.glucose.shape[0]))


@dataclass
class _Episode:
    kind: AlertKind
    start: pd.Timestamp
    announced: bool = False
    last_alert: pd.Timestamp | None = None
    repeats: int = 0
    detail: str = ""
    escalated: bool = False  # an urgent low that follows an announced low


AlertSink = Callable[[Alert], None]


# --------------------------------------------------------------------------- engine


class AlertEngine:
    """Per-person alert state; call `update` once per cycle (see the module docstring).

    ``sink`` receives every raised alert (the loop journals them, `journal_sink`); a sink
    that raises does not lose the alert: it is still returned, and the failure is kept in
    `sink_errors` for the loop to retry.
    """

    def __init__(
        self,
        thresholds: AlertThresholds = AlertThresholds(),
        *,
        sink: AlertSink | None = None,
        trend: TrendConfig | None = None,
        history_min: float = 60.0,
        start: pd.Timestamp | None = None,
    ) -> None:
        self.thresholds = thresholds
        self.sink = sink
        self.trend_config = trend if trend is not None else TrendConfig()
        self.history_min = max(history_min, self.trend_config.window_min)
        self.episodes: dict[tuple[AlertKind, str], _Episode] = {}
        self.snoozed_until: dict[AlertKind, pd.Timestamp] = {}
        self._hist_t: list[float] = []  # sensor time, minutes since epoch
        self._hist_g: list[float] = []
        self._last_sensor_time: pd.Timestamp | None = None
        self._last_ok_at: pd.Timestamp | None = None if start is None else _utc(start)
        self._high_since: pd.Timestamp | None = None
        self._pred_low_count = 0  # consecutive cycles predicting a low
        self._pred_high_count = 0
        self._pred_low_clear = 0  # consecutive cycles whose forecast cleared the band
        self._pred_high_clear = 0
        self.warming_up = False
        self.last_trend = Trend(math.nan, None)
        self.last_glucose = math.nan
        self._low_ended_at: pd.Timestamp | None = None  # the last low (< low_mgdl) ended
        self._carbs_at: pd.Timestamp | None = None  # the last carbs the loop told us of
        self.sink_errors: deque[tuple[Alert, Exception]] = deque(maxlen=1000)

    # -- user actions -------------------------------------------------------------------

    def snooze(self, kind: AlertKind | str, minutes: float, *, now: pd.Timestamp) -> pd.Timestamp:
        """Silence `kind` for `minutes` (urgent low: at most `urgent_low_max_snooze_min`)."""
        kind = AlertKind(kind)
        if minutes <= 0:
            raise AlertConfigError(f"snooze needs a positive duration, got {minutes}")
        if kind is AlertKind.URGENT_LOW:
            minutes = min(minutes, self.thresholds.urgent_low_max_snooze_min)
        until = _utc(now) + pd.Timedelta(minutes=minutes)
        self.snoozed_until[kind] = until
        return until

    def active(self) -> list[AlertKind]:
        """Kinds with an episode going on (announced or not)."""
        return sorted({k for k, _ in self.episodes}, key=list(AlertKind).index)

    # -- the cycle ----------------------------------------------------------------------

    def update(
        self,
        now: pd.Timestamp,
        reading: Reading | None = None,
        *,
        forecast: AlertForecast | None = None,
        pump_faults: Iterable[str] | None = None,
        carbs_g: float | None = None,
    ) -> list[Alert]:
        """Advance one cycle; return (and send to the sink) the alerts raised now.

        ``carbs_g`` the carbohydrate eaten (or announced) in this cycle, when the loop knows
        it: it only feeds ``predicted_low_quiet_after_carbs_min``.

        ``pump_faults=None`` means "no news from the pump this cycle" (fault episodes are
        kept); an empty list means the pump reports no fault (they end). Codes are strings,
        e.g. ``[pump.status().fault]`` — `PumpFault.NONE` is the empty string and counts as
        no fault — plus whatever the loop adds (``"no_response"`` after a `PumpTimeout`).
        """
        now = _utc(now)
        if self._last_ok_at is None:
            self._last_ok_at = now
        if carbs_g is not None and math.isfinite(carbs_g) and carbs_g > 0:
            self._carbs_at = now
        th = self.thresholds
        info: dict[AlertKind, dict[str, Any]] = {}
        # The gap is measured on the loop's clock before this cycle's reading: a loop clock
        # that jumped (or a replay that skipped slots) reports the hole even though a reading
        # arrives in the same cycle.
        gap = (now - self._last_ok_at).total_seconds() / 60.0
        fresh = self._take_reading(now, reading)
        warmup_now = reading is not None and CGMStatus(reading.status) is CGMStatus.WARMUP
        if warmup_now:
            self._last_ok_at = now  # the sensor is talking; the gap clock restarts after warm-up
        lost = (
            th.signal_loss_min is not None and not warmup_now and gap >= th.signal_loss_min - 1e-9
        )
        if lost:
            self._begin(AlertKind.SIGNAL_LOSS, now)
            info[AlertKind.SIGNAL_LOSS] = {"value": gap, "source": "cgm"}
        if lost or (fresh and not math.isfinite(self.last_trend.roc_mgdl_min)):
            # whatever was predicted before the hole is void; predict afresh on new data
            self._end(AlertKind.PREDICTED_LOW)
            self._end(AlertKind.PREDICTED_HIGH)
        if fresh:
            self._glucose_episodes(now, self.last_glucose, info)
            self._rate_episodes(now, info)

        self._predicted_episodes(now, fresh, forecast, info)
        if pump_faults is not None:
            self._pump_episodes(now, list(pump_faults), info)
        if self.warming_up:  # no glucose alerts from a sensor that is not measuring yet
            for k in (
                *_LOW_FAMILY,
                AlertKind.HIGH,
                AlertKind.RAPID_RISE,
                AlertKind.RAPID_FALL,
                AlertKind.PREDICTED_LOW,
                AlertKind.PREDICTED_HIGH,
            ):
                self._end(k)

        raised = self._announce(now, info)
        if fresh:
            self._end(AlertKind.SIGNAL_LOSS)  # announced above if the hole was news
        self._deliver(raised)
        return raised

    def _deliver(self, raised: list[Alert]) -> None:
        """Hand alerts to the sink; a failing sink (journal unavailable) never eats an alarm.

        The alerts are returned to the caller whatever the sink does; a failure is kept in
        `sink_errors` (alert, exception) so the loop can retry journaling and report it.
        """
        if self.sink is None:
            return
        for a in raised:
            try:
                self.sink(a)
            except Exception as e:  # noqa: BLE001 — any sink failure must not silence alarms
                self.sink_errors.append((a, e))

    # -- input ---------------------------------------------------------------------------

    def _take_reading(self, now: pd.Timestamp, reading: Reading | None) -> bool:
        """Digest the reading; True when it is a new, usable glucose value."""
        if reading is None:
            return False
        status = CGMStatus(reading.status)
        if status is CGMStatus.WARMUP:
            self.warming_up = True
            self._reset_history()
            return False
        g = float(reading.glucose_mgdl)
        if status is not CGMStatus.OK or not math.isfinite(g):
            return False
        t = _utc(reading.time)
        if self._last_sensor_time is not None and t == self._last_sensor_time:
            return False  # the same reading delivered again: not news, not a fresh signal
        if self._last_sensor_time is not None and t < self._last_sensor_time:
            self._reset_history()  # the sensor clock went backwards: no slope across it
        self.warming_up = False
        self._last_sensor_time = t
        self._last_ok_at = now
        tm = t.value / 60e9
        if self._hist_t and tm - self._hist_t[-1] > (self.thresholds.signal_loss_min or 20.0):
            self._high_since = None  # a long gap breaks "sustained"
        self._hist_t.append(tm)
        self._hist_g.append(g)
        cut = tm - self.history_min
        while self._hist_t and self._hist_t[0] < cut:
            self._hist_t.pop(0)
            self._hist_g.pop(0)
        self.last_glucose = g
        self.last_trend = trend_at(
            np.asarray(self._hist_t), np.asarray(self._hist_g), config=self.trend_config
        )
        return True

    def _reset_history(self) -> None:
        self._hist_t.clear()
        self._hist_g.clear()
        self._high_since = None
        self._pred_low_count = self._pred_high_count = 0
        self._pred_low_clear = self._pred_high_clear = 0
        self.last_trend = Trend(math.nan, None)

    # -- conditions ----------------------------------------------------------------------

    def _glucose_episodes(self, now: pd.Timestamp, g: float, info: dict) -> None:
        th = self.thresholds
        hy = th.hysteresis_mgdl
        for kind, thr in ((AlertKind.URGENT_LOW, th.urgent_low_mgdl), (AlertKind.LOW, th.low_mgdl)):
            if thr is None:
                continue
            if g < thr:
                self._begin(kind, now)
                self._end(AlertKind.PREDICTED_LOW)  # it came true; the low alarm takes over
                info[kind] = {"value": g}
            elif g >= thr + hy:
                if kind is AlertKind.LOW and (kind, "") in self.episodes:
                    self._low_ended_at = now  # the recovery of a (treated) low starts
                self._end(kind)
        if th.high_mgdl is None:
            return
        if g > th.high_mgdl:
            if self._high_since is None:
                self._high_since = now
            lasted = (now - self._high_since).total_seconds() / 60.0
            self._end(AlertKind.PREDICTED_HIGH)  # it came true
            if lasted >= th.high_sustain_min - 1e-9:
                self._begin(AlertKind.HIGH, now)
                info[AlertKind.HIGH] = {"value": g, "lasted": lasted}
        else:
            self._high_since = None
            if g < th.high_mgdl - hy:
                self._end(AlertKind.HIGH)

    def _rate_episodes(self, now: pd.Timestamp, info: dict) -> None:
        th = self.thresholds
        roc = self.last_trend.roc_mgdl_min
        if not math.isfinite(roc):
            return
        for kind, thr, sign in (
            (AlertKind.RAPID_RISE, th.rapid_rise_mgdl_min, 1.0),
            (AlertKind.RAPID_FALL, th.rapid_fall_mgdl_min, -1.0),
        ):
            if thr is None:
                continue
            r = sign * roc
            if r >= thr:
                self._begin(kind, now)
                info[kind] = {"value": roc}
            elif r < thr - th.rate_hysteresis_mgdl_min:
                self._end(kind)

    def predictions_evaluable(
        self, now: pd.Timestamp, fresh: bool, fc: AlertForecast | None
    ) -> bool:
        """A forecast is believed only on continuous, fresh data (see module docstring)."""
        if fc is None or not fresh or self.warming_up:
            return False
        if not math.isfinite(self.last_trend.roc_mgdl_min):
            return False  # a gap or a clock jump in the last 15 min: inputs are carried forward
        age = (now - fc.time).total_seconds() / 60.0
        return -fc.slot_minutes <= age <= self.thresholds.max_forecast_age_min

    def _predicted_episodes(
        self, now: pd.Timestamp, fresh: bool, fc: AlertForecast | None, info: dict
    ) -> None:
        th = self.thresholds
        if not self.predictions_evaluable(now, fresh, fc):
            if fresh or not math.isfinite(self.last_trend.roc_mgdl_min):
                # a fresh reading without a usable forecast breaks the run of cycles
                self._pred_low_count = 0
                self._pred_high_count = 0
            return
        assert fc is not None
        k = fc.within(th.predicted_horizon_min)
        src = "physio" if fc.source in ("physio", "fallback") else fc.source
        if th.predicted_low_mgdl is not None:
            lo = th.predicted_low_line(fc)[:k]
            bar = th.predicted_low_mgdl + th.predicted_low_margin_mgdl
            vmin = float(lo.min())
            falling = (
                th.predicted_low_max_roc is None
                or self.last_trend.roc_mgdl_min <= th.predicted_low_max_roc
            ) and not self._predicted_low_suppressed(now)
            if vmin < bar and falling:
                self._pred_low_count += 1
                self._pred_low_clear = 0
            else:
                self._pred_low_count = 0
                cleared = vmin >= bar + th.predicted_hysteresis_mgdl
                self._pred_low_clear = self._pred_low_clear + 1 if cleared else 0
                if self._pred_low_clear >= th.predicted_clear_cycles:
                    self._end(AlertKind.PREDICTED_LOW)
            low_now = any((kd, "") in self.episodes for kd in _LOW_FAMILY)
            if self._pred_low_count >= th.predicted_cycles and not low_now:
                self._begin(AlertKind.PREDICTED_LOW, now)
                eta = (int(np.flatnonzero(lo < bar)[0]) + 1) * fc.slot_minutes
                if th.predicted_low_log_offsets is not None:
                    detail = "calibrated"
                else:
                    detail = f"q{fc.quantile_used(th.predicted_low_quantile):g}"
                info[AlertKind.PREDICTED_LOW] = {
                    "value": vmin,
                    "source": src,
                    "eta": eta,
                    "detail": detail,
                    "chance": fc.chance_beyond(th.predicted_low_mgdl, k),
                }
        if th.predicted_high_mgdl is not None:
            hi = fc.column(th.predicted_high_quantile)[:k]
            vmax = float(hi.max())
            if vmax > th.predicted_high_mgdl:
                self._pred_high_count += 1
                self._pred_high_clear = 0
            else:
                self._pred_high_count = 0
                cleared = vmax <= th.predicted_high_mgdl - th.predicted_hysteresis_mgdl
                self._pred_high_clear = self._pred_high_clear + 1 if cleared else 0
                if self._pred_high_clear >= th.predicted_clear_cycles:
                    self._end(AlertKind.PREDICTED_HIGH)
            high_now = th.high_mgdl is not None and self.last_glucose > th.high_mgdl
            if self._pred_high_count >= th.predicted_cycles and not high_now:
                self._begin(AlertKind.PREDICTED_HIGH, now)
                eta = (int(np.flatnonzero(hi > th.predicted_high_mgdl)[0]) + 1) * fc.slot_minutes
                info[AlertKind.PREDICTED_HIGH] = {
                    "value": vmax,
                    "source": src,
                    "eta": eta,
                    "detail": f"q{th.predicted_high_quantile:g}",
                    "chance": fc.chance_beyond(th.predicted_high_mgdl, k, below=False),
                }

    def _predicted_low_suppressed(self, now: pd.Timestamp) -> bool:
        """A treated low's recovery or a recent meal: a predicted low is not believed now
        (unless the trend falls at least `predicted_low_suppress_unless_roc`)."""
        th = self.thresholds
        quiet = False
        for since, minutes in (
            (self._low_ended_at, th.predicted_low_quiet_after_low_min),
            (self._carbs_at, th.predicted_low_quiet_after_carbs_min),
        ):
            if since is not None and minutes is not None:
                quiet |= (now - since).total_seconds() / 60.0 < minutes - 1e-9
        unless = th.predicted_low_suppress_unless_roc
        if quiet and unless is not None and self.last_trend.roc_mgdl_min <= unless:
            return False
        return quiet

    def _pump_episodes(self, now: pd.Timestamp, faults: Sequence[str], info: dict) -> None:
        codes = {str(f) for f in faults if str(f)}
        for kind, detail in list(self.episodes):
            if kind is AlertKind.PUMP_FAULT and detail not in codes:
                del self.episodes[(kind, detail)]
        for code in sorted(codes):
            self._begin(AlertKind.PUMP_FAULT, now, detail=code)

    # -- episodes ------------------------------------------------------------------------

    def _begin(self, kind: AlertKind, now: pd.Timestamp, *, detail: str = "") -> None:
        if (kind, detail) not in self.episodes:
            self.episodes[(kind, detail)] = _Episode(kind, now, detail=detail)

    def _end(self, kind: AlertKind) -> None:
        for key in [k for k in self.episodes if k[0] is kind]:
            del self.episodes[key]

    def _snoozed(self, kind: AlertKind, now: pd.Timestamp) -> bool:
        until = self.snoozed_until.get(kind)
        return until is not None and now < until

    def _announce(self, now: pd.Timestamp, info: dict[AlertKind, dict[str, Any]]) -> list[Alert]:
        th = self.thresholds
        out: list[Alert] = []
        # a more severe alert of the same family covers the milder one in the same cycle
        urgent = self.episodes.get((AlertKind.URGENT_LOW, ""))
        low = self.episodes.get((AlertKind.LOW, ""))
        if urgent is not None and low is not None:
            if not low.announced:
                low.announced = True
                low.last_alert = now
            elif not urgent.announced:
                urgent.escalated = True
        # a fast fall into a low (rise into a high) is said by the low (high) alarm
        for fast, covers in (
            (AlertKind.RAPID_FALL, _LOW_FAMILY),
            (AlertKind.RAPID_RISE, (AlertKind.HIGH,)),
        ):
            ep = self.episodes.get((fast, ""))
            if (
                ep is not None
                and not ep.announced
                and any((c, "") in self.episodes for c in covers)
            ):
                ep.announced = True
                ep.last_alert = now
        for key in sorted(self.episodes, key=lambda k: list(AlertKind).index(k[0])):
            ep = self.episodes[key]
            kind = ep.kind
            if self._snoozed(kind, now):
                continue
            if ep.announced:
                every = th.realert_for(kind)
                if every is None or ep.last_alert is None:
                    continue
                if (now - ep.last_alert).total_seconds() / 60.0 < every - 1e-9:
                    continue
                if kind in _PREDICTED and kind not in info:
                    continue  # said again only while this cycle's forecast still predicts it
                if (
                    kind is AlertKind.PREDICTED_LOW
                    and th.predicted_low_realert_falling
                    and not self.last_trend.roc_mgdl_min < 0
                ):
                    continue  # trend-aware: a prediction that levelled off is not repeated
                ep.repeats += 1
            ep.announced = True
            ep.last_alert = now
            out.append(self._make(kind, now, ep, info.get(kind, {})))
        return out

    def _make(self, kind: AlertKind, now: pd.Timestamp, ep: _Episode, inf: dict) -> Alert:
        th = self.thresholds
        g = self.last_glucose
        value = float(inf.get("value", g))
        src = str(inf.get("source", "cgm"))
        eta = float(inf.get("eta", math.nan))
        arrow = self.last_trend.symbol
        if kind is AlertKind.URGENT_LOW:
            msg = f"Urgent low: {g:.0f} mg/dL {arrow}".rstrip()
        elif kind is AlertKind.LOW:
            msg = f"Low: {g:.0f} mg/dL {arrow}".rstrip()
        elif kind in _PREDICTED:
            msg = predicted_message(
                "Low" if kind is AlertKind.PREDICTED_LOW else "High",
                eta,
                arrow,
                now_mgdl=g,
                forecast_mgdl=value,
                chance=float(inf.get("chance", math.nan)),
                physio=src == "physio",
            )
        elif kind is AlertKind.HIGH:
            msg = f"High: {g:.0f} mg/dL for {th.high_sustain_min:.0f}+ min"
        elif kind is AlertKind.RAPID_RISE:
            value = float(inf.get("value", self.last_trend.roc_mgdl_min))
            msg = f"Rising fast: {value:+.1f} mg/dL/min {arrow}".rstrip()
        elif kind is AlertKind.RAPID_FALL:
            value = float(inf.get("value", self.last_trend.roc_mgdl_min))
            msg = f"Falling fast: {value:+.1f} mg/dL/min {arrow}".rstrip()
        elif kind is AlertKind.SIGNAL_LOSS:
            msg = f"Signal loss: no CGM reading for {value:.0f} min"
        else:  # pump fault
            value = math.nan
            src = "pump"
            msg = f"Pump fault: {ep.detail}"
        if ep.repeats:
            msg += f" (repeat {ep.repeats})"
        return Alert(
            kind=kind,
            severity=SEVERITY[kind],
            time=now,
            value=value,
            message=msg,
            source=src,
            repeat=ep.repeats,
            episode_start=ep.start,
            detail=ESCALATION if ep.escalated else str(inf.get("detail", ep.detail)),
            eta_min=eta,
        )

    # -- persistence (a restarted loop must not re-alarm an announced episode) -----------

    def state_dict(self) -> dict[str, Any]:
        """JSON-ready state; `AlertEngine.from_state` restores it after a restart."""

        def ts(t: pd.Timestamp | None) -> str | None:
            return None if t is None else t.isoformat()

        return {
            "thresholds": self.thresholds.to_dict(),
            "episodes": [
                {
                    "kind": e.kind.value,
                    "start": ts(e.start),
                    "announced": e.announced,
                    "last_alert": ts(e.last_alert),
                    "repeats": e.repeats,
                    "detail": e.detail,
                    "escalated": e.escalated,
                }
                for e in self.episodes.values()
            ],
            "snoozed_until": {k.value: ts(v) for k, v in self.snoozed_until.items()},
            "history": [list(self._hist_t), list(self._hist_g)],
            "last_sensor_time": ts(self._last_sensor_time),
            "last_ok_at": ts(self._last_ok_at),
            "high_since": ts(self._high_since),
            "pred_counts": [
                self._pred_low_count,
                self._pred_high_count,
                self._pred_low_clear,
                self._pred_high_clear,
            ],
            "warming_up": self.warming_up,
            "low_ended_at": ts(self._low_ended_at),
            "carbs_at": ts(self._carbs_at),
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any], *, sink: AlertSink | None = None) -> AlertEngine:
        def ts(s: str | None) -> pd.Timestamp | None:
            return None if s is None else _utc(pd.Timestamp(s))

        eng = cls(AlertThresholds.from_dict(state["thresholds"]), sink=sink)
        for e in state["episodes"]:
            ep = _Episode(
                AlertKind(e["kind"]),
                ts(e["start"]),
                e["announced"],
                ts(e["last_alert"]),
                int(e["repeats"]),
                e["detail"],
                bool(e.get("escalated", False)),
            )
            eng.episodes[(ep.kind, ep.detail)] = ep
        eng.snoozed_until = {AlertKind(k): ts(v) for k, v in state["snoozed_until"].items()}
        eng._hist_t, eng._hist_g = (list(map(float, x)) for x in state["history"])
        eng._last_sensor_time = ts(state["last_sensor_time"])
        eng._last_ok_at = ts(state["last_ok_at"])
        eng._high_since = ts(state["high_since"])
        counts = [int(x) for x in state["pred_counts"]] + [0, 0]
        eng._pred_low_count, eng._pred_high_count = counts[0], counts[1]
        eng._pred_low_clear, eng._pred_high_clear = counts[2], counts[3]
        eng.warming_up = bool(state["warming_up"])
        eng._low_ended_at = ts(state.get("low_ended_at"))
        eng._carbs_at = ts(state.get("carbs_at"))
        if eng._hist_t:
            eng.last_glucose = eng._hist_g[-1]
            eng.last_trend = trend_at(
                np.asarray(eng._hist_t), np.asarray(eng._hist_g), config=eng.trend_config
            )
        return eng


def predicted_message(
    what: str,
    eta_min: float,
    arrow: str | None,
    *,
    now_mgdl: float,
    forecast_mgdl: float,
    chance: float = math.nan,
    physio: bool = False,
) -> str:
    """What a predicted low (``what="Low"``) or high says: how soon, to the nearest 5 minutes
    ("Low expected in about 20 min"), the trend arrow, the reading now and the forecast, and
    how sure — the forecast's chance of crossing, to the nearest 10 %, ``likely`` from 50 %.

    >>> predicted_message("Low", 18, "↘", now_mgdl=84, forecast_mgdl=66, chance=0.42)
    'Low expected in about 20 min ↘ (now 84 mg/dL, forecast 66; possible, chance about 40 %)'
    """
    head = f"{what} expected"
    if math.isfinite(eta_min):
        head += f" in about {max(5, 5 * round(eta_min / 5)):.0f} min"
    if arrow:
        head += f" {arrow}"
    parts = []
    if math.isfinite(now_mgdl):
        parts.append(f"now {now_mgdl:.0f} mg/dL")
    if math.isfinite(forecast_mgdl):
        parts.append(f"forecast {forecast_mgdl:.0f}")
    text = ", ".join(parts)
    if math.isfinite(chance):
        pct = min(max(10 * round(10 * chance), 10), 90) if chance < 1 else 100
        sure = f"{'likely' if chance >= 0.5 else 'possible'}, chance about {pct:.0f} %"
        text = f"{text}; {sure}" if text else sure
    if physio:
        text += ", physiological model"
    return f"{head} ({text})" if text else head


def journal_sink(journal: Any, patient: str = "") -> AlertSink:
    """A sink writing each alert as an ``alert`` event of a `serving.journal.Journal`.

    Duck-typed on ``journal.event(kind, detail, patient=, time=)`` so this module does not
    import the journal (and its pump protocol) just to describe alerts.
    """

    def sink(alert: Alert) -> None:
        journal.event("alert", alert.to_dict(), patient=patient, time=alert.time)

    return sink


def with_thresholds(base: AlertThresholds, **changes: Any) -> AlertThresholds:
    """A copy of `base` with some settings changed (validated again)."""
    return replace(base, **changes)


_UTC = pd.Timestamp(0, tz="UTC").tzinfo


def _utc(t: Any) -> pd.Timestamp:
    if type(t) is pd.Timestamp and t.tzinfo is _UTC:
        return t  # the common case, once per cycle: skip the conversions
    ts = pd.Timestamp(t)
    if ts.tzinfo is None:
        return ts.tz_localize("UTC")
    return ts.tz_convert("UTC")
