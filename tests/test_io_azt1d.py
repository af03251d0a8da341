"""AZT1D reader: the shipped trimmed files (each layout and oddity) and hand-made bad files."""

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from forecast.io import guess_format, read
from forecast.io.azt1d import BASAL_MAX_U_H, read_azt1d
from forecast.schema import InputError, get_meta, read_parquet

SHIPPED = Path(__file__).parent / "fixtures" / "azt1d"
HEADER = (
    "EventDateTime,DeviceMode,BolusType,Basal,CorrectionDelivered,"
    "TotalBolusInsulinDelivered,FoodDelivered,CarbSize,CGM"
)


def raw(n: int) -> pd.DataFrame:
    return pd.read_csv(SHIPPED / f"Subject {n}" / f"Subject {n}.csv", dtype=str).fillna("")


@pytest.fixture(scope="module")
def shipped():
    return read_azt1d(SHIPPED)


def write(tmp_path: Path, rows: list[str], name: str = "Subject 99.csv") -> Path:
    p = tmp_path / name
    p.write_text("\n".join([HEADER, *rows]) + "\n")
    return p


def day(n: int = 24, start: str = "2024-01-01 00:00:00", **cells: str) -> list[str]:
    """`n` rows 5 min apart with CGM 120 and the given cells (column name -> value)."""
    t0 = pd.Timestamp(start)
    cols = HEADER.split(",")
    out = []
    for i in range(n):
        row = dict.fromkeys(cols, "")
        row.update(EventDateTime=str(t0 + pd.Timedelta(minutes=5 * i)), CGM="120", **cells)
        out.append(",".join(row[c] for c in cols))
    return out


# --------------------------------------------------------------------------- shipped files


def test_every_cgm_value_is_accounted_for(shipped):
    frame, report = shipped
    n_in = sum(len(raw(n)) for n in (1, 8, 14, 17))  # every row of these files has a CGM value
    assert report.readings_in == n_in
    assert report.readings_kept + report.readings_rejected == n_in
    assert frame["glucose"].notna().sum() == report.readings_kept
    reasons = {r.reason for r in report.rejected if r.field == "glucose"}
    assert reasons == {"duplicate row", "duplicate"}


def test_layouts_and_metadata(shipped):
    frame, _ = shipped
    meta = get_meta(frame)
    assert meta.timezone == "America/Phoenix" and "CC BY 4.0" in meta.licence
    assert meta.extra["layouts"] == {
        "Subject 1.csv": "standard",
        "Subject 14.csv": "reordered",
        "Subject 17.csv": "standard",
        "Subject 8.csv": "zero-filled",
    }
    assert sorted(frame["subject_id"].unique()) == ["azt1d-1", "azt1d-14", "azt1d-17", "azt1d-8"]
    # the reordered file's glucose comes from "Readings (CGM / BGM)", not a shifted column
    s14 = frame[frame["subject_id"] == "azt1d-14"]["glucose"].dropna()
    want = pd.to_numeric(raw(14)["Readings (CGM / BGM)"])
    assert sorted(s14) == sorted(want)


def test_local_arizona_time_becomes_utc(shipped):
    frame, _ = shipped
    first = frame[frame["subject_id"] == "azt1d-1"].dropna(subset=["glucose"]).iloc[0]
    local = pd.Timestamp(raw(1)["EventDateTime"].iloc[0])  # 2023-12-20 06:04, MST = UTC-7
    assert abs(first["time"] - (local + pd.Timedelta(hours=7)).tz_localize("UTC")) <= pd.Timedelta(
        minutes=2.5
    )


def test_basal_rate_is_held_and_implausible_rates_rejected(shipped):
    frame, report = shipped
    f = frame[frame["subject_id"] == "azt1d-1"].set_index("time")
    # blank basal cells at the file's start: unknown, not zero insulin
    assert f["basal_known"].iloc[0] == 0 and f["basal_u"].iloc[0] == 0
    # 2.2 U/h from 2023-12-20 23:59 local = 06:59 UTC: 2.2/12 U in a slot it covers whole
    assert f.loc["2023-12-21 07:10", "basal_u"] == pytest.approx(2.2 / 12)
    assert f.loc["2023-12-21 07:10", "basal_known"] == 1
    bad = [r for r in report.rejected if r.field == "basal_u"]
    assert len(bad) == 12 and {r.value for r in bad} == {"1910.0"}
    assert all(r.reason == f"implausible basal rate (above {BASAL_MAX_U_H:g} U/h)" for r in bad)
    assert bad[0].record.startswith("line ") and "column 'Basal'" in bad[0].record
    # the hour of 1910 "U/h" (05:xx local, 12:xx UTC) is unknown basal, not a held rate
    hour = f.loc["2023-12-22 12:05":"2023-12-22 12:50"]
    assert (hour["basal_known"] == 0).all() and (hour["basal_u"] == 0).all()


