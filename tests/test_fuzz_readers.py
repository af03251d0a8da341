"""Fuzzed readers: malformed input gives a frame or a typed error — nothing else, ever.

For every reader (`forecast.io.read` and each `read_<format>`), hypothesis writes broken
files of its format — truncated, wrong tags or keys, bad timestamps, non-numeric, missing,
huge and negative values, random bytes — and the reader must

* return ``(frame, DataReport)`` with a canonical frame (`validate_frame` passes) or raise a
  `GlucastError` subclass (`InputError`, `SchemaError`...), in lenient and in strict mode;
* never raise another exception type (a `KeyError` or `OutOfBoundsDatetime` from deep inside
  pandas is a bug: the user learns nothing about which record was wrong);
* never hang: each call runs under a wall-clock alarm (`Hang` derives from BaseException so a
  reader's ``except Exception`` cannot swallow it);
* never lose a reading without a reason: ``readings_in == readings_kept + readings_rejected``,
  the frame holds exactly ``readings_kept`` glucose values, and for well-formed files the
  reader counts exactly the readings the generator wrote.

Spreadsheets are written with a small OOXML writer (stdlib zipfile) because openpyxl is not
installed (calamine only reads); that writer emits shared and inline strings, booleans, error
cells and date-styled numbers, which is what real exports contain.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import signal
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape, quoteattr

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import forecast.io as fio
from forecast.schema import DataReport, GlucastError, InputError, validate_frame

#: wall-clock seconds one reader call may take before it counts as a hang (generous: the
#: CI box is shared, and the largest generated file is a few hundred records)
HANG_S = 30.0
#: examples per reader: modest in `make test` (a reader call costs ~0.3 s of pandas on the
#: shared CI box); GLUCAST_FUZZ_EXAMPLES=500 for a deep run. No shrinking: a failure prints
#: the generated input as is, and the bugs found so far are pinned as @example cases.
EXAMPLES = int(os.environ.get("GLUCAST_FUZZ_EXAMPLES", "12"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def landed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


# --------------------------------------------------------------------------- the oracle


class Hang(BaseException):
    """A reader call ran past HANG_S (BaseException: `except Exception` cannot hide it)."""


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    def on_alarm(signum, frame):
        raise Hang(f"reader still running after {seconds:.0f} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def check_read(
    fn: Callable[..., tuple[pd.DataFrame, DataReport]],
    paths: Any,
    *,
    expect_in: int | None = None,
    **kw: Any,
) -> tuple[pd.DataFrame, DataReport] | GlucastError:
    """Call a reader in both modes and check the contract; return the lenient outcome."""
    outcome: tuple[pd.DataFrame, DataReport] | GlucastError | None = None
    for strict in (False, True):
        with time_limit(HANG_S):
            try:
                frame, report = fn(paths, strict=strict, **kw)
            except GlucastError as e:
                if isinstance(e, InputError):
                    assert e.reason, "a typed error must say what was wrong"
                if not strict:
                    outcome = e
                continue
        check_report(frame, report)
        if strict:
            # strict mode raises on the first bad record: success means nothing was rejected
            # (duplicates are resolved deterministically by the grid, not errors)
            bad = [r for r in report.rejected if r.reason != "duplicate"]
            assert not bad, bad[:3]
        else:
            outcome = (frame, report)
            if expect_in is not None:
                assert report.readings_in == expect_in, (report.readings_in, expect_in)
    assert outcome is not None
    return outcome


def check_report(frame: pd.DataFrame, report: DataReport) -> None:
    """Every reading is kept or rejected with a reason; the frame is canonical."""
    validate_frame(frame)
    assert report.readings_in == report.readings_kept + report.readings_rejected, (
        report.readings_in,
        report.readings_kept,
        report.readings_rejected,
    )
    assert int(frame["glucose"].notna().sum()) == report.readings_kept
    for r in report.rejected:
        assert r.reason and r.field, r


# --------------------------------------------------------------------------- values

BASE = pd.Timestamp("2021-12-07 00:00")
#: timestamps that a careless export writes; years are chosen so a grid is either tiny or
#: refused outright (a 9-year grid of 5-minute slots would make the fuzz slow, not wrong)
BAD_TIMES = [
    "",
    " ",
    "31-02-2022 00:15:00",
    "01-01-1899 00:00:00",
    "01-01-1970 00:00:00",
    "01-01-2100 00:00:00",
    "99-99-9999 99:99:99",
    "01-01-2022 24:00:00",
    "2022-01-01T00:00:00Z",
    "01/01/2022 00:05",
    "yesterday",
    "NaN",
    "1e10",
    "\x00",
    "07-12-2021 00:05:00\u200b",
    "07-12-2021 00:05",
]
BAD_NUMBERS = [
    "",
    " ",
    "abc",
    "1,5",
    "NaN",
    "nan",
    "inf",
    "-inf",
    "-0",
    "1e308",
    "1e400",
    "0x1F",
    "12.5.3",
    "  90 ",
    "٣٤",
    "LOW",
    "High",
    "None",
    "-5",
    "100000",
    "39",
    "1",
]

finite_numbers = st.one_of(
    st.integers(-10, 700).map(str),
    st.floats(-100, 1e4, allow_nan=False).map(lambda x: f"{x:.6g}"),
)
numbers_text = st.one_of(finite_numbers, finite_numbers, st.sampled_from(BAD_NUMBERS))


def ohio_time(minutes: int) -> str:
    return (BASE + pd.Timedelta(minutes=minutes)).strftime("%d-%m-%Y %H:%M:%S")


ohio_times = st.one_of(
    st.integers(0, 2 * 1440).map(ohio_time),
    st.integers(0, 2 * 1440).map(ohio_time),
    st.sampled_from(BAD_TIMES),
)
junk_text = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), max_codepoint=0x2FFF), max_size=12
)


# --------------------------------------------------------------------------- OhioT1DM XML

OHIO_TAGS = {
    "glucose_level": ("ts", "value"),
    "finger_stick": ("ts", "value"),
    "basal": ("ts", "value"),
    "temp_basal": ("ts_begin", "ts_end", "value"),
    "bolus": ("ts_begin", "ts_end", "type", "dose", "bwz_carb_input"),
    "meal": ("ts", "type", "carbs"),
    "exercise": ("ts", "intensity", "type", "duration"),
    "sleep": ("ts_begin", "ts_end", "quality"),
    "basis_sleep": ("tbegin", "tend", "quality"),
    "work": ("ts_begin", "ts_end", "intensity"),
    "illness": ("ts_begin", "ts_end"),
    "stressors": ("ts",),
    "hypo_event": ("ts",),
    "basis_heart_rate": ("ts", "value"),
    "basis_gsr": ("ts", "value"),
    "basis_skin_temperature": ("ts", "value"),
    "basis_steps": ("ts", "value"),
    "acceleration": ("ts", "value"),
}
BOLUS_TYPES = ["normal", "square", "square dual", "Normal Dual", "", "weird"]


@st.composite
def ohio_event(draw, tag: str) -> dict[str, str]:
    attrs = OHIO_TAGS.get(tag, ("ts", "value"))
    ev: dict[str, str] = {}
    for a in attrs:
        if draw(st.integers(0, 9)) == 0:
            continue  # missing attribute
        if a.startswith("t"):
            ev[a] = draw(ohio_times)
        elif a == "type":
            ev[a] = draw(st.sampled_from(BOLUS_TYPES))
        else:
            ev[a] = draw(numbers_text)
    if draw(st.integers(0, 14)) == 0:
        ev[draw(st.from_regex(r"[a-z_]{1,10}", fullmatch=True))] = draw(junk_text)
    return ev


def xml_safe(v: str) -> str:
    """Characters XML 1.0 forbids even when escaped are dropped (the file stays well-formed;
    damaged files come from `mutate`)."""
    return "".join(c for c in v if c in "\t\n\r" or (" " <= c and c not in "\ufffe\uffff"))


@st.composite
def ohio_document(draw) -> tuple[str, int]:
    """(XML text, glucose events written)."""
    tags = draw(
        st.lists(
            st.one_of(
                st.sampled_from(sorted(OHIO_TAGS)),
                st.sampled_from(["glucose_level", "bolus", "basal", "meal"]),
                st.from_regex(r"[a-z][a-z_]{0,12}", fullmatch=True),
            ),
            max_size=7,
        )
    )
    parts, n_glucose = [], 0
    for tag in tags:
        events = draw(st.lists(ohio_event(tag), max_size=12))
        if tag == "glucose_level":
            n_glucose += len(events)
        body = "".join(
            "\t\t<event" + "".join(f" {k}={quoteattr(xml_safe(v))}" for k, v in ev.items()) + "/>\n"
            for ev in events
        )
        parts.append(f"\t<{tag}>\n{body}\t</{tag}>\n")
    pid = draw(st.sampled_from(['id="559"', 'id=""', "", 'id="x y"', 'id="540" weight="-1"']))
    root = draw(st.sampled_from(["patient"] * 6 + ["patients", "entries"]))
    text = f'<?xml version="1.0" encoding="UTF-8"?>\n<{root} {pid}>\n{"".join(parts)}</{root}>\n'
    return text, (n_glucose if root == "patient" else 0)


def mutate(data: bytes, draw) -> tuple[bytes, bool]:
    """Damage a file the ways downloads and editors do; (bytes, still intact?)."""
    how = draw(st.sampled_from(["none"] * 4 + ["truncate", "junk", "flip", "bom", "nul", "utf16"]))
    if how == "none" or not data:
        return data, True
    if how == "truncate":
        return data[: draw(st.integers(0, len(data) - 1))], False
    if how == "junk":
        at = draw(st.integers(0, len(data)))
        return data[:at] + draw(st.binary(min_size=1, max_size=16)) + data[at:], False
    if how == "flip":
        at = draw(st.integers(0, len(data) - 1))
        return data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1 :], False
    if how == "bom":
        return b"\xef\xbb\xbf" + data, False
    if how == "nul":
        return data.replace(b">", b">\x00", 1), False
    return data.decode("utf-8", "replace").encode("utf-16"), False


@FUZZ
@given(doc=ohio_document(), data=st.data())
def test_ohio_xml_fuzz(doc, data):
    text, n_glucose = doc
    raw, intact = mutate(text.encode("utf-8"), data.draw)
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / data.draw(st.sampled_from(["559-ws-training.xml", "x.xml", "-ws-.xml"]))
        p.write_bytes(raw)
        from forecast.io.ohio import read_ohio

        out = check_read(read_ohio, p, expect_in=n_glucose if intact else None)
        if intact and isinstance(out, tuple):
            # the dispatcher gives the same answer as the reader
            f2, r2 = fio.read(p)
            assert r2.readings_in == out[1].readings_in and len(f2) == len(out[0])


BILLION_LAUGHS = (
    '<?xml version="1.0"?><!DOCTYPE patient [<!ENTITY a "aaaaaaaaaa">'
    + "".join(f'<!ENTITY {chr(98 + i)} "{("&" + chr(97 + i) + ";") * 10}">' for i in range(8))
    + ']><patient id="1"><glucose_level><event ts="07-12-2021 00:00:00" value="&i;"/>'
    "</glucose_level></patient>"
)
XXE = (
    '<?xml version="1.0"?><!DOCTYPE patient [<!ENTITY x SYSTEM "file:///etc/hostname">]>'
    '<patient id="1"><glucose_level><event ts="07-12-2021 00:00:00" value="&x;"/>'
    '<event ts="07-12-2021 00:05:00" value="100"/></glucose_level></patient>'
)


# --------------------------------------------------------------------------- Nightscout JSON

json_scalar = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**63),
    st.floats(allow_nan=False, allow_infinity=False),
    junk_text,
    st.sampled_from(BAD_NUMBERS),
)
json_any = st.recursive(
    json_scalar,
    lambda c: st.lists(c, max_size=3) | st.dictionaries(junk_text, c, max_size=3),
    max_leaves=6,
)
EPOCH0 = int(pd.Timestamp("2024-03-01", tz="UTC").value // 10**6)
epoch_ms = st.one_of(
    st.integers(EPOCH0, EPOCH0 + 2 * 86_400_000),
    st.integers(EPOCH0, EPOCH0 + 2 * 86_400_000),
    st.sampled_from([0, -1, 10**19, 2**63 - 1, -(2**63), 1e300, 253402300800000, 1.5e12]),
)
iso_time = st.one_of(
    epoch_ms.filter(lambda x: isinstance(x, int) and 0 < x < 4e12).map(
        lambda ms: pd.Timestamp(ms, unit="ms", tz="UTC").isoformat()
    ),
    st.sampled_from(
        ["2024-03-01T08:00:00", "2024-03-01 08:00:00+0100", "9999-12-31T23:59:59Z", "", "now"]
    ),
    junk_text,
)
num_or_junk = st.one_of(
    st.integers(-50, 800), st.floats(-1e3, 1e3, allow_nan=False), st.sampled_from(BAD_NUMBERS)
)


def maybe(d: dict, draw) -> dict:
    """Drop some keys and corrupt a value's type now and then."""
    out = {k: v for k, v in d.items() if draw(st.integers(0, 7))}
    if out and draw(st.integers(0, 5)) == 0:
        k = draw(st.sampled_from(sorted(out)))
        out[k] = draw(json_any)
    return out


