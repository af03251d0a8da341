"""ShanghaiT1DM reader: the shipped real records, bad spreadsheets, and (when present) all 16."""

import re
import zipfile
from pathlib import Path
from xml.sax.saxutils import escape

import numpy as np
import pandas as pd
import pytest

from forecast.io.shanghai import parse_injections, read_shanghai
from forecast.schema import EmptyInputError, InputError, get_meta

SHIPPED = Path(__file__).parent / "fixtures" / "shanghai"
FULL = Path(__file__).parents[2] / "shared" / "data" / "shanghai_t1dm"
CGM = "CGM (mg / dl)"
SC = "Insulin dose - s.c."


@pytest.fixture(scope="module")
def shipped():
    frame, report = read_shanghai(SHIPPED)
    sheets = {p.name: pd.read_excel(p, engine="calamine") for p in sorted(SHIPPED.glob("*.xls*"))}
    return frame, report, sheets


def test_shipped_records_keep_every_cgm_value(shipped):
    frame, report, sheets = shipped
    assert sorted(frame["subject_id"].unique()) == [
        "shanghai-1001",
        "shanghai-1002",
        "shanghai-1006",
    ]
    n_in = sum(int(s[CGM].notna().sum()) for s in sheets.values())
    assert report.readings_in == n_in == report.readings_kept == frame["glucose"].notna().sum()
    assert report.rejected == []
    want = np.sort(np.concatenate([s[CGM].dropna().to_numpy(float) for s in sheets.values()]))
    assert np.array_equal(np.sort(frame["glucose"].dropna().to_numpy()), want)


def test_times_are_utc_from_shanghai_clock_and_15_min_readings_leave_gaps(shipped):
    frame, _, sheets = shipped
    s = sheets["1001_0_20210730.xlsx"]
    sub = frame[frame["subject_id"] == "shanghai-1001"].dropna(subset=["glucose"])
    first_local = s["Date"].iloc[0]  # 2021-07-30 16:43 China Standard Time (UTC+8)
    utc = pd.Timestamp(first_local).tz_localize("Asia/Shanghai").tz_convert("UTC")
    assert abs(sub["time"].iloc[0] - utc) <= pd.Timedelta("150s")
    assert sub["glucose"].iloc[0] == s[CGM].iloc[0]
    # readings 15 min apart: the grid keeps 5-min rows and never fills the two between
    gaps = sub["time"].diff().dropna()
    assert (gaps >= pd.Timedelta("10min")).all()
    assert (gaps == pd.Timedelta("15min")).mean() > 0.9
    meta = get_meta(frame)
    assert meta.timezone == "Asia/Shanghai" and meta.sampling_minutes == 15
    assert "CC BY 4.0" in meta.licence and "10.1038/s41597-023-01940-7" in meta.licence


def test_injections_regular_is_bolus_long_acting_spread_into_basal(shipped):
    frame, _, sheets = shipped
    s = sheets["1006_0_20210114.xlsx"]
    sub = frame[frame["subject_id"] == "shanghai-1006"]
    regular = long_acting = 0.0
    for cell in s[SC].dropna():
        for name, units in parse_injections(cell)[0]:
            if name.endswith(" R"):
                regular += units
            else:
                assert re.search("degludec|detemir|glargine", name)
                long_acting += units
    assert long_acting > 0 and regular > 0
    assert sub["bolus_u"].sum() == pytest.approx(regular)
    assert sub["basal_u"].sum() == pytest.approx(long_acting)
    # a long-acting injection is spread over 24 h, so no slot holds more than a slot's share
    assert sub["basal_u"].max() < 1.0
    # the injection itself is kept, with its name, at its slot
    txt = sub["insulin_sc"].dropna()
    assert txt.str.contains("insulin degludec").any() and txt.str.contains("Gansulin R").any()


def test_pump_records_bolus_basal_and_meals(shipped):
    frame, report, sheets = shipped
    s = sheets["1001_0_20210730.xlsx"]
    sub = frame[frame["subject_id"] == "shanghai-1001"]
    bolus = pd.to_numeric(s["CSII - bolus insulin (Novolin R, IU)"], errors="coerce").sum()
    assert sub["bolus_u"].sum() == pytest.approx(bolus)
    # basal: each rate (U/h) held until the next one, the last until the end of the record
    b = s[["Date", "CSII - basal insulin (Novolin R, IU / H)"]].dropna()
    ends = list(b["Date"].iloc[1:]) + [s["Date"].iloc[-1]]
    want = sum(
        r * (e - t).total_seconds() / 3600
        for t, e, r in zip(b["Date"], ends, b.iloc[:, 1].astype(float))
    )
    assert sub["basal_u"].sum() == pytest.approx(want)
    # meals: announced, size unknown (NaN), one per dietary-intake row
    meals = int(s["Dietary intake"].notna().sum())
    assert sub["meal_announced"].sum() == meals
    assert sub.loc[sub["meal_announced"] == 1, "carbs_g"].isna().all()
    assert sub["finger_stick"].notna().sum() == s["CBG (mg / dl)"].notna().sum()


