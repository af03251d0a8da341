"""The journal: WAL, write-ahead intent, reconciliation by key, insulin history, disk failures."""

from __future__ import annotations

import json
import sqlite3

import numpy as np
import pandas as pd
import pytest

from forecast.cli import main as cli_main
from serving.hal.pump import Command, CommandKind, Delivery
from serving.insilico.simulated import ManualClock, VirtualPump
from serving.journal import (
    DuplicateCommand,
    Journal,
    JournalCorrupt,
    JournalUnavailable,
    bin_insulin,
)
from serving.safety import Supervisor, command_key
from serving.types import PatientSettings, Proposal, Reading, Verdict

T0 = pd.Timestamp("2026-03-01 08:00", tz="UTC")
FIVE = pd.Timedelta(minutes=5)
P = "adult#001"


def virtual_pump() -> VirtualPump:
    """A real pump (the firmware the simulated pumps run) on a clock the test holds."""
    return VirtualPump(1.0, ManualClock(T0))


def settings() -> PatientSettings:
    return PatientSettings(P, 1.0, 10.0, 40.0, 3.0, 10.0, 8.0)


def test_wal_mode_schema_and_reopen(tmp_path):
    path = tmp_path / "j.db"
    with Journal(path) as j:
        assert j.journal_mode == "wal"
        assert j.meta("schema_version") == "1"
        j.set_meta("run_start", "x")
    with Journal(path) as j:
        assert j.meta("run_start") == "x"
    raw = sqlite3.connect(path)
    assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    raw.close()


def test_not_a_journal_is_a_typed_error(tmp_path):
    bad = tmp_path / "bad.db"
    bad.write_bytes(b"this is not sqlite at all" * 100)
    with pytest.raises(JournalCorrupt):
        Journal(bad)


def test_cycle_roundtrip_and_duplicate_cycle(tmp_path):
    j = Journal(tmp_path / "j.db")
    rs = [Reading(T0 - FIVE, 118.0), Reading(T0, float("nan"))]
    v = Verdict(1.5, 30, 0.5, vetoes=["max_iob: x"], fallback="")
    pred = np.full((12, 3), 120.0)
    pred[0, 0] = np.nan
    j.record_cycle(
        patient=P, time=T0, readings=rs, glucose=118.0, iob_u=1.2, verdict=v, mode="closed",
        proposal=Proposal(2.0, 30, 0.5, predicted_mgdl=pred), prediction=pred, carbs_g=30.0,
        events=[("veto", {"reason": "max_iob: x"})],
    )  # fmt: skip
    assert j.has_cycle(P, T0) and not j.has_cycle(P, T0 + FIVE)
    df = j.cycles()
    assert len(df) == 1 and df.loc[0, "time"] == T0
    assert json.loads(df.loc[0, "verdict"])["bolus_u"] == 0.5
    assert json.loads(df.loc[0, "prediction"])[0][0] is None  # NaN stored as null, valid JSON
    assert len(j.events("veto")) == 1
    with pytest.raises(Exception, match="UNIQUE"):
        j.record_cycle(
            patient=P, time=T0, readings=rs, glucose=1, iob_u=0, verdict=v, mode="closed"
        )
    assert len(j.events("veto")) == 1  # the failed cycle left nothing behind


def test_write_ahead_intent_and_duplicate_key(tmp_path):
    j = Journal(tmp_path / "j.db")
    cmd = Command(command_key(P, T0, "bolus"), CommandKind.BOLUS, 2.0)
    j.begin_command(cmd, patient=P, cycle_time=T0)
    assert j.command(cmd.key).status == "pending"
    assert j.unconfirmed_bolus_u(P) == 2.0
    with pytest.raises(DuplicateCommand):
        j.begin_command(cmd, patient=P, cycle_time=T0)
    pump = virtual_pump()
    ack = pump.bolus(2.0, cmd.key)
    j.finish_command(cmd.key, "acked", ack)
    rec = j.command(cmd.key)
    assert rec.status == "acked" and rec.ack == ack
    assert j.unconfirmed_bolus_u(P) == 0.0


