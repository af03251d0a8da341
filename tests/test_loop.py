"""The control loop on simulated devices: cycles, restarts, faults, modes, signals, the CLI."""

from __future__ import annotations

import json
import os
import signal
import threading

import numpy as np
import pandas as pd
import pytest

from forecast.cli import main as cli_main
from serving.controllers import build_controller
from serving.insilico.backends import ReplayBackend, SimBackend
from serving.insilico.simulated import SimulatedCohort, WorldConfig
from serving.journal import Journal
from serving.loop import ControlLoop, LoopError, StopFlag, run_loop
from serving.predictor import FallbackPredictor
from serving.safety import max_basal

P = "adult#001"


def make_loop(
    tmp_path, *, faults=(), controller="physio-mpc", mode="closed", world=None, predictor=None,
    describe=False,
):  # fmt: skip
    world = world or SimulatedCohort(
        WorldConfig(patients=P, sensor="dexcom-noise", seed=11), state_path=tmp_path / "dev.db"
    )
    built = build_controller(controller, None)
    ctrl, pred = built.controller, built.predictor
    journal = Journal(tmp_path / "j.db", sync="normal")
    backend = SimBackend(world, faults)
    loop = ControlLoop(backend, journal, ctrl, predictor or pred, mode=mode)
    loop.start(describe=backend.describe() if describe else None)
    return loop


def verdicts(j: Journal) -> pd.DataFrame:
    c = j.cycles()
    v = pd.DataFrame([json.loads(x) for x in c["verdict"]]).drop(columns="fallback")
    return pd.concat([c[["time", "glucose", "iob_u", "fallback", "mode"]], v], axis=1)


def test_cycles_journal_limits_and_sync(tmp_path):
    loop = make_loop(tmp_path)
    s = loop.settings[0]
    summary = run_loop(loop, max_cycles=24)
    assert summary.cycles == 24 and summary.stopped_by == "max_cycles"
    j = loop.journal
    v = verdicts(j)
    assert len(v) == 24 and v["time"].is_monotonic_increasing
    cap = float(max_basal(s.max_basal_u_per_h, s.max_daily_basal_u_per_h, s.basal_u_per_h))
    assert (v["temp_basal_u_per_h"] <= cap + 1e-9).all() and (v["bolus_u"] <= s.max_bolus_u).all()
    assert (v["duration_min"] <= 30).all()
    assert j.check() == [] and j.unresolved() == []
    pump = loop.backend.pump(0)
    assert [d.seq for d in pump.deliveries()] == list(j.insulin_history(P)["seq"])  # synced at stop
    assert set(j.events()["kind"]) >= {"start", "stop", "mode"}


def test_a_journaled_cycle_is_not_run_again_after_a_restart(tmp_path):
    loop = make_loop(tmp_path)
    run_loop(loop, max_cycles=3)
    recs = loop.cycle()  # the cycle is journaled, then the process "dies" before time moves
    assert len(recs) == 1
    loop.journal.close()
    loop.backend.world.close()
    again = make_loop(tmp_path, world=SimulatedCohort.open(tmp_path / "dev.db"))
    assert again.cycle() == []  # already done: nothing recomputed, nothing resent
    again.backend.advance(5)
    assert len(again.cycle()) == 1
    assert len(again.journal.cycles()) == 5


def test_a_journal_continues_only_its_own_run(tmp_path):
    first = make_loop(tmp_path, describe=True)
    first.journal.close()
    other = SimulatedCohort(WorldConfig(patients="child#002", sensor="none"))
    with pytest.raises(LoopError, match="is for patients"):
        make_loop(tmp_path, world=other)
    same_patient = SimulatedCohort(WorldConfig(patients=P, sensor="none", seed=99))
    with pytest.raises(LoopError, match="another world"):
        make_loop(tmp_path, world=same_patient, describe=True)


def test_cgm_dropout_falls_back_then_recovers(tmp_path):
    loop = make_loop(tmp_path, faults=["dropout:start=30,minutes=40"])
    run_loop(loop, max_cycles=24)
    v = verdicts(loop.journal).set_index("time")
    t0 = v.index[0]
    during = v.loc[t0 + pd.Timedelta(minutes=45) : t0 + pd.Timedelta(minutes=65)]  # > 12 min old
    assert len(during) == 5
    assert (during["fallback"].isin(["scheduled_basal", "suspend"])).all()
    assert (during["bolus_u"] == 0).all() and during["glucose"].isna().all()
    after = v.loc[t0 + pd.Timedelta(minutes=90) :]
    assert (after["fallback"] == "").any()
    vetoes = loop.journal.events("veto")
    assert vetoes["detail"].str.contains("cgm_unusable").sum() >= 6


class _BrokenModel:
    """A model that returns NaN (what a corrupted graph does): a fault, not a stand-in."""

    def __init__(self, like):
        self.config, self.quantiles = like.config, like.quantiles

    def predict(self, past, future):
        return np.full((len(past), self.config.horizon_slots, len(self.quantiles)), np.nan)


def test_a_failing_predictor_means_scheduled_basal(tmp_path):
    built = build_controller("basal-bolus", None)
    _, physio = built.controller, built.predictor
    broken = FallbackPredictor(_BrokenModel(physio), None)  # no fallback: it raises
    loop = make_loop(tmp_path, controller="basal-bolus", predictor=broken)
    run_loop(loop, max_cycles=4)
    v = verdicts(loop.journal)
    assert (v["fallback"] == "scheduled_basal").all() and (v["bolus_u"] == 0).all()
    faults = loop.journal.events("fault")
    assert faults["detail"].str.contains("predictor").all() and len(faults) == 4