@st.composite
def ns_entry(draw) -> dict:
    typ = draw(st.sampled_from(["sgv"] * 6 + ["mbg", "cal", "SGV", ""]))
    return maybe(
        {
            "type": typ,
            "sgv": draw(num_or_junk),
            "mbg": draw(num_or_junk),
            "date": draw(epoch_ms),
            "dateString": draw(iso_time),
            "direction": draw(st.sampled_from(["Flat", "SingleUp", "NOT COMPUTABLE", ""])),
            "device": "xDrip",
        },
        draw,
    )


TREATMENT_TYPES = [
    "Meal Bolus",
    "Correction Bolus",
    "Bolus",
    "SMB",
    "Carb Correction",
    "Temp Basal",
    "Combo Bolus",
    "BG Check",
    "Suspend Pump",
    "Resume Pump",
    "Exercise",
    "Note",
    "Site Change",
    "",
]


@st.composite
def ns_treatment(draw) -> dict:
    return maybe(
        {
            "eventType": draw(st.sampled_from(TREATMENT_TYPES)),
            "created_at": draw(iso_time),
            "mills": draw(epoch_ms),
            "insulin": draw(num_or_junk),
            "carbs": draw(num_or_junk),
            "duration": draw(num_or_junk),
            "absolute": draw(num_or_junk),
            "rate": draw(num_or_junk),
            "percent": draw(num_or_junk),
            "relative": draw(num_or_junk),
            "glucose": draw(num_or_junk),
            "units": draw(st.sampled_from(["mg/dl", "mmol", "mmol/L", "", "furlongs"])),
        },
        draw,
    )


