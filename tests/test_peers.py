"""The peer controllers' adapters (OpenAPS oref0, Loop/pyloopkit) against recorded peer answers.

tests/fixtures/peers/{oref0,loop}_cycle.json hold one decision each, recorded from the real
peer (`benchmarks/peer_latency.py --record`): the `ControlInput` (settings + 12 h of
`SlotHistory`), the request the adapter built, the peer's answer and the `Proposal`. The pure
tests always run; the ones that run the real peer are skipped when its environment is absent
(`glucast peers install` creates it in about half a minute).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from serving.controllers.peers import (
    PeerAnswerError,
    PeerCrashError,
    PeerEnvironmentError,
    PeerInputError,
    PeerTimeoutError,
)
from serving.controllers.peers import loop as loop_peer
from serving.controllers.peers import oref0 as oref0_peer
from serving.controllers.peers.history import basal_runs
from serving.controllers.peers.process import PeerProcess, child_env
from serving.types import ControlInput, PatientSettings, SlotHistory

FIX = Path(__file__).parent / "fixtures" / "peers"


def _fixture(peer: str) -> dict:
    return json.loads((FIX / f"{peer}_cycle.json").read_text())


def _input(fx: dict) -> ControlInput:
    i = fx["input"]
    h = i["history"]
    hist = SlotHistory(
        time=np.array([pd.Timestamp(t).to_datetime64() for t in h["time"]], "datetime64[ns]"),
        glucose=np.array([np.nan if g is None else g for g in h["glucose"]], np.float64),
        basal_u=np.array(h["basal_u"], np.float64),
        bolus_u=np.array(h["bolus_u"], np.float64),
        carbs_g=np.array(h["carbs_g"], np.float64),
    )
    return ControlInput(
        time=pd.Timestamp(i["time"]),
        past=np.zeros((0, 0)),
        future=np.zeros((0, 0)),
        glucose_mgdl=i["glucose_mgdl"],
        iob_u=i["iob_u"],
        settings=PatientSettings(**i["settings"]),
        carbs_announced_g=i["carbs_announced_g"],
        history=hist,
    )


def _controller(peer: str, **overrides):
    try:
        if peer == "oref0":
            return oref0_peer.Oref0Controller(**overrides)
        return loop_peer.LoopController(**overrides)
    except PeerEnvironmentError as e:
        pytest.skip(f"{peer} environment absent ({e}); `glucast peers install {peer}` makes it")


def _proposal_dict(p) -> dict:
    return {
        "temp_basal_u_per_h": p.temp_basal_u_per_h,
        "duration_min": p.duration_min,
        "bolus_u": p.bolus_u,
        "reason": p.reason,
    }


# --------------------------------------------------------------------------- fixtures: pure


@pytest.mark.parametrize("peer", ["oref0", "loop"])
def test_fixture_names_peer_version_and_licence(peer):
    fx = _fixture(peer)
    assert fx["peer"] == peer
    assert fx["peer_version"] == {"oref0": "0.7.1", "loop": "0.1.0"}[peer]
    assert fx["peer_licence"].startswith({"oref0": "MIT", "loop": "BSD-2-Clause"}[peer])


RECORDED_OREF0 = oref0_peer.Oref0Config(history_hours=24.0)  # the fixture's 12 h, all of it


def test_oref0_builds_the_recorded_request():
    fx = _fixture("oref0")
    assert oref0_peer.build_request(_input(fx), RECORDED_OREF0) == fx["request"]
    short = oref0_peer.build_request(_input(fx))  # the default: the last 8 h only
    assert len(short["glucose"]) == 8 * 12 + 1 < len(fx["request"]["glucose"])


def test_loop_builds_the_recorded_request():
    fx = _fixture("loop")
    assert loop_peer.build_request(_input(fx)) == fx["request"]


def test_oref0_recorded_answer_maps_to_the_proposal():
    fx = _fixture("oref0")
    p = oref0_peer.proposal_from_result(fx["response"], fx["request"], _input(fx))
    assert _proposal_dict(p) == fx["proposal"]
    rt = fx["response"]["suggested"]
    # units as oref0 states them: rate U/h, duration min, SMB U
    assert p.temp_basal_u_per_h == rt["rate"] and p.duration_min == rt["duration"]
    assert p.bolus_u == rt["units"] > 0
    assert p.reason.startswith("oref0: ") and rt["reason"] in p.reason


def test_loop_recorded_answer_maps_to_the_proposal():
    fx = _fixture("loop")
    inp = _input(fx)
    p = loop_peer.proposal_from_result(fx["response"], inp, loop_peer.LoopConfig())
    assert _proposal_dict(p) == fx["proposal"]
    rate, minutes = fx["response"]["recommended_temp_basal"]
    assert (p.temp_basal_u_per_h, p.duration_min) == (rate, minutes)
    assert p.bolus_u == 0.0  # no automatic bolus in Loop 2 (pyloopkit), no meal this cycle


def test_oref0_request_is_what_a_rig_reads():
    fx = _fixture("oref0")
    req = fx["request"]
    stamps = [r["timestamp"] for r in req["pumphistory"]]
    assert stamps == sorted(stamps, reverse=True)  # newest first
    dates = [g["date"] for g in req["glucose"]]
    assert dates == sorted(dates, reverse=True)
    assert req["clock"].endswith("Z")
    s = _input(fx).settings
    assert req["profile"]["max_iob"] > 0  # oref0's default 0 would never add insulin
    assert req["profile"]["enableSMB_always"] and req["profile"]["enableUAM"]
    assert req["profile"]["sens"] == s.isf_mgdl_per_u
    assert req["profile"]["max_basal"] <= s.max_basal_u_per_h


def test_oref0_meal_bolus_goes_into_the_pump_history_first():
    fx = _fixture("oref0")
    inp = _input(fx)
    h = inp.history
    carbs = h.carbs_g.copy()
    carbs[-1] = 45.0
    inp.history = SlotHistory(h.time, h.glucose, h.basal_u, h.bolus_u, carbs)
    inp.carbs_announced_g = 45.0
    req = oref0_peer.build_request(inp)
    want = np.floor(45.0 / inp.settings.carb_ratio_g_per_u / 0.05 + 1e-9) * 0.05
    assert req["meal_bolus_u"] == pytest.approx(want)
    assert req["pumphistory"][0] == {
        "_type": "Bolus", "timestamp": req["clock"], "amount": req["meal_bolus_u"], "duration": 0
    }  # fmt: skip
    assert req["carbhistory"][0] == {
        "created_at": req["clock"],
        "carbs": 45.0,
        "enteredBy": "glucast",
    }
    result = {"suggested": {"rate": 0.0, "duration": 30, "reason": "r"}}
    p = oref0_peer.proposal_from_result(result, req, inp)
    assert p.bolus_u == pytest.approx(want) and p.temp_basal_u_per_h == 0.0


def test_loop_second_pass_carries_the_accepted_bolus():
    fx = _fixture("loop")
    req = loop_peer.build_request(_input(fx), bolus_now_u=1.5)
    assert req["dose_types"][-1] == "Bolus" and req["dose_values"][-1] == 1.5
    assert req["dose_start_times"][-1] == req["time_to_calculate_at"]


@pytest.mark.parametrize(
    ("answer", "want"),
    [
        ({"suggested": {"reason": "doing nothing"}}, "no temp asked"),
        ({"suggested": {"rate": 0, "duration": 0, "reason": "cancel"}}, "cancel"),
    ],
)
def test_oref0_no_rate_or_cancel_is_scheduled_basal(answer, want):
    fx = _fixture("oref0")
    inp = _input(fx)
    p = oref0_peer.proposal_from_result(answer, fx["request"], inp)
    assert p.temp_basal_u_per_h == inp.settings.basal_u_per_h and want in p.reason


@pytest.mark.parametrize("temp", [None, [0, 0]])
def test_loop_none_or_cancel_is_scheduled_basal(temp):
    fx = _fixture("loop")
    inp = _input(fx)
    res = {**fx["response"], "recommended_temp_basal": temp}
    p = loop_peer.proposal_from_result(res, inp, loop_peer.LoopConfig())
    assert p.temp_basal_u_per_h == inp.settings.basal_u_per_h and p.duration_min == 30


def test_bad_peer_numbers_are_typed_errors():
    fx = _fixture("oref0")
    with pytest.raises(PeerAnswerError, match="rate"):
        oref0_peer.proposal_from_result(
            {"suggested": {"rate": "NaN", "duration": 30}}, fx["request"], _input(fx)
        )
    fl = _fixture("loop")
    with pytest.raises(PeerAnswerError, match="temp basal"):
        loop_peer.proposal_from_result(
            {"recommended_temp_basal": [-1, 30]}, _input(fl), loop_peer.LoopConfig()
        )


# --------------------------------------------------------------------------- input checks


def test_history_none_is_a_typed_error_naming_the_need():
    inp = _input(_fixture("oref0"))
    inp.history = None
    for build in (oref0_peer.build_request, loop_peer.build_request):
        with pytest.raises(PeerInputError, match="needs the engine's SlotHistory"):
            build(inp)


def test_bad_history_is_named():
    inp = _input(_fixture("loop"))
    h = inp.history
    gap = np.delete(h.time, 10)
    inp.history = SlotHistory(gap, h.glucose[1:], h.basal_u[1:], h.bolus_u[1:], h.carbs_g[1:])
    with pytest.raises(PeerInputError, match=r"SlotHistory.time\[10\] = .* does not follow"):
        loop_peer.build_request(inp)
    basal = h.basal_u.copy()
    basal[3] = -0.1
    inp.history = SlotHistory(h.time, h.glucose, basal, h.bolus_u, h.carbs_g)
    with pytest.raises(PeerInputError, match=r"basal_u\[3\].*-0.1"):
        oref0_peer.build_request(inp)
    inp.history = h
    inp.carbs_announced_g = 30.0  # announced, but not in the history's current slot
    with pytest.raises(PeerInputError, match="carbs_announced_g"):
        oref0_peer.build_request(inp)


@settings(max_examples=60, deadline=None)
@given(
    rates=st.lists(st.sampled_from([0.0, 0.4, 0.8, 1.2, 2.35]), min_size=1, max_size=60),
    scheduled=st.sampled_from([0.8, 1.2]),
)
def test_basal_runs_reconstruct_the_delivered_basal(rates, scheduled):
    t = pd.date_range("2020-01-01", periods=len(rates), freq="5min").to_numpy()
    basal = np.array(rates) * 5 / 60
    z = np.zeros(len(rates))
    h = SlotHistory(t, z + 100, basal, z, z)
    runs = basal_runs(h, scheduled)
    covered = sum(r.minutes for r in runs)
    total = sum(r.rate_u_per_h * r.minutes / 60 for r in runs)
    total += scheduled * (5 * len(rates) - covered) / 60
    assert total == pytest.approx(basal.sum(), abs=1e-9)
    assert all(abs(r.rate_u_per_h - scheduled) > 1e-9 for r in runs)
    starts = [r.start for r in runs]
    assert starts == sorted(starts)


# --------------------------------------------------------------------------- the real peers


@pytest.mark.parametrize("peer", ["oref0", "loop"])
def test_real_peer_gives_the_recorded_answer_twice(peer):
    fx = _fixture(peer)
    ctl = _controller(peer, history_hours=24.0)  # as recorded
    with ctl:
        first = ctl.process.request(fx["request"])
        again = ctl.process.request(fx["request"])
        proposal = ctl.propose([_input(fx)])[0]
    assert first == again  # determinism: same input, same recommendation
    assert first == fx["response"]
    assert _proposal_dict(proposal) == fx["proposal"]


def test_loop_empty_result_is_an_error():
    fx = _fixture("loop")
    req = json.loads(json.dumps(fx["request"]))
    req["dose_end_times"][0] = "2000-01-01T00:00:00+00:00"  # ends before it starts: update() → []
    with _controller("loop") as ctl:
        with pytest.raises(PeerAnswerError, match=r"returned \[\]"):
            ctl.process.request(req)
        assert ctl.process.request(fx["request"]) == fx["response"]  # the process lives on


def test_missing_environment_says_how_to_make_it(tmp_path, monkeypatch):
    monkeypatch.setenv("GLUCAST_PEERS_DIR", str(tmp_path))
    with pytest.raises(PeerEnvironmentError, match="glucast peers install"):
        oref0_peer.Oref0Controller()
    with pytest.raises(PeerEnvironmentError, match="glucast peers install loop"):
        loop_peer.LoopController()


def test_peers_check_json_reports_missing(tmp_path):
    env = {**child_env(), "GLUCAST_PEERS_DIR": str(tmp_path)}
    r = subprocess.run(
        [sys.executable, "-m", "forecast.cli", "peers", "check", "--json"],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert r.returncode == 1, r.stderr
    out = json.loads(r.stdout)
    assert [p["peer"] for p in out["peers"]] == ["oref0", "loop"]
    assert not any(p["ok"] for p in out["peers"])


# --------------------------------------------------------------------------- the process


_FAKE = textwrap.dedent(
    """
    import json, sys, time
    print(json.dumps({"ready": True, "version": "x"}), flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        if req.get("do") == "sleep":
            time.sleep(30)
        if req.get("do") == "die":
            sys.stderr.write("dying on purpose\\n"); sys.stderr.flush(); sys.exit(3)
        if req.get("do") == "fail":
            print(json.dumps({"id": req["id"], "ok": False, "error": "bad input"}), flush=True)
            continue
        print(json.dumps({"id": req["id"], "ok": True, "result": {"x": req.get("x")}}), flush=True)
    """
)


def test_process_timeout_crash_and_restart():
    """The JSON-lines runner itself, on a tiny stand-in driver (no peer involved)."""
    with PeerProcess("fake", [sys.executable, "-c", _FAKE], timeout_s=1.0) as proc:
        assert proc.request_many([{"x": 1}, {"x": 2}]) == [{"x": 1}, {"x": 2}]
        out = proc.request_many([{"x": 3}, {"do": "fail"}])
        assert out[0] == {"x": 3} and isinstance(out[1], PeerAnswerError)
        with pytest.raises(PeerTimeoutError, match="within 1 s"):
            proc.request({"do": "sleep"})
        assert not proc.running
        assert proc.request({"x": 4}) == {"x": 4}  # a fresh process
        with pytest.raises(PeerCrashError, match="dying on purpose"):
            proc.request({"do": "die"})
        assert proc.request({"x": 5}) == {"x": 5}
        assert proc.starts == 3


# --------------------------------------------------------------------------- wired in by name


def test_peers_are_controllers_by_name_and_cli_choice():
    from serving.commands import loop as loop_cmd
    from serving.commands import trial as trial_cmd
    from serving.controllers import CONTROLLER_NAMES, PEER_NAMES

    assert set(PEER_NAMES) <= set(CONTROLLER_NAMES)
    assert set(trial_cmd.CONTROLLERS) == set(CONTROLLER_NAMES)
    assert set(loop_cmd.CONTROLLERS) == set(CONTROLLER_NAMES)


class _Failing:
    """A controller whose second patient fails, as a peer reports it (PeerError.partial)."""

    name = "failing"

    def propose(self, inputs):
        from serving.types import Proposal

        ok = [Proposal(0.5 + k, 30, 0.0, reason="mine") for k in range(len(inputs))]
        raise PeerAnswerError(
            "failed for 1 of n", peer="x", failed={1: "bad record"},
            partial=[None if k == 1 else p for k, p in enumerate(ok)],
        )  # fmt: skip


def _settings(name: str) -> PatientSettings:
    return PatientSettings(name=name, basal_u_per_h=1.0, carb_ratio_g_per_u=10.0,
                           isf_mgdl_per_u=40.0, max_basal_u_per_h=4.0, max_bolus_u=5.0,
                           max_iob_u=10.0)  # fmt: skip


def test_engine_falls_back_per_patient_on_a_partial_peer_failure():
    from forecast.windows import WindowConfig
    from serving.engine import CycleEngine
    from serving.modes import Mode

    settings = [_settings(f"p{k}") for k in range(3)]
    inputs = [
        ControlInput(time=pd.Timestamp("2018-01-01 00:00"), past=np.zeros((1, 1)),
                     future=np.zeros((1, 1)), glucose_mgdl=120.0, iob_u=0.0, settings=s)
        for s in settings
    ]  # fmt: skip
    engine = CycleEngine(_Failing(), None, WindowConfig())
    proposals, events = engine.propose(inputs, settings, Mode.CLOSED)
    assert [p.reason for p in proposals[::2]] == ["mine", "mine"]
    assert [p.temp_basal_u_per_h for p in proposals[::2]] == [0.5, 2.5]
    assert proposals[1].temp_basal_u_per_h == 1.0 and "controller failed" in proposals[1].reason
    assert events[0] == events[2] == []
    assert events[1] == [("fault", {"controller": "PeerAnswerError: bad record"})]


def test_a_bad_record_fails_one_patient_of_the_real_peer():
    """The real oref0: one patient without history fails alone, the other is answered."""
    fx = _fixture("oref0")
    good = _input(fx)
    bad = ControlInput(**{**good.__dict__, "history": None})
    with _controller("oref0") as ctl:
        with pytest.raises(PeerAnswerError) as e:
            ctl.propose([good, bad])
    assert list(e.value.failed) == [1] and "history is None" in e.value.failed[1]
    assert _proposal_dict(e.value.partial[0]) == fx["proposal"]


def test_oref0_split_over_two_processes_answers_as_one():
    fx = _fixture("oref0")
    inputs = [_input(fx)] * 5
    with _controller("oref0") as one:
        want = [_proposal_dict(p) for p in one.propose(inputs)]
    with oref0_peer.Oref0Controller(processes=2) as two:
        got = [_proposal_dict(p) for p in two.propose(inputs)]
        assert sum(p.starts for p in two.processes) == 2  # both worked
    assert got == want == [fx["proposal"]] * 5


@pytest.mark.parametrize("peer", ["oref0", "loop"])
def test_trial_with_a_peer_records_settings_counts_and_closes_it(peer):
    from serving.insilico.trial import TrialConfig, run_trial

    ctl = _controller(peer)
    cfg = TrialConfig(controller=peer, patients="adult#001,child#002", days=0.1, seed=1)
    try:
        r = run_trial(cfg, controller=ctl)
    finally:
        ctl.close()
    data = r.to_json()
    assert data["run"]["peer_settings"]["peer"] == peer
    c = data["cohort"]
    assert c["controller_fallbacks_total"] == 0
    assert c["controller_interventions_total"] == r.log["intervened"].sum()
    assert not any(p.running for p in getattr(ctl, "processes", [ctl.process]))


class _Recording:
    """Basal-bolus that keeps the `SlotHistory` each cycle gives it (what a peer would read)."""

    name = "basal-bolus"
    reads_history = True  # as the peers: the loop reads the CGM's whole record span

    def __init__(self):
        from serving.controllers.basal_bolus import BasalBolusController

        self.inner = BasalBolusController()
        self.seen: list[SlotHistory] = []

    def propose(self, inputs):
        # copies: the trial's history is a view of its live record (the slot is delivered later)
        self.seen.extend(
            SlotHistory(*(np.array(getattr(inp.history, k)) for k in
                          ("time", "glucose", "basal_u", "bolus_u", "carbs_g")))
            for inp in inputs
        )  # fmt: skip
        return self.inner.propose(inputs)


def test_loop_and_trial_give_controllers_the_same_history(tmp_path):
    """`glucast loop` builds ControlInput.history from its journal as the trial does from its
    record: cycle by cycle the same slots, glucose, basal, bolus and carbs."""
    from serving.controllers import build_controller
    from serving.insilico.backends import SimBackend
    from serving.insilico.simulated import SimulatedCohort, WorldConfig
    from serving.insilico.trial import TrialConfig, run_trial
    from serving.journal import Journal
    from serving.loop import ControlLoop

    cycles = 96  # 8 h: meals, boluses and announced carbs in the record
    trial_ctl = _Recording()
    b = build_controller("basal-bolus")
    run_trial(TrialConfig(controller="basal-bolus", patients="adult#001", days=cycles / 288,
                          seed=3, carb_error=0.2), controller=trial_ctl, window=b.window,
              predictor=b.predictor)  # fmt: skip
    loop_ctl = _Recording()
    world = SimulatedCohort(WorldConfig(patients="adult#001", seed=3, carb_error=0.2,
                                        sim_pump="Insulet"))  # fmt: skip
    backend = SimBackend(world)
    loop = ControlLoop(backend, Journal(tmp_path / "h.db", sync="normal"), loop_ctl,
                       b.predictor, log=lambda m: None)  # fmt: skip
    loop.start()
    for _ in range(cycles):
        loop.cycle()
        backend.advance(5)
    assert len(trial_ctl.seen) == len(loop_ctl.seen) == cycles
    assert sum(h.carbs_g[-1] > 0 for h in trial_ctl.seen) >= 1  # a meal was announced
    for c, (t, lp) in enumerate(zip(trial_ctl.seen, loop_ctl.seen)):
        assert np.array_equal(t.time, lp.time), c
        for k in ("glucose", "basal_u", "bolus_u", "carbs_g"):
            np.testing.assert_allclose(getattr(lp, k), getattr(t, k), atol=1e-9,
                                       err_msg=f"cycle {c}: {k}")  # fmt: skip


@pytest.mark.parametrize("peer", ["oref0", "loop"])
def test_the_default_history_gives_the_recorded_decision(peer):
    """The adapters pass less history than the recorded 12 h by default (oref0 8 h): the real
    peer decides the same on the recorded cycle."""
    fx = _fixture(peer)
    with _controller(peer) as ctl:
        (p,) = ctl.propose([_input(fx)])
    want = fx["proposal"]
    assert (p.temp_basal_u_per_h, p.duration_min, p.bolus_u) == (
        want["temp_basal_u_per_h"], want["duration_min"], want["bolus_u"])  # fmt: skip
