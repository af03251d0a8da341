"""The canonical frame: validation, typed errors, Parquet round trip, dataset hash."""

import numpy as np
import pandas as pd
import pytest

from forecast.schema import (
    DataReport,
    DatasetMeta,
    InputError,
    SchemaError,
    dataset_hash,
    get_meta,
    read_parquet,
    set_meta,
    validate_frame,
    write_parquet,
)


def _frame(n: int = 6) -> pd.DataFrame:
    t = pd.date_range("2024-01-01", periods=n, freq="5min", tz="UTC")
    return pd.DataFrame(
        {
            "subject_id": ["a"] * n,
            "time": t,
            "glucose": np.linspace(100, 150, n),
            "basal_u": np.full(n, 0.1),
            "bolus_u": np.zeros(n),
            "carbs_g": np.zeros(n),
        }
    )


def test_valid_frame_passes_and_is_coerced():
    out = validate_frame(_frame())
    assert str(out["time"].dtype) == "datetime64[ns, UTC]"
    assert out["glucose"].dtype == np.float64


def test_missing_column_names_it():
    with pytest.raises(SchemaError, match="carbs_g"):
        validate_frame(_frame().drop(columns="carbs_g"))


def test_glucose_in_mmol_is_refused_with_advice():
    f = _frame()
    f.loc[2, "glucose"] = 6.5
    with pytest.raises(SchemaError, match="mmol/L"):
        validate_frame(f)


def test_off_grid_and_duplicate_slots_are_refused():
    f = _frame()
    f.loc[3, "time"] = f.loc[3, "time"] + pd.Timedelta(minutes=1)
    with pytest.raises(SchemaError, match="grid"):
        validate_frame(f)
    g = pd.concat([_frame(), _frame().iloc[[2]]]).sort_values("time")
    with pytest.raises(SchemaError, match="duplicate"):
        validate_frame(g)


def test_naive_times_are_refused():
    f = _frame()
    f["time"] = f["time"].dt.tz_localize(None)
    with pytest.raises(SchemaError, match="naive"):
        validate_frame(f)


def test_negative_insulin_is_refused():
    f = _frame()
    f.loc[1, "bolus_u"] = -1.0
    with pytest.raises(SchemaError, match="bolus_u"):
        validate_frame(f)


def test_parquet_round_trip_keeps_metadata_and_hash(tmp_path):
    f = set_meta(
        _frame(), DatasetMeta(source="test", timezone="Asia/Shanghai", licence="CC BY 4.0")
    )
    p = write_parquet(f, tmp_path / "f.parquet")
    g = read_parquet(p)
    assert get_meta(g).timezone == "Asia/Shanghai"
    assert get_meta(g).licence == "CC BY 4.0"
    assert dataset_hash(g) == dataset_hash(f)
    pd.testing.assert_frame_equal(
        g.reset_index(drop=True), validate_frame(f).reset_index(drop=True), check_dtype=False
    )


def test_hash_changes_with_content():
    f = _frame()
    g = _frame()
    g.loc[0, "glucose"] = 101.0
    assert dataset_hash(f) != dataset_hash(g)


def test_input_error_names_file_record_field_value():
    e = InputError("glucose out of range", file="x.csv", record=12, field="gl", value=900)
    msg = str(e)
    for part in ("x.csv", "12", "'gl'", "900"):
        assert part in msg
    r = e.as_rejection()
    assert r.value == 900 and r.field == "gl"
    rep = DataReport()
    rep.reject_error(e)
    assert rep.as_dict()["rejected"][0]["reason"] == "glucose out of range"