@st.composite
def ns_profile(draw) -> Any:
    basal = draw(
        st.lists(
            st.one_of(
                st.fixed_dictionaries(
                    {
                        "time": st.sampled_from(["00:00", "06:30", "25:99", "", "x"]),
                        "value": num_or_junk,
                    }
                ),
                st.fixed_dictionaries(
                    {"timeAsSeconds": st.integers(-10, 90_000), "value": num_or_junk}
                ),
                json_any,
            ),
            max_size=4,
        )
    )
    store = {"Default": {"basal": basal, "timezone": draw(st.sampled_from(["UTC", "Mars/Base"]))}}
    doc = {"defaultProfile": draw(st.sampled_from(["Default", "Other"])), "store": store}
    return draw(st.sampled_from([doc, [doc], {"store": []}, {"store": {}}, {"defaultProfile": 1}]))


@st.composite
def ns_files(draw) -> tuple[dict[str, bytes], bool]:
    """{file name: bytes} for one Nightscout export directory, and whether all are intact."""
    files: dict[str, bytes] = {}
    intact = True
    for name, strat in (
        ("entries.json", st.lists(st.one_of(ns_entry(), ns_entry(), json_any), max_size=25)),
        ("treatments.json", st.lists(st.one_of(ns_treatment(), json_any), max_size=12)),
        ("profile.json", ns_profile()),
    ):
        if draw(st.integers(0, 4)) == 0:
            continue
        doc = draw(st.one_of(strat, strat, strat, json_any))
        data = json.dumps(doc, allow_nan=draw(st.booleans())).encode()
        data, ok = mutate(data, draw)
        intact &= ok
        files[name] = data
    if not files:
        files["entries.json"] = b"[]"
    return files, intact