def test_automatic_boluses_are_kept_apart(shipped):
    frame, _ = shipped
    r = raw(1)
    auto = r["BolusType"].str.startswith("Automatic")
    want = pd.to_numeric(r.loc[auto, "TotalBolusInsulinDelivered"]).sum()
    f = frame[frame["subject_id"] == "azt1d-1"]
    assert f["bolus_auto_u"].sum() == pytest.approx(want)
    assert (f["bolus_u"] >= f["bolus_auto_u"] - 1e-9).all()  # bolus_u is the total
    dup = r.duplicated()
    total = pd.to_numeric(r.loc[~dup, "TotalBolusInsulinDelivered"], errors="coerce").sum()
    assert f["bolus_u"].sum() == pytest.approx(total)


def test_extended_boluses(shipped, tmp_path):
    _, report = shipped
    ext = [r for r in report.rejected if r.file.endswith("Subject 14.csv")]
    assert {r.reason for r in ext} == {
        "extended portion without a duration (not in the frame)",
        "extended bolus without its programmed total",
    }
    # "Extended 50.00%/25.00": 12.5 U now, 12.5 U later
    assert any(r.value == "Extended 50.00%/25.00 (12.50 U delayed)" for r in ext)
    p = write(tmp_path, day(60, BolusType="", Basal="1.0"))
    rows = p.read_text().splitlines()
    rows[2] = "2024-01-01 00:05:00,,Extended 60.00%/10.00,1.0,0.0,6.0,6.0,60,120"
    p.write_text("\n".join(rows) + "\n")
    frame, rep = read_azt1d(p, extended_hours=2)
    assert frame["bolus_u"].sum() == pytest.approx(10.0)
    b = frame.set_index("time")["bolus_u"]  # 00:05 in Arizona is 07:05 UTC
    # 4 U over 07:05-09:05: 1/6 U per 5-min slot (half slots at both ends)
    assert b["2024-01-01 07:05"] == pytest.approx(6.0 + 4.0 / 48)
    assert b["2024-01-01 07:10":"2024-01-01 09:00"].to_numpy() == pytest.approx(
        np.full(23, 4.0 / 24)
    )
    assert b["2024-01-01 09:05"] == pytest.approx(4.0 / 48)
    assert b["2024-01-01 09:10":].sum() == 0
    frame, rep = read_azt1d(p)
    assert frame["bolus_u"].sum() == pytest.approx(6.0)
    assert [r.value for r in rep.rejected] == ["Extended 60.00%/10.00 (4.00 U delayed)"]


def test_device_mode(shipped):
    frame, report = shipped
    assert set(frame["device_mode"].dropna()) == {"sleep", "exercise"}
    s17 = frame[frame["subject_id"] == "azt1d-17"]
    assert (s17["device_mode"].dropna() == "sleep").all() and s17["device_mode"].notna().sum() > 0
    assert any("sleepsleep" in n for n in report.notes)


def test_duplicate_rows_name_file_record_and_value(shipped):
    _, report = shipped
    dups = [r for r in report.rejected if r.reason == "duplicate row"]
    r = raw(1)
    assert len([d for d in dups if d.file.endswith("Subject 1.csv")]) == r.duplicated().sum()
    d = dups[0]
    line = int(d.record.split(",")[0].removeprefix("line "))
    assert d.record.endswith("column 'CGM'")
    src = (Path(d.file).read_text().splitlines())[line - 1]
    assert src.endswith("," + str(d.value))


def test_high_daily_bolus_is_flagged(shipped):
    _, report = shipped
    assert any(n.startswith("flagged: azt1d-1 ") for n in report.notes)
    assert report.counts["flagged:high daily bolus"] == 1


# --------------------------------------------------------------------------- bad files


