"""CSV reader: iglu, Dexcom Clarity, LibreView, mapped columns; units; bad rows."""

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from forecast.io.csv import read_csv
from forecast.schema import MGDL_PER_MMOLL, EmptyInputError, InputError, UnitsError, get_meta

HERE = Path(__file__).parent / "fixtures" / "csv"


def rows_of(name: str, delimiter: str = ",") -> list[list[str]]:
    with open(HERE / name, newline="") as f:
        return list(csv.reader(f, delimiter=delimiter))


def test_iglu_two_subjects_every_reading_kept():
    frame, report = read_csv(HERE / "iglu.csv")
    rows = rows_of("iglu.csv")[1:]
    assert sorted(frame["subject_id"].unique()) == ["Subject 1", "Subject 2"]
    assert report.readings_in == len(rows) == report.readings_kept
    for sid in ("Subject 1", "Subject 2"):
        want = [float(r[2]) for r in rows if r[0] == sid]
        assert frame.loc[frame["subject_id"] == sid, "glucose"].dropna().tolist() == want
    first = frame.dropna(subset=["glucose"])["time"].iloc[0]
    assert first == pd.Timestamp("2020-02-24 00:00", tz="UTC")  # 00:00:07 -> nearest slot
    chicago, _ = read_csv(HERE / "iglu.csv", timezone="America/Chicago")
    assert chicago.dropna(subset=["glucose"])["time"].iloc[0] == first + pd.Timedelta("6h")
    assert get_meta(chicago).timezone == "America/Chicago"


def test_dexcom_clarity_export():
    frame, report = read_csv(HERE / "dexcom_clarity.csv")
    rows = rows_of("dexcom_clarity.csv")
    egv = [r for r in rows if r[2] == "EGV"]
    assert list(frame["subject_id"].unique()) == ["dexcom-dexcom_clarity"]
    assert report.readings_in == len(egv) == 72
    rej = {(r.record, r.value): r for r in report.rejected}
    assert rej[("line 26, Glucose Value (mg/dL)", "Low")].reason == "sensor error code"
    assert rej[("line 56, Glucose Value (mg/dL)", "High")].field == "glucose"
    assert report.readings_kept == 70 == frame["glucose"].notna().sum()
    assert frame["finger_stick"].dropna().tolist() == [118.0]
    assert frame["bolus_u"].sum() == pytest.approx(4.5)
    assert frame["basal_u"].sum() == pytest.approx(18.0)  # long-acting, spread over 24 h
    assert frame["basal_u"].max() == pytest.approx(18.0 / 288)
    assert frame["carbs_g"].sum() == 48
    assert (frame["exercise"] == 2.0).sum() == 7  # "Medium" for 30 min
    assert frame["insulin_sc"].dropna().tolist() == ["Fast-Acting 4.5 U", "Long-Acting 18 U"]
    assert report.counts["ignored:FirstName"] == 1 and report.counts["ignored:Health"] == 1
    text = frame.astype(str).to_string()
    assert "Jane" not in text and "Doe" not in text  # patient info never enters the frame


def test_libreview_export_unsorted_with_scans_and_strips():
    frame, report = read_csv(HERE / "libreview.csv")
    rows = rows_of("libreview.csv")[2:]
    n = sum(1 for r in rows if r[4] or r[5])
    assert report.readings_in == n == 49 == report.readings_kept
    assert report.rejected == []  # records grouped by type are not "out of order"
    assert frame["finger_stick"].dropna().tolist() == [165.0]
    assert frame["bolus_u"].sum() == 5.0  # the meal-insulin column is a split, not more insulin
    assert frame["basal_u"].sum() == pytest.approx(14.0)
    assert frame["carbs_g"].sum() == 60
    meta = get_meta(frame)
    assert meta.sampling_minutes == 15 and meta.extra["layouts"] == ["libreview"]
    # 13-09-2022 00:07 (day first)
    assert frame.dropna(subset=["glucose"])["time"].min() == pd.Timestamp(
        "2022-09-13 00:05", tz="UTC"
    )


def test_mapped_columns_semicolons_decimal_commas_and_detected_mmol():
    cols = {"subject_id": "patient", "time": "timestamp", "glucose": "bg_mmol"}
    frame, report = read_csv(HERE / "mapped_mmol.csv", columns=cols)
    rows = rows_of("mapped_mmol.csv", delimiter=";")
    first = float(rows[1][2].replace(",", "."))
    assert frame["glucose"].dropna().iloc[0] == pytest.approx(first * MGDL_PER_MMOLL)
    assert get_meta(frame).units_seen == ["mmol/L"]
    assert report.readings_kept == 36
    with pytest.raises(UnitsError, match="look like mmol/L"):
        read_csv(HERE / "mapped_mmol.csv", columns=cols, units="mg/dL")


