"""Figures for forecasts and outcomes: error grids, overlays, AGP, CVGA, metric-by-horizon.

Every function returns a `matplotlib.figure.Figure` built without pyplot (no global figure
registry, no GUI backend, nothing shown): save it with ``fig.savefig("x.png")`` or embed it
with `forecast.htmlreport.HtmlReport.add_figure`. Pass ``ax=`` to draw into an existing
Axes instead (the function then returns that Axes' figure).

Grids are drawn from the same definitions the metrics use (`forecast.metrics`), so a point
drawn in a zone is counted in that zone.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from forecast import glycemia, metrics
from forecast.schema import GlucastError

ZONE_COLOURS: dict[str, str] = {
    "A": "#2e7d32",
    "B": "#7cb342",
    "C": "#fbc02d",
    "D": "#ef6c00",
    "E": "#c62828",
}
RANGE_COLOUR = "#e8f5e9"


class PlotError(GlucastError, ValueError):
    """Data handed to a plot cannot be drawn (shapes, missing columns)."""


def _axes(ax: Axes | None, size: tuple[float, float] = (6.0, 6.0)) -> tuple[Figure, Axes]:
    if ax is not None:
        return ax.figure, ax  # type: ignore[return-value]
    fig = Figure(figsize=size, layout="constrained")
    return fig, fig.add_subplot()


def _scatter_zones(ax: Axes, r: np.ndarray, p: np.ndarray, zones: np.ndarray, size: float):
    shares = metrics.zone_shares(zones)
    for z in metrics.ZONES:
        m = zones == z
        share = shares[z]
        label = f"{z}: {share:.1f} %" if np.isfinite(share) else z
        ax.scatter(r[m], p[m], s=size, c=ZONE_COLOURS[z], label=label, alpha=0.7, lw=0)
    ax.legend(
        loc="upper left",
        bbox_to_anchor=(1.02, 1.0),
        fontsize=8,
        title="zone share",
        title_fontsize=8,
        frameon=False,
        markerscale=2.0,
    )


def _grid_inputs(ref: Any, pred: Any) -> tuple[np.ndarray, np.ndarray]:
    r = np.asarray(ref, dtype=np.float64).ravel()
    p = np.asarray(pred, dtype=np.float64).ravel()
    if r.shape != p.shape:
        raise PlotError(f"ref and pred have {r.size} and {p.size} values; pass paired values")
    m = np.isfinite(r) & np.isfinite(p)
    return r[m], p[m]


def clarke_plot(
    ref: Any,
    pred: Any,
    *,
    title: str = "Clarke error grid",
    ax: Axes | None = None,
    limit: float = 400.0,
    point_size: float = 8.0,
) -> Figure:
    """Scatter of (reference, prediction) on the Clarke (1987) grid with its zone lines.

    Points are coloured by `forecast.metrics.clarke_zones` and the legend gives each zone's
    share (%). Pairs with a NaN are left out (as the metrics do).
    """
    r, p = _grid_inputs(ref, pred)
    fig, ax = _axes(ax, (7.2, 6.0))
    lines = [
        ((0, limit), (0, limit), ":"),  # identity
        ((0, 175 / 3), (70, 70), "-"),
        ((175 / 3, limit / 1.2), (70, limit), "-"),  # y = 1.2 x
        ((70, 70), (84, limit), "-"),
        ((0, 70), (180, 180), "-"),
        ((70, 290), (180, 400), "-"),  # y = x + 110
        ((70, 70), (0, 56), "-"),
        ((70, limit), (56, 0.8 * limit), "-"),  # y = 0.8 x
        ((180, 180), (0, 70), "-"),
        ((180, limit), (70, 70), "-"),
        ((240, 240), (70, 180), "-"),
        ((240, limit), (180, 180), "-"),
        ((130, 180), (0, 70), "-"),  # y = 7/5 x - 182
    ]
    for xs, ys, style in lines:
        ax.plot(xs, ys, style, color="black", lw=0.9)
    labels = [
        ("A", 30, 15),
        ("A", 370, 260),
        ("B", 280, 370),
        ("B", 370, 200),
        ("C", 160, 370),
        ("C", 160, 15),
        ("D", 30, 140),
        ("D", 370, 120),
        ("E", 30, 370),
        ("E", 370, 15),
    ]
    for z, x, y in labels:
        ax.text(x * limit / 400, y * limit / 400, z, fontsize=14, weight="bold", ha="center")
    if r.size:
        _scatter_zones(ax, r, p, metrics.clarke_zones(r, p), point_size)
    ax.set_xlim(0, limit)
    ax.set_ylim(0, limit)
    ax.set_aspect("equal")
    ax.set_xlabel("reference glucose (mg/dL)")
    ax.set_ylabel("predicted glucose (mg/dL)")
    ax.set_title(title)
    return fig


def parkes_plot(
    ref: Any,
    pred: Any,
    *,
    diabetes_type: int = 1,
    title: str | None = None,
    ax: Axes | None = None,
    limit: float = 550.0,
    point_size: float = 8.0,
) -> Figure:
    """Scatter on the Parkes consensus grid (type 1 by default) with the published borders.

    Borders are `forecast.metrics.PARKES_BORDERS` (Pfützner et al. 2013, Table 1); points are
    coloured by `forecast.metrics.parkes_zones`.
    """
    if diabetes_type not in metrics.PARKES_BORDERS:
        raise PlotError(f"diabetes_type must be 1 or 2, got {diabetes_type!r}")
    r, p = _grid_inputs(ref, pred)
    fig, ax = _axes(ax, (7.2, 6.0))
    ax.plot((0, limit), (0, limit), ":", color="black", lw=0.9)
    for verts in metrics.PARKES_BORDERS[diabetes_type].values():
        v = np.asarray(verts, dtype=np.float64)
        ax.plot(v[:, 0], v[:, 1], "-", color="black", lw=0.9)
    labels = {
        1: [
            ("A", 320, 320),
            ("B", 220, 360),
            ("B", 360, 220),
            ("C", 120, 420),
            ("C", 420, 150),
            ("D", 50, 480),
            ("D", 480, 60),
            ("E", 15, 500),
        ],
        2: [
            ("A", 320, 320),
            ("B", 200, 380),
            ("B", 380, 200),
            ("C", 110, 420),
            ("C", 420, 120),
            ("D", 45, 470),
            ("D", 480, 60),
            ("E", 15, 500),
        ],
    }[diabetes_type]
    for z, x, y in labels:
        ax.text(x * limit / 550, y * limit / 550, z, fontsize=14, weight="bold", ha="center")
    if r.size:
        _scatter_zones(ax, r, p, metrics.parkes_zones(r, p, diabetes_type), point_size)
    ax.set_xlim(0, limit)
    ax.set_ylim(0, limit)
    ax.set_aspect("equal")
    ax.set_xlabel("reference glucose (mg/dL)")
    ax.set_ylabel("predicted glucose (mg/dL)")
    ax.set_title(title or f"Parkes (consensus) error grid, type {diabetes_type}")
    return fig


def overlay_plot(
    times: Any,
    reference: Any,
    pred: Any = None,
    quantiles: Sequence[float] | None = None,
    *,
    label: str = "forecast",
    title: str = "Forecast vs reference",
    ax: Axes | None = None,
    target_range: tuple[float, float] | None = (70.0, 180.0),
) -> Figure:
    """Reference CGM and a forecast over time: the median line and the quantile bands.

    `times` [T] (datetime-like or numbers), `reference` [T] mg/dL (NaN gaps stay gaps), `pred`
    [T] or [T, Q] with `quantiles` (the column nearest 0.5 is the median; bands join each
    quantile with its mirror, outermost lightest). Typical use: one horizon of a test split,
    e.g. ``pred[:, 5, :]`` against ``target[:, 5]`` at ``origin + 30 min``.

    Where consecutive times are further apart than 1.5 times their median spacing (hours
    without readings, so without forecasts) the line and the bands stop and start again
    instead of bridging the gap with a forecast nobody made.
    """
    t = np.asarray(pd.to_datetime(times) if _is_datetime(times) else np.asarray(times))
    ref = np.asarray(reference, dtype=np.float64).ravel()
    if t.shape[0] != ref.size:
        raise PlotError(f"{t.shape[0]} times for {ref.size} reference values")
    gaps = _gap_starts(t)
    fig, ax = _axes(ax, (10.0, 4.0))
    if target_range is not None:
        ax.axhspan(*target_range, color=RANGE_COLOUR, zorder=0, label="target range")
    if pred is not None:
        p = np.asarray(pred, dtype=np.float64)
        if p.ndim == 1:
            p = p[:, None]
            quantiles = quantiles or (0.5,)
        if p.shape[0] != ref.size or p.ndim != 2:
            raise PlotError(f"pred must be [T] or [T, Q] with T={ref.size}, got {p.shape}")
        if quantiles is None or len(quantiles) != p.shape[1]:
            raise PlotError(f"pass the {p.shape[1]} quantile levels of pred's columns")
        q = np.asarray(quantiles, dtype=np.float64)
        order = np.argsort(q)
        q, p = q[order], p[:, order]
        mi = metrics.median_index(q)
        tp, p = _break_at(t, p, gaps)
        n_bands = min(mi, len(q) - 1 - mi)
        for k in range(n_bands):
            lo, hi = p[:, k], p[:, len(q) - 1 - k]
            alpha = 0.15 + 0.15 * k
            ax.fill_between(
                tp,
                lo,
                hi,
                color="#1565c0",
                alpha=alpha,
                lw=0,
                label=f"{label} {q[k]:g}–{q[len(q) - 1 - k]:g}",
            )
        ax.plot(tp, p[:, mi], color="#1565c0", lw=1.3, label=f"{label} (q={q[mi]:g})")
    ax.plot(t, ref, ".", color="black", ms=3, label="reference CGM")
    ax.set_ylabel("glucose (mg/dL)")
    ax.set_title(title)
    ax.legend(loc="upper right", fontsize=8)
    if _is_datetime(times):
        fig.autofmt_xdate()
    return fig


def _gap_starts(t: np.ndarray) -> np.ndarray:
    """Indices i where t[i + 1] - t[i] exceeds 1.5 x the median positive spacing."""
    if t.shape[0] < 3:
        return np.zeros(0, dtype=np.int64)
    if _is_datetime(t):  # datetime64 or (time-zone aware) Timestamp objects
        d = np.diff(pd.to_datetime(t, utc=True).asi8).astype(np.float64)
    else:
        d = np.diff(np.asarray(t, dtype=np.float64))
    pos = d[np.isfinite(d) & (d > 0)]
    if pos.size == 0:
        return np.zeros(0, dtype=np.int64)
    return np.flatnonzero(d > 1.5 * np.median(pos))


def _break_at(t: np.ndarray, p: np.ndarray, gaps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`t` and `p` [T, Q] with a NaN row inserted after each gap start: matplotlib stops a
    line and a fill_between at NaN, so nothing is drawn across the gap."""
    if gaps.size == 0:
        return t, p
    mid = t[gaps] + (t[gaps + 1] - t[gaps]) / 2
    tt = np.insert(t, gaps + 1, mid)
    pp = np.insert(p, gaps + 1, np.nan, axis=0)
    return tt, pp