@pytest.mark.skipif(
    not landed("forecast.io.nightscout"), reason="forecast.io.nightscout not landed"
)
@FUZZ
@given(files=ns_files(), basal=st.sampled_from([None, 0.8]))
def test_nightscout_json_fuzz(files, basal):
    from forecast.io.nightscout import read_nightscout

    files, _ = files
    with tempfile.TemporaryDirectory() as d:
        for name, data in files.items():
            (Path(d) / name).write_bytes(data)
        check_read(read_nightscout, d, basal=basal)


# --------------------------------------------------------------------------- pinned cases

#: inputs the fuzz found (or that are known to be nasty), kept as deterministic cases so a
#: regression names itself; each must satisfy the same contract as the fuzz
SGV = b'{"type":"sgv","sgv":120,"date":1709280000000}'
PROFILE = b'{"defaultProfile":"D","store":{"D":{"basal":%s,"timezone":%s}}}'
PINNED_NIGHTSCOUT: dict[str, dict[str, bytes]] = {
    "deep-nesting": {"entries.json": b"[" * 50_000 + b"]" * 50_000},
    "nan-and-infinity-literals": {
        "entries.json": b'[{"sgv":NaN,"date":1709280000000},{"sgv":Infinity,"date":1}]'
    },
    "date-1e300": {"entries.json": b'[{"type":"sgv","sgv":120,"date":1e300}]'},
    "date-year-10000": {"entries.json": b'[{"type":"sgv","sgv":120,"date":253402300800000}]'},
    "mills-year-2445": {
        "treatments.json": b'[{"eventType":"SMB","mills":15000000000000.0,"insulin":1}]'
    },
    "temp-basal-duration-1e300": {
        "treatments.json": b'[{"eventType":"Temp Basal","created_at":"2024-03-01T08:00:00Z",'
        b'"absolute":1,"duration":1e300}]'
    },
    "combo-bolus-duration-1e300": {
        "treatments.json": b'[{"eventType":"Combo Bolus","created_at":"2024-03-01T08:00:00Z",'
        b'"insulin":1,"relative":1,"duration":1e300}]'
    },
    "exercise-duration-1e300": {
        "treatments.json": b'[{"eventType":"Exercise","created_at":"2024-03-01T08:00:00Z",'
        b'"duration":1e300}]'
    },
    "suspend-duration-1e300": {
        "treatments.json": b'[{"eventType":"Suspend Pump","created_at":"2024-03-01T08:00:00Z",'
        b'"duration":1e300}]'
    },
    "profile-basal-entry-not-an-object": {
        "profile.json": PROFILE % (b"[5, []]", b'"UTC"'),
        "entries.json": b"[" + SGV + b"]",
    },
    "profile-empty-store": {"profile.json": b'{"store":{}}', "entries.json": b"[" + SGV + b"]"},
    "profile-store-a-list": {"profile.json": b'{"store":[]}'},
    "profile-unknown-zone": {
        "profile.json": PROFILE % (b'[{"time":"00:00","value":1}]', b'"Mars/Base"'),
        "entries.json": b"[" + SGV + b"]",
    },
    "profile-default-name-unhashable": {
        "profile.json": b'{"defaultProfile":[1],"store":{"D":{"basal":[{"time":"00:00","value":1}]}}}',
        "entries.json": b"[" + SGV + b"]",
    },
    "profile-time-as-seconds-huge": {
        "profile.json": PROFILE % (b'[{"timeAsSeconds":1e300,"value":1}]', b'"UTC"'),
        "entries.json": b"[" + SGV + b"]",
    },
}


@pytest.mark.skipif(
    not landed("forecast.io.nightscout"), reason="forecast.io.nightscout not landed"
)
@pytest.mark.parametrize("case", sorted(PINNED_NIGHTSCOUT))
def test_nightscout_pinned(tmp_path, case):
    from forecast.io.nightscout import read_nightscout

    for name, data in PINNED_NIGHTSCOUT[case].items():
        (tmp_path / name).write_bytes(data)
    check_read(read_nightscout, tmp_path)


def ohio_file(body: str) -> str:
    return (
        f'<patient id="559"><glucose_level><event ts="07-12-2021 10:00:00" value="100"/>'
        f"</glucose_level>{body}</patient>"
    )


PINNED_OHIO: dict[str, str] = {
    "exercise-duration-1e308": ohio_file(
        '<exercise><event ts="07-12-2021 10:00:00" intensity="5" duration="1e308"/></exercise>'
    ),
    "exercise-duration-inf": ohio_file(
        '<exercise><event ts="07-12-2021 10:00:00" intensity="5" duration="inf"/></exercise>'
    ),
    "temp-basal-ends-in-year-9999": ohio_file(
        '<temp_basal><event ts_begin="07-12-2021 10:00:00" ts_end="07-12-9999 10:00:00" '
        'value="0"/></temp_basal>'
    ),
    "square-bolus-without-end": ohio_file(
        '<bolus><event ts_begin="07-12-2021 10:00:00" type="square" dose="2"/></bolus>'
    ),
    "billion-laughs": BILLION_LAUGHS,
    "external-entity": XXE,
}