def _write_iglu(path: Path, values, sids=None, times=None) -> Path:
    n = len(values)
    sids = sids or ["s"] * n
    times = times or [
        (pd.Timestamp("2024-05-01") + pd.Timedelta(minutes=5 * i)).strftime("%Y-%m-%d %H:%M:%S")
        for i in range(n)
    ]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "time", "gl"])
        w.writerows(zip(sids, times, values))
    return path


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(st.lists(st.floats(40.0, 400.0, allow_nan=False), min_size=3, max_size=30))
def test_property_mmol_csv_and_its_mgdl_twin_give_the_same_frame(tmp_path, mg):
    a = _write_iglu(tmp_path / "mg.csv", [repr(v) for v in mg])
    b = _write_iglu(tmp_path / "mmol.csv", [repr(v / MGDL_PER_MMOLL) for v in mg])
    fa, _ = read_csv(a, units="mg/dL")
    fb, _ = read_csv(b, units="mmol/L")
    pd.testing.assert_frame_equal(fa, fb, check_exact=False, rtol=1e-12)
    np.testing.assert_allclose(fa["glucose"].dropna(), mg, rtol=1e-12)


def test_units_are_never_guessed_when_ambiguous(tmp_path):
    p = _write_iglu(tmp_path / "amb.csv", [22, 25, 30, 28])
    with pytest.raises(UnitsError, match="--units") as e:
        read_csv(p)
    assert e.value.file == str(p)
    frame, _ = read_csv(p, units="mmol/L")
    assert frame["glucose"].dropna().iloc[0] == pytest.approx(22 * MGDL_PER_MMOLL)
    frame, _ = read_csv(p, units="mg/dL")
    assert frame["glucose"].dropna().iloc[0] == 22
    with pytest.raises(InputError, match="unknown glucose units"):
        read_csv(p, units="mg%")


def test_bad_rows_values_and_order(tmp_path):
    p = tmp_path / "bad.csv"
    p.write_text(
        "id,time,gl\n"
        "a,2024-05-01 00:00:00,120\n"
        "a,2024-05-01 00:05:00,LOW\n"
        "a,2024-05-01 00:10:00,15\n"
        "a,2024-05-01 00:15:00\n"  # line 5: a field missing
        "a,2024-05-01 00:20:00,130\n"
        "a,2024-05-01 00:12:00,125\n"  # line 7: back in time
        "b,2024-04-30 23:00:00,140\n"  # another subject starts earlier: fine
        "b,2024-04-30 23:05:00,n/a\n"
        "a,2099-01-01 00:00:00,100\n"
    )
    frame, report = read_csv(p)
    got = {r.record: (r.reason, r.value) for r in report.rejected}
    assert got["line 3, gl"] == ("sensor error code", "LOW")
    assert got["line 4, gl"] == ("glucose outside 20-600 mg/dL", "15")
    assert got["line 5"][0] == "malformed CSV row (expected 3 fields, got 2)"
    assert got["line 7, time"] == ("timestamp out of order", "2024-05-01 00:12:00")
    assert got["line 9, gl"] == ("unparseable glucose", "n/a")
    assert got["line 10, time"][0] == "timestamp in the future"
    assert all(r.field == "glucose" for r in report.rejected)
    assert report.readings_in == 9 and report.readings_kept == 3
    assert report.readings_kept + report.readings_rejected == report.readings_in
    # strict: the file's structure is checked before its values, so the broken row stops it
    with pytest.raises(InputError) as e:
        read_csv(p, strict=True)
    assert (e.value.file, e.value.record, e.value.field) == (str(p), "line 5", "glucose")
    lines = p.read_text().splitlines()
    p.write_text("\n".join(lines[:4] + lines[5:]) + "\n")
    with pytest.raises(InputError) as e:
        read_csv(p, strict=True)
    assert (e.value.record, e.value.field, e.value.value) == ("line 3, gl", "glucose", "LOW")


def test_empty_headers_only_unknown_layout_and_ambiguous_dates(tmp_path):
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(EmptyInputError):
        read_csv(empty, strict=True)
    frame, report = read_csv(empty)
    assert len(frame) == 0 and report.rejected[0].reason == "empty file"
    header_only = tmp_path / "header.csv"
    header_only.write_text("id,time,gl\n")
    with pytest.raises(EmptyInputError, match="no records"):
        read_csv(header_only, strict=True)
    odd = tmp_path / "odd.csv"
    odd.write_text("when,value\n2024-01-01 00:00,100\n")
    with pytest.raises(InputError, match="unrecognised CSV header") as e:
        read_csv(odd, strict=True)
    assert e.value.field == "header" and "--columns" in str(e.value)
    frame, _ = read_csv(odd, columns={"time": "when", "glucose": "value"}, subject_id="me")
    assert list(frame["subject_id"].unique()) == ["me"]
    amb = tmp_path / "amb.csv"
    amb.write_text("id,time,gl\nx,03-04-2024 10:00,100\nx,03-04-2024 10:05,110\n")
    with pytest.raises(InputError, match="day from month"):
        read_csv(amb)
    frame, _ = read_csv(amb, time_format="%d-%m-%Y %H:%M")
    assert frame["time"].iloc[0] == pd.Timestamp("2024-04-03 10:00", tz="UTC")


