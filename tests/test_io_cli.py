"""`glucast data ingest` / `describe` through forecast.cli.main, and the Parquet round trip."""

import json
from pathlib import Path

import pandas as pd
import pytest

from forecast.cli import main
from forecast.io import guess_format, read
from forecast.schema import InputError, dataset_hash, get_meta, read_parquet

FIX = Path(__file__).parent / "fixtures"
SHANGHAI = sorted(str(p) for p in (FIX / "shanghai").glob("*.xls*"))


def run_json(capsys, argv) -> dict:
    rc = main(argv)
    out = capsys.readouterr().out
    assert rc == 0, out
    return json.loads(out)  # exactly one JSON object on stdout


def test_ingest_and_describe_shanghai_json(tmp_path, capsys):
    out = tmp_path / "sh.parquet"
    got = run_json(
        capsys, ["data", "ingest", *SHANGHAI, "--format", "shanghai", "--out", str(out), "--json"]
    )
    frame = read_parquet(out)
    assert got["subjects"] == 3 == frame["subject_id"].nunique()
    assert got["readings"] == int(frame["glucose"].notna().sum()) == got["readings_in"]
    assert got["rejected"] == []
    assert got["bolus_u"] == pytest.approx(frame["bolus_u"].sum())
    assert got["basal_u"] == pytest.approx(frame["basal_u"].sum())
    assert got["carbs_g"] == 0.0  # meals of unknown size only
    desc = run_json(capsys, ["data", "describe", str(out), "--json"])
    subj = {s["subject_id"]: s for s in desc["subjects"]}
    assert set(subj) == {"shanghai-1001", "shanghai-1002", "shanghai-1006"}
    s = subj["shanghai-1001"]
    assert s["n"] == 658 and s["days"] == pytest.approx(658 * 15 / 1440)
    assert 95 <= s["coverage"] <= 101  # 15-min sensor, judged against its own period
    for key in ("mean", "cv", "gmi", "tir", "tbr70", "tbr54", "tar180", "tar250", "lbgi", "hbgi"):
        assert isinstance(s[key], float)
    assert desc["timezone"] == "Asia/Shanghai" and "CC BY 4.0" in desc["licence"]


def test_ingest_rejections_in_json_and_strict_exit_code(tmp_path, capsys):
    bad = tmp_path / "bad.csv"
    bad.write_text("id,time,gl\na,2024-05-01 00:00:00,120\na,2024-05-01 00:05:00,HIGH\n")
    got = run_json(
        capsys, ["data", "ingest", str(bad), "--out", str(tmp_path / "b.parquet"), "--json"]
    )
    assert got["rejected"] == [
        {
            "file": str(bad),
            "record": "line 3, gl",
            "field": "glucose",
            "value": "HIGH",
            "reason": "sensor error code",
        }
    ]
    assert got["readings"] == 1 and got["readings_in"] == 2
    rc = main(
        [
            "data",
            "ingest",
            str(bad),
            "--format",
            "csv",
            "--out",
            str(tmp_path / "c.parquet"),
            "--strict",
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "line 3, gl" in err and "'HIGH'" in err and str(bad) in err
    assert not (tmp_path / "c.parquet").exists()


def test_cli_options_columns_units_timezone_and_refusals(tmp_path, capsys):
    out = tmp_path / "m.parquet"
    got = run_json(
        capsys,
        [
            "data",
            "ingest",
            str(FIX / "csv" / "mapped_mmol.csv"),
            "--format",
            "csv",
            "--out",
            str(out),
            "--columns",
            "subject_id=patient,time=timestamp,glucose=bg_mmol",
            "--units",
            "mmol/L",
            "--timezone",
            "Europe/Berlin",
            "--json",
        ],
    )
    assert got["subject_ids"] == ["p7"] and got["readings"] == 36
    meta = get_meta(read_parquet(out))
    assert meta.timezone == "Europe/Berlin" and meta.units_seen == ["mmol/L"]
    rc = main(
        ["data", "ingest", *SHANGHAI, "--format", "shanghai", "--out", str(out), "--basal", "1.0"]
    )
    assert rc == 2 and "do not apply" in capsys.readouterr().err
    rc = main(
        ["data", "ingest", str(FIX / "csv" / "iglu.csv"), "--out", str(out), "--columns", "oops"]
    )
    assert rc == 2 and "--columns" in capsys.readouterr().err
    rc = main(["data", "ingest", str(tmp_path / "missing.xml"), "--out", str(out)])
    assert rc == 2


def test_human_output(tmp_path, capsys):
    out = tmp_path / "o.parquet"
    assert main(["data", "ingest", str(FIX / "ohio"), "--format", "ohio", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "OhioT1DM" in text and "subjects 2" in text
    assert main(["data", "describe", str(out)]) == 0
    text = capsys.readouterr().out
    assert "ohio-559" in text and "TIR" in text


def test_parquet_round_trip_keeps_meta_and_content(tmp_path):
    frame, _ = read(FIX / "nightscout" / "person_a", "nightscout")
    from forecast.schema import write_parquet

    write_parquet(frame, tmp_path / "ns.parquet")
    back = read_parquet(tmp_path / "ns.parquet")
    assert get_meta(back) == get_meta(frame)
    assert get_meta(back).timezone == "Europe/London"
    assert dataset_hash(back) == dataset_hash(frame)
    pd.testing.assert_frame_equal(back, frame, check_dtype=False)
    assert list(back.columns) == list(frame.columns)


def test_format_is_guessed_from_suffixes_or_refused():
    assert guess_format(SHANGHAI) == "shanghai"
    assert guess_format(["a.xml", "b.xml"]) == "ohio"
    with pytest.raises(InputError, match="--format"):
        guess_format(["a.xml", "b.csv"])