def test_reconcile_resolves_pending_by_key_never_resends(tmp_path):
    j = Journal(tmp_path / "j.db")
    pump = virtual_pump()
    got = Command(command_key(P, T0, "bolus"), CommandKind.BOLUS, 1.5)
    lost = Command(command_key(P, T0 - FIVE, "bolus"), CommandKind.BOLUS, 1.0)
    for c in (got, lost):
        j.begin_command(c, patient=P, cycle_time=T0)
    pump.bolus(1.5, got.key)  # reached the pump; the process died before recording the ack
    pump.advance()
    recs = {r.key: r for r in j.reconcile(pump, P)}
    assert recs[got.key].status == "acked" and recs[got.key].ack.amount == 1.5
    assert recs[lost.key].status == "failed" and recs[lost.key].ack is None
    assert sum(1 for d in pump.deliveries() if d.kind == "bolus") == 1  # nothing resent
    assert len(j.events("reconcile")) == 2
    # a restarted cycle with the same key: the supervisor reuses the outcome, sends nothing
    sup = Supervisor(settings(), pump, journal=j)
    res = sup.apply(Verdict(1.0, 30, 1.5), T0)
    bolus = [r for r in res if r.command.kind == CommandKind.BOLUS][0]
    assert bolus.status == "acked" and "already resolved" in bolus.detail
    assert len(pump.firmware.acks) == 1


def test_supervisor_apply_journals_intent_before_the_pump(tmp_path):
    j = Journal(tmp_path / "j.db")
    pump = virtual_pump()
    seen = []
    real_bolus = pump.bolus

    def bolus(units, key):  # record what the journal held at the moment the pump was called
        seen.append(Journal(tmp_path / "j.db", readonly=True).command(key).status)
        return real_bolus(units, key)

    pump.bolus = bolus
    sup = Supervisor(settings(), pump, journal=j)
    v = sup.check(Proposal(2.0, 30, 1.0), _state())
    res = sup.apply(v, T0)
    assert [r.command.kind for r in res] == [CommandKind.TEMP_BASAL, CommandKind.BOLUS]
    assert seen == ["pending"]
    assert all(j.command(r.command.key).status == "acked" for r in res)
    # the same verdict again (a restarted cycle) sends nothing new
    sup.apply(v, T0)
    assert len(pump.firmware.acks) == 2


def _state(iob=0.0):
    from serving.safety import SafetyState

    return SafetyState.from_readings(T0, [Reading(T0 - FIVE, 150.0), Reading(T0, 152.0)], iob)


def test_insulin_history_and_binning(tmp_path):
    j = Journal(tmp_path / "j.db")
    pump = virtual_pump()
    j.begin_command(Command("b1", CommandKind.BOLUS, 2.0), patient=P, cycle_time=T0)
    j.finish_command("b1", "acked", pump.bolus(2.0, "b1"))
    for _ in range(3):
        pump.advance()
    n = j.record_deliveries(P, pump.deliveries())
    assert n == 4 and j.record_deliveries(P, pump.deliveries()) == 4  # idempotent
    assert j.last_delivery_seq(P) == 4
    h = j.insulin_history(P)
    assert list(h["kind"]) == ["basal", "bolus", "basal", "basal"]
    slots = pd.date_range(T0, periods=4, freq="5min")
    assert bin_insulin(h, slots, "bolus").tolist() == [2.0, 0.0, 0.0, 0.0]
    basal = bin_insulin(h, slots, "basal")
    assert np.allclose(basal, [1 / 12, 1 / 12, 1 / 12, 0.0])
    # an interval straddling two slots is split in proportion
    straddle = pd.DataFrame(
        {
            "time": [T0 + pd.Timedelta(minutes=3)],
            "kind": ["basal"],
            "units": [1.0],
            "minutes": [5.0],
        }
    )
    assert np.allclose(bin_insulin(straddle, slots, "basal"), [0.4, 0.6, 0, 0])
    assert j.check() == []


