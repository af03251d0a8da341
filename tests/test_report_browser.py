"""The demo report in a real browser: headless Chromium loads it from a local HTTP server,
and a checker page (same origin) reads what the browser made of it — every image decoded
with a size, every relative link fetched with status 200. Skipped, saying why, where
Chromium is not installed (Debian: `apt-get install chromium`)."""

from __future__ import annotations

import functools
import http.server
import json
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import pytest
from test_report import write_demo_outputs

CHROMIUM = next(
    (p for p in (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")) if p),
    None,
)
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="headless Chromium not installed (apt-get install chromium)"
)

# Runs in the browser: load the report in an iframe of the same origin, then record what it
# got. Images: decoded (complete, natural size > 0). Relative links: fetched, status kept.
CHECKER = """<!DOCTYPE html><html><body><pre id="result">pending</pre>
<iframe id="f" src="%s" style="width:1200px;height:800px"></iframe>
<script>
document.getElementById('f').addEventListener('load', async () => {
  const doc = document.getElementById('f').contentDocument;
  const imgs = [...doc.images].map(i => ({alt: i.alt, ok: i.complete && i.naturalWidth > 0}));
  const links = [...doc.querySelectorAll('a[href]')].map(a => a.getAttribute('href'));
  const relative = links.filter(h => !/^[a-z]+:/i.test(h) && !h.startsWith('#'));
  const fetched = [];
  for (const h of relative) {
    const url = new URL(h, doc.baseURI).href;
    try { const r = await fetch(url); fetched.push({href: h, status: r.status}); }
    catch (e) { fetched.push({href: h, status: String(e)}); }
  }
  const anchors = links.filter(h => h.startsWith('#')).map(h => ({href: h,
    ok: doc.getElementById(decodeURIComponent(h.slice(1))) !== null}));
  document.getElementById('result').textContent = JSON.stringify(
    {title: doc.title, imgs, links, fetched, anchors});
});
</script></body></html>"""


def _serve(root: Path) -> tuple[http.server.ThreadingHTTPServer, int]:
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):  # keep pytest's output for failures
            pass

    handler = functools.partial(Quiet, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, server.server_address[1]


def render(root: Path, page: str) -> dict:
    """What headless Chromium saw of `page` (a path under `root`)."""
    (root / "_check.html").write_text(CHECKER % page)
    server, port = _serve(root)
    try:
        with tempfile.TemporaryDirectory() as profile:
            res = subprocess.run(
                [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
                 "--virtual-time-budget=20000", "--dump-dom",
                 f"http://127.0.0.1:{port}/_check.html"],
                capture_output=True, text=True, timeout=120,
            )  # fmt: skip
    finally:
        server.shutdown()
    assert res.returncode == 0, res.stderr[-2000:]
    start = res.stdout.index('<pre id="result">') + len('<pre id="result">')
    text = res.stdout[start : res.stdout.index("</pre>", start)]
    assert text != "pending", "the checker never saw the report load"
    import html

    return json.loads(html.unescape(text))


def test_demo_report_in_chromium_images_load_and_links_resolve(tmp_path):
    write_demo_outputs(tmp_path)
    seen = render(tmp_path, "index.html")
    assert seen["title"] == "glucast demo"
    assert len(seen["imgs"]) >= 6 and all(i["ok"] for i in seen["imgs"]), seen["imgs"]
    assert seen["fetched"], "no relative links (the trial reports) in the demo report"
    assert all(f["status"] == 200 for f in seen["fetched"]), seen["fetched"]
    assert all(a["ok"] for a in seen["anchors"]) and seen["anchors"]  # table of contents
    mlflow = [h for h in seen["links"] if h.startswith("http")]
    assert any("/#/experiments/7?" in h for h in mlflow)
    # and the trial report it links to renders with its own images
    trial = render(tmp_path, "trial-basal-bolus/index.html")
    assert trial["imgs"] and all(i["ok"] for i in trial["imgs"])


def test_a_broken_image_or_link_is_seen(tmp_path):
    """The check can fail: a missing linked page and an undecodable image are reported."""
    (tmp_path / "index.html").write_text(
        '<html><head><title>x</title></head><body><img alt="bad" src="data:image/png;base64,'
        'iVBORw0KGgo="><a href="missing/index.html">gone</a></body></html>'
    )
    seen = render(tmp_path, "index.html")
    assert seen["imgs"] == [{"alt": "bad", "ok": False}]
    assert seen["fetched"] == [{"href": "missing/index.html", "status": 404}]