def _is_datetime(x: Any) -> bool:
    arr = np.asarray(x)
    if np.issubdtype(arr.dtype, np.datetime64):
        return True
    if isinstance(x, (pd.Series, pd.Index)):
        return pd.api.types.is_datetime64_any_dtype(x)
    return arr.dtype == object and arr.size > 0 and isinstance(arr.flat[0], pd.Timestamp)


def agp_plot(
    data: pd.DataFrame | Any,
    times: Any = None,
    *,
    bin_minutes: int = 15,
    title: str = "Ambulatory glucose profile",
    ax: Axes | None = None,
    timezone: str | None = None,
) -> Figure:
    """AGP: median and the 25–75 / 5–95 % bands of glucose by local time of day.

    `data` is a canonical frame (subset it to one subject for an individual AGP) or a glucose
    array with `times`; also accepts the table `forecast.glycemia.agp` returns.
    """
    if isinstance(data, pd.DataFrame) and {"p5", "p25", "p50", "p75", "p95"} <= set(data.columns):
        table = data
    else:
        table = glycemia.agp(data, times, bin_minutes=bin_minutes, timezone=timezone)
    fig, ax = _axes(ax, (10.0, 4.0))
    hours = table.index.to_numpy(dtype=np.float64) / 60.0
    ax.axhspan(70, 180, color=RANGE_COLOUR, zorder=0, label="70–180 mg/dL")
    ax.fill_between(
        hours, table["p5"], table["p95"], color="#90caf9", alpha=0.5, lw=0, label="5–95 %"
    )
    ax.fill_between(
        hours, table["p25"], table["p75"], color="#1e88e5", alpha=0.6, lw=0, label="25–75 %"
    )
    ax.plot(hours, table["p50"], color="#0d47a1", lw=2, label="median")
    for y, c in ((54, "#c62828"), (70, "#ef6c00"), (180, "#ef6c00"), (250, "#c62828")):
        ax.axhline(y, color=c, lw=0.7, ls="--")
    ax.set_xlim(0, 24)
    ax.set_xticks(range(0, 25, 3))
    ax.set_xticklabels([f"{h:02d}:00" for h in range(0, 25, 3)])
    ax.set_xlabel("local time of day")
    ax.set_ylabel("glucose (mg/dL)")
    ax.set_title(title)
    ax.legend(loc="upper right", fontsize=8)
    return fig