def test_check_finds_a_double_bolus(tmp_path):
    j = Journal(tmp_path / "j.db")
    pump = virtual_pump()
    j.begin_command(Command("k", CommandKind.BOLUS, 1.0), patient=P, cycle_time=T0)
    j.finish_command("k", "acked", pump.bolus(1.0, "k"))
    half = [Delivery(1, T0, "bolus", 0.5, "k"), Delivery(2, T0 + FIVE, "bolus", 0.5, "k")]
    j.record_deliveries(P, half)  # one bolus booked over two intervals (a slow pump): fine
    assert j.check() == []
    j.record_deliveries(P, [Delivery(3, T0 + 2 * FIVE, "bolus", 1.0, "k")])  # given again
    assert any("2.00 U delivered for 1.00 U" in p for p in j.check())
    j.record_deliveries(P, [Delivery(4, T0 + 3 * FIVE, "bolus", 1.0, "other")])
    assert any("no acked command" in p for p in j.check())


def test_full_disk_and_read_only_raise_unavailable(tmp_path):
    path = tmp_path / "j.db"
    j = Journal(path)
    j.event("start", {})
    pages = j.con.execute("PRAGMA page_count").fetchone()[0]
    j.con.execute(f"PRAGMA max_page_count = {pages}")  # the disk is now full
    with pytest.raises(JournalUnavailable, match="full"):
        for i in range(200):
            j.event("warning", {"filler": "x" * 2000, "i": i})
    ro = Journal(path, readonly=True)
    assert len(ro.events()) >= 1
    with pytest.raises(JournalUnavailable):
        ro.event("warning", {})


def test_supervisor_with_unwritable_journal_sends_only_reductions(tmp_path):
    path = tmp_path / "j.db"
    Journal(path).close()
    ro = Journal(path, readonly=True)
    pump = virtual_pump()
    sup = Supervisor(settings(), pump, journal=ro)
    res = sup.apply(Verdict(2.5, 30, 1.0), T0)  # a raise and a bolus: neither may go
    assert [r.status for r in res] == ["skipped", "skipped"] and not pump.firmware.acks
    res = sup.apply(Verdict(0.0, 30, 0.0, suspend=True, fallback="suspend"), T0 + FIVE)
    assert [r.status for r in res] == ["acked"] and pump.firmware.temp_rate == 0.0
    assert any("journal unavailable" in m for m in sup.log)


def test_cli_show_and_export(tmp_path, capsys):
    path = tmp_path / "j.db"
    j = Journal(path)
    pump = virtual_pump()
    for k in range(3):
        t = T0 + k * FIVE
        j.record_cycle(
            patient=P, time=t, readings=[Reading(t, 120.0 + k)], glucose=120.0 + k, iob_u=0.1,
            verdict=Verdict(1.0, 30, 0.0), mode="closed", carbs_g=10.0 * (k == 1),
        )  # fmt: skip
        pump.advance()
    j.record_deliveries(P, pump.deliveries())
    j.close()
    assert cli_main(["journal", "show", str(path), "--json", "--last", "2"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (
        out["summary"]["cycles"] == 3
        and len(out["cycles"]) == 2
        and out["summary"]["problems"] == []
    )
    assert cli_main(["journal", "show", str(path)]) == 0
    assert "cycles" in capsys.readouterr().out
    for ext in ("csv", "parquet"):
        dest = tmp_path / f"out.{ext}"
        assert cli_main(["journal", "export", str(path), "--out", str(dest)]) == 0
        df = pd.read_csv(dest) if ext == "csv" else pd.read_parquet(dest)
        assert list(df["glucose"]) == [120.0, 121.0, 122.0]
        assert np.allclose(df["basal_u"], 1 / 12) and list(df["carbs_g"]) == [0.0, 10.0, 0.0]
    assert cli_main(["journal", "show", str(tmp_path / "missing.db")]) == 2
