"""GluPredKit's own models on glucast's windows: its isolated environment and the adapter.

GluPredKit (MIT, https://github.com/miriamkw/GluPredKit) is installed, pinned, into its own
venv — by default ``~/.cache/glucast/peers/glupredkit``, or ``$GLUCAST_PEERS_DIR/glupredkit``
— so its dependencies (pandas, scikit-learn, pyloopkit... at whatever versions it resolves)
never meet glucast's. `install` creates it; `run_models` drives GluPredKit's model classes
in a subprocess with that venv's python (``glupredkit_driver.py``, shipped beside this file),
exchanging numpy ``.npz`` and JSON files in a temporary directory (no pickles).

What the adapter gives the peer, and why (GluPredKit's source, version 1.0.32):

- **training**: glucast's training split *frame* (the same days glucast's models train on)
  on the full 5-minute grid, as GluPredKit's raw frame: ``id`` (the subject as a number,
  which is how GluPredKit's parsers and models identify people; the ridge model keeps one
  model per id and cannot predict an id it did not see), ``CGM`` (NaN where no reading),
  ``carbs``, ``bolus`` (U per slot) and ``basal`` (U/h, what its Loop model expects).
  GluPredKit's own ``basic`` preprocessor then interpolates CGM (and the inputs) linearly
  and builds its targets from the interpolated series, and each model's ``process_data``
  adds its lagged and what-if columns — the peer trains exactly as it would by itself;
- **scoring**: one row per glucast *test window*, nothing else: the current value and
  ``L - 1`` lags of each feature from the window's past (the same 2 hours glucast's models
  see), the future inputs as its what-if columns, and CGM gaps inside the past filled by
  linear interpolation between the window's own past readings (GluPredKit interpolates
  before predicting; inside the past so no future reading leaks in). Predictions are scored
  by forecast.metrics against the windows' real readings only, like every glucast model.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from forecast.schema import GlucastError

VERSION = "1.0.32"
#: What `install` puts in the peer's venv: GluPredKit itself, the PyLoopKit its Loop model
#: imports (GluPredKit's "heavy" extra pins exactly this one; the rest of that extra —
#: tensorflow 2.14, torch, py_replay_bg — is for its deep and UVA/Padova models, not
#: installed), and pandas 1.x: GluPredKit does not bound pandas, and with the pandas 3 that
#: pip resolves its Loop model's fit fails (``np.mean(DataFrame)[0]``: IndexError, invalid
#: index to scalar variable), code written against pandas 1.
REQUIREMENTS = (f"glupredkit=={VERSION}", "opsb-pyloopkit==0.1.0", "pandas==1.5.3")
DRIVER = Path(__file__).with_name("glupredkit_driver.py")

#: GluPredKit model modules the adapter knows, with the positional fit arguments glucast
#: passes (its CLI's options). Loop's grid search over ISF/CR factors samples
#: `n_cross_val_samples` rows per subject (its default, 1000, takes hours on real data).
MODELS: dict[str, str] = {
    "zero_order": "zero-order hold: the last reading held",
    "ridge": "ridge regression, alpha by 5-fold grid search, one model per subject id",
    "random_forest": "random forest (300 trees, min_samples_split 80) by 5-fold grid search",
    "loop": "Tidepool Loop's prediction (PyLoopKit), ISF/CR fitted by grid search",
    "svr": "support vector regression",
    "naive_linear_regressor": "a linear trend of the last readings",
}
NUM_FEATURES = ("CGM", "carbs", "bolus", "basal")
WHAT_IF_FEATURES = ("carbs", "bolus", "basal")


class PeerError(GlucastError, RuntimeError):
    """GluPredKit's environment is missing or broken, or its driver failed as a whole."""


# --------------------------------------------------------------------------- environment


