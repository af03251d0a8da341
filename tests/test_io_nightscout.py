"""Nightscout reader: entries, treatments, profile; synthetic exports in the API's format."""

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from forecast.io.nightscout import read_nightscout
from forecast.schema import EmptyInputError, InputError, UnitsError, get_meta

HERE = Path(__file__).parent / "fixtures" / "nightscout"
A = HERE / "person_a"
B = HERE / "person_b"
H = 3600.0


@pytest.fixture(scope="module")
def a():
    return read_nightscout(A)


def _at(frame, hhmm: str, day="2024-03-10"):
    return frame[frame["time"] == pd.Timestamp(f"{day} {hhmm}", tz="UTC")].iloc[0]


def test_entries_newest_first_with_a_double_upload(a):
    frame, report = a
    entries = json.loads((A / "entries.json").read_text())
    sgv = [e for e in entries if e.get("type") == "sgv"]
    assert list(frame["subject_id"].unique()) == ["nightscout-person_a"]
    assert report.readings_in == len(sgv) == 97
    assert report.readings_kept == 96 == frame["glucose"].notna().sum()
    assert [(r.record, r.reason, r.field) for r in report.rejected] == [
        ("entries[11]", "duplicate", "glucose")
    ]
    assert report.counts["ignored:entries:cal"] == 1
    assert _at(frame, "07:00")["finger_stick"] == 131.0  # the meter (mbg) entry at 06:58
    assert get_meta(frame).timezone == "Europe/London"


def test_profile_basal_with_absolute_percent_and_cancelled_temps(a):
    frame, _ = a
    first = pd.Timestamp("2024-03-10 00:02:13", tz="UTC")
    last = pd.Timestamp("2024-03-10 07:57:13", tz="UTC")
    six = pd.Timestamp("2024-03-10 06:00", tz="UTC")
    scheduled = 0.8 * (six - first).total_seconds() / H + 1.0 * (last - six).total_seconds() / H
    # 01:00-01:30 at 0.5 instead of 0.8; 03:00 -50 % for 60 min, cancelled at 03:30
    want = scheduled - 0.5 * (0.8 - 0.5) - 0.5 * 0.8 * 0.5
    assert frame["basal_u"].sum() == pytest.approx(want)
    assert _at(frame, "03:15")["basal_u"] == pytest.approx(0.4 / 12)
    assert _at(frame, "03:45")["basal_u"] == pytest.approx(0.8 / 12)


def test_boluses_carbs_and_other_treatments(a):
    frame, report = a
    # Combo Bolus: 1.0 U now + 1.2 U/h for 60 min; Correction 1.5; Meal Bolus 4.0
    assert frame["bolus_u"].sum() == pytest.approx(1.0 + 1.2 + 1.5 + 4.0)
    assert _at(frame, "04:30")["bolus_u"] == pytest.approx(1.2 / 12)
    assert frame["carbs_g"].sum() == 55
    assert _at(frame, "07:00")["carbs_g"] == 40 and _at(frame, "07:00")["meal_announced"] == 1
    assert _at(frame, "06:30")["finger_stick"] == 120.0
    assert _at(frame, "02:15")["exercise"] == 1.0
    assert report.counts["ignored:treatments:Note"] == 1
    assert report.counts["ignored:treatments:Site Change"] == 1


def test_mmol_treatments_and_a_flat_basal_without_profile():
    frame, report = read_nightscout(B, basal=0.9)
    assert frame["finger_stick"].dropna().tolist() == [pytest.approx(6.5 * 18.0182)]
    assert "mmol/L" in get_meta(frame).units_seen
    span = (
        pd.Timestamp("2024-06-01 15:55:40", tz="UTC")
        - pd.Timestamp("2024-06-01 12:00:40", tz="UTC")
    ).total_seconds() / H
    assert frame["basal_u"].sum() == pytest.approx(0.9 * span + 0.5 * (1.2 - 0.9))
    frame, report = read_nightscout(B)
    assert frame["basal_u"].sum() == pytest.approx(0.6)  # the temp basal only
    assert any("no profile.json and no --basal" in n for n in report.notes)
    frame, _ = read_nightscout(B, subject_id="me")
    assert list(frame["subject_id"].unique()) == ["me"]


def test_treatment_glucose_without_units_follows_an_mmol_profile(tmp_path):
    profile = json.loads((A / "profile.json").read_text())
    profile[0]["store"]["Default"]["units"] = "mmol"
    profile[0]["units"] = "mmol"
    (tmp_path / "profile.json").write_text(json.dumps(profile))
    shutil.copy(B / "entries.json", tmp_path / "entries.json")
    t = pd.Timestamp("2024-06-01 13:00", tz="UTC").isoformat()
    (tmp_path / "treatments.json").write_text(
        json.dumps([{"eventType": "BG Check", "created_at": t, "glucose": 7.0}])
    )
    frame, _ = read_nightscout(tmp_path)
    assert frame["finger_stick"].dropna().tolist() == [pytest.approx(7.0 * 18.0182)]


