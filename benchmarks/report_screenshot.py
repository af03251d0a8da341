"""Render a glucast HTML report in headless Chromium and save a screenshot.

Proves the demo's report opens in a real browser with its plots (issue 7). Not a test: it
needs Debian's `chromium` (apt-get install chromium), which CI does not install.

    python benchmarks/report_screenshot.py reports/demo/index.html --out docs/demo_report.png
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
]


def screenshot(page: Path, out: Path, width: int = 1280, height: int = 4000) -> dict:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        raise SystemExit("chromium not found: apt-get install chromium")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as profile:
        t0 = time.perf_counter()
        res = subprocess.run(
            [
                browser,
                *FLAGS,
                f"--user-data-dir={profile}",
                f"--window-size={width},{height}",
                f"--screenshot={out.resolve()}",
                page.resolve().as_uri(),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        seconds = time.perf_counter() - t0
    if res.returncode != 0 or not out.exists():
        raise SystemExit(f"chromium failed ({res.returncode}): {res.stderr[-2000:]}")
    html = page.read_text()
    return {
        "page": str(page),
        "screenshot": str(out),
        "bytes": out.stat().st_size,
        "embedded_images": html.count("data:image/png;base64,"),
        "render_s": round(seconds, 2),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("page", type=Path, nargs="?", default=Path("reports/demo/index.html"))
    ap.add_argument("--out", type=Path, default=Path("reports/demo/screenshot.png"))
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    info = screenshot(args.page, args.out)
    if args.json:
        print(json.dumps(info))
    else:
        for k, v in info.items():
            print(f"{k:>16}  {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
