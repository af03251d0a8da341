"""`glucast train | finetune | evaluate | compare` end to end on a small simulated frame,
with a temporary MLflow store, plus the bad-input errors a user can hit."""

from __future__ import annotations

import json
import shutil

import pytest

pytest.importorskip("torch")
pytest.importorskip("mlflow")

from forecast.cli import main  # noqa: E402
from forecast.schema import write_parquet  # noqa: E402
from training.synthetic import replay_cohort  # noqa: E402


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One MLflow store per module (creating a sqlite store costs seconds)."""
    d = tmp_path_factory.mktemp("mlflow")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(d)  # MLflow's artifact store and default outputs land here, not in the repo
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{d / 'mlflow.db'}")
        mp.setenv("GLUCAST_TORCH_THREADS", "1")
        yield d


@pytest.fixture(scope="module")
def frame_path(store):
    frame = replay_cohort("adult#001,adolescent#001", days=2.5, seed=2)
    # small epochs keep the test fast (finetune inherits this from the manifest)
    (store / "small.yaml").write_text("trainer:\n  max_train_windows: 1024\n")
    return write_parquet(frame, store / "frame.parquet")


def run_json(capsys, argv):
    rc = main(argv + ["--json"])
    out, err = capsys.readouterr()
    assert rc == 0, err[-2000:]
    return json.loads(out)


def run_fail(capsys, argv):
    rc = main(argv)
    out, err = capsys.readouterr()
    assert rc == 2, (out, err[-2000:])
    return err


@pytest.fixture(scope="module")
def lstm_run(store, frame_path):
    import contextlib
    import io

    out = io.StringIO()
    argv = ["train", "--model", "lstm", "--data", str(frame_path), "--max-epochs", "1"]
    argv += ["--config", str(store / "small.yaml"), "--experiment", "cli"]
    argv += ["--out", str(store / "lstm"), "--json"]
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        rc = main(argv)
    assert rc == 0
    return json.loads(out.getvalue())


def test_train_lstm_end_to_end(lstm_run):
    from pathlib import Path

    r = lstm_run
    assert len(r["run_id"]) == 32
    d = Path(r["model_dir"])
    assert (d / "model.onnx").exists() and (d / "manifest.json").exists()
    m = json.loads((d / "manifest.json").read_text())
    assert m["mlflow_run_id"] == r["run_id"]
    assert m["test_dataset_hash"] == r["dataset_hash"]
    assert m["parity_max_abs_mgdl"] <= 1e-3
    assert set(r["metrics"]) == {"30", "60"} and r["metrics"]["30"]["rmse"] > 0
    assert r["registered_model"] == "glucast-lstm"

    import mlflow

    run = mlflow.get_run(r["run_id"])
    assert run.data.tags["dataset_hash"] == r["dataset_hash"]
    assert "mlflow.source.git.commit" in run.data.tags
    assert run.data.params["model"] == "lstm"
    assert {"test_rmse_30", "test_rmse_60", "test_clarke_A_30"} <= set(run.data.metrics)
    names = {a.path for a in mlflow.MlflowClient().list_artifacts(r["run_id"])}
    assert {"model", "plots", "evaluation.json"} <= names


def test_evaluate_json_shape_and_same_hash(capsys, lstm_run, frame_path, store):
    r = run_json(
        capsys,
        [
            "evaluate",
            "--model",
            lstm_run["model_dir"],
            "--data",
            str(frame_path),
            "--bglp",
            "--plots",
            str(store / "evalplots"),
        ],  # fmt: skip
    )
    assert r["dataset_hash"] == lstm_run["dataset_hash"]
    for h in ("30", "60"):
        m = r["horizons"][h]
        for key in ("rmse", "mae", "mard", "clarke", "parkes", "coverage", "lag_min", "by_range"):
            assert key in m
        assert set(m["clarke"]) == set("ABCDE")
        # the ONNX model scores what the torch model scored at training time
        assert m["rmse"] == pytest.approx(lstm_run["metrics"][h]["rmse"], abs=1e-2)
    assert set(r["bglp"]) >= {"30", "60", "subjects"}
    assert r["bglp"]["60"]["readings_without_forecast"] >= 0
    assert any(p.endswith("clarke_30min.png") for p in r["plots"])


def test_evaluate_interventional(capsys, lstm_run, frame_path):
    r = run_json(
        capsys,
        [
            "evaluate",
            "--model",
            lstm_run["model_dir"],
            "--data",
            str(frame_path),
            "--interventional",
            "--max-windows",
            "40",
        ],  # fmt: skip
    )
    iv = r["interventional"]
    assert iv["windows"] > 0 and iv["monotonicity_violation_pct"] == 0.0
    assert iv["reconstruction_rmse_mgdl"] < 1.0  # the replay reproduces the recorded patient
    bolus = iv["interventions"]["bolus_plus_1u"]["horizons"]["60"]
    assert bolus["mean_true_change"] < 0 and bolus["mean_predicted_change"] <= 0


def test_baseline_train_and_compare_groups_by_hash(capsys, lstm_run, frame_path, store):
    ridge = run_json(
        capsys,
        [
            "train",
            "--model",
            "ridge",
            "--data",
            str(frame_path),
            "--experiment",
            "cli",
            "--out",
            str(store / "ridge"),
        ],  # fmt: skip
    )
    assert ridge["dataset_hash"] == lstm_run["dataset_hash"]
    assert (store / "ridge" / "model" / "baseline.json").exists()
    # another test set: one subject only -> another hash, another group
    from forecast.schema import read_parquet

    f = read_parquet(frame_path)
    other = write_parquet(f[f["subject_id"] == "adult#001"], store / "one.parquet")
    persist = run_json(
        capsys,
        [
            "train",
            "--model",
            "persistence",
            "--data",
            str(other),
            "--experiment",
            "cli",
            "--out",
            str(store / "persistence"),
        ],  # fmt: skip
    )
    assert persist["dataset_hash"] != ridge["dataset_hash"]
    cmp = run_json(capsys, ["compare", "--experiment", "cli"])
    groups = {g["dataset_hash"]: g for g in cmp["groups"]}
    assert len(groups) == 2
    same = groups[ridge["dataset_hash"]]["runs"]
    assert {r["model"] for r in same} == {"lstm", "ridge"}
    assert [r["model"] for r in groups[persist["dataset_hash"]]["runs"]] == ["persistence"]
    assert set(same[0]["rmse_by_horizon"]) >= {"5", "30", "60"}
    err = run_fail(capsys, ["compare", "--experiment", "cli", "--plot", str(store / "c.png")])
    assert "different test datasets" in err
    r = run_json(
        capsys,
        [
            "compare",
            "--experiment",
            "cli",
            "--dataset-hash",
            ridge["dataset_hash"][:10],
            "--plot",
            str(store / "c.png"),
        ],  # fmt: skip
    )
    assert len(r["groups"]) == 1 and (store / "c.png").exists()
    assert "no MLflow experiment" in run_fail(capsys, ["compare", "--experiment", "nope"])


def finetune_argv(lstm_run, frame_path, subject, *extra):
    return ["finetune", "--model", lstm_run["model_dir"], "--data", str(frame_path),
            "--subject", subject, *extra]  # fmt: skip


def test_finetune_on_one_subject(capsys, lstm_run, frame_path, store):
    r = run_json(
        capsys,
        finetune_argv(
            lstm_run,
            frame_path,
            "adult#001",
            "--max-epochs",
            "1",
            "--experiment",
            "cli",
            "--out",
            str(store / "ft"),
            "--no-register",
        ),  # fmt: skip
    )
    assert r["subject"] == "adult#001" and len(r["run_id"]) == 32
    assert (store / "ft" / "model" / "model.onnx").exists()
    assert set(r["population_metrics"]) == {"30", "60"}
    err = run_fail(capsys, finetune_argv(lstm_run, frame_path, "adult#999"))
    assert "adult#999" in err and "not in the frame" in err


# --------------------------------------------------------------------------- bad input


def test_frame_without_required_columns(capsys, store, frame_path):
    import pandas as pd

    from forecast.schema import read_parquet

    f = read_parquet(frame_path).drop(columns=["bolus_u"])
    p = store / "nobolus.parquet"
    pd.DataFrame(f).to_parquet(p)
    err = run_fail(capsys, ["train", "--model", "ridge", "--data", str(p)])
    assert "bolus_u" in err and "missing" in err


def test_horizon_not_a_multiple_of_the_slot(capsys, store, frame_path):
    cfg = store / "bad.yaml"
    cfg.write_text("data:\n  horizon_min: 62\n")
    err = run_fail(
        capsys, ["train", "--model", "ridge", "--data", str(frame_path), "--config", str(cfg)]
    )
    assert "62" in err and "multiple" in err


def test_too_little_data_for_a_split(capsys, store, frame_path):
    from forecast.schema import read_parquet

    f = read_parquet(frame_path)
    short = f.groupby("subject_id").head(60)  # 5 hours per subject
    p = write_parquet(short, store / "short.parquet")
    err = run_fail(capsys, ["train", "--model", "lstm", "--data", str(p), "--max-epochs", "1"])
    assert "too little data" in err or "no windows" in err
    assert not (store / "artifacts").exists()  # nothing is written before the data check


def test_manifest_not_matching_onnx(capsys, lstm_run, frame_path, store):
    d = store / "tampered"
    shutil.copytree(lstm_run["model_dir"], d)
    m = json.loads((d / "manifest.json").read_text())
    m["sha256"] = "0" * 64
    (d / "manifest.json").write_text(json.dumps(m))
    err = run_fail(capsys, ["evaluate", "--model", str(d), "--data", str(frame_path)])
    assert "does not match its manifest" in err
    err = run_fail(capsys, ["evaluate", "--model", "nosuchmodel", "--data", str(frame_path)])
    assert "neither a model directory nor a baseline" in err


def test_finetune_every_subject_for_personal_alerts(capsys, lstm_run, frame_path, store):
    from serving.insilico.alert_eval import find_subject_models

    r = run_json(
        capsys,
        finetune_argv(
            lstm_run,
            frame_path,
            "all",
            "--max-epochs",
            "1",
            "--experiment",
            "cli",
            "--out",
            str(store / "personal"),
            "--no-register",
        ),  # fmt: skip
    )
    assert set(r["subjects"]) == {"adult#001", "adolescent#001"}
    assert r["summary"]["30"]["better"] in (0, 1, 2)
    found = find_subject_models(store / "personal")
    assert set(found) == {"adult#001", "adolescent#001"}
    assert all((d / "model.onnx").exists() for d in found.values())
    err = run_fail(
        capsys,
        finetune_argv(lstm_run, frame_path, "adult#001,child#042", "--out", str(store / "p2")),
    )
    assert "child#042" in err and "not in the frame" in err
