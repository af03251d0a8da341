"""OhioT1DM reader on synthetic files in the release's exact XML layout (both cohorts)."""

import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from forecast.io.ohio import read_ohio
from forecast.schema import EmptyInputError, InputError, get_meta

HERE = Path(__file__).parent / "fixtures" / "ohio"
DAY = pd.Timestamp("2021-12-07", tz="UTC")


@pytest.fixture(scope="module")
def ohio():
    return read_ohio(HERE)


def _events(name: str, element: str) -> list[dict]:
    return [e.attrib for e in ET.parse(HERE / name).getroot().find(element)]


def _slot(frame, sid, hhmm, day=DAY):
    t = day + pd.Timedelta(hhmm + ":00")
    return frame[(frame["subject_id"] == sid) & (frame["time"] == t)].iloc[0]


def test_both_cohorts_and_both_splits_are_read(ohio):
    frame, report = ohio
    assert sorted(frame["subject_id"].unique()) == ["ohio-540", "ohio-559"]
    n_in = sum(
        len(_events(f, "glucose_level"))
        for f in ("559-ws-training.xml", "559-ws-testing.xml", "540-ws-training.xml")
    )
    assert report.readings_in == n_in == report.readings_kept == frame["glucose"].notna().sum()
    assert report.rejected == []
    meta = get_meta(frame)
    assert meta.source == "OhioT1DM" and meta.timezone == "UTC"
    assert meta.extra["cohorts"] == ["2018", "2020"]
    assert meta.extra["patients"]["559"] == {"weight": "99", "insulin_type": "Novalog"}
    # the testing file continues the training file: one contiguous grid per subject
    sub = frame[frame["subject_id"] == "ohio-559"]
    assert (sub["time"].diff().dropna() == pd.Timedelta("5min")).all()
    first = _events("559-ws-training.xml", "glucose_level")[0]
    assert first == {"ts": "07-12-2021 01:17:00", "value": "140"}
    assert _slot(frame, "ohio-559", "01:15")["glucose"] == 140.0


def test_basal_schedule_temp_basals_and_suspension(ohio):
    frame, _ = ohio
    sub = frame[frame["subject_id"] == "ohio-559"]
    # training: 1.02 U/h 00:00-06:00, 1.2 U/h 06:00-20:00 less a suspension 10:00-10:30
    # and a 0.5 U/h temp 15:00-16:00, 0.9 U/h from 20:00 to the file's last record (23:42);
    # testing: 1.02 U/h from 00:00 to its last record (05:57)
    want = 6 * 1.02 + (14 * 1.2 - 0.5 * 1.2 - 0.7) + (3 + 42 / 60) * 0.9 + (5 + 57 / 60) * 1.02
    assert sub["basal_u"].sum() == pytest.approx(want)
    for hhmm in ("10:05", "10:10", "10:15", "10:20", "10:25"):
        assert _slot(frame, "ohio-559", hhmm)["basal_u"] == 0.0
    assert _slot(frame, "ohio-559", "15:30")["basal_u"] == pytest.approx(0.5 / 12)
    assert _slot(frame, "ohio-559", "11:00")["basal_u"] == pytest.approx(1.2 / 12)


def test_square_and_dual_boluses_are_spread_and_wizard_carbs_kept_apart(ohio):
    frame, _ = ohio
    sub = frame[frame["subject_id"] == "ohio-559"]
    doses = sum(
        float(e["dose"])
        for f in ("559-ws-training.xml", "559-ws-testing.xml")
        for e in _events(f, "bolus")
    )
    assert sub["bolus_u"].sum() == pytest.approx(doses)
    # 3.0 U square bolus 12:00-13:00: 0.25 U in each full slot
    assert _slot(frame, "ohio-559", "12:30")["bolus_u"] == pytest.approx(0.25)
    # dual: 2.0 U now + 1.5 U over an hour
    assert _slot(frame, "ohio-559", "18:00")["bolus_u"] == pytest.approx(2.0 + 1.5 / 24)
    meals = _events("559-ws-training.xml", "meal")
    assert sub["carbs_g"].sum() == sum(float(m["carbs"]) for m in meals) == 145
    assert sub["carbs_bwz_g"].sum() == 45 + 60
    assert sub["meal_announced"].sum() == 4
    assert _slot(frame, "ohio-559", "07:30")["carbs_g"] == 45


