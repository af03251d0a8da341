"""glucast benchmark (training/benchmark.py) and the GluPredKit adapter (training/peers/).

The adapter is checked against a recorded request/response of the real peer
(tests/fixtures/peers/glupredkit/, made by benchmarks/record_glupredkit_fixture.py from the
ShanghaiT1DM fixture); the live replay needs GluPredKit's venv and skips without it.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from training import benchmark as bm
from training.peers import glupredkit as gpk

ROOT = Path(__file__).resolve().parents[1]
FIX = ROOT / "tests" / "fixtures" / "peers" / "glupredkit"


def _recorder():
    spec = importlib.util.spec_from_file_location(
        "record_glupredkit_fixture", ROOT / "benchmarks" / "record_glupredkit_fixture.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def recorded():
    rec = _recorder()
    train, test = rec.fixture_inputs()
    return rec, train, test


# --------------------------------------------------------------------------- units


@settings(max_examples=60, deadline=None)
@given(st.lists(st.text("abcdefgh#0123", min_size=1, max_size=6), min_size=3, max_size=40))
def test_held_out_subjects_fixed_and_leave_two_to_train(ids):
    import pandas as pd

    frame = pd.DataFrame({"subject_id": ids})
    uniq = set(ids)
    if len(uniq) < 3:
        with pytest.raises(bm.BenchmarkError, match="at least 3 subjects"):
            bm.held_out_subjects(frame)
        return
    held = bm.held_out_subjects(frame)
    assert held == bm.held_out_subjects(frame.sample(frac=1, random_state=1))  # order-free
    assert 1 <= len(held) <= len(uniq) - 2
    assert set(held) <= uniq


@settings(max_examples=80, deadline=None)
@given(
    st.lists(st.tuples(st.floats(40, 400), st.booleans()), min_size=2, max_size=30).filter(
        lambda xs: any(o for _, o in xs)
    )
)
def test_interpolate_past_keeps_readings_and_stays_between_them(row):
    g = np.array([[v for v, _ in row]])
    obs = np.array([[1.0 if o else 0.0 for _, o in row]])
    out = gpk.interpolate_past(g, obs)
    m = obs[0] > 0.5
    np.testing.assert_array_equal(out[0, m], g[0, m])
    assert np.isfinite(out).all()
    assert out.min() >= g[0, m].min() - 1e-9 and out.max() <= g[0, m].max() + 1e-9


def test_parse_dataset_forms(tmp_path):
    p = tmp_path / "f.parquet"
    p.write_bytes(b"")
    d = bm.parse_dataset(f"mine={p}")
    assert (d.name, d.path, d.format) == ("mine", str(p), None)
    d = bm.parse_dataset(f"sh={ROOT / 'tests/fixtures/shanghai'}:shanghai")
    assert d.format == "shanghai" and d.path.endswith("shanghai")
    assert bm.parse_dataset("sim:adults:3").format == "sim"
    with pytest.raises(bm.BenchmarkError, match="no such file"):
        bm.parse_dataset("x=/nonexistent/dir:azt1d")
    with pytest.raises(bm.BenchmarkError, match="say its reader"):
        bm.parse_dataset(f"sh={ROOT / 'tests/fixtures/shanghai'}")


def test_unknown_models_are_refused():
    cfg = bm.BenchmarkConfig(datasets=[bm.Dataset("x", "sim", "sim")], models=("lsmt",))
    with pytest.raises(bm.BenchmarkError, match="unknown model 'lsmt'"):
        cfg.validate()
    cfg.models = ("glupredkit:xgboost",)
    with pytest.raises(bm.BenchmarkError, match="unknown GluPredKit model"):
        cfg.validate()


def test_table_mean_sd_and_relative_to_zero_order_hold():
    runs = {
        "persistence": [{"metrics": {"test_rmse_30": 20.0, "test_rmse_60": 30.0}}],
        "lstm": [
            {"metrics": {"test_rmse_30": 14.0, "test_rmse_60": 21.0}},
            {"metrics": {"test_rmse_30": 16.0, "test_rmse_60": 24.0}},
        ],
    }
    df = bm.table_frame({"runs": runs})
    assert df.loc["lstm", "RMSE 30"] == f"15.00 ± {np.std([14, 16], ddof=1):.2f}"
    assert df.loc["persistence", "RMSE 30"] == "20.00"
    assert df.loc["lstm", "× ZOH 30"] == "0.75" and df.loc["lstm", "× ZOH 60"] == "0.75"
    assert df.loc["lstm", "runs"] == "2"


# --------------------------------------------------------------------------- the adapter


def test_request_matches_the_recorded_one(recorded):
    """The adapter still builds exactly the request the peer answered."""
    rec, train, test = recorded
    request, tr, te = gpk.build_request(train, test, rec.MODELS, loop_samples=rec.LOOP_SAMPLES)
    want = json.loads((FIX / "request.json").read_text())
    assert json.loads(json.dumps(request)) == want
    for name, got in (("train.npz", tr), ("test.npz", te)):
        with np.load(FIX / name, allow_pickle=False) as z:
            assert sorted(z.files) == sorted(got)
            for k in z.files:
                np.testing.assert_array_equal(z[k], got[k], err_msg=f"{name}:{k}")


def test_request_gives_the_peer_glucast_windows(recorded):
    _, train, test = recorded
    request, tr, te = gpk.build_request(train, test, ["zero_order"])
    cfg = test.config
    # One row per window, the window's own past (L slots) and future (H slots).
    assert te["past_CGM"].shape == (len(test), cfg.past_slots)
    assert te["future_bolus"].shape == (len(test), cfg.horizon_slots)
    assert request["num_lagged_features"] == cfg.past_slots - 1
    assert request["prediction_horizon"] == cfg.horizon_slots * cfg.slot_minutes
    # The origin reading is real and passed unchanged; basal goes over as a rate (U/h).
    g = test.past[..., cfg.past_index("glucose")]
    np.testing.assert_allclose(te["past_CGM"][:, -1], g[:, -1])
    np.testing.assert_allclose(te["past_basal"], test.past[..., cfg.past_index("basal_u")] * 12)
    # Subjects as numbers, the same in training and test rows.
    codes = request["subject_codes"]
    assert set(np.unique(tr["id"])) <= set(codes.values())
    assert [codes[s] for s in test.subject_id] == te["id"].tolist()
    # The training frame is the training split on its full grid, CGM never invented.
    assert np.isfinite(tr["CGM"]).sum() == train["glucose"].notna().sum()


def test_recorded_response_scores_like_glucast(recorded):
    """The peer's zero-order hold on glucast's windows holds each window's last reading, and
    is scored on the windows' real readings only."""
    from forecast.metrics import rmse
    from training.evaluate import score

    _, _, test = recorded
    preds, resp = gpk.read_response(FIX, len(test), test.config.horizon_slots)
    assert resp["glupredkit_version"] == gpk.VERSION
    assert {"zero_order", "ridge"} <= set(preds)
    last = test.past[:, -1, test.config.past_index("glucose")]
    np.testing.assert_allclose(preds["zero_order"], np.repeat(last[:, None], 12, axis=1))
    zoh = score(bm._Point(preds["zero_order"]), test)
    for h in (30, 60):
        t = test.target[:, h // 5 - 1]
        real = np.isfinite(t)  # scored on real readings only
        want = rmse(t[real], last[real])
        assert zoh["horizons"][str(h)]["rmse"] == pytest.approx(want)
        assert zoh["horizons"][str(h)]["n"] == int(real.sum())
    # 15-minute Libre readings: no reading 5 minutes after an origin, nothing scored there.
    five = np.isfinite(test.target[:, 0])
    assert zoh["horizons"]["5"]["n"] == int(five.sum()) < len(test)
    ridge = score(bm._Point(preds["ridge"]), test)
    # A fitted model on this fixture beats holding the last reading at 30 min.
    assert ridge["horizons"]["30"]["rmse"] < zoh["horizons"]["30"]["rmse"]
    assert ridge["horizons"]["30"]["coverage"] is None  # point forecasts: no interval


def test_response_of_the_wrong_shape_is_a_failure(tmp_path):
    (tmp_path / "response.json").write_text(
        json.dumps({"glupredkit_version": gpk.VERSION, "models": {"ridge": {"status": "ok"}}})
    )
    np.savez(tmp_path / "response.npz", pred_ridge=np.zeros((3, 5)))
    preds, resp = gpk.read_response(tmp_path, 3, 12)
    assert preds == {} and "shape" in resp["models"]["ridge"]["error"]


@pytest.mark.skipif(
    gpk.unavailable_reason() is not None,
    reason=f"GluPredKit's venv is absent: {gpk.unavailable_reason()}",
)
def test_live_peer_reproduces_the_recorded_response(tmp_path):
    import shutil

    req = json.loads((FIX / "request.json").read_text())
    req["models"] = [m for m in req["models"] if m["name"] in ("zero_order", "ridge")]
    (tmp_path / "request.json").write_text(json.dumps(req))
    for f in ("train.npz", "test.npz"):
        shutil.copy(FIX / f, tmp_path / f)
    gpk.run_driver(tmp_path)
    n = len(np.load(FIX / "test.npz")["id"])
    got, _ = gpk.read_response(tmp_path, n, req["prediction_horizon"] // 5)
    want, _ = gpk.read_response(FIX, n, req["prediction_horizon"] // 5)
    for name in ("zero_order", "ridge"):
        np.testing.assert_allclose(got[name], want[name], rtol=1e-6, atol=1e-6)


def test_peer_cap_parses_all_or_per_model_and_refuses_the_rest():
    assert bm.parse_peer_cap(None) is None
    assert bm.parse_peer_cap("3000") == 3000
    assert bm.parse_peer_cap("random_forest=1000, glupredkit:svr=50") == {
        "random_forest": 1000,
        "svr": 50,
    }
    with pytest.raises(bm.BenchmarkError, match="unknown GluPredKit model 'forest'"):
        bm.parse_peer_cap("forest=10")
    with pytest.raises(bm.BenchmarkError, match="an integer or NAME=N"):
        bm.parse_peer_cap("random_forest=many")


def test_per_model_cap_goes_to_that_model_only(recorded):
    _, train, test = recorded
    request, _, _ = gpk.build_request(
        train, test, ["zero_order", "ridge"], max_train_rows={"ridge": 50}
    )
    assert request["max_train_rows"] is None
    assert [m.get("max_train_rows") for m in request["models"]] == [None, 50]
    with pytest.raises(gpk.PeerError, match="unknown GluPredKit model"):
        gpk.build_request(train, test, ["ridge"], max_train_rows={"forest": 5})


@pytest.mark.skipif(
    gpk.unavailable_reason() is not None,
    reason=f"GluPredKit's venv is absent: {gpk.unavailable_reason()}",
)
def test_live_peer_caps_only_the_named_model(tmp_path, recorded):
    _, train, test = recorded
    # the two models that fit nothing, so that the check takes seconds
    capped = "naive_linear_regressor"
    request, tr, te = gpk.build_request(
        train, test, ["zero_order", capped], max_train_rows={capped: 200}
    )
    gpk.write_request(tmp_path, request, tr, te)
    gpk.run_driver(tmp_path)
    _, resp = gpk.read_response(tmp_path, len(test), test.config.horizon_slots)
    ridge, zoh = resp["models"][capped], resp["models"]["zero_order"]
    assert ridge["status"] == zoh["status"] == "ok"
    assert ridge["train_rows_used"] == 200 < ridge["train_rows"]
    assert "train_rows_used" not in zoh


def test_peers_command_checks_glupredkit_by_name(monkeypatch, tmp_path, capsys):
    from forecast.cli import main

    monkeypatch.setenv("GLUCAST_PEERS_DIR", str(tmp_path))
    assert main(["peers", "check", "glupredkit"]) == 1
    out = capsys.readouterr().out
    assert "glupredkit MISSING" in out and "glucast peers install glupredkit" in out
    assert main(["peers", "check", "glupredkit", "--json"]) == 1
    got = json.loads(capsys.readouterr().out)
    assert [(p["peer"], p["ok"]) for p in got["peers"]] == [("glupredkit", False)]
    assert main(["peers", "check", "glupredkitt"]) == 2
    assert "glupredkit" in capsys.readouterr().err


def test_missing_peer_env_is_a_clear_reason(monkeypatch, tmp_path):
    monkeypatch.setenv("GLUCAST_PEERS_DIR", str(tmp_path))
    assert gpk.env_dir() == tmp_path / "glupredkit"
    assert "glucast peers install glupredkit" in gpk.unavailable_reason()
    with pytest.raises(gpk.PeerError, match="not installed"):
        gpk.run_driver(tmp_path)


# --------------------------------------------------------------------------- end to end


def test_quick_benchmark_one_hash_per_table_parent_children_and_resume(monkeypatch, tmp_path):
    from mlflow.tracking import MlflowClient

    from training import tracking

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("GLUCAST_PEERS_DIR", str(tmp_path / "no-peers"))  # CI has no peer env
    cfg = bm.quick_config(str(tmp_path / "out"), "glucast benchmark --quick")
    res = bm.run_benchmark(cfg, progress=lambda m: None)
    assert len(res["tables"]) == 4  # 2 datasets x 2 splits
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(cfg.experiment)
    children = client.search_runs(
        [exp.experiment_id], f"tags.`mlflow.parentRunId` = '{res['parent_run_id']}'"
    )
    # persistence + ridge once, lstm per seed; the peers are absent here and say so.
    assert len(children) == 4 * (2 + len(cfg.seeds)) == res["children_run"]
    for t in res["tables"]:
        hashes = {
            r.data.tags[tracking.TAG_HASH]
            for r in children
            if r.data.tags["glucast.benchmark.dataset"] == t["dataset"]
            and r.data.tags["glucast.benchmark.split"] == t["split"]
        }
        assert hashes == {t["test_hash"]}
        assert len(t["runs"]["lstm"]) == len(cfg.seeds)
        assert "glupredkit:ridge" not in t["runs"]
    md = (tmp_path / "out" / "benchmark.md").read_text()
    assert "± " in md and "held-out subjects" in md and "not installed" in md
    assert "<table" in (tmp_path / "out" / "benchmark.html").read_text()
    # Resumed: the same benchmark again redoes no finished child run.
    again = bm.run_benchmark(cfg, progress=lambda m: None)
    assert again["parent_run_id"] == res["parent_run_id"]
    assert all(r["resumed"] for t in again["tables"] for rs in t["runs"].values() for r in rs)
    assert again["tables"][0]["runs"]["ridge"][0]["metrics"] == pytest.approx(
        res["tables"][0]["runs"]["ridge"][0]["metrics"]
    )


def test_pretrained_lstm_starts_from_the_simulated_cohort(monkeypatch, tmp_path):
    """lstm+sim: one pretraining (shared by tables with the same window layout), then
    trained on the dataset from those weights — a different model from lstm alone."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("GLUCAST_PEERS_DIR", str(tmp_path / "no-peers"))
    cfg = bm.quick_config(str(tmp_path / "out"))
    cfg.datasets = cfg.datasets[:1]  # the ShanghaiT1DM fixture
    cfg.models, cfg.seeds = ("lstm", "lstm+sim"), (0,)
    cfg.pretrain_sim = "adult#001,adult#002:1"
    said: list[str] = []
    res = bm.run_benchmark(cfg, progress=said.append)
    assert sum(m.startswith("pretraining lstm") for m in said) == 1  # two tables, one pretrain
    assert len(list((tmp_path / "out" / "work").glob("pretrain-*.pt"))) == 1
    for t in res["tables"]:
        a, b = t["runs"]["lstm"][0]["metrics"], t["runs"]["lstm+sim"][0]["metrics"]
        assert a["test_rmse_30"] != pytest.approx(b["test_rmse_30"], abs=1e-6)
    with pytest.raises(bm.BenchmarkError, match="unknown model 'lstm\\+simm'"):
        bm.BenchmarkConfig(datasets=cfg.datasets, models=("lstm+simm",)).validate()


def test_extra_features_reach_the_models_where_the_dataset_has_them(monkeypatch, tmp_path):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    import forecast.io as fio

    frame, _ = fio.read([str(ROOT / "tests" / "fixtures" / "azt1d")], "azt1d")
    frame = frame[frame["subject_id"] != "azt1d-17"]  # 6 hours: too short to split by time
    azt = bm.Dataset("azt1d-fixture", frame=frame)
    cfg = bm.BenchmarkConfig(
        datasets=[azt], models=("ridge",), seeds=(0,), splits=("chronological",),
        out_dir=str(tmp_path / "out"),
    )  # fmt: skip
    plain = bm.run_benchmark(cfg, progress=lambda m: None)["tables"][0]
    cfg.extra_features = ("bolus_auto_u", "basal_known", "no_such_column")
    said: list[str] = []
    extra = bm.run_benchmark(cfg, progress=said.append)["tables"][0]
    assert extra["past_features"] == [*plain["past_features"], "bolus_auto_u", "basal_known"]
    assert any("no_such_column" in m for m in said)
    assert extra["windows"] == plain["windows"]  # the same windows, more inputs
    assert not extra["runs"]["ridge"][0]["resumed"]  # other inputs: not the plain run's child


def test_benchmark_help_loads_no_torch():
    import subprocess

    code = (
        "import sys; from forecast.cli import main\n"
        "try:\n    main(['benchmark', '--help'])\nexcept SystemExit:\n    pass\n"
        "assert 'torch' not in sys.modules and 'mlflow' not in sys.modules"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert "--quick" in r.stdout and "glupredkit:" in r.stdout
