"""A self-contained HTML report: headings, text, tables, figures, JSON — one file, no network.

Figures are rendered to PNG and embedded as base64 ``data:`` URIs, the style sheet is inline,
and nothing is fetched from anywhere, so the page can be mailed, archived as an MLflow
artifact or opened offline. Links (`add_links`) are plain anchors to other pages (a trial's
own report beside this one, a run in the MLflow UI): followed when clicked, never loaded with
the page. All text is HTML-escaped.

    report = HtmlReport("Trial: MPC vs basal-bolus")
    report.add_heading("Cohort")
    report.add_table(cohort_df)
    report.add_figure(plots.cvga_plot(table), "CVGA, one point per patient")
    report.write("report/index.html")
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from forecast.metrics import json_safe
from forecast.schema import GlucastError

_CSS = """
:root { --fg:#1f2328; --muted:#59636e; --line:#d1d9e0; --bg:#ffffff; --accent:#0d47a1;
        --stripe:#f6f8fa; }
* { box-sizing: border-box; }
body { margin: 0; background: var(--bg); color: var(--fg);
       font: 15px/1.55 -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
main { max-width: 1100px; margin: 0 auto; padding: 2rem 1.5rem 4rem; }
header { border-bottom: 2px solid var(--accent); margin-bottom: 1.5rem; }
header h1 { margin: 0 0 .25rem; font-size: 1.8rem; }
header p { margin: 0 0 .8rem; color: var(--muted); font-size: .85rem; }
h2 { margin-top: 2.2rem; padding-bottom: .3rem; border-bottom: 1px solid var(--line); }
h3, h4 { margin-top: 1.6rem; }
nav { background: var(--stripe); border: 1px solid var(--line); border-radius: 6px;
      padding: .6rem 1rem; margin-bottom: 1.5rem; font-size: .9rem; }
nav a { color: var(--accent); text-decoration: none; margin-right: 1.2rem; }
p.text { margin: .6rem 0; white-space: pre-wrap; }
ul.links { margin: .6rem 0; padding-left: 1.4rem; }
ul.links a, p.text a { color: var(--accent); }
.table-wrap { overflow-x: auto; margin: 1rem 0; }
table { border-collapse: collapse; font-size: .85rem; font-variant-numeric: tabular-nums; }
th, td { border: 1px solid var(--line); padding: .3rem .6rem; text-align: right; }
th { background: var(--stripe); font-weight: 600; }
td:first-child, th:first-child { text-align: left; }
tbody tr:nth-child(even) { background: var(--stripe); }
figure { margin: 1.2rem 0; text-align: center; }
figure img { max-width: 100%; height: auto; border: 1px solid var(--line); border-radius: 4px; }
.grid { display: grid; gap: 0 1rem; grid-template-columns: repeat(var(--cols), 1fr); }
figcaption, .caption { color: var(--muted); font-size: .85rem; margin-top: .4rem; }
pre { background: var(--stripe); border: 1px solid var(--line); border-radius: 6px;
      padding: .8rem 1rem; overflow-x: auto; font-size: .8rem; }
footer { margin-top: 3rem; color: var(--muted); font-size: .8rem; }
"""


class ReportError(GlucastError, ValueError):
    """Something handed to the report cannot be rendered."""


def _slug(text: str, taken: set[str]) -> str:
    base = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "section"
    slug, i = base, 2
    while slug in taken:
        slug, i = f"{base}-{i}", i + 1
    taken.add(slug)
    return slug


class HtmlReport:
    """Builder of one self-contained HTML page. Methods return self, so calls chain."""

    def __init__(self, title: str, *, subtitle: str | None = None, toc: bool = True) -> None:
        self.title = str(title)
        self.subtitle = subtitle
        self.toc = toc
        self._parts: list[str] = []
        self._sections: list[tuple[str, str]] = []
        self._slugs: set[str] = set()
        self.n_figures = 0

    # ------------------------------------------------------------------ content

    def add_heading(self, text: str, level: int = 2) -> HtmlReport:
        """A section heading (level 2 headings are listed in the table of contents)."""
        if level not in (2, 3, 4):
            raise ReportError(f"heading level must be 2, 3 or 4 (1 is the title), got {level}")
        slug = _slug(str(text), self._slugs)
        if level == 2:
            self._sections.append((slug, str(text)))
        self._parts.append(f'<h{level} id="{slug}">{html.escape(str(text))}</h{level}>')
        return self

    def add_text(self, text: str) -> HtmlReport:
        """A paragraph of plain text (escaped; blank lines start new paragraphs)."""
        for para in re.split(r"\n\s*\n", str(text).strip()):
            if para:
                self._parts.append(f'<p class="text">{html.escape(para)}</p>')
        return self

    def add_link(self, href: str, text: str, note: str | None = None) -> HtmlReport:
        """One link as a paragraph (see `add_links`)."""
        return self.add_links([(text, href, note)])

    def add_links(self, links: list[tuple[str, str, str | None]]) -> HtmlReport:
        """A list of links: (text, href, note or None). `href` is a path relative to the page
        (e.g. ``trial-mpc/index.html``), an in-page ``#anchor`` or an http(s) URL; anything
        else (``javascript:``, ``file:``) is refused."""
        items = []
        for text, href, note in links:
            href = str(href)
            scheme = re.match(r"^([a-zA-Z][a-zA-Z0-9+.-]*):", href)
            if scheme and scheme.group(1).lower() not in ("http", "https"):
                raise ReportError(f"link {href!r}: only relative paths and http(s) URLs")
            tail = f" — {html.escape(note)}" if note else ""
            items.append(
                f'<li><a href="{html.escape(href, quote=True)}">{html.escape(str(text))}</a>'
                f"{tail}</li>"
            )
        if items:
            self._parts.append(f'<ul class="links">{"".join(items)}</ul>')
        return self

    def add_table(
        self,
        table: pd.DataFrame | Mapping[str, Any],
        caption: str | None = None,
        *,
        float_format: str = "{:.2f}",
        index: bool = True,
        max_rows: int | None = 500,
        integers: tuple[str, ...] | list[str] = (),
    ) -> HtmlReport:
        """A table from a DataFrame (or a flat mapping, shown as key/value rows); escaped.

        Floats are written with `float_format`, integers as integers, NaN/None as an en
        dash. `integers` names the columns (rows, for a mapping) that hold counts, so a count
        stored as a float (30.0 in JSON) prints as 30. The index name, if any, heads the index
        column (no extra header row). Tables longer than `max_rows` are cut, and the caption
        says so.
        """
        as_int_rows: set[str] = set()
        if isinstance(table, Mapping):
            as_int_rows = {str(k) for k in integers}
            table = pd.DataFrame(
                {
                    "value": [
                        v if not isinstance(v, Mapping) else json.dumps(json_safe(v))
                        for v in table.values()
                    ]
                },
                index=pd.Index([str(k) for k in table], name="metric"),
                dtype=object,
            )
        if not isinstance(table, pd.DataFrame):
            raise ReportError(
                f"add_table takes a DataFrame or a mapping, got {type(table).__name__}"
            )
        note = ""
        if max_rows is not None and len(table) > max_rows:
            note = f" (first {max_rows} of {len(table)} rows)"
            table = table.head(max_rows)
        as_int_cols = {str(c) for c in integers} if not as_int_rows else set()

        def fmt(v: Any, as_int: bool) -> str:
            if v is None or v is pd.NA or (isinstance(v, float | np.floating) and v != v):
                return "–"
            if isinstance(v, bool | np.bool_):
                return str(bool(v))
            if isinstance(v, int | np.integer):
                return str(int(v))
            if isinstance(v, float | np.floating):
                if as_int and float(v).is_integer():
                    return str(int(v))
                try:
                    return float_format.format(v)
                except (ValueError, TypeError):
                    return str(v)
            return str(v)

        if isinstance(table.columns, pd.MultiIndex) or isinstance(table.index, pd.MultiIndex):
            raise ReportError("add_table takes flat tables (no MultiIndex rows or columns)")
        corner = table.index.name or table.columns.name or ""
        cells = pd.DataFrame(
            [
                [
                    fmt(v, str(c) in as_int_cols or str(r) in as_int_rows)
                    for c, v in zip(table.columns, row, strict=True)
                ]
                for r, row in zip(table.index, table.itertuples(index=False), strict=True)
            ],
            index=pd.Index([str(i) for i in table.index]),
            columns=[str(c) for c in table.columns],
            dtype=object,
        )
        body = cells.to_html(escape=True, index=index, border=0, classes=None)
        if index and corner:  # the index name goes in the corner cell, not a row of its own
            body = body.replace("<th></th>", f"<th>{html.escape(str(corner))}</th>", 1)
        cap = ""
        if caption or note:
            cap = f'<div class="caption">{html.escape((caption or "") + note)}</div>'
        self._parts.append(f'<div class="table-wrap">{body}{cap}</div>')
        return self

    def add_figure(
        self, fig: Figure, caption: str | None = None, *, dpi: int = 110, close: bool = True
    ) -> HtmlReport:
        """A matplotlib Figure, rendered to PNG and embedded (base64) in the page.

        With `close` (default) a figure that pyplot tracks is closed afterwards, so long
        reports do not pile figures up in memory.
        """
        if not isinstance(fig, Figure):
            raise ReportError(
                f"add_figure takes a matplotlib Figure, got {type(fig).__name__}; the "
                "forecast.plots functions return one"
            )
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
        if close:
            import sys

            plt = sys.modules.get("matplotlib.pyplot")
            if plt is not None:
                plt.close(fig)
        return self._embed_png(buf.getvalue(), caption)

    def add_image(self, png: str | Path | bytes, caption: str | None = None) -> HtmlReport:
        """A PNG file (or its bytes) another step wrote, embedded like a figure."""
        return self._embed_png(self._png_bytes(png), caption)

    def add_image_grid(
        self, images: list[tuple[str | Path | bytes, str | None]], columns: int = 2
    ) -> HtmlReport:
        """PNG files (or bytes) with captions side by side, `columns` to a row."""
        if columns < 1:
            raise ReportError(f"an image grid needs at least one column, got {columns}")
        figures = [self._figure(self._png_bytes(png), caption) for png, caption in images]
        if figures:
            self._parts.append(
                f'<div class="grid" style="--cols:{int(columns)}">{"".join(figures)}</div>'
            )
        return self

    @staticmethod
    def _png_bytes(png: str | Path | bytes) -> bytes:
        data = png if isinstance(png, bytes) else Path(png).read_bytes()
        if not data.startswith(b"\x89PNG"):
            raise ReportError(f"add_image takes PNG images; {png!s:.80} is not one")
        return data

    def _figure(self, png: bytes, caption: str | None) -> str:
        data = base64.b64encode(png).decode("ascii")
        self.n_figures += 1
        alt = html.escape(caption or f"figure {self.n_figures}", quote=True)
        cap = f"<figcaption>{html.escape(caption)}</figcaption>" if caption else ""
        return f'<figure><img alt="{alt}" src="data:image/png;base64,{data}">{cap}</figure>'

    def _embed_png(self, png: bytes, caption: str | None) -> HtmlReport:
        self._parts.append(self._figure(png, caption))
        return self

    def add_json(self, obj: Any, caption: str | None = None) -> HtmlReport:
        """A JSON dump of `obj` (NaN written as null), escaped, in a <pre> block."""
        text = json.dumps(json_safe(obj), indent=2, default=str, allow_nan=False)
        cap = f'<div class="caption">{html.escape(caption)}</div>' if caption else ""
        self._parts.append(f"<pre>{html.escape(text, quote=False)}</pre>{cap}")
        return self

    # ------------------------------------------------------------------ output

    def to_html(self) -> str:
        """The whole page as a string."""
        title = html.escape(self.title)
        stamp = _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
        sub = html.escape(self.subtitle) + " · " if self.subtitle else ""
        nav = ""
        if self.toc and len(self._sections) > 1:
            links = "".join(f'<a href="#{s}">{html.escape(t)}</a>' for s, t in self._sections)
            nav = f"<nav>{links}</nav>"
        body = "\n".join(self._parts)
        return (
            "<!DOCTYPE html>\n"
            '<html lang="en"><head><meta charset="utf-8">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{title}</title><style>{_CSS}</style></head>\n"
            f"<body><main><header><h1>{title}</h1><p>{sub}generated {stamp} by glucast"
            "</p></header>\n"
            f"{nav}\n{body}\n"
            "<footer>glucast — research software, not a medical device.</footer>"
            "</main></body></html>\n"
        )

    def write(self, path: str | Path) -> Path:
        """Write the page (UTF-8) to `path`, creating parent folders; return the path."""
        path = Path(path)
        if path.exists() and path.is_dir():
            path = path / "index.html"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_html(), encoding="utf-8")
        return path


__all__ = ["HtmlReport", "ReportError"]