# --------------------------------------------------------------------------- no silent loss


def test_unknown_or_unsupported_column_key_is_an_error(tmp_path):
    p = tmp_path / "export.csv"
    p.write_text("EventDateTime,CGM,Basal\n2024-01-01 00:00,100,0.8\n")
    for bad in ({"time": "EventDateTime", "glucose": "CGM", "foo": "Basal"},):
        with pytest.raises(InputError, match="unknown --columns key 'foo'") as e:
            read_csv(p, columns=bad)
        assert "basal_rate (basal rate, U/h held until the next value)" in str(e.value)
    with pytest.raises(InputError, match="not both"):
        read_csv(
            p,
            columns={
                "time": "EventDateTime",
                "glucose": "CGM",
                "basal_u": "Basal",
                "basal_rate": "Basal",
            },
        )


def test_insulin_and_carb_columns_with_their_units(tmp_path):
    p = tmp_path / "export.csv"
    rows = ["EventDateTime,CGM,Basal,Bolus,Carbs"]
    for i in range(24):  # two hours; 1.2 U/h from the start, 0.6 U/h from 01:00
        t = pd.Timestamp("2024-01-01") + pd.Timedelta(minutes=5 * i)
        basal = "1.2" if i == 0 else "0.6" if i == 12 else ""
        rows.append(f"{t},{100 + i},{basal},{'3.5' if i == 6 else ''},{'40' if i == 6 else ''}")
    p.write_text("\n".join(rows) + "\n")
    cols = {"time": "EventDateTime", "glucose": "CGM", "bolus_u": "Bolus", "carbs_g": "Carbs"}
    frame, rep = read_csv(p, columns={**cols, "basal_rate": "Basal"})
    # 1.2 U/h for 1 h + 0.6 U/h until the file's last record (00:55 after 01:00)
    assert frame["basal_u"].sum() == pytest.approx(1.2 + 0.6 * 55 / 60)
    assert frame["bolus_u"].sum() == 3.5 and np.nansum(frame["carbs_g"]) == 40
    assert not any("not read" in n for n in rep.notes)
    frame, _ = read_csv(p, columns={**cols, "basal_u": "Basal"})
    assert frame["basal_u"].sum() == pytest.approx(1.8)  # U per record


def test_columns_not_read_are_named(tmp_path):
    p = tmp_path / "iglu_plus.csv"
    p.write_text("id,time,gl,insulin,meal\na,2024-01-01 00:00,100,2,30\na,2024-01-01 00:05,101,,\n")
    frame, rep = read_csv(p)
    assert frame["glucose"].notna().sum() == 2
    assert "iglu_plus.csv: column(s) not read: insulin, meal" in rep.notes
    q = tmp_path / "mapped.csv"
    q.write_text("ts,sgv,device\n2024-01-01 00:00,100,x\n")
    _, rep = read_csv(q, columns={"time": "ts", "glucose": "sgv"})
    assert "mapped.csv: column(s) not read: device" in rep.notes


def test_unrecognised_header_fails_and_counts_its_rows(tmp_path):
    p = tmp_path / "device.csv"
    p.write_text("date,time,glucose,type\n2024-01-01,00:00,100,cgm\n2024-01-01,00:05,98,cgm\n")
    frame, rep = read_csv(p)
    assert len(frame) == 0 and rep.readings_in == 2 and rep.readings_rejected == 2
    head = rep.rejected[0]
    assert head.field == "header" and "iglu (id,time,gl), Dexcom Clarity, LibreView" in head.reason
    assert any("--columns time=date+time,glucose=glucose,type=type" in n for n in rep.notes)
    out = tmp_path / "out.parquet"
    res = subprocess.run(
        [sys.executable, "-m", "forecast.cli", "data", "ingest", str(p), "--out", str(out)],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 1 and "unrecognised CSV header" in res.stderr
    assert "readings 0 of 2" in res.stderr and not out.exists()


def test_date_and_time_columns_and_finger_sticks(tmp_path):
    p = tmp_path / "device.csv"
    rows = ["date,time,glucose,type"]
    for i in range(300):  # a day and a bit: times of day repeat on the next date
        t = pd.Timestamp("2024-03-01 22:00") + pd.Timedelta(minutes=5 * i)
        rows.append(f"{t:%Y-%m-%d},{t:%H:%M},{100 + i % 50},cgm")
    rows.append("2024-03-02,07:02,123,manual")
    rows.append("2024-03-02,07:03,124,calibration?")
    p.write_text("\n".join(rows) + "\n")
    frame, rep = read_csv(p, columns={"time": "date+time", "glucose": "glucose", "type": "type"})
    assert frame["glucose"].notna().sum() == 300 == rep.readings_kept
    assert rep.readings_in == 301  # 300 CGM rows + the row of unknown type
    assert [r.reason for r in rep.rejected] == ["unknown record type (neither cgm nor manual)"]
    fs = frame.set_index("time")["finger_stick"].dropna()
    assert fs.to_dict() == {pd.Timestamp("2024-03-02 07:00", tz="UTC"): 123.0}
