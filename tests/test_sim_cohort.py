"""Cohort data and `glucast simulate`: the canonical frame from the simulator."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pandas as pd
import pytest

from forecast.cli import main
from forecast.schema import get_meta, read_parquet, validate_frame
from forecast.sim import (
    AnnouncementConfig,
    PhysiologyWarning,
    SimInputError,
    UnknownPatientError,
    load_patients,
    simulate_cohort,
)


@pytest.fixture(scope="module")
def frame():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PhysiologyWarning)
        return simulate_cohort("adult#001,child#002,adolescent#003", days=2, seed=5)


def test_frame_is_canonical_and_complete(frame):
    checked = validate_frame(frame)
    pd.testing.assert_frame_equal(checked, frame)  # already canonical dtypes and order
    assert len(frame) == 3 * 2 * 288
    assert frame["subject_id"].unique().tolist() == ["adolescent#003", "adult#001", "child#002"]
    t = frame.loc[frame.subject_id == "adult#001", "time"]
    assert t.iloc[0] == pd.Timestamp("2018-01-01", tz="UTC")
    assert (t.diff().dropna() == pd.Timedelta("5min")).all()
    for c in ("bg_true", "gsub", "meal_announced", "carbs_eaten_g"):
        assert c in frame.columns
    assert frame["bg_true"].notna().all() and frame["gsub"].notna().all()
    assert 0.0 < frame["glucose"].isna().mean() < 0.1  # G6-like dropouts, not many
    g = frame["glucose"].dropna()
    assert g.between(40, 400).all()
    assert (frame["glucose"] - frame["gsub"]).abs().median() < 15  # noise + drift, not junk


def test_insulin_and_carbs_accounting(frame):
    p = load_patients("adolescent#003,adult#001,child#002")
    by = frame.groupby("subject_id", sort=True)
    basal = by["basal_u"].sum().to_numpy()
    # basal at the pump's 0.05 U/h resolution, 48 h
    np.testing.assert_allclose(basal, p.basal_u_per_h * 48, atol=0.025 * 48 + 1e-9)
    assert (frame["bolus_u"] >= 0).all() and frame["bolus_u"].sum() > 10
    # no announcement errors by default: logged carbs are the eaten carbs, slot by slot
    np.testing.assert_array_equal(frame["carbs_g"], frame["carbs_eaten_g"])
    assert (frame["meal_announced"] == (frame["carbs_g"] > 0)).all()
    meals_per_day = (frame["carbs_g"] > 0).sum() / 6
    assert 2.5 < meals_per_day < 5.5
    # every meal got a bolus within its slot (basal-bolus policy)
    meal_rows = frame["carbs_g"] > 0
    assert (frame.loc[meal_rows, "bolus_u"] > 0).all()


def test_metadata_travels(frame, tmp_path):
    meta = get_meta(frame)
    assert meta.source == "uva_padova_s2008"
    assert meta.sampling_minutes == 5 and meta.timezone == "UTC"
    assert meta.extra["seed"] == 5 and meta.extra["policy"] == "basal-bolus"
    assert "simglucose" in meta.licence
    path = tmp_path / "f.parquet"
    from forecast.schema import write_parquet

    write_parquet(frame, path)
    back = read_parquet(path)
    assert get_meta(back).extra["patients"] == ["adult#001", "child#002", "adolescent#003"]
    pd.testing.assert_series_equal(back["bg_true"], frame["bg_true"])


def test_same_seed_same_data_and_patient_independence():
    a = simulate_cohort("adult#004", days=0.5, seed=3)
    b = simulate_cohort("adult#004,adult#005", days=0.5, seed=3)
    b4 = b[b.subject_id == "adult#004"].reset_index(drop=True)
    pd.testing.assert_frame_equal(a, b4, check_like=True)
    c = simulate_cohort("adult#004", days=0.5, seed=4)
    assert not np.allclose(a["carbs_g"], c["carbs_g"])


def test_announcement_errors_split_logged_and_eaten():
    f = simulate_cohort(
        "adults", days=3, seed=1, scenario="fixed", sensor="none",
        announcement=AnnouncementConfig(carb_error_sd=0.3, missed_bolus_prob=0.2),
    )  # fmt: skip
    eaten = f["carbs_eaten_g"].sum()
    assert eaten == pytest.approx(10 * 3 * (45 + 70 + 80 + 15))
    assert f["carbs_g"].sum() < 0.95 * eaten  # missed boluses are not logged
    missed = (f["carbs_eaten_g"] > 0) & ~f["meal_announced"]
    assert missed.sum() > 5 and (f.loc[missed, "carbs_g"] == 0).all()
    assert np.allclose(f["glucose"], f["gsub"])  # sensor "none" is the noise-free signal


def test_bad_arguments():
    with pytest.raises(SimInputError):
        simulate_cohort("adult#001", days=0)
    with pytest.raises(SimInputError, match="scenario"):
        simulate_cohort("adult#001", days=1, scenario="feast")
    with pytest.raises(SimInputError, match="policy"):
        simulate_cohort("adult#001", days=1, policy="pid")
    with pytest.raises(UnknownPatientError):
        simulate_cohort("adult#042", days=1)


def test_cli_writes_a_frame_and_json(tmp_path, capsys):
    out = tmp_path / "sim.parquet"
    rc = main(
        [
            "simulate", "--patients", "children", "--days", "0.5", "--seed", "2",
            "--policy", "excitation", "--out", str(out), "--json", "--no-progress",
        ]
    )  # fmt: skip
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["patients"] == 10 and summary["rows"] == 10 * 144
    f = read_parquet(out)
    assert summary["dataset_hash"] and len(f) == 1440
    assert get_meta(f).extra["policy"] == "excitation"
    assert isinstance(summary["out_of_range"], list)


def test_cli_progress_bar_and_errors(tmp_path, capsys):
    out = tmp_path / "s.parquet"
    assert main(["simulate", "--patients", "adult#001", "--days", "0.1", "--out", str(out)]) == 0
    assert "wrote 29 rows" in capsys.readouterr().out
    assert main(["simulate", "--patients", "nobody", "--out", str(out)]) == 2
    assert "unknown patient 'nobody'" in capsys.readouterr().err
