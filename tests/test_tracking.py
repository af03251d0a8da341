"""What glucast writes to MLflow, read back through MLflow's own client: params that apply to
the model only, per-horizon curves (step = minutes), the data as a dataset input with the hash
as digest, lineage tags from training run to trial and alert runs, descriptions, and
experiments that MLflow 3's UI opens on their runs."""

from __future__ import annotations

import contextlib
import io
import json

import pytest

pytest.importorskip("mlflow")
pytest.importorskip("onnx")

from test_predictor import write_model_dir  # noqa: E402

from forecast.cli import main  # noqa: E402
from forecast.schema import write_parquet  # noqa: E402
from training import tracking  # noqa: E402
from training.synthetic import replay_cohort  # noqa: E402

EXP = "workbench"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One sqlite store per module (creating one costs seconds)."""
    d = tmp_path_factory.mktemp("mlflow")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(d)  # MLflow's artifacts land here, not in the repo
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{d / 'mlflow.db'}")
        mp.setenv("GLUCAST_MLFLOW_UI", "http://mlflow.test:5000")
        yield d


@pytest.fixture(scope="module")
def frame_path(store):
    frame = replay_cohort("adult#001,adolescent#001", days=2.5, seed=2)
    return write_parquet(frame, store / "frame.parquet")


def _json(argv: list[str]) -> dict:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([*argv, "--json"])
    assert rc == 0, err.getvalue()[-3000:]
    return json.loads(out.getvalue())


@pytest.fixture(scope="module")
def client(store):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking.tracking_uri())


@pytest.fixture(scope="module")
def ridge(store, frame_path):
    return _json(["train", "--model", "ridge", "--data", str(frame_path), "--experiment", EXP,
                  "--out", str(store / "ridge")])  # fmt: skip


@pytest.fixture(scope="module")
def registered(store, client):
    """A real exported ONNX model (tests/test_predictor's linear graph) logged and registered
    from a training run, its manifest naming that run — what `glucast train` leaves behind."""
    model_dir = write_model_dir(store / "onnx")
    with tracking.run(EXP, run_name="onnx-model", kind="train") as active:
        run_id = active.info.run_id
        manifest = json.loads((model_dir / "manifest.json").read_text())
        manifest["mlflow_run_id"] = run_id
        manifest["model"] = "linear-test"
        (model_dir / "manifest.json").write_text(json.dumps(manifest))
        version = tracking.log_onnx_model(model_dir, "glucast-linear-test", "a test model")
    return {"dir": model_dir, "run_id": run_id, "version": version, "sha": manifest["sha256"]}


def test_baseline_run_has_only_its_own_params(ridge, client):
    run = client.get_run(ridge["run_id"])
    params = run.data.params
    assert params["model"] == "ridge" and params["ridge.alpha"] == "1.0"
    foreign = [k for k in params if k.split(".")[0] in ("lstm", "transformer", "trainer",
                                                         "export", "linear", "physio")]  # fmt: skip
    assert foreign == []
    assert "head.quantiles" in params and "head.isf_prior" not in params
    assert run.data.tags[tracking.TAG_KIND] == "train"
    assert "ridge forecaster trained on" in run.data.tags[tracking.TAG_NOTE]


def test_rmse_is_a_curve_over_horizon_minutes(ridge, client):
    hist = client.get_metric_history(ridge["run_id"], "test_rmse")
    steps = sorted(m.step for m in hist)
    assert steps == list(range(5, 65, 5))  # 12 horizons, step = minutes ahead
    by_step = {m.step: m.value for m in hist}
    run = client.get_run(ridge["run_id"])
    # the headline scalar and the curve are the same number
    assert by_step[30] == pytest.approx(run.data.metrics["test_rmse_30"])
    assert by_step[60] > by_step[5]  # further ahead is harder
    # coverage is a percent everywhere, like the table says
    assert 50 < run.data.metrics["test_coverage_30"] <= 100


def test_splits_are_dataset_inputs_with_the_hash_as_digest(ridge, client):
    inputs = client.get_run(ridge["run_id"]).inputs.dataset_inputs
    by_context = {
        next(t.value for t in i.tags if t.key == "mlflow.data.context"): i.dataset for i in inputs
    }
    assert set(by_context) == {"training", "validation", "testing"}
    test = by_context["testing"]
    assert test.digest == ridge["dataset_hash"][: tracking.DIGEST_CHARS]
    assert "frame.parquet" in test.source and json.loads(test.profile)["num_rows"] > 0
    assert client.get_run(ridge["run_id"]).data.tags["dataset_hash"] == ridge["dataset_hash"]
    found = client.search_runs(
        [client.get_experiment_by_name(EXP).experiment_id],
        f"tags.dataset_hash = '{ridge['dataset_hash']}'",
    )
    assert ridge["run_id"] in {r.info.run_id for r in found}


def test_experiment_opens_on_its_runs_and_compare_links_them(ridge, client, store, capsys):
    exp = client.get_experiment_by_name(EXP)
    assert exp.tags[tracking.TAG_EXPERIMENT_KIND] == "custom_model_development"
    assert ridge["run_url"] == (
        f"http://mlflow.test:5000/#/experiments/{exp.experiment_id}/runs/{ridge['run_id']}"
        "?workflowType=machine_learning"  # MLflow 3's UI: the runs view, not GenAI traces
    )
    cmp = _json(["compare", "--experiment", EXP])
    url = cmp["groups"][0]["url"]
    assert url.startswith("http://mlflow.test:5000/#/compare-runs?runs=") and ridge["run_id"] in url
    rc = main(["compare", "--experiment", EXP])
    assert rc == 0 and f"compare in MLflow: {url}" in capsys.readouterr().out


def test_registered_model_carries_the_sha256_and_a_description(registered, client):
    mv = client.get_model_version("glucast-linear-test", registered["version"])
    assert mv.tags[tracking.TAG_SHA] == registered["sha"] and mv.description == "a test model"
    assert client.get_registered_model("glucast-linear-test").description


def test_evaluation_is_a_child_of_the_training_run(registered, frame_path, client):
    out = _json(["evaluate", "--model", str(registered["dir"]), "--data", str(frame_path),
                 "--mlflow", "--experiment", "elsewhere"])  # fmt: skip
    run = client.get_run(out["mlflow"]["run_id"])
    tags = run.data.tags
    assert tags["mlflow.parentRunId"] == registered["run_id"]
    assert tags[tracking.TAG_TRAINING_RUN] == registered["run_id"]
    assert tags[tracking.TAG_SHA] == registered["sha"]
    assert tags[tracking.TAG_REGISTERED] == f"glucast-linear-test/{registered['version']}"
    assert run.info.experiment_id == client.get_run(registered["run_id"]).info.experiment_id
    assert len(client.get_metric_history(run.info.run_id, "test_rmse")) == 12
    digests = {i.dataset.digest for i in run.inputs.dataset_inputs}
    assert digests == {out["dataset_hash"][: tracking.DIGEST_CHARS]}


def test_alert_replay_is_a_child_of_the_training_run(registered, frame_path, client):
    out = _json(["alerts", "evaluate", "--model", str(registered["dir"]), "--data",
                 str(frame_path), "--mlflow", "--experiment", EXP])  # fmt: skip
    run = client.get_run(out["mlflow"]["run_id"])
    assert run.data.tags["mlflow.parentRunId"] == registered["run_id"]
    assert run.data.tags[tracking.TAG_SHA] == registered["sha"]
    m = run.data.metrics
    sens = out["threshold_low"]["sensitivity"]
    if sens is not None:  # a percent, like every share glucast logs
        assert m["alert_threshold_low_sensitivity"] == pytest.approx(100 * sens)
    assert m["alert_threshold_low_episodes"] == out["threshold_low"]["episodes"]
    assert run.data.params["rule.low_mgdl"] == "70.0"


@pytest.mark.slow
def test_trial_run_tags_the_model_it_used_and_logs_results_as_metrics(registered, client):
    out = _json(["trial", "--controller", "mpc", "--model", str(registered["dir"]), "--patients",
                 "adult#001", "--days", "0.05", "--mlflow", "--experiment", EXP])  # fmt: skip
    run = client.get_run(out["mlflow"]["run_id"])
    tags, params, metrics = run.data.tags, run.data.params, run.data.metrics
    assert tags[tracking.TAG_TRAINING_RUN] == registered["run_id"]
    assert tags[tracking.TAG_SHA] == registered["sha"]
    assert tags[tracking.TAG_REGISTERED].startswith("glucast-linear-test/")
    assert tags[tracking.TAG_KIND] == "trial" and "mpc controller" in tags[tracking.TAG_NOTE]
    for result in ("wall_s", "decision_ms_p99", "cycles"):
        assert result not in params
    assert metrics["trial_wall_s"] == pytest.approx(out["run"]["wall_s"])
    # the run lasts as long as the trial did, not as long as logging it took
    assert run.info.end_time - run.info.start_time >= 1000 * out["run"]["wall_s"] - 1
    assert metrics["decision_ms_p99"] > 0 and "cohort_tir" in metrics
    assert params["controller"] == "mpc" and "accept_prob" not in params  # closed loop


def test_trial_params_only_for_the_controller_and_mode():
    info = {"controller": "basal-bolus", "mode": "closed", "model_dir": None, "days": 1.0,
            "accept_prob": 0.8, "wall_s": 3.0, "seed": 1}  # fmt: skip
    assert tracking.trial_params(info) == {"controller": "basal-bolus", "mode": "closed",
                                           "days": 1.0, "seed": 1}  # fmt: skip
    adv = tracking.trial_params({**info, "mode": "advisory"})
    assert adv["accept_prob"] == 0.8