def peers_dir() -> Path:
    """Where peers' environments live: ``$GLUCAST_PEERS_DIR`` or ``~/.cache/glucast/peers``."""
    env = os.environ.get("GLUCAST_PEERS_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "glucast" / "peers"


def env_dir() -> Path:
    return peers_dir() / "glupredkit"


def env_python() -> Path:
    return env_dir() / "bin" / "python"


def installed_version(python: Path | None = None) -> str | None:
    """GluPredKit's version in its venv, or None when the venv or the package is absent."""
    py = python or env_python()
    if not py.exists():
        return None
    r = subprocess.run(
        [str(py), "-c", "from importlib.metadata import version; print(version('glupredkit'))"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    return r.stdout.strip() if r.returncode == 0 else None


def unavailable_reason() -> str | None:
    """Why GluPredKit cannot run here (None when its pinned version is installed)."""
    have = installed_version()
    if have is None:
        return (
            f"GluPredKit is not installed in {env_dir()} "
            "(create it with `glucast peers install glupredkit`; needs the package index once)"
        )
    if have != VERSION:
        return f"{env_dir()} holds glupredkit {have}, not the pinned {VERSION}; reinstall it"
    return None


def install(*, python: str | None = None, progress: Callable[[str], None] | None = None) -> dict:
    """Create the peer's venv and install the pinned requirements (idempotent)."""
    say = progress or (lambda m: print(f"[glucast] {m}", file=sys.stderr, flush=True))
    target = env_dir()
    if installed_version() == VERSION:
        return {"env": str(target), "version": VERSION, "created": False}
    base = python or sys.executable
    say(f"creating {target} with {base}")
    target.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([base, "-m", "venv", "--clear", str(target)], check=True)
    say(f"installing {' '.join(REQUIREMENTS)} (a few minutes)")
    r = subprocess.run(
        [str(env_python()), "-m", "pip", "install", "--quiet", *REQUIREMENTS],
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        raise PeerError(f"pip could not install {REQUIREMENTS} into {target}:\n{r.stderr[-3000:]}")
    have = installed_version()
    if have != VERSION:
        raise PeerError(f"after installing, {target} reports glupredkit {have}, not {VERSION}")
    return {"env": str(target), "version": VERSION, "created": True}


# --------------------------------------------------------------------------- adapter


def subject_codes(subjects: Sequence[str]) -> dict[str, int]:
    """glucast subject ids -> the numbers GluPredKit identifies people by (1, 2, ... sorted)."""
    return {s: i + 1 for i, s in enumerate(sorted({str(s) for s in subjects}))}


def _grid(frame: pd.DataFrame, codes: dict[str, int]) -> dict[str, np.ndarray]:
    """Each subject's rows on its full 5-minute grid (missing rows: NaN, the peer interpolates)."""
    parts = []
    for sid, g in frame.groupby("subject_id", observed=True, sort=True):
        g = g.set_index("time").sort_index()
        full = pd.date_range(g.index[0], g.index[-1], freq="5min")
        g = g.reindex(full)
        # Insulin and carbs of a row that exists are known (NaN carbs = a meal of unknown
        # size, an input of 0 g as in forecast.windows); rows that do not exist stay NaN.
        present = g["glucose"].notna() | g["bolus_u"].notna() | g["basal_u"].notna()
        out = pd.DataFrame(
            {
                "time_ns": full.asi8,
                "id": codes[str(sid)],
                "CGM": g["glucose"].to_numpy(float),
                "carbs": np.where(present, g["carbs_g"].fillna(0.0), np.nan),
                "bolus": np.where(present, g["bolus_u"].fillna(0.0), np.nan),
                "basal": np.where(present, g["basal_u"].fillna(0.0) * 12.0, np.nan),  # U/h
            }
        )
        parts.append(out)
    df = pd.concat(parts, ignore_index=True)
    return {c: df[c].to_numpy() for c in df.columns}


def interpolate_past(glucose: np.ndarray, observed: np.ndarray) -> np.ndarray:
    """Past CGM with gaps filled linearly between the window's own real readings.

    Before the first real reading of a window the first reading is held (there is nothing to
    interpolate from inside the past); after the last one (the origin always has one) nothing
    is filled. Rows without any real reading are returned unchanged.
    """
    g = np.array(glucose, dtype=np.float64, copy=True)
    obs = np.asarray(observed) > 0.5
    x = np.arange(g.shape[1])
    for i in np.flatnonzero(~obs.all(axis=1) & obs.any(axis=1)):
        m = obs[i]
        g[i] = np.interp(x, x[m], g[i, m])
    return g


def build_request(
    train_frame: pd.DataFrame,
    test_windows: Any,
    models: Sequence[str],
    *,
    subjects: Sequence[str] | None = None,
    max_train_rows: int | dict[str, int] | None = None,
    loop_samples: int = 100,
) -> tuple[dict[str, Any], dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(request.json, train.npz, test.npz) contents for the driver.

    `max_train_rows` caps the peer's training rows for every model (an int) or per model
    (``{"random_forest": 3000}``: the others fit on all their rows) — its random forest
    repeats a 300-tree fit per output and per grid-search fold, hours on AZT1D."""
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        raise PeerError(f"unknown GluPredKit model(s) {unknown}; the adapter knows {list(MODELS)}")
    per_model = None
    if isinstance(max_train_rows, dict):
        bad = [m for m in max_train_rows if m not in MODELS]
        if bad:
            raise PeerError(f"max_train_rows names unknown GluPredKit model(s) {bad}")
        per_model = {m: int(n) for m, n in max_train_rows.items() if n}
    cfg = test_windows.config
    codes = subject_codes(
        subjects
        if subjects is not None
        else list(train_frame["subject_id"].astype(str)) + list(test_windows.subject_id)
    )
    train = _grid(train_frame, codes)
    past, fut = test_windows.past, test_windows.future
    glucose = interpolate_past(
        past[..., cfg.past_index("glucose")], past[..., cfg.past_index("observed")]
    )
    test = {
        "time_ns": test_windows.origin.astype("datetime64[ns]").astype(np.int64),
        "id": np.array([codes[str(s)] for s in test_windows.subject_id], dtype=np.int64),
        "past_CGM": glucose,
        "past_carbs": past[..., cfg.past_index("carbs_g")].astype(np.float64),
        "past_bolus": past[..., cfg.past_index("bolus_u")].astype(np.float64),
        "past_basal": past[..., cfg.past_index("basal_u")].astype(np.float64) * 12.0,
        "future_carbs": fut[..., cfg.future_index("carbs_g")].astype(np.float64),
        "future_bolus": fut[..., cfg.future_index("bolus_u")].astype(np.float64),
        "future_basal": fut[..., cfg.future_index("basal_u")].astype(np.float64) * 12.0,
    }
    request = {
        "glupredkit_version": VERSION,
        "prediction_horizon": cfg.horizon_slots * cfg.slot_minutes,
        "num_lagged_features": cfg.past_slots - 1,
        "num_features": list(NUM_FEATURES),
        "what_if_features": list(WHAT_IF_FEATURES),
        "models": [
            {"name": m, "fit_args": [int(loop_samples)] if m == "loop" else []}
            | ({"max_train_rows": per_model.get(m)} if per_model is not None else {})
            for m in models
        ],
        "max_train_rows": int(max_train_rows) if isinstance(max_train_rows, int) else None,
        "subject_codes": codes,
    }
    return request, train, test


def write_request(
    work: Path, request: dict[str, Any], train: dict[str, np.ndarray], test: dict[str, np.ndarray]
) -> None:
    work.mkdir(parents=True, exist_ok=True)
    (work / "request.json").write_text(json.dumps(request, indent=1, sort_keys=True))
    np.savez_compressed(work / "train.npz", **train)
    np.savez_compressed(work / "test.npz", **test)


def read_response(work: Path, n: int, horizon_slots: int) -> tuple[dict[str, np.ndarray], dict]:
    """Predictions per model ``[n, H]`` and the driver's per-model report; checks shapes."""
    path = work / "response.json"
    if not path.exists():
        raise PeerError(f"the GluPredKit driver wrote no {path}")
    resp = json.loads(path.read_text())
    preds: dict[str, np.ndarray] = {}
    with np.load(work / "response.npz", allow_pickle=False) as z:
        for name, info in resp["models"].items():
            if info.get("status") != "ok":
                continue
            p = z[f"pred_{name}"]
            if p.shape != (n, horizon_slots):
                info["status"] = "failed"
                info["error"] = f"predictions of shape {p.shape}, expected {(n, horizon_slots)}"
                continue
            preds[name] = p
    return preds, resp


def run_driver(work: Path, *, python: Path | None = None, timeout: float | None = None) -> float:
    """Run the driver on the request in `work` with the peer's python; seconds taken."""
    py = python or env_python()
    if not py.exists():
        raise PeerError(unavailable_reason() or f"no python at {py}")
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": env.get("OMP_NUM_THREADS", "1"), "MPLBACKEND": "Agg",
                "WANDB_MODE": "disabled"})  # fmt: skip
    t0 = time.perf_counter()
    r = subprocess.run(
        # -I: isolated, so neither glucast's directory (where this module, also named
        # glupredkit, lives) nor PYTHON* variables reach the peer's interpreter.
        [str(py), "-I", str(DRIVER), str(work)], stderr=subprocess.PIPE, text=True, env=env,
        timeout=timeout, stdout=subprocess.DEVNULL,
    )  # fmt: skip
    if r.returncode != 0:
        raise PeerError(f"the GluPredKit driver exited {r.returncode}:\n{r.stderr[-3000:]}")
    return time.perf_counter() - t0


def run_models(
    train_frame: pd.DataFrame,
    test_windows: Any,
    models: Sequence[str],
    *,
    subjects: Sequence[str] | None = None,
    max_train_rows: int | dict[str, int] | None = None,
    loop_samples: int = 100,
    timeout: float | None = None,
    keep: Path | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Fit GluPredKit's `models` on `train_frame` and predict every test window.

    Returns ``({model: pred [N, H]}, report)``; a model that failed is absent from the
    predictions and its report entry says why. `keep` writes the exchange files there
    (for recording a fixture) instead of a temporary directory.
    """
    request, train, test = build_request(
        train_frame, test_windows, models, subjects=subjects,
        max_train_rows=max_train_rows, loop_samples=loop_samples,
    )  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="glucast-glupredkit-") as tmp:
        work = Path(keep) if keep else Path(tmp)
        write_request(work, request, train, test)
        seconds = run_driver(work, timeout=timeout)
        preds, resp = read_response(work, len(test_windows), test_windows.config.horizon_slots)
    resp["seconds"] = seconds
    return preds, resp


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m training.peers.glupredkit install|status`` until `glucast peers` has it."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m training.peers.glupredkit")
    p.add_argument("action", choices=("install", "status"))
    args = p.parse_args(argv)
    if args.action == "install":
        print(json.dumps(install()))
        return 0
    reason = unavailable_reason()
    print(json.dumps({"env": str(env_dir()), "version": VERSION, "ready": reason is None,
                      "reason": reason}))  # fmt: skip
    return 0 if reason is None else 1


if __name__ == "__main__":
    sys.exit(main())
