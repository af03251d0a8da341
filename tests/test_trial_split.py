"""A trial split over worker processes gives the same result as one process."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from test_predictor import write_model_dir

from forecast.cli import main
from serving.insilico.trial import TrialConfig, TrialError, run_trial

warnings.filterwarnings("ignore", category=UserWarning)  # the simulator's physiology flags


def assert_same(a, b) -> None:
    assert a.names == b.names
    assert a.times.equals(b.times)
    assert set(a.log) == set(b.log)
    for k in a.log:
        np.testing.assert_array_equal(a.log[k], b.log[k], err_msg=k)
    assert a.veto_kinds == b.veto_kinds
    np.testing.assert_array_equal(a.cap_rate, b.cap_rate)
    np.testing.assert_array_equal(a.out_of_range, b.out_of_range)
    assert a.patient_metrics() == b.patient_metrics()


def test_basal_bolus_split_over_two_processes_is_the_same_trial():
    cfg = TrialConfig(
        controller="basal-bolus",
        patients="adult#001,child#002,adolescent#003",
        days=0.5,
        seed=5,
        carb_error=0.2,
    )
    one, two = run_trial(cfg), run_trial(cfg, workers=2)
    assert_same(one, two)
    assert two.info["workers"] == 2 and "workers" not in one.info
    assert two.config == cfg
    assert two.decision_s.shape == one.decision_s.shape


def test_mpc_split_is_the_same_trial(tmp_path):
    model = write_model_dir(tmp_path / "m")
    cfg = TrialConfig(
        controller="mpc",
        model_dir=str(model),
        patients="adult#002,child#001,adolescent#004,adult#007",
        days=0.25,
        seed=2,
        carb_error=0.2,
    )
    one, two = run_trial(cfg), run_trial(cfg, workers=3)  # parts of 2, 1 and 1 patients
    assert_same(one, two)
    assert two.forecaster_calls == 3 * cfg.cycles  # one batched call per cycle per worker


def test_split_refuses_what_depends_on_the_cohort():
    cfg = TrialConfig(controller="basal-bolus", patients="adult#001,adult#002", days=0.1,
                      mode="advisory")  # fmt: skip
    with pytest.raises(TrialError, match="advisory"):
        run_trial(cfg, workers=2)
    with pytest.raises(TrialError, match="controller"):
        run_trial(TrialConfig(controller="pid", days=0.1), controller=object(), workers=2)


def test_workers_from_the_command_line(capsys):
    args = ["trial", "--controller", "pid", "--patients", "adult#004,child#003", "--days", "0.2",
            "--seed", "5", "--carb-error", "0.2", "--json"]  # fmt: skip
    assert main([*args, "--workers", "2"]) == 0
    two = json.loads(capsys.readouterr().out)
    assert main(args) == 0
    one = json.loads(capsys.readouterr().out)
    assert two["patients"] == one["patients"]
    assert two["run"]["workers"] == 2
