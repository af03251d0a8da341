"""Record the GluPredKit adapter fixture: a request built from the ShanghaiT1DM test fixture
and the real peer's response (tests/fixtures/peers/glupredkit/).

    python benchmarks/record_glupredkit_fixture.py   # needs `python -m training.peers.glupredkit install`

The request is the training split's frame of tests/fixtures/shanghai and every 8th test
window; tests/test_benchmark.py rebuilds the request from the same fixture and checks it is
identical, checks the recorded predictions against glucast's own numbers, and (where the
peer's venv exists) replays the request through the real peer.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

OUT = ROOT / "tests" / "fixtures" / "peers" / "glupredkit"
MODELS = ("zero_order", "ridge")
LOOP_SAMPLES = 10
EVERY = 8


def fixture_inputs():
    """(train frame, test windows) the fixture is made of; the tests call this too."""
    import forecast.io as fio
    from training.config import TrainConfig
    from training.splits import build_splits

    frame, _ = fio.read([ROOT / "tests" / "fixtures" / "shanghai"], "shanghai")
    cfg = TrainConfig()
    splits = build_splits(frame, cfg.data, cfg.window_config(frame))
    test = splits.windows["test"]
    return splits.frames["train"], test.subset(slice(0, len(test), EVERY))


def main() -> int:
    from training.peers import glupredkit as gpk

    train, test = fixture_inputs()
    request, tr, te = gpk.build_request(train, test, MODELS, loop_samples=LOOP_SAMPLES)
    if OUT.exists():
        shutil.rmtree(OUT)
    gpk.write_request(OUT, request, tr, te)
    seconds = gpk.run_driver(OUT)
    for junk in ("data",):  # GluPredKit's configuration file, written by the driver
        shutil.rmtree(OUT / junk, ignore_errors=True)
    preds, resp = gpk.read_response(OUT, len(test), test.config.horizon_slots)
    print(f"recorded {sorted(preds)} in {seconds:.0f} s -> {OUT}")
    for name, info in resp["models"].items():
        print(name, info.get("status"), info.get("error", ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