# CVGA axes: equal-sized cells, as in Magni's figure (min BG reversed 110 -> 50).
_CVGA_X = ((50.0, 70.0, 90.0, 110.0), (3.0, 2.0, 1.0, 0.0))
_CVGA_Y = ((110.0, 180.0, 300.0, 400.0), (0.0, 1.0, 2.0, 3.0))
_CVGA_CELL_COLOURS = (
    ("#2e7d32", "#9ccc65", "#fbc02d"),
    ("#9ccc65", "#c5e1a5", "#ef6c00"),
    ("#fbc02d", "#ef6c00", "#c62828"),
)


def cvga_plot(
    table: pd.DataFrame,
    *,
    title: str = "Control-variability grid analysis",
    ax: Axes | None = None,
    label_points: bool | None = None,
) -> Figure:
    """CVGA (Magni 2007/2008): one point per subject at (min BG, max BG), zones shaded.

    `table` is what `forecast.glycemia.cvga` returns (columns min, max; zone shares are
    recomputed from it for the title). Points outside the grid are drawn on its edge.
    """
    if not {"min", "max"} <= set(table.columns):
        raise PlotError("cvga_plot needs forecast.glycemia.cvga(...) output (columns min, max)")
    fig, ax = _axes(ax, (6.0, 6.0))
    for row in range(3):
        for col in range(3):
            ax.add_patch(
                Rectangle(
                    (col, row),
                    1,
                    1,
                    facecolor=_CVGA_CELL_COLOURS[row][col],
                    alpha=0.35,
                    edgecolor="black",
                    lw=0.8,
                )
            )
            ax.text(
                col + 0.5,
                row + 0.5,
                glycemia.CVGA_ZONES[row][col],
                ha="center",
                va="center",
                fontsize=10,
                alpha=0.8,
            )
    lo = table["min"].to_numpy(dtype=np.float64)
    hi = table["max"].to_numpy(dtype=np.float64)
    ok = np.isfinite(lo) & np.isfinite(hi)
    x = np.interp(np.clip(lo[ok], 50, 110), *_CVGA_X)
    y = np.interp(np.clip(hi[ok], 110, 400), *_CVGA_Y)
    ax.scatter(x, y, s=30, c="black", zorder=3, edgecolors="white", linewidths=0.6)
    if label_points or (label_points is None and ok.sum() <= 12):
        for name, xi, yi in zip(np.asarray(table.index)[ok], x, y, strict=True):
            ax.annotate(str(name), (xi, yi), fontsize=7, xytext=(3, 3), textcoords="offset points")
    shares = glycemia.cvga_shares(table)
    ax.set_xlim(0, 3)
    ax.set_ylim(0, 3)
    ax.set_xticks(_CVGA_X[1][::-1])
    ax.set_xticklabels([">110", "90", "70", "<50"])
    ax.set_yticks(_CVGA_Y[1])
    ax.set_yticklabels(["<110", "180", "300", ">400"])
    ax.set_xlabel("minimum BG (mg/dL)")
    ax.set_ylabel("maximum BG (mg/dL)")
    summary = ", ".join(f"{k} {v:.0f} %" for k, v in shares.items() if np.isfinite(v) and v > 0)
    ax.set_title(f"{title}\n{summary}" if summary else title, fontsize=10)
    ax.set_aspect("equal")
    return fig