def test_an_unwritable_journal_limits_insulin_and_the_loop_goes_on(tmp_path, capsys):
    loop = make_loop(tmp_path)
    run_loop(loop, max_cycles=2)
    j = loop.journal
    j.con.execute("PRAGMA query_only = ON")  # every write now fails as on a read-only disk
    before = len(loop.backend.pump(0).firmware.acks)
    recs = []
    run_loop(loop, max_cycles=4, on_cycle=recs.extend)
    assert len(recs) == 4 and not any(r.journal_ok for r in recs)
    for r in recs:
        assert r.verdict.bolus_u == 0.0
        assert r.verdict.temp_basal_u_per_h <= loop.settings[0].basal_u_per_h + 1e-9
        assert any(v.startswith("journal_unavailable") for v in r.verdict.vetoes)
        assert all(c.command.kind != "bolus" for c in r.results)
    sent = list(loop.backend.pump(0).firmware.acks.values())[before:]
    assert all(a.kind in ("cancel_temp", "temp_basal") and a.amount <= 1e-9 for a in sent)
    assert "journal unavailable" in capsys.readouterr().err
    j.con.execute("PRAGMA query_only = OFF")  # writable again
    run_loop(loop, max_cycles=1)
    assert j.events("warning")["detail"].str.contains("journal_recovered").any()
    assert list(j.insulin_history(P)["seq"]) == [d.seq for d in loop.backend.pump(0).deliveries()]
    assert j.check() == []


def test_unreachable_pump_never_gets_blind_retries(tmp_path):
    loop = make_loop(tmp_path, faults=["unreachable:start=20,minutes=20"])
    run_loop(loop, max_cycles=16)
    j = loop.journal
    assert j.unresolved() == [] and j.check() == []
    was = [json.loads(d)["was"] for d in j.events("reconcile")["detail"]]
    assert "unknown" in was  # commands the pump could not confirm, resolved later by query
    bolus = [d for d in loop.backend.pump(0).deliveries() if d.kind == "bolus"]
    assert len({d.key for d in bolus}) == len(bolus)
    assert j.events("fault")["detail"].str.contains("unreachable").any()


def test_open_mode_only_advises(tmp_path):
    loop = make_loop(tmp_path, mode="open")  # the old name: advisory with nobody to confirm
    run_loop(loop, max_cycles=6)
    assert loop.backend.pump(0).firmware.acks == {}
    v = verdicts(loop.journal)
    assert (v["mode"] == "advisory").all() and len(v) == 6
    assert loop.journal.meta("mode") == "advisory"
    answers = [json.loads(d)["action"] for d in loop.journal.events("advice")["detail"]]
    assert set(answers) <= {"offered"}  # offered, never confirmed


def test_sigterm_finishes_the_cycle_and_stops_cleanly(tmp_path):
    loop = make_loop(tmp_path)
    timer = threading.Timer(1.0, lambda: os.kill(os.getpid(), signal.SIGTERM))
    timer.start()
    try:
        summary = run_loop(loop, speed="realtime", stop=StopFlag())
    finally:
        timer.cancel()
    assert summary.stopped_by == "SIGTERM" and summary.cycles == 1
    assert len(loop.journal.cycles()) == 1
    stop = loop.journal.events("stop")
    assert json.loads(stop["detail"].iloc[-1])["reason"] == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored


def test_cli_loop_runs_and_continues_the_same_run(tmp_path, capsys):
    db = tmp_path / "cli.db"
    argv = ["loop", "--backend", "sim", "--patient", P, "--journal", str(db), "--speed", "fast",
            "--controller", "basal-bolus", "--sensor", "none", "--quiet", "--json"]  # fmt: skip
    assert cli_main([*argv, "--hours", "0.5"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["journal"]["cycles"] == 6 and out["stopped_by"] == "until"
    assert (tmp_path / "cli.db.device.db").exists()
    assert (
        cli_main([*argv, "--hours", "1"]) == 0
    )  # a restart continues: --hours counts from the start
    out = json.loads(capsys.readouterr().out)
    assert out["cycles_this_run"] == 6 and out["journal"]["cycles"] == 12
    assert out["journal"]["problems"] == []
    assert cli_main([*argv, "--hours", "1", "--fault", "gremlins"]) == 2


def test_replay_backend_advises_over_a_recording(tmp_path):
    world = SimulatedCohort(WorldConfig(patients=P, sensor="dexcom-noise", seed=2))
    rows = []
    for _ in range(60):
        rows.append((world.now(), world.cgm(0).latest().glucose_mgdl))
        world.advance(5)
    frame = pd.DataFrame(rows, columns=["time", "glucose"]).assign(
        subject_id="rec-1", basal_u=world.settings(0).basal_u_per_h / 12, bolus_u=0.0, carbs_g=0.0
    )
    backend = ReplayBackend(frame, "rec-1")
    built = build_controller("pid", None)
    ctrl, pred = built.controller, built.predictor
    j = Journal(tmp_path / "r.db")
    loop = ControlLoop(backend, j, ctrl, pred)
    loop.start(describe={"backend": "replay"})
    summary = run_loop(loop, until=backend.until)
    assert summary.cycles == 60 - 24 and j.check() == []
    assert list(j.insulin_history("rec-1")["seq"]) == [d.seq for d in backend.vpump.deliveries()]
    assert j.cycles()["glucose"].notna().all()