@pytest.mark.parametrize("case", sorted(PINNED_OHIO))
def test_ohio_pinned(tmp_path, case):
    from forecast.io.ohio import read_ohio

    p = tmp_path / "559-ws-training.xml"
    p.write_text(PINNED_OHIO[case])
    out = check_read(read_ohio, p)
    if case == "external-entity" and isinstance(out, tuple):
        host = Path("/etc/hostname")
        secret = host.read_text().strip() if host.exists() else ""
        assert not secret or all(secret not in str(r.value) for r in out[1].rejected)


# --------------------------------------------------------------------------- CSV

#: the layouts the CSV reader recognises (forecast.io.csv), plus a mapped one and junk
CSV_LAYOUTS: dict[str, list[str]] = {
    "iglu": ["id", "time", "gl"],
    "clarity": [
        "Index",
        "Timestamp (YYYY-MM-DDThh:mm:ss)",
        "Event Type",
        "Event Subtype",
        "Patient Info",
        "Glucose Value (mg/dL)",
        "Insulin Value (u)",
        "Carb Value (grams)",
        "Duration (hh:mm:ss)",
    ],
    "libreview": [
        "Device",
        "Serial Number",
        "Device Timestamp",
        "Record Type",
        "Historic Glucose mg/dL",
        "Scan Glucose mg/dL",
        "Rapid-Acting Insulin (units)",
        "Long-Acting Insulin (units)",
        "Carbohydrates (grams)",
        "Strip Glucose mg/dL",
        "Ketone mmol/L",
    ],
    "mapped": ["who", "when", "sgv", "units", "carbs"],
    "junk": ["time", "glucose", "bolus", "", "Glucose Value (mmol/L)"],
}
CSV_WORDS = ["EGV", "Calibration", "Insulin", "Carbs", "Exercise", "Fast-Acting",
             "Long-Acting", "Light", "Heavy", "0", "1", "2", "4", "5", "6", "Low", "High",
             "FreeStyle LibreLink", "ABC-123", "mg/dL", "mmol/L"]  # fmt: skip
csv_cell = st.one_of(
    st.integers(0, 2 * 1440).map(lambda m: (BASE + pd.Timedelta(minutes=m)).isoformat()),
    st.integers(0, 2 * 1440).map(
        lambda m: (BASE + pd.Timedelta(minutes=m)).strftime("%m-%d-%Y %I:%M %p")
    ),
    st.integers(0, 2 * 1440).map(ohio_time),
    st.sampled_from(BAD_TIMES),
    finite_numbers,
    st.floats(2.0, 30.0).map(lambda x: f"{x:.1f}"),  # mmol/L values mixed in
    st.sampled_from(BAD_NUMBERS),
    st.sampled_from(CSV_WORDS),
    junk_text.filter(lambda t: not any(c in t for c in ',;\t\n\r"|')),
)


def valid_csv_row(layout: str, k: int, draw) -> dict[str, str]:
    """A well-formed record of a layout (column -> text); the fuzz then damages cells."""
    t = BASE + pd.Timedelta(minutes=5 * k)
    g = str(draw(st.integers(40, 400)))
    if layout == "iglu":
        return {"id": "p1", "time": str(t), "gl": g}
    if layout == "clarity":
        kind = draw(st.sampled_from(["EGV"] * 4 + ["Calibration", "Insulin", "Carbs", "Exercise"]))
        return {
            "Index": str(k),
            "Timestamp (YYYY-MM-DDThh:mm:ss)": t.strftime("%Y-%m-%dT%H:%M:%S"),
            "Event Type": kind,
            "Event Subtype": {"Insulin": "Fast-Acting", "Exercise": "Light"}.get(kind, ""),
            "Glucose Value (mg/dL)": g if kind in ("EGV", "Calibration") else "",
            "Insulin Value (u)": "2.5" if kind == "Insulin" else "",
            "Carb Value (grams)": "30" if kind == "Carbs" else "",
            "Duration (hh:mm:ss)": "00:30:00" if kind == "Exercise" else "",
        }
    if layout == "libreview":
        rt = draw(st.sampled_from(["0", "0", "1", "4", "5", "6"]))
        return {
            "Device": "FreeStyle LibreLink",
            "Serial Number": "ABC-123",
            "Device Timestamp": t.strftime("%m-%d-%Y %I:%M %p"),
            "Record Type": rt,
            "Historic Glucose mg/dL": g if rt == "0" else "",
            "Scan Glucose mg/dL": g if rt == "1" else "",
            "Rapid-Acting Insulin (units)": "3" if rt == "4" else "",
            "Carbohydrates (grams)": "40" if rt == "5" else "",
        }
    return {"who": "p1", "when": t.isoformat(), "sgv": g, "units": "mg/dL", "carbs": "0"}