@pytest.mark.skipif(not FULL.exists(), reason="ShanghaiT1DM not at ../shared/data/shanghai_t1dm")
def test_all_sixteen_records_give_twelve_subjects_and_account_for_every_cgm_value():
    frame, report = read_shanghai(FULL)
    assert len(sorted(FULL.glob("1*_*_*.xls*"))) == 16
    assert len(report.files) == 16  # the clinical summary sheet is not a record
    # the dataset's README: 16 records, 12 patients, 15,695 rows, each with a CGM value
    n_in = 15_695
    assert frame["subject_id"].nunique() == 12
    assert report.readings_in == n_in
    assert frame["glucose"].notna().sum() + report.readings_rejected == n_in


# --------------------------------------------------------------------------- bad input


def write_xlsx(path: Path, header: list, rows: list[list]) -> Path:
    """A minimal .xlsx (inline strings), enough for calamine; no writer library needed."""

    def ref(c: int, r: int) -> str:
        return f"{chr(65 + c)}{r}"

    def cell(c: int, r: int, v) -> str:
        if v is None:
            return ""
        if isinstance(v, (int, float)):
            return f'<c r="{ref(c, r)}"><v>{v}</v></c>'
        return f'<c r="{ref(c, r)}" t="inlineStr"><is><t>{escape(str(v))}</t></is></c>'

    body = "".join(
        f'<row r="{r}">' + "".join(cell(c, r, v) for c, v in enumerate(vals)) + "</row>"
        for r, vals in enumerate([header, *rows], start=1)
    )
    ns = "http://schemas.openxmlformats.org"
    parts = {
        "[Content_Types].xml": f'<Types xmlns="{ns}/package/2006/content-types">'
        '<Default Extension="rels" ContentType="application/vnd.openxmlformats-package.relationships+xml"/>'
        '<Default Extension="xml" ContentType="application/xml"/>'
        '<Override PartName="/xl/workbook.xml" ContentType="application/vnd.openxmlformats-officedocument.spreadsheetml.sheet.main+xml"/>'
        '<Override PartName="/xl/worksheets/sheet1.xml" ContentType="application/vnd.openxmlformats-officedocument.spreadsheetml.worksheet+xml"/></Types>',
        "_rels/.rels": f'<Relationships xmlns="{ns}/package/2006/relationships"><Relationship Id="rId1" '
        f'Type="{ns}/officeDocument/2006/relationships/officeDocument" Target="xl/workbook.xml"/></Relationships>',
        "xl/workbook.xml": f'<workbook xmlns="{ns}/spreadsheetml/2006/main" xmlns:r="{ns}/officeDocument/2006/relationships">'
        '<sheets><sheet name="Sheet1" sheetId="1" r:id="rId1"/></sheets></workbook>',
        "xl/_rels/workbook.xml.rels": f'<Relationships xmlns="{ns}/package/2006/relationships"><Relationship Id="rId1" '
        f'Type="{ns}/officeDocument/2006/relationships/worksheet" Target="worksheets/sheet1.xml"/></Relationships>',
        "xl/worksheets/sheet1.xml": f'<worksheet xmlns="{ns}/spreadsheetml/2006/main"><sheetData>{body}</sheetData></worksheet>',
    }
    with zipfile.ZipFile(path, "w") as z:
        for name, text in parts.items():
            z.writestr(name, text)
    return path


HEADER = [
    "Date",
    CGM,
    "CBG (mg / dl)",
    "Dietary intake",
    SC,
    "CSII - basal insulin (Novolin R, IU / H)",
]


