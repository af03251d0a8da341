"""glucast arena (serving.insilico.arena): split runs merge into the unsplit run, the table and
the report hold what the issue lists, bad configurations are refused by name."""

from __future__ import annotations

import json

import numpy as np
import pytest

from serving.insilico.arena import (
    ArenaConfig,
    ArenaError,
    merge_results,
    run_arena,
    split_patients,
    table_markdown,
    write_report,
)
from serving.insilico.trial import TrialConfig, run_trial

PATIENTS = ["adolescent#001", "adult#001", "adult#002", "child#001"]


def test_split_patients_interleaves_and_keeps_everyone():
    parts = split_patients(PATIENTS, 3)
    assert sorted(sum(parts, [])) == sorted(PATIENTS)
    assert parts[0] == ["adolescent#001", "child#001"]
    assert split_patients(PATIENTS[:1], 2) == [PATIENTS[:1]]


def test_a_split_run_equals_the_unsplit_run():
    """basal-bolus is deterministic and decides per patient: subsets merged = one trial."""
    cfg = TrialConfig(controller="basal-bolus", patients=",".join(PATIENTS), days=0.25, seed=4,
                      carb_error=0.2)  # fmt: skip
    whole = run_trial(cfg)
    parts = [
        run_trial(TrialConfig(**{**cfg.__dict__, "patients": ",".join(sub)}))
        for sub in split_patients(PATIENTS, 2)
    ]
    merged = merge_results(parts, PATIENTS)
    assert merged.names == whole.names == PATIENTS
    for key in whole.log:
        assert np.array_equal(merged.log[key], whole.log[key], equal_nan=True), key
    assert merged.patient_metrics() == whole.patient_metrics()
    assert merged.veto_kinds == whole.veto_kinds
    with pytest.raises(ArenaError):
        merge_results(parts[:1], PATIENTS)


def test_arena_in_two_processes_table_and_report(tmp_path):
    cfg = ArenaConfig(patients="adult#001,child#001", days=0.1, seeds=(0,),
                      controllers=("basal-bolus", "pid"), scenarios=("announced", "variability"),
                      workers=2)  # fmt: skip
    lines: list[str] = []
    res = run_arena(cfg, progress=lines.append)
    assert len(lines) == 2 * 2 * 2  # scenarios × controllers × worker subsets
    t = res.table()
    assert set(t.group) == {"all", "adults", "children"}
    assert len(t) == 2 * 2 * 3
    for col in (
        "TIR %",
        "TBR<54 %",
        "true TBR<54 %",
        "TAR>250 %",
        "CV %",
        "LBGI",
        "HBGI",
        "insulin U/day",
        "runs with true BG<54",
        "supervisor changed %",
        "fallbacks",
    ):
        assert col in t.columns, col  # fmt: skip
    # the same patients and seeds: the scenarios' meals are the same, the variability is not
    a = res.trials[("announced", 0, "basal-bolus")]
    v = res.trials[("variability", 0, "basal-bolus")]
    assert np.array_equal(a.log["carbs_eaten"], v.log["carbs_eaten"])
    assert not np.array_equal(a.log["bg"], v.log["bg"])
    assert "| scenario | controller | group |" in table_markdown(t)
    index = write_report(res, tmp_path)
    assert index.exists() and (tmp_path / "cvga_announced.png").exists()
    data = json.loads((tmp_path / "arena.json").read_text())
    assert data["run"]["variability"]["variability"].startswith("circadian SI")
    assert len(data["patients"]) == 2 * 2 * 2


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"controllers": ("mpc",)}, "needs --model"),
        ({"controllers": ("chess",)}, "unknown controller"),
        ({"scenarios": ("rain",)}, "unknown scenario"),
        ({"workers": 0, "controllers": ("pid",)}, "workers"),
        ({"seeds": (), "controllers": ("pid",)}, "at least one"),
    ],
)
def test_bad_configurations_are_refused(kwargs, match):
    with pytest.raises(ArenaError, match=match):
        ArenaConfig(**kwargs)


def test_arena_logs_one_mlflow_run(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    from mlflow.tracking import MlflowClient

    from serving.insilico.arena import log_mlflow

    cfg = ArenaConfig(patients="adult#001", days=0.05, seeds=(0,), controllers=("pid",),
                      scenarios=("announced",), workers=1)  # fmt: skip
    res = run_arena(cfg, progress=lambda line: None)
    index = write_report(res, tmp_path / "report")
    ref = log_mlflow(res, "arena-test", index)
    run = MlflowClient().get_run(ref["run_id"])
    m = run.data.metrics
    t = res.table().iloc[0]
    assert m["announced.pid.all.tir"] == pytest.approx(t["TIR %"])
    assert m["announced.pid.all.bg_tbr54"] == pytest.approx(t["true TBR<54 %"])
    assert m["announced.pid.adults.runs_bg_below_54"] == t["runs with true BG<54"]
    assert run.data.params["controllers"] == "['pid']"
    from training import tracking

    assert run.data.tags[tracking.TAG_KIND] == "arena"
