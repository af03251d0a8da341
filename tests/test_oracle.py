"""The forecast ceilings (forecast.sim.oracle): the AR noise algebra, both oracles on a small
simulated cohort, and `glucast evaluate --model oracle-*` / `compare` with the ratios."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from forecast.schema import write_parquet
from forecast.sim import simulate_cohort
from forecast.sim.oracle import (
    FilterOracle,
    FilterSettings,
    NoiseStateOracle,
    OracleError,
    ar_mean_weights,
    ar_prediction_sd,
)
from forecast.sim.sensor import G6_NOISE, AR2Noise
from forecast.windows import WindowConfig, make_windows

WC = WindowConfig(past_slots=12, horizon_slots=12)


@pytest.fixture(scope="module")
def frame():
    # two patients, two days of excitation dosing with the G6 sensor (drift, compression, gaps)
    return simulate_cohort("adult#001,child#002", days=2, policy="excitation", seed=3)


@pytest.fixture(scope="module")
def windows(frame):
    return make_windows(frame, WC)


def _rmse(pred, target, h):
    e = pred[:, h - 1, 1] - target[:, h - 1]
    return float(np.sqrt(np.nanmean(e**2)))


def test_g6_floor_is_the_issue_s_7_67_and_7_94():
    sd = ar_prediction_sd(G6_NOISE, 12)
    assert sd[5] == pytest.approx(7.67, abs=0.005) and sd[11] == pytest.approx(7.94, abs=0.005)
    # far ahead the best prediction is the mean: the error is the noise itself
    assert ar_prediction_sd(G6_NOISE, 400)[-1] == pytest.approx(G6_NOISE.stationary_sd(), 1e-6)


@settings(max_examples=40, deadline=None)
@given(
    a1=st.floats(-1.5, 1.5),
    a2=st.floats(-0.9, 0.9),
    e0=st.floats(-20, 20),
    e1=st.floats(-20, 20),
)
def test_conditional_mean_is_the_noise_free_recursion(a1, a2, e0, e1):
    noise = AR2Noise("t", ((a1, a2, 1.0),))
    w = ar_mean_weights(noise, 8)
    cur, prev = e0, e1
    for h in range(8):
        cur, prev = a1 * cur + a2 * prev, cur
        assert w[h, 0] @ [e0, e1] == pytest.approx(cur, abs=1e-9 * (1 + abs(cur)))
    sd = ar_prediction_sd(noise, 8)
    assert sd[0] == pytest.approx(1.0) and (np.diff(sd) >= -1e-12).all()


def test_noise_state_oracle_reaches_the_floor(frame, windows):
    o = NoiseStateOracle(frame, (0.05, 0.5, 0.95))
    pred = o.predict_windows(windows)
    assert pred.shape == (len(windows), 12, 3)
    assert (np.diff(pred, axis=2) >= 0).all()
    # the error is the noise's future alone: near the analytic floor (a 2-day sample), and
    # far below what an off-by-one-slot signal would give
    r6, r12 = _rmse(pred, windows.target, 6), _rmse(pred, windows.target, 12)
    assert 0.8 * 7.67 < r6 < 1.2 * 7.67 and 0.8 * 7.94 < r12 < 1.2 * 7.94
    assert _rmse(pred, windows.target, 1) == pytest.approx(3.03, rel=0.2)


def test_noise_state_oracle_refuses_an_edited_or_unsimulated_frame(frame):
    edited = frame.copy()
    k = int(np.flatnonzero(np.isfinite(edited["glucose"].to_numpy()))[100])
    edited.loc[edited.index[k], "glucose"] += 5.0
    with pytest.raises(OracleError, match="does not match its re-simulation"):
        NoiseStateOracle(edited)
    plain = frame.copy()
    plain.attrs = {}
    with pytest.raises(OracleError, match="glucast simulate"):
        NoiseStateOracle(plain)
    with pytest.raises(OracleError, match="predict_windows"):
        NoiseStateOracle(frame).predict(np.zeros((1, 12, 10)), np.zeros((1, 12, 5)))


def test_filter_oracle_sits_between_the_floor_and_persistence(frame, windows):
    o = FilterOracle(frame, (0.05, 0.5, 0.95), FilterSettings(members=12, burn_in_days=0.5))
    pred = o.predict_windows(windows)
    assert pred.shape == (len(windows), 12, 3) and np.isfinite(pred).all()
    assert (np.diff(pred, axis=2) >= 0).all()
    last = windows.past[:, -1, 0][:, None]  # persistence: the last reading
    t = windows.target
    for h in (6, 12):
        persistence = float(np.sqrt(np.nanmean((last[:, 0] - t[:, h - 1]) ** 2)))
        r = _rmse(pred, t, h)
        assert 0.9 * ar_prediction_sd(G6_NOISE, h)[-1] < r < 0.8 * persistence, (h, r)
    inside = (t >= pred[:, :, 0]) & (t <= pred[:, :, 2])
    assert 0.7 < inside[np.isfinite(t)].mean() <= 1.0  # a 90 % interval, roughly


def test_evaluate_and_compare_report_the_ceilings(frame, tmp_path, monkeypatch, capsys):
    pytest.importorskip("mlflow")
    from forecast.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    (tmp_path / "c.yaml").write_text("data:\n  past_min: 60\n")
    path = str(write_parquet(frame, tmp_path / "f.parquet"))

    def run(argv):
        rc = main(argv + ["--json"])
        out, err = capsys.readouterr()
        assert rc == 0, err[-2000:]
        return json.loads(out)

    cfg = ["--config", str(tmp_path / "c.yaml")]
    noise = run(["evaluate", "--model", "oracle-noise", "--data", path, "--mlflow", "--experiment", "x", *cfg])  # fmt: skip
    assert noise["model"] == "oracle-noise"
    pers = run(["train", "--model", "persistence", "--data", path, "--experiment", "x", "--out", str(tmp_path / "p"), *cfg])  # fmt: skip
    assert pers["dataset_hash"] == noise["dataset_hash"]  # the same test windows
    ev = run(["evaluate", "--model", "persistence", "--data", path, "--ceiling", *cfg])
    ratio = ev["ceiling"]["ratio"]
    assert set(ratio) == {"oracle-noise", "oracle-filter"}
    r30 = ev["horizons"]["30"]["rmse"] / ev["ceiling"]["rmse"]["oracle-noise"]["30"]
    assert ratio["oracle-noise"]["30"] == pytest.approx(r30, abs=1e-3) and r30 > 1
    cmp = run(["compare", "--experiment", "x"])
    (group,) = cmp["groups"]
    by_model = {r["model"]: r for r in group["runs"]}
    assert set(by_model) == {"oracle-noise", "persistence"}
    p30 = by_model["persistence"]["ceiling_ratio"]["oracle-noise"]["30"]
    assert p30 == pytest.approx(
        by_model["persistence"]["rmse_by_horizon"]["30"] / noise["horizons"]["30"]["rmse"], 1e-2
    )