def _metric_value(entry: Mapping[str, Any], metric: str) -> float:
    v: Any = entry
    for part in metric.split("."):
        if not isinstance(v, Mapping) or part not in v:
            raise PlotError(
                f"metric {metric!r} not in the evaluate_forecast result (have {sorted(entry)}); "
                "use e.g. 'rmse', 'mard', 'coverage' or 'clarke.A'"
            )
        v = v[part]
    return float("nan") if v is None else float(v)


def horizon_metric_plot(
    results: Mapping[str, Mapping[str, Any]],
    metric: str = "rmse",
    *,
    title: str | None = None,
    ax: Axes | None = None,
) -> Figure:
    """One line per model: `metric` against the forecast horizon (minutes).

    `results` maps a model name to a `forecast.metrics.evaluate_forecast` result (or directly
    to its ``"horizons"`` dict). `metric` is a key of a horizon entry; nested keys with dots,
    e.g. ``"clarke.A"`` or ``"by_range.<70.rmse"``.
    """
    if not results:
        raise PlotError("no results to plot; pass {model name: evaluate_forecast(...)}")
    fig, ax = _axes(ax, (7.0, 4.0))
    units = {
        "rmse": "mg/dL",
        "mae": "mg/dL",
        "bias": "mg/dL",
        "width": "mg/dL",
        "lag_min": "min",
        "n": "count",
    }
    for name, res in results.items():
        horizons = res.get("horizons", res)
        hs = sorted(horizons, key=lambda k: int(k))
        ys = [_metric_value(horizons[h], metric) for h in hs]
        ax.plot([int(h) for h in hs], ys, marker="o", ms=4, label=str(name))
    unit = units.get(metric.split(".")[-1], "%")
    ax.set_xlabel("horizon (min)")
    ax.set_ylabel(f"{metric} ({unit})")
    ax.set_title(title or f"{metric} by horizon")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def alert_tradeoff_plot(
    sweep: pd.DataFrame,
    *,
    goal: tuple[float, float, float] | None = None,
    title: str | None = None,
) -> Figure:
    """Predicted-low alerts by quantile: lows warned (left) and median lead (right) against
    false alerts per day, the threshold-only alarm as a red star.

    `sweep` is `serving.insilico.alert_sweep.sweep_quantiles`' frame; points are labelled with their
    quantile and joined in quantile order. `goal` = (max false alerts a day, min share of lows
    warned 0–1, min median lead in minutes) draws the target lines.
    """
    need = {"rule", "quantile", "sensitivity", "lead_min", "false_per_day"}
    if not need <= set(sweep.columns):
        raise PlotError(
            f"the sweep frame lacks {sorted(need - set(sweep.columns))}; "
            "pass serving.insilico.alert_sweep.sweep_quantiles(...)"
        )
    fig = Figure(figsize=(10.0, 4.0), layout="constrained")
    ax_sens, ax_lead = fig.subplots(1, 2, sharex=True)
    pred = sweep[sweep["rule"] == "predicted_low"].sort_values("quantile")
    thr = sweep[sweep["rule"] == "threshold_low"]
    panels = ((ax_sens, "sensitivity", 100.0, "lows warned (%)"), (ax_lead, "lead_min", 1.0,
              "median lead before the low (min)"))  # fmt: skip
    for k, (ax, col, scale, label) in enumerate(panels):
        ax.plot(pred["false_per_day"], scale * pred[col], marker="o", label="predicted low")
        for _, r in pred.iterrows():
            ax.annotate(
                f"q{r['quantile']:g}",
                (r["false_per_day"], scale * r[col]),
                textcoords="offset points",
                xytext=(3, 4),
                fontsize=7,
            )
        if len(thr):
            ax.plot(thr["false_per_day"], scale * thr[col], marker="*", ms=12, ls="",
                    color="tab:red", label="threshold alarm")  # fmt: skip
        if goal is not None:
            ax.axvline(goal[0], color="tab:green", lw=0.8, ls="--", label="goal")
            ax.axhline(scale * goal[k + 1], color="tab:green", lw=0.8, ls="--")
        ax.set_xlabel("false alerts per day")
        ax.set_ylabel(label)
        ax.set_xlim(left=0)
        ax.grid(alpha=0.3)
    ax_sens.legend(fontsize=8, loc="lower right")
    fig.suptitle(title or "Predicted-low alerts by forecast quantile")
    return fig


__all__ = [
    "PlotError",
    "alert_tradeoff_plot",
    "agp_plot",
    "clarke_plot",
    "cvga_plot",
    "horizon_metric_plot",
    "overlay_plot",
    "parkes_plot",
]