@pytest.fixture
def bad_sheet(tmp_path):
    rows = [
        ["2021-05-04 10:00:00", 120, None, None, None, 0.8],  # row 2: fine
        ["2021-05-04 10:15:00", "LO", None, None, None, None],  # row 3: sensor code
        ["2021-05-04 10:30:00", 700, None, None, None, None],  # row 4: out of range
        ["2021-05-04 10:45:00", "abc", None, "Rice 100 g", None, None],  # row 5: unparseable
        ["yesterday", 100, None, None, None, None],  # row 6: bad timestamp
        ["2099-01-01 00:00:00", 100, None, None, None, None],  # row 7: future
        [
            "2021-05-04 11:00:00",
            130,
            135,
            None,
            "Mystery insulin, 5 IU",
            None,
        ],  # row 8: unknown insulin
        ["2021-05-04 10:50:00", 125, None, None, "Novolin R, 4 IU", None],  # row 9: out of order
        ["2021-05-04 11:15:00", 140, None, None, None, "temporarily suspend insulin delivery"],
    ]
    return write_xlsx(tmp_path / "2001_0_20210504.xlsx", HEADER, rows)


def test_bad_records_are_rejected_with_file_record_field_value(bad_sheet):
    frame, report = read_shanghai(bad_sheet)
    by_record = {r.record.split(",")[0]: r for r in report.rejected}
    assert by_record["row 3"].reason == "sensor error code" and by_record["row 3"].value == "LO"
    assert (
        by_record["row 4"].reason.startswith("glucose outside") and by_record["row 4"].value == 700
    )
    assert by_record["row 5"].reason == "unparseable glucose"
    assert (
        by_record["row 6"].reason == "unparseable timestamp"
        and by_record["row 6"].value == "yesterday"
    )
    assert by_record["row 7"].reason == "timestamp in the future"
    assert by_record["row 8"].reason == "unknown insulin name"
    assert (
        by_record["row 8"].field == "insulin_sc"
        and by_record["row 8"].value == "Mystery insulin, 5 IU"
    )
    assert by_record["row 9"].reason == "timestamp out of order"
    for r in report.rejected:
        assert r.file == str(bad_sheet)
    assert "column 'CGM (mg / dl)'" in by_record["row 3"].record
    assert "column 'Date'" in by_record["row 6"].record
    # accounting: 9 CGM cells = 3 kept + 6 rejected
    assert report.readings_in == 9
    assert report.readings_kept == 3 == frame["glucose"].notna().sum()
    assert report.readings_rejected == 6
    # the suspension stops the basal: 0.8 U/h from 10:00 to 11:15 local, then 0
    assert frame["basal_u"].sum() == pytest.approx(0.8 * 1.25)


def test_strict_raises_on_the_first_bad_record(bad_sheet):
    with pytest.raises(InputError) as e:
        read_shanghai(bad_sheet, strict=True)
    err = e.value
    assert err.file == str(bad_sheet)
    assert err.record.startswith("row 3") and err.field == "glucose" and err.value == "LO"
    assert "2001_0_20210504.xlsx" in str(err) and "'LO'" in str(err)


def test_empty_corrupt_and_foreign_files(tmp_path):
    empty = tmp_path / "2002_0_20210101.xlsx"
    empty.write_bytes(b"")
    with pytest.raises(EmptyInputError):
        read_shanghai(empty, strict=True)
    frame, report = read_shanghai(empty)
    assert len(frame) == 0 and report.rejected[0].reason == "empty file"

    corrupt = tmp_path / "2003_0_20210101.xlsx"
    corrupt.write_bytes(b"PK\x03\x04 this is not a workbook")
    with pytest.raises(InputError, match="unreadable spreadsheet"):
        read_shanghai(corrupt, strict=True)

    foreign = write_xlsx(tmp_path / "2004_0_20210101.xlsx", ["when", "sgv"], [["2021-01-01", 100]])
    with pytest.raises(InputError, match="not a ShanghaiT1DM sheet") as e:
        read_shanghai(foreign, strict=True)
    assert e.value.field == "date"

    only_header = write_xlsx(tmp_path / "2005_0_20210101.xlsx", HEADER, [])
    with pytest.raises(EmptyInputError):
        read_shanghai(only_header, strict=True)


def test_parse_injections_keeps_names_and_finds_several_doses():
    assert parse_injections("Humulin R, 2 IU, insulin degludec, 12 IU") == (
        [("Humulin R", 2.0), ("insulin degludec", 12.0)],
        "",
    )
    assert parse_injections("Novolin 30R, 12 IU")[0] == [("Novolin 30R", 12.0)]
    assert parse_injections("insulin\xa0glargine, 6 IU")[0] == [("insulin glargine", 6.0)]
    assert parse_injections("Novolin R 6 IU")[0] == [("Novolin R", 6.0)]
    assert parse_injections("6 IU")[1] != ""