def test_percent_temp_without_scheduled_basal_is_reported(tmp_path):
    for name in ("entries.json", "treatments.json"):
        shutil.copy(A / name, tmp_path / name)
    frame, report = read_nightscout(tmp_path)
    assert any("30 min of percent temp basal" in n for n in report.notes)
    assert frame["basal_u"].sum() == pytest.approx(0.5 * 0.5)  # the absolute temp only


# --------------------------------------------------------------------------- bad input


def _entry(i: int, sgv, when: str | None = None, **kw) -> dict:
    t = (
        pd.Timestamp(when)
        if when
        else pd.Timestamp("2024-01-01", tz="UTC") + pd.Timedelta(minutes=5 * i)
    )
    return {
        "type": "sgv",
        "sgv": sgv,
        "date": int(t.value // 10**6),
        "dateString": t.isoformat(),
        **kw,
    }


def test_error_codes_ranges_times_and_order(tmp_path):
    entries = [
        _entry(0, 120),
        _entry(1, 5),  # ?NC sensor not calibrated
        _entry(2, 39),  # Dexcom LOW
        _entry(3, 700),
        {"type": "sgv", "sgv": 110, "dateString": "not a date"},
        _entry(5, 100, when="2099-01-01T00:00:00Z"),
        _entry(6, 130),
        _entry(4, 125),  # earlier than the record before it
        _entry(7, "abc"),
    ] + [_entry(10 + i, 150 + i) for i in range(10)]
    (tmp_path / "entries.json").write_text(json.dumps(entries))
    frame, report = read_nightscout(tmp_path)
    got = {r.record: (r.reason, r.value) for r in report.rejected}
    assert got["entries[1], sgv"] == ("sensor error code", 5)
    assert got["entries[2], sgv"] == ("sensor error code", 39)
    assert got["entries[3], sgv"] == ("glucose outside 20-600 mg/dL", 700)
    assert got["entries[4], date"] == ("unparseable timestamp", "not a date")
    assert got["entries[5], date"][0] == "timestamp in the future"
    assert got["entries[7], date"][0] == "timestamp out of order"
    assert got["entries[8], sgv"] == ("unparseable glucose", "abc")
    assert all(
        r.field == "glucose" and r.file == str(tmp_path / "entries.json") for r in report.rejected
    )
    assert report.readings_in == 19 and report.readings_kept == 12
    assert report.readings_kept + report.readings_rejected == report.readings_in
    with pytest.raises(InputError) as e:
        read_nightscout(tmp_path, strict=True)
    assert (e.value.record, e.value.field, e.value.value) == ("entries[1], sgv", "glucose", 5)


def test_malformed_empty_and_mmol_entries(tmp_path):
    bad = tmp_path / "a" / "entries.json"
    bad.parent.mkdir()
    bad.write_text('[{"type": "sgv", "sgv": 100,\n "date": 17}\n')
    with pytest.raises(InputError, match="malformed JSON") as e:
        read_nightscout(bad, strict=True)
    assert e.value.record.startswith("line ") and e.value.field == "json"
    frame, report = read_nightscout(bad)
    assert len(frame) == 0 and report.rejected[0].reason == "malformed JSON"

    empty = tmp_path / "b" / "treatments.json"
    empty.parent.mkdir()
    empty.write_text("[]")
    with pytest.raises(EmptyInputError):
        read_nightscout(empty, strict=True)
    empty.write_text("")
    with pytest.raises(EmptyInputError):
        read_nightscout(empty, strict=True)

    mmol = tmp_path / "c" / "entries.json"
    mmol.parent.mkdir()
    mmol.write_text(json.dumps([_entry(i, 5.5 + i / 10) for i in range(12)]))
    with pytest.raises(UnitsError, match="mmol/L"):
        read_nightscout(mmol)


# --------------------------------------------------------------------------- therapy profile


def _with_profile(tmp_path: Path, **store) -> Path:
    """person_a's entries with its profile changed (`store` updates the default profile)."""
    profile = json.loads((A / "profile.json").read_text())
    profile[0]["store"]["Default"].update(store)
    (tmp_path / "profile.json").write_text(json.dumps(profile))
    shutil.copy(A / "entries.json", tmp_path / "entries.json")
    return tmp_path


def _sched(*pairs) -> list[dict]:
    return [{"time": t, "value": v} for t, v in pairs]


def test_profile_carb_ratio_and_isf_follow_the_local_schedule(tmp_path):
    # Tokyo is UTC+9 (no DST): the record, 00:02-07:57 UTC, is 09:02-16:57 local
    path = _with_profile(
        tmp_path,
        timezone="Asia/Tokyo",
        carbratio=_sched(("10:00", 8), ("12:00", 12)),
        sens=[
            {"time": "00:00", "value": 40, "timeAsSeconds": 0},
            {"time": "14:30", "value": "60", "timeAsSeconds": 52200},
        ],
    )
    frame, report = read_nightscout(path)
    assert [r.reason for r in report.rejected] == ["duplicate"]
    cr, isf = "carb_ratio_g_per_u", "isf_mgdl_per_u"
    # before 10:00 local the day before's 12:00 entry still holds (the schedule wraps)
    assert _at(frame, "00:30")[cr] == 12 and _at(frame, "00:55")[cr] == 12
    assert _at(frame, "01:00")[cr] == 8 and _at(frame, "02:55")[cr] == 8
    assert _at(frame, "03:00")[cr] == 12 and _at(frame, "07:55")[cr] == 12
    assert _at(frame, "05:25")[isf] == 40 and _at(frame, "05:30")[isf] == 60
    assert frame[cr].notna().all() and frame[isf].notna().all()
    assert frame[isf].dtype == "float64"


def test_profile_isf_of_an_mmol_profile_is_converted_to_mgdl(tmp_path):
    path = _with_profile(tmp_path, units="mmol", sens=_sched(("00:00", 2.5)))
    frame, report = read_nightscout(path)
    assert frame["isf_mgdl_per_u"].unique().tolist() == [pytest.approx(2.5 * 18.0182)]
    assert frame["carb_ratio_g_per_u"].unique().tolist() == [10]  # g/U whatever the units
    assert [r.reason for r in report.rejected] == ["duplicate"]


@pytest.mark.parametrize(
    ("units", "bad"),
    [("mg/dl", "abc"), ("mmol", 0.1), ("mg/dl", None)],
    ids=["not-a-number", "mmol-out-of-range", "missing"],
)
def test_profile_bad_isf_entry_leaves_the_isf_column_out(tmp_path, units, bad):
    sens = _sched(("00:00", 3.0 if units == "mmol" else 50), ("06:00", bad))
    path = _with_profile(tmp_path, units=units, sens=sens)
    frame, report = read_nightscout(path)
    assert "isf_mgdl_per_u" not in frame and "carb_ratio_g_per_u" in frame
    (r,) = [r for r in report.rejected if r.reason != "duplicate"]
    assert (r.file, r.record, r.field, r.reason) == (
        str(path / "profile.json"),
        "store['Default'].sens[1]",
        "isf_mgdl_per_u",
        "bad sens schedule entry",
    )
    assert json.loads(r.value) == sens[1]
    assert any("isf_mgdl_per_u not written" in n for n in report.notes)
    with pytest.raises(InputError, match="bad sens schedule entry"):
        read_nightscout(path, strict=True)


def test_profile_without_carbratio_is_reported(tmp_path):
    path = _with_profile(tmp_path)
    profile = json.loads((path / "profile.json").read_text())
    del profile[0]["store"]["Default"]["carbratio"]
    (path / "profile.json").write_text(json.dumps(profile))
    frame, report = read_nightscout(path)
    assert "carb_ratio_g_per_u" not in frame and "isf_mgdl_per_u" in frame
    got = [(r.record, r.field, r.reason) for r in report.rejected if r.reason != "duplicate"]
    assert got == [("store['Default']", "carb_ratio_g_per_u", "profile has no carbratio schedule")]


def test_profile_columns_need_a_profile_for_every_person(tmp_path):
    for name in ("entries.json", "treatments.json"):
        shutil.copy(A / name, tmp_path / name)
    frame, report = read_nightscout(tmp_path)  # no profile.json
    assert not {"carb_ratio_g_per_u", "isf_mgdl_per_u"} & set(frame.columns)
    assert [r.reason for r in report.rejected] == ["duplicate"]
    assert not any("not written" in n for n in report.notes)
    # person_a has a profile, person_b none: a column cannot hold person_a's rows only
    frame, report = read_nightscout(HERE)
    assert set(frame["subject_id"].unique()) == {"nightscout-person_a", "nightscout-person_b"}
    assert not {"carb_ratio_g_per_u", "isf_mgdl_per_u"} & set(frame.columns)
    assert "isf_mgdl_per_u not written: no complete profile schedule for nightscout-person_b" in (
        report.notes
    )


def test_a_flat_basal_with_only_implausible_times_is_no_crash(tmp_path):
    """Found by the fuzz test: treatments dated 1970 and year 10000 and no usable entry gave a
    flat-basal span with a start (1970) but no plausible end. Both ends are screened now."""
    (tmp_path / "entries.json").write_text('["100000", true, 0.15]')
    (tmp_path / "treatments.json").write_text(json.dumps([
        {"eventType": "Correction Bolus", "mills": 253402300800000, "insulin": 1.0},
        {"eventType": "SMB", "mills": 0, "insulin": 1.0},
    ]))  # fmt: skip
    frame, report = read_nightscout(tmp_path, basal=0.8)
    assert len(frame) == 0 and len(report.rejected) >= 2  # the two dates, reported