def test_wearable_and_life_event_columns(ohio):
    frame, _ = ohio
    sub = frame[frame["subject_id"] == "ohio-559"]
    hr = _events("559-ws-training.xml", "basis_heart_rate")
    assert sub["heart_rate"].notna().sum() == len(hr)
    assert sub["steps"].sum() == sum(
        float(e["value"]) for e in _events("559-ws-training.xml", "basis_steps")
    )
    assert _slot(frame, "ohio-559", "16:45")["exercise"] == 5.0
    assert _slot(frame, "ohio-559", "17:30")["exercise"] == 0.0
    assert _slot(frame, "ohio-559", "03:00")["sleep"] == 2.0
    assert _slot(frame, "ohio-559", "10:00")["work"] == 3.0
    assert _slot(frame, "ohio-559", "10:15")["hypo_event"] == 1.0
    assert _slot(frame, "ohio-559", "21:00")["illness"] == 1.0
    assert _slot(frame, "ohio-559", "07:25")["finger_stick"] == 169.0
    s540 = frame[frame["subject_id"] == "ohio-540"]
    assert s540["acceleration"].notna().sum() == 24 and sub["acceleration"].isna().all()


def test_timezone_argument_gives_true_utc(tmp_path):
    frame, _ = read_ohio(HERE / "559-ws-testing.xml", timezone="America/New_York")
    assert get_meta(frame).timezone == "America/New_York"
    first = frame.dropna(subset=["glucose"])["time"].iloc[0]
    assert first == pd.Timestamp("2021-12-08 05:00", tz="UTC")  # 00:02 EST, nearest slot
    with pytest.raises(InputError, match="unknown time zone"):
        read_ohio(HERE / "559-ws-testing.xml", timezone="Ohio/Athens")


def test_shifted_future_dates_are_allowed_unless_asked(tmp_path):
    now = pd.Timestamp("2026-01-01", tz="UTC")
    frame, report = read_ohio(HERE / "540-ws-training.xml", now=now)
    assert report.readings_kept == report.readings_in > 0
    frame, report = read_ohio(HERE / "540-ws-training.xml", now=now, allow_future=False)
    assert report.readings_kept == 0 and len(frame) == 0
    assert {r.reason for r in report.rejected} == {"timestamp in the future"}
    assert report.readings_rejected == report.readings_in


# --------------------------------------------------------------------------- bad input

BAD = """<patient id="901" weight="70" insulin_type="Novalog">
	<glucose_level>
		<event ts="01-01-2022 00:00:00" value="100"/>
		<event ts="01-01-2022 00:05:00" value="abc"/>
		<event ts="01-01-2022 00:10:00" value="700"/>
		<event ts="31-02-2022 00:15:00" value="110"/>
		<event ts="01-01-2022 00:20:00" value="120"/>
		<event ts="01-01-2022 00:21:00" value="121"/>
		<event ts="01-01-2022 00:12:00" value="115"/>
		<event ts="01-01-2022 00:30:00" value="130"/>
	</glucose_level>
	<bolus>
		<event ts_begin="01-01-2022 00:10:00" ts_end="01-01-2022 00:10:00" type="normal" dose="-1" bwz_carb_input="0"/>
		<event ts_begin="01-01-2022 00:10:00" ts_end="01-01-2022 00:00:00" type="square" dose="2" bwz_carb_input="0"/>
	</bolus>
	<sleep>
		<event ts_begin="01-01-2022 23:00:00" ts_end="01-01-2022 06:50:00" quality="3"/>
	</sleep>
	<gizmo>
		<event ts="01-01-2022 00:00:00" value="1"/>
	</gizmo>
</patient>
"""