@st.composite
def csv_file(draw) -> tuple[bytes, str]:
    """(file bytes, layout) for one export."""
    layout = draw(st.sampled_from([*CSV_LAYOUTS, "bytes"]))
    if layout == "bytes":
        return draw(st.binary(max_size=400)), layout
    header = list(CSV_LAYOUTS[layout])
    if draw(st.integers(0, 3)) == 0:  # partial or shuffled header
        header = draw(st.permutations(header))[: draw(st.integers(1, len(header)))]
    delim = draw(st.sampled_from([",", ",", ",", ";", "\t"]))
    rows = []
    for k in range(draw(st.integers(0, 25))):
        good = valid_csv_row(layout, k, draw)
        row = [good.get(h, "") if draw(st.integers(0, 4)) else draw(csv_cell) for h in header]
        extra = draw(st.sampled_from([0, 0, 0, 0, 0, -1, 1]))
        row = row[:-1] if extra < 0 else row + [draw(csv_cell)] * extra
        rows.append(row)
    lines = [delim.join(header)] + [delim.join(r) for r in rows]
    if layout == "libreview" or draw(st.integers(0, 5)) == 0:
        lines.insert(
            0, draw(st.sampled_from(["Glucose Data,Generated on,01-01-2022", "# export", ""]))
        )
    eol = "\r\n" if draw(st.booleans()) else "\n"
    enc = draw(st.sampled_from(["utf-8", "utf-8", "utf-8-sig", "latin-1", "utf-16"]))
    data = eol.join(lines).encode(enc, "replace")
    return mutate(data, draw)[0], layout


@pytest.mark.skipif(not landed("forecast.io.csv"), reason="forecast.io.csv not landed")
@FUZZ
@given(
    file=csv_file(),
    suffix=st.sampled_from([".csv", ".tsv", ".txt"]),
    units=st.sampled_from([None, None, "mg/dL", "mmol/L"]),
)
def test_csv_fuzz(file, suffix, units):
    from forecast.io.csv import read_csv

    data, layout = file
    kw: dict[str, Any] = {"units": units}
    if layout == "mapped":
        kw["columns"] = {"subject_id": "who", "time": "when", "glucose": "sgv", "carbs_g": "carbs"}
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / f"export{suffix}"
        p.write_bytes(data)
        check_read(read_csv, p, **kw)


# --------------------------------------------------------------------------- AZT1D

AZT1D_HEADERS = {
    "standard": [
        "EventDateTime", "DeviceMode", "BolusType", "Basal", "CorrectionDelivered",
        "TotalBolusInsulinDelivered", "FoodDelivered", "CarbSize", "CGM",
    ],
    "reordered": [
        "EventDateTime", "Basal", "BolusType", "CarbSize", "CorrectionDelivered",
        "FoodDelivered", "Readings (CGM / BGM)", "TotalBolusInsulinDelivered", "DeviceMode",
    ],
}  # fmt: skip
AZT1D_WORDS = [
    "Standard", "Standard/Correction", "Automatic Bolus/Correction", "BLE Standard Bolus",
    "Quick", "Extended 50.00%/12.00", "Extended/Correction 65.00%/3.18",
    "Extended 50.00%/0.00", "Extended 150.00%/99999", "Extended x%/y", "sleep", "exercise",
    "sleepsleep", "0", "1910.0", "476", "-1", "nan", "inf", "1e308",
]  # fmt: skip


@st.composite
def azt1d_file(draw) -> tuple[bytes, int | None]:
    """(file bytes, CGM rows when the file is intact and every row well formed, else None)."""
    layout = draw(st.sampled_from(["standard", "reordered", "zero-filled"]))
    header = AZT1D_HEADERS["reordered" if layout == "reordered" else "standard"]
    gcol = header[6] if layout == "reordered" else "CGM"
    empty = "0" if layout == "zero-filled" else ""
    rows, well_formed, n_cgm = [], True, 0
    t = BASE
    for _k in range(draw(st.integers(0, 30))):
        t = t + pd.Timedelta(minutes=draw(st.sampled_from([5, 5, 5, 0, 4, 6, 60])))
        good = dict.fromkeys(header, empty)
        good.update(EventDateTime=str(t), **{gcol: str(draw(st.integers(40, 400)))})
        good["Basal"] = draw(st.sampled_from(["", "0.8", "1.25"]))
        if draw(st.integers(0, 3)) == 0:
            good.update(
                BolusType=draw(st.sampled_from(AZT1D_WORDS[:7])),
                TotalBolusInsulinDelivered="2.5",
                CorrectionDelivered="0.5",
                FoodDelivered="2.0",
                CarbSize="30",
            )
        row = []
        for h in header:
            if draw(st.integers(0, 6)):
                row.append(good[h])
            else:
                well_formed = False
                row.append(draw(st.one_of(csv_cell, st.sampled_from(AZT1D_WORDS))))
        n_cgm += 1
        if draw(st.integers(0, 8)) == 0:
            rows.append(row)  # a verbatim duplicate row
            n_cgm += 1
        rows.append(row)
    data = "\n".join([",".join(header)] + [",".join(r) for r in rows]).encode()
    data, intact = mutate(data, draw)
    return data, (n_cgm if intact and well_formed else None)


@FUZZ
@given(file=azt1d_file(), hours=st.sampled_from([None, None, 2.0]))
def test_azt1d_fuzz(file, hours):
    from forecast.io.azt1d import read_azt1d

    data, n_cgm = file
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "Subject 3.csv"
        p.write_bytes(data)
        out = check_read(read_azt1d, p, expect_in=n_cgm, extended_hours=hours)
        if n_cgm:
            frame, _ = out
            assert set(frame["subject_id"]) <= {"azt1d-3"}


# --------------------------------------------------------------------------- spreadsheets

NS = "http://schemas.openxmlformats.org"
SHANGHAI_HEADERS = [
    "Date",
    "CGM (mg / dl)",
    "CBG (mg / dl)",
    "Blood Ketone (mmol / L)",
    "Dietary intake",
    "饮食",
    "Insulin dose - s.c.",
    "Non-insulin hypoglycemic agents",
    "CSII - bolus insulin (Novolin R, IU)",
    "CSII - basal insulin (Novolin R, IU / H)",
    "Insulin dose - i.v.",
]
EXCEL_EPOCH = pd.Timestamp("1899-12-30")
#: cell texts pandas.read_excel turns into NaN (its default na_values, and blank)
PANDAS_NA = {
    "", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN",
    "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null",
}  # fmt: skip