def test_each_rejection_reason(tmp_path):
    rows = day(24, Basal="0.8")
    cols = HEADER.split(",")

    def put(i, **cells):
        row = dict(zip(cols, next(csv.reader([rows[i]])), strict=True))
        row.update(cells)
        rows[i] = ",".join(row[c] for c in cols)

    put(1, BolusType="Mystery", TotalBolusInsulinDelivered="1.0")
    put(2, BolusType="Standard", TotalBolusInsulinDelivered="476")
    put(3, BolusType="Standard", TotalBolusInsulinDelivered="1.0", CarbSize="900")
    put(4, Basal="-1")
    put(5, Basal="abc")
    put(6, DeviceMode="party")
    put(7, CGM="700")
    put(8, CGM="High")
    put(9, EventDateTime="yesterday")
    put(10, BolusType="Standard", TotalBolusInsulinDelivered="2.0", CarbSize="30")
    rows.insert(11, rows[10].replace(",120", ",125"))  # the same bolus, another CGM value
    rows.insert(12, "2024-01-01 00:55:00,,,0.8,")  # too few fields
    frame, rep = read_azt1d(write(tmp_path, rows))
    got = {(r.field, r.reason, str(r.value)) for r in rep.rejected}
    assert {
        ("bolus_u", "unknown bolus type", "Mystery"),
        ("bolus_u", "implausible bolus_u (above 30)", "476"),
        ("carbs_g", "implausible carbs_g (above 300)", "900"),
        ("basal_u", "negative basal rate", "-1"),
        ("basal_u", "unparseable basal rate", "abc"),
        ("device_mode", "unknown device mode", "party"),
        ("glucose", "glucose outside 20-600 mg/dL", "700"),
        ("glucose", "sensor error code", "High"),
        ("glucose", "unparseable timestamp", "yesterday"),
        ("bolus_u", "duplicate bolus record", "2.0"),
    } <= got
    assert any(r.reason.startswith("malformed CSV row") for r in rep.rejected)
    assert rep.readings_in == len(rows)
    assert rep.readings_kept + rep.readings_rejected == rep.readings_in
    assert frame["bolus_u"].sum() == pytest.approx(3.0)  # 1.0 (row 3) + 2.0 once
    assert np.nansum(frame["carbs_g"]) == 30


def test_strict_raises_naming_the_record(tmp_path):
    rows = day(4, Basal="1910")
    with pytest.raises(InputError) as e:
        read_azt1d(write(tmp_path, rows), strict=True)
    assert e.value.field == "basal_u" and e.value.value == "1910"
    assert e.value.record == "line 2, column 'Basal'" and "Subject 99.csv" in e.value.file


def test_not_an_azt1d_file_counts_its_rows(tmp_path):
    p = tmp_path / "other.csv"
    p.write_text("id,time,gl\na,2024-01-01 00:00,100\na,2024-01-01 00:05,101\n")
    frame, rep = read_azt1d(p)
    assert rep.readings_in == rep.readings_rejected == 2 and len(frame) == 0
    assert rep.rejected[0].field == "header"
    assert [r.record for r in rep.rejected[1:]] == ["line 2", "line 3"]
    with pytest.raises(InputError):
        read_azt1d(p, strict=True)


def test_format_is_detected_from_the_header(tmp_path):
    assert guess_format([SHIPPED]) == "azt1d"
    assert guess_format([SHIPPED / "Subject 8" / "Subject 8.csv"]) == "azt1d"
    iglu = Path(__file__).parent / "fixtures" / "csv" / "iglu.csv"
    assert guess_format([iglu]) == "csv"
    frame, _ = read([SHIPPED / "Subject 17"])
    assert frame["subject_id"].unique().tolist() == ["azt1d-17"]


def test_cli_ingest_and_describe(tmp_path):
    out = tmp_path / "azt.parquet"
    cmd = [sys.executable, "-m", "forecast.cli", "data"]
    res = subprocess.run(
        [*cmd, "ingest", str(SHIPPED), "--format", "azt1d", "--out", str(out)],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr
    _, report = read_azt1d(SHIPPED)
    assert f"readings {report.readings_kept} of {report.readings_in}" in res.stdout
    frame = read_parquet(out)
    assert {"bolus_auto_u", "basal_known", "device_mode"} <= set(frame.columns)


def test_describe_shows_daily_insulin_and_carbs(shipped):
    from forecast.commands.data import describe_frame

    frame, _ = shipped
    info = {s["subject_id"]: s for s in describe_frame(frame)["subjects"]}
    s8 = info["azt1d-8"]
    g = frame[frame["subject_id"] == "azt1d-8"]
    days = len(g) * 5 / 1440
    assert s8["auto_u_day"] == pytest.approx(g["bolus_auto_u"].sum() / days)
    assert s8["bolus_u_day"] + s8["auto_u_day"] == pytest.approx(g["bolus_u"].sum() / days)
    assert s8["carbs_g_day"] == pytest.approx(np.nansum(g["carbs_g"]) / days)
    # subject 14's trimmed day states no basal rate: unknown, not 0 U/day
    assert info["azt1d-14"]["basal_u_day"] is None and info["azt1d-14"]["tdd_u_day"] is None
    for k in ("tir", "tbr70", "coverage", "days"):
        assert s8[k] is not None