def test_bad_records_name_file_record_field_value(tmp_path):
    p = tmp_path / "901-ws-training.xml"
    p.write_text(BAD)
    frame, report = read_ohio(p)
    rej = {(r.record, r.reason): r for r in report.rejected}
    assert rej[("glucose_level event 2 (line 4), value", "unparseable glucose")].value == "abc"
    assert (
        rej[("glucose_level event 3 (line 5), value", "glucose outside 20-600 mg/dL")].value
        == "700"
    )
    assert (
        rej[("glucose_level event 4 (line 6), ts", "unparseable timestamp")].value
        == "31-02-2022 00:15:00"
    )
    assert ("glucose_level event 7 (line 9), ts", "timestamp out of order") in rej
    assert rej[("glucose_level event 6 (line 8)", "duplicate")].value == 121.0
    assert rej[("bolus event 1 (line 13), dose", "negative bolus_u")].field == "bolus_u"
    assert (
        rej[("bolus event 2 (line 14), ts_end", "end before start")].value == "01-01-2022 00:00:00"
    )
    assert all(r.file == str(p) for r in report.rejected)
    # 8 readings: 100, 120, 130 kept; 5 rejected (abc, 700, bad date, duplicate, out of order)
    assert report.readings_in == 8 and report.readings_kept == 3 and report.readings_rejected == 5
    assert frame["bolus_u"].sum() == 0
    # overnight sleep written with the morning's date on its end
    assert report.counts["sleep_overnight_spans"] == 1
    assert frame[frame["sleep"] == 3]["time"].min() <= pd.Timestamp("2022-01-01 23:00", tz="UTC")
    assert report.counts["ignored:gizmo"] == 1


def test_strict_mode_raises_the_first_problem(tmp_path):
    p = tmp_path / "901-ws-training.xml"
    p.write_text(BAD)
    with pytest.raises(InputError) as e:
        read_ohio(p, strict=True)
    assert e.value.file == str(p) and e.value.field == "glucose" and e.value.value == "abc"
    assert "line 4" in str(e.value)


def test_malformed_xml_keeps_what_was_read_or_raises(tmp_path):
    p = tmp_path / "902-ws-training.xml"
    text = (HERE / "559-ws-testing.xml").read_text()
    cut = text[: text.index("<event", 2000)] + "<event ts="  # truncated download
    p.write_text(cut)
    with pytest.raises(InputError, match="malformed XML") as e:
        read_ohio(p, strict=True)
    assert e.value.record.startswith("line ") and e.value.field == "xml"
    frame, report = read_ohio(p)
    assert report.rejected[-1].reason.startswith("malformed XML")
    assert 0 < report.readings_kept == report.readings_in


def test_empty_foreign_and_anonymous_files(tmp_path):
    empty = tmp_path / "903-ws-training.xml"
    empty.write_text("  \n")
    with pytest.raises(EmptyInputError):
        read_ohio(empty, strict=True)
    foreign = tmp_path / "904-ws-training.xml"
    foreign.write_text("<entries><event ts='01-01-2022 00:00:00' value='1'/></entries>")
    with pytest.raises(InputError, match="root element is not <patient>"):
        read_ohio(foreign, strict=True)
    nameless = tmp_path / "905-ws-testing.xml"
    nameless.write_text(
        '<patient><glucose_level><event ts="01-01-2022 00:00:00" value="99"/></glucose_level></patient>'
    )
    with pytest.raises(InputError, match="no id"):
        read_ohio(nameless, strict=True)
    frame, report = read_ohio(nameless)
    assert list(frame["subject_id"].unique()) == ["ohio-905"]
    assert np.isclose(frame["glucose"].iloc[0], 99.0)
