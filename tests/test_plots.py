"""Plots return Figures that save as PNG; the HTML report is one self-contained file."""

import base64
import re

import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure

from forecast import glycemia, metrics, plots
from forecast.htmlreport import HtmlReport, ReportError
from forecast.schema import DatasetMeta, set_meta

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _saved_png(fig: Figure, tmp_path, name: str) -> bytes:
    assert isinstance(fig, Figure)
    path = tmp_path / f"{name}.png"
    fig.savefig(path, dpi=40)
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 1000
    return data


@pytest.fixture(scope="module")
def pairs():
    rng = np.random.default_rng(0)
    ref = rng.uniform(40, 400, 200)
    pred = ref * rng.normal(1.0, 0.25, 200)
    pred[:3] = np.nan  # missing pairs are skipped, not drawn
    return ref, pred


def test_clarke_and_parkes_plots(tmp_path, pairs):
    ref, pred = pairs
    fig = plots.clarke_plot(ref, pred)
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    shares = metrics.zone_shares(metrics.clarke_zones(ref, pred))
    assert legend[0] == f"A: {shares['A']:.1f} %"
    texts = {t.get_text() for t in fig.axes[0].texts}
    assert {"A", "B", "C", "D", "E"} <= texts  # zone labels drawn
    _saved_png(fig, tmp_path, "clarke")
    fig = plots.parkes_plot(ref, pred)
    assert {"A", "B", "C", "D", "E"} <= {t.get_text() for t in fig.axes[0].texts}
    _saved_png(fig, tmp_path, "parkes")
    assert isinstance(plots.parkes_plot(ref, pred, diabetes_type=2), Figure)
    with pytest.raises(plots.PlotError):
        plots.clarke_plot([1, 2], [1])


def test_overlay_plot_quantile_bands(tmp_path):
    t = pd.date_range("2024-01-01", periods=100, freq="5min", tz="UTC")
    ref = 140 + 30 * np.sin(np.arange(100) / 10)
    ref[40:45] = np.nan
    pred = np.stack([ref - 30, ref - 10, ref, ref + 10, ref + 30], axis=1)
    pred[40:45] = 140.0
    fig = plots.overlay_plot(t, ref, pred, (0.05, 0.25, 0.5, 0.75, 0.95))
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert "forecast 0.05–0.95" in labels and "forecast 0.25–0.75" in labels
    _saved_png(fig, tmp_path, "overlay")
    _saved_png(plots.overlay_plot(np.arange(100), ref), tmp_path, "overlay_ref_only")
    with pytest.raises(plots.PlotError, match="quantile"):
        plots.overlay_plot(t, ref, pred, (0.1, 0.9))


def _frame():
    n = 288 * 2
    t = pd.date_range("2024-01-01", periods=n, freq="5min", tz="UTC")
    g = 140 + 60 * np.sin(np.arange(n) / 30)
    f = pd.DataFrame(
        {
            "subject_id": ["a"] * n + ["b"] * n,
            "time": np.concatenate([t, t]),
            "glucose": np.concatenate([g, g - 50]),
        }
    )
    set_meta(f, DatasetMeta(timezone="Europe/Berlin"))
    return f


def test_agp_and_cvga_plots(tmp_path):
    f = _frame()
    _saved_png(plots.agp_plot(f), tmp_path, "agp")
    _saved_png(plots.agp_plot(glycemia.agp(f, bin_minutes=5)), tmp_path, "agp_table")
    table = glycemia.cvga(f)
    fig = plots.cvga_plot(table)
    texts = {t.get_text() for t in fig.axes[0].texts}
    assert {"A", "Lower B", "Upper D", "E"} <= texts and {"a", "b"} <= texts
    _saved_png(fig, tmp_path, "cvga")
    with pytest.raises(plots.PlotError):
        plots.cvga_plot(pd.DataFrame({"x": [1]}))


def test_horizon_metric_plot(tmp_path):
    rng = np.random.default_rng(1)
    target = rng.uniform(60, 250, (50, 6))
    res = {
        name: metrics.evaluate_forecast(target, target[..., None] + off, (0.5,))
        for name, off in (("good", 2.0), ("bad", 20.0))
    }
    fig = plots.horizon_metric_plot(res, "rmse")
    lines = fig.axes[0].get_lines()
    assert [ln.get_label() for ln in lines] == ["good", "bad"]
    assert np.allclose(lines[1].get_ydata(), 20.0)
    assert list(lines[0].get_xdata()) == [5, 10, 15, 20, 25, 30]
    _saved_png(plots.horizon_metric_plot(res, "clarke.A"), tmp_path, "hz")
    with pytest.raises(plots.PlotError, match="not in"):
        plots.horizon_metric_plot(res, "nope")


def test_html_report_is_self_contained(tmp_path, pairs):
    ref, pred = pairs
    rep = HtmlReport("Trial <MPC> & co")
    rep.add_heading("Cohort").add_text("TIR <b>rose</b>\n\nsecond paragraph")
    rep.add_table(pd.DataFrame({"tir": [71.234, np.nan]}, index=["a<1>", "b"]), "per patient")
    rep.add_table({"tir": 70.5, "nested": {"x": float("nan")}})
    rep.add_heading("Figures")
    rep.add_figure(plots.clarke_plot(ref, pred), "Clarke <grid>")
    rep.add_json({"rmse": np.float64("nan"), "n": np.int64(3)})
    path = rep.write(tmp_path / "out" / "report.html")
    page = path.read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>")
    assert "Trial &lt;MPC&gt; &amp; co" in page
    assert "&lt;b&gt;rose&lt;/b&gt;" in page and "<b>rose" not in page
    assert "a&lt;1&gt;" in page and "71.23" in page and "–" in page
    assert '"rmse": null' in page
    assert 'href="#cohort"' in page and 'href="#figures"' in page
    imgs = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(imgs) == 1 and base64.b64decode(imgs[0]).startswith(PNG_MAGIC)
    # nothing external: no http(s) links, scripts or stylesheets fetched
    assert not re.search(r"(src|href)=\"https?:", page) and "<script" not in page
    with pytest.raises(ReportError):
        rep.add_figure("not a figure")  # type: ignore[arg-type]
    with pytest.raises(ReportError):
        rep.add_heading("x", level=1)


def test_html_report_embeds_png_files(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    from forecast.htmlreport import HtmlReport, ReportError

    fig = Figure()
    fig.add_subplot().plot([1, 2, 3])
    png = tmp_path / "a.png"
    fig.savefig(png)
    rep = HtmlReport("t").add_image(png, "from a file")
    out = rep.write(tmp_path / "index.html").read_text()
    assert out.count("data:image/png;base64,") == 1 and "from a file" in out
    (tmp_path / "b.png").write_text("not a png")
    with pytest.raises(ReportError):
        rep.add_image(tmp_path / "b.png")