def col_name(i: int) -> str:
    s = ""
    i += 1
    while i:
        i, r = divmod(i - 1, 26)
        s = chr(65 + r) + s
    return s


def xlsx_bytes(rows: list[list[Any]]) -> bytes:
    """A one-sheet workbook: str → shared string, ("inline", s), bool, ("error", "#N/A"),
    pd.Timestamp → date-styled serial number, numbers as numbers, None → empty."""
    shared: list[str] = []

    def cell(c: int, r: int, v: Any) -> str:
        ref = f"{col_name(c)}{r}"
        if v is None:
            return ""
        if isinstance(v, bool):
            return f'<c r="{ref}" t="b"><v>{int(v)}</v></c>'
        if isinstance(v, tuple) and v[0] == "inline":
            return f'<c r="{ref}" t="inlineStr"><is><t>{escape(v[1])}</t></is></c>'
        if isinstance(v, tuple) and v[0] == "error":
            return f'<c r="{ref}" t="e"><v>{escape(v[1])}</v></c>'
        if isinstance(v, str):
            shared.append(v)
            return f'<c r="{ref}" t="s"><v>{len(shared) - 1}</v></c>'
        if isinstance(v, pd.Timestamp):
            serial = (v - EXCEL_EPOCH) / pd.Timedelta(days=1)
            return f'<c r="{ref}" s="1"><v>{serial!r}</v></c>'
        return f'<c r="{ref}"><v>{v!r}</v></c>'

    body = "".join(
        f'<row r="{r}">' + "".join(cell(c, r, v) for c, v in enumerate(vals)) + "</row>"
        for r, vals in enumerate(rows, start=1)
    )
    sst = "".join(f"<si><t>{escape(s)}</t></si>" for s in shared)
    ct = "application/vnd.openxmlformats-officedocument.spreadsheetml"
    parts = {
        "[Content_Types].xml": f'<Types xmlns="{NS}/package/2006/content-types">'
        f'<Default Extension="rels" ContentType="application/vnd.openxmlformats-package.relationships+xml"/>'
        f'<Default Extension="xml" ContentType="application/xml"/>'
        f'<Override PartName="/xl/workbook.xml" ContentType="{ct}.sheet.main+xml"/>'
        f'<Override PartName="/xl/worksheets/sheet1.xml" ContentType="{ct}.worksheet+xml"/>'
        f'<Override PartName="/xl/styles.xml" ContentType="{ct}.styles+xml"/>'
        f'<Override PartName="/xl/sharedStrings.xml" ContentType="{ct}.sharedStrings+xml"/></Types>',
        "_rels/.rels": f'<Relationships xmlns="{NS}/package/2006/relationships"><Relationship Id="rId1" '
        f'Type="{NS}/officeDocument/2006/relationships/officeDocument" Target="xl/workbook.xml"/></Relationships>',
        "xl/workbook.xml": f'<workbook xmlns="{NS}/spreadsheetml/2006/main" xmlns:r="{NS}/officeDocument/2006/relationships">'
        '<sheets><sheet name="Sheet1" sheetId="1" r:id="rId1"/></sheets></workbook>',
        "xl/_rels/workbook.xml.rels": f'<Relationships xmlns="{NS}/package/2006/relationships">'
        f'<Relationship Id="rId1" Type="{NS}/officeDocument/2006/relationships/worksheet" Target="worksheets/sheet1.xml"/>'
        f'<Relationship Id="rId2" Type="{NS}/officeDocument/2006/relationships/styles" Target="styles.xml"/>'
        f'<Relationship Id="rId3" Type="{NS}/officeDocument/2006/relationships/sharedStrings" Target="sharedStrings.xml"/>'
        "</Relationships>",
        "xl/styles.xml": f'<styleSheet xmlns="{NS}/spreadsheetml/2006/main"><cellXfs count="2">'
        '<xf numFmtId="0"/><xf numFmtId="22" applyNumberFormat="1"/></cellXfs></styleSheet>',
        "xl/sharedStrings.xml": f'<sst xmlns="{NS}/spreadsheetml/2006/main" count="{len(shared)}" '
        f'uniqueCount="{len(shared)}">{sst}</sst>',
        "xl/worksheets/sheet1.xml": f'<worksheet xmlns="{NS}/spreadsheetml/2006/main"><sheetData>{body}</sheetData></worksheet>',
    }
    import io

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, text in parts.items():
            z.writestr(name, text)
    return buf.getvalue()


sheet_time = st.one_of(
    st.integers(0, 2 * 96).map(lambda k: BASE + pd.Timedelta(minutes=15 * k)),
    st.integers(0, 2 * 96).map(lambda k: str(BASE + pd.Timedelta(minutes=15 * k))),
    st.sampled_from([pd.Timestamp("1899-12-31"), pd.Timestamp("2099-01-01"), -1.0, 1e7]),
    st.sampled_from(BAD_TIMES),
)
sheet_cell = st.one_of(
    st.none(),
    st.none(),
    st.floats(-50, 800, allow_nan=False),
    st.integers(-5, 700),
    st.sampled_from(BAD_NUMBERS),
    st.sampled_from(
        [
            "LO",
            "HI",
            "Novolin R, 6 IU",
            "insulin glargine, 12 IU; Novolin R, 4 IU",
            "Mystery, 5 IU",
            "temporarily suspend insulin delivery",
            "Glucose 20 g",
            "500ml 0.9% sodium chloride, 12 IU Novolin R",
            "data not available",
        ]
    ),
    junk_text.map(lambda s: ("inline", s)),
    st.booleans(),
    st.just(("error", "#N/A")),
    st.sampled_from([float("1e308"), -1e308]),
)


@st.composite
def shanghai_sheet(draw) -> tuple[bytes, int]:
    """(workbook bytes, CGM cells holding something) — or damaged bytes and -1."""
    header = draw(
        st.one_of(
            st.just(SHANGHAI_HEADERS),
            st.lists(st.sampled_from(SHANGHAI_HEADERS + ["", "when", "sgv"]), max_size=8),
        )
    )
    rows = draw(
        st.lists(
            st.tuples(sheet_time, st.lists(sheet_cell, max_size=len(header))).map(
                lambda tr: [tr[0], *tr[1]]
            ),
            max_size=25,
        )
    )
    data = xlsx_bytes([list(header), *rows])
    damage = draw(st.sampled_from(["none"] * 5 + ["truncate", "flip", "random"]))
    if damage == "truncate":
        return data[: draw(st.integers(0, len(data) - 1))], -1
    if damage == "flip":
        at = draw(st.integers(0, len(data) - 1))
        return data[:at] + bytes([data[at] ^ 0x55]) + data[at + 1 :], -1
    if damage == "random":
        return draw(st.binary(max_size=300)), -1
    # CGM cells the reader must account for: the first column whose header starts "cgm"
    cgm = next((i for i, h in enumerate(header) if h.lower().startswith("cgm")), None)
    has_date = any(h.lower().startswith("date") for h in header)
    if cgm is None or not has_date or not rows:
        return data, -1

    def filled(v: Any) -> bool:
        # pandas reads its NA spellings ("None", "nan", "N/A"...) and error cells as empty
        if v is None or (isinstance(v, tuple) and v[0] == "error"):
            return False
        text = v[1] if isinstance(v, tuple) else v
        return not (isinstance(text, str) and text.strip() in PANDAS_NA)

    return data, sum(1 for r in rows if cgm < len(r) and filled(r[cgm]))


@FUZZ
@given(sheet=shanghai_sheet(), name=st.sampled_from(["1001_0_20210730.xlsx", "odd name.xlsx"]))
def test_shanghai_spreadsheet_fuzz(sheet, name):
    from forecast.io.shanghai import read_shanghai

    data, n_cgm = sheet
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / name
        p.write_bytes(data)
        check_read(read_shanghai, p, expect_in=n_cgm if n_cgm >= 0 else None)


@settings(max_examples=15, deadline=None)
@given(data=st.binary(max_size=600), suffix=st.sampled_from([".xls", ".xlsx"]))
def test_shanghai_random_bytes_and_legacy_xls(data, suffix):
    from forecast.io.shanghai import read_shanghai

    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / f"1002_1_20210909{suffix}"
        p.write_bytes(b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + data if suffix == ".xls" else data)
        check_read(read_shanghai, p)


# --------------------------------------------------------------------------- the dispatcher


@settings(max_examples=25, deadline=None)
@given(
    suffixes=st.lists(
        st.sampled_from([".xml", ".json", ".csv", ".xlsx", ".xls", ".txt", ".parquet", ""]),
        min_size=1,
        max_size=3,
    ),
    fmt=st.sampled_from([None, "ohio", "nightscout", "csv", "shanghai", "fhir"]),
    options=st.dictionaries(
        st.sampled_from(["timezone", "basal", "units", "subject_id", "bogus"]),
        st.sampled_from(["UTC", "Not/AZone", "1.0", 1.0, -3.0, "mmol/L"]),
        max_size=2,
    ),
)
def test_read_dispatcher_refuses_with_typed_errors(suffixes, fmt, options):
    """Format guessing, unknown formats and options that do not apply: typed, never a crash."""
    with tempfile.TemporaryDirectory() as d:
        paths = []
        for i, s in enumerate(suffixes):
            p = Path(d) / f"f{i}{s}"
            p.write_bytes(b"1,2\n")
            paths.append(p)
        mod = fio.FORMATS.get(fmt or "", ("",))[0] if fmt else ""
        if mod and not landed(mod):
            pytest.skip(f"{mod} not landed")
        with time_limit(HANG_S):
            try:
                frame, report = fio.read(paths, fmt, **options)
            except GlucastError:
                return
            except ModuleNotFoundError as e:  # a format whose reader has not landed yet
                assert e.name in {m for m, _, _ in fio.FORMATS.values()}, e
                return
        check_report(frame, report)


def test_grid_of_a_fuzzed_frame_is_canonical_and_float():
    """Sanity of the oracle itself: a good Ohio file passes every check it makes."""
    from forecast.io.ohio import read_ohio

    events = (
        "".join(f'<event ts="{ohio_time(5 * k)}" value="{100 + k}"/>' for k in range(12))
        + '<event ts="bad" value="100"/>'
    )
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "559-ws-training.xml"
        p.write_text(f'<patient id="559"><glucose_level>{events}</glucose_level></patient>')
        frame, report = check_read(read_ohio, p, expect_in=13)
    assert report.readings_kept == 12 and report.readings_rejected == 1
    assert np.isfinite(frame["glucose"]).sum() == 12
