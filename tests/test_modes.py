"""Operating modes: monitor never commands the pump, advisory acts only on confirmations
(through the supervisor), closed acts; the simulated person; the trial helpers."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest

from forecast.cli import main as cli_main
from serving.controllers import build_controller
from serving.insilico.advisory import (
    AdvisoryError,
    AdvisoryPerson,
    AutoAccept,
    MonitorOnly,
    confirm_batch,
    confirmer_for,
)
from serving.insilico.backends import SimBackend
from serving.insilico.simulated import SimulatedCohort, WorldConfig
from serving.journal import Journal
from serving.loop import ControlLoop, LoopError, run_loop
from serving.modes import (
    BolusAdvice,
    Mode,
    ModeError,
    advice_from_verdict,
    bolus_advice,
    net_iob_u,
    parse_mode,
)
from serving.safety import SafetyState, assess_cgm, check_batch
from serving.types import CGMStatus, ControlInput, PatientSettings, Proposal, Reading

P = "adult#001"
START = "2018-01-01 06:00"  # adult#001, seed 11: a 41 g meal is announced at 06:35
MEAL = pd.Timestamp("2018-01-01 06:35", tz="UTC")
T0 = pd.Timestamp(START, tz="UTC")


# --------------------------------------------------------------------------- helpers


def world(tmp_path=None, **kw) -> SimulatedCohort:
    cfg = WorldConfig(patients=P, sensor="dexcom-noise", seed=11, start=START, **kw)
    return SimulatedCohort(cfg, state_path=None if tmp_path is None else tmp_path / "dev.db")


def make_loop(tmp_path, mode, *, controller="basal-bolus", person=None, faults=(), w=None,
              name="j.db", logs=None):  # fmt: skip
    built = build_controller(controller, None)
    ctrl, pred = built.controller, built.predictor
    j = Journal(tmp_path / name, sync="normal")
    log = logs.append if logs is not None else (lambda msg: None)
    loop = ControlLoop(SimBackend(w or world(), faults), j, ctrl, pred, mode=mode, person=person,
                       log=log)  # fmt: skip
    loop.start()
    return loop


def boluses(loop) -> list[tuple[pd.Timestamp, float]]:
    return [(d.time, d.units) for d in loop.backend.pump(0).deliveries() if d.kind == "bolus"]


def only_scheduled_basal(loop) -> bool:
    """The pump's history: no bolus, every basal interval at the scheduled rate."""
    sched = loop.settings[0].basal_u_per_h
    hist = loop.backend.pump(0).deliveries()
    assert hist, "the pump delivered nothing at all"
    for d in hist:
        if d.kind != "basal":
            return False
        if abs(d.units - sched * d.minutes / 60.0) > 0.05 * d.minutes / 60.0 + 1e-9:
            return False
    return True


def advice_events(j: Journal) -> list[dict]:
    return [json.loads(d) for d in j.events("advice")["detail"]]


class CountingController:
    """A controller that counts its calls (monitor mode must never ask it)."""

    name = "counting"

    def __init__(self, inner):
        self.inner, self.calls = inner, 0

    def propose(self, inputs):
        self.calls += 1
        return self.inner.propose(inputs)


SETTINGS = PatientSettings(
    name="p", basal_u_per_h=1.0, carb_ratio_g_per_u=10.0, isf_mgdl_per_u=50.0,
    max_basal_u_per_h=4.0, max_bolus_u=8.0, max_iob_u=12.0, max_daily_basal_u_per_h=1.0,
)  # fmt: skip


def inp(g=150.0, iob=None, carbs=0.0, s=SETTINGS, t=T0) -> ControlInput:
    from serving.controllers import basal_iob_u

    iob = float(basal_iob_u(s.basal_u_per_h)) if iob is None else iob  # resting on basal
    return ControlInput(t, np.zeros((1, 1)), np.zeros((1, 1)), g, iob, s, carbs)


def at(k: int) -> pd.Timestamp:
    return T0 + pd.Timedelta(minutes=5 * k)


# --------------------------------------------------------------------------- modes


def test_mode_names_and_aliases(tmp_path):
    assert parse_mode("monitor") is Mode.MONITOR and parse_mode("CLOSED") is Mode.CLOSED
    assert parse_mode("open") is Mode.ADVISORY  # advisory with nobody to confirm
    with pytest.raises(ModeError, match="autopilot"):
        parse_mode("autopilot")
    w = world()
    with pytest.raises(LoopError, match="mode must be one of"):
        ControlLoop(SimBackend(w), Journal(tmp_path / "x.db"), None, None, mode="autopilot")
    with pytest.raises(LoopError, match="advisory mode only"):
        ControlLoop(SimBackend(w), Journal(tmp_path / "x.db"), None, None, mode="closed",
                    person=AdvisoryPerson(1))  # fmt: skip
    with pytest.raises(LoopError, match="answers for 2 patients"):
        ControlLoop(SimBackend(w), Journal(tmp_path / "x.db"), None, None, mode="advisory",
                    person=AdvisoryPerson(2))  # fmt: skip


# --------------------------------------------------------------------------- the loop


def test_monitor_never_commands_the_pump_yet_journals_alerts(tmp_path):
    built = build_controller("physio-mpc", None)
    ctrl, pred = built.controller, built.predictor
    spy = CountingController(ctrl)
    j = Journal(tmp_path / "m.db", sync="normal")
    backend = SimBackend(world(), ["dropout:start=20,minutes=30"])
    loop = ControlLoop(backend, j, spy, pred, mode="monitor", log=lambda m: None)
    loop.start()
    recs = []
    run_loop(loop, max_cycles=16, on_cycle=recs.extend)  # through the meal at 06:35
    assert spy.calls == 0  # nothing is proposed
    assert loop.backend.pump(0).firmware.acks == {} and j.commands() == []
    assert only_scheduled_basal(loop)
    assert all(r.results == [] for r in recs)
    cyc = j.cycles()
    assert (cyc["mode"] == "monitor").all() and len(cyc) == 16
    alerts = [json.loads(d) for d in j.events("alert")["detail"]]
    assert [a["kind"] for a in alerts] == ["signal_loss"]  # 20 min after the last reading
    assert pd.Timestamp(alerts[0]["time"]) == T0 + pd.Timedelta(minutes=35)  # (06:15)
    assert [a.kind for r in recs for a in r.alerts] == ["signal_loss"]
    assert len(j.events("veto")) == 0 and j.check() == []


def test_advisory_with_a_refusing_person_delivers_only_the_schedule(tmp_path):
    person = AdvisoryPerson(1, accept_prob=0.0, delay_min=10, seed=1)
    loop = make_loop(tmp_path, "advisory", controller="physio-mpc", person=person)
    run_loop(loop, max_cycles=16)
    assert loop.backend.pump(0).firmware.acks == {}
    assert only_scheduled_basal(loop)
    ev = advice_events(loop.journal)
    offered = [e for e in ev if e["action"] == "offered"]
    answered = [e for e in ev if e["action"] != "offered"]
    assert len(offered) >= 3 and {e["action"] for e in answered} <= {"refused", "superseded"}
    assert sum(e["action"] == "refused" for e in answered) >= 2
    assert len(answered) >= len(offered) - 1  # the last one may still be on the screen
    assert any(e["plan"]["bolus_u"] > 0 for e in offered)  # the meal bolus was offered
    assert (loop.journal.cycles()["mode"] == "advisory").all()


def test_advisory_accepting_at_once_boluses_like_closed(tmp_path):
    closed = make_loop(tmp_path, "closed", name="c.db")
    run_loop(closed, max_cycles=12)
    person = AdvisoryPerson(1, accept_prob=1.0, delay_min=0, seed=0)
    adv = make_loop(tmp_path, "advisory", person=person, name="a.db")
    run_loop(adv, max_cycles=12)
    assert boluses(closed) and boluses(adv) == boluses(closed)
    assert boluses(adv)[0][0] == MEAL
    ev = advice_events(adv.journal)
    assert [e["action"] for e in ev] == ["offered", "confirmed"]
    b = ev[0]["bolus"]  # the breakdown shown with it
    s = adv.settings[0]
    assert b["carbs_g"] == 41.0 and b["carbs_u"] == pytest.approx(41.0 / s.carb_ratio_g_per_u)
    assert b["advised_u"] == pytest.approx(boluses(adv)[0][1], abs=0.05)
    assert b["forecast"]["median_30min"] > 0
    assert adv.journal.check() == [] and adv.journal.unresolved() == []


def test_a_late_confirmation_is_delivered_late_and_a_stale_one_re_advised(tmp_path):
    fresh = make_loop(tmp_path, "advisory", person=AdvisoryPerson(1, 1.0, 10, 0), name="f.db")
    run_loop(fresh, max_cycles=14)
    (t, u), = boluses(fresh)  # fmt: skip
    assert t == MEAL + pd.Timedelta(minutes=10)
    ev = advice_events(fresh.journal)
    assert ev[-1]["action"] == "confirmed" and ev[-1]["age_min"] == 10 and not ev[-1]["stale"]
    stale = make_loop(tmp_path, "advisory", person=AdvisoryPerson(1, 1.0, 20, 0), name="s.db")
    run_loop(stale, max_cycles=14)
    ev = advice_events(stale.journal)
    assert ev[-1]["action"] == "readvised" and "min old" in ev[-1]["stale"]
    recalculated = ev[-1]["bolus"]
    assert recalculated["recalculated_from"] == pytest.approx(ev[0]["bolus"]["advised_u"])
    assert recalculated["advised_u"] <= recalculated["recalculated_from"] + 1e-9
    (t2, u2), = boluses(stale)  # fmt: skip
    assert t2 == MEAL + pd.Timedelta(minutes=20) and u2 <= u + 1e-9


class OverridingPerson(AdvisoryPerson):
    """A person who types 50 U into the confirmation (as pumps let people edit amounts)."""

    def _answer(self, *args):
        ans = super()._answer(*args)
        if ans.proposal is not None and ans.proposal.bolus_u > 0:
            ans.proposal = replace(ans.proposal, bolus_u=50.0)
        return ans


def test_the_supervisor_vetoes_an_over_limit_confirmed_bolus(tmp_path):
    loop = make_loop(tmp_path, "advisory", person=OverridingPerson(1, 1.0, 0, 0))
    recs = []
    run_loop(loop, max_cycles=9, on_cycle=recs.extend)
    s = loop.settings[0]
    (rec,) = [r for r in recs if r.confirmed is not None and r.confirmed.bolus_u > 0]
    assert rec.time == MEAL and rec.confirmed.bolus_u <= s.max_bolus_u
    assert any(v.startswith("max_bolus") for v in rec.confirmed.vetoes)
    (_, u), = boluses(loop)  # fmt: skip
    assert u <= s.max_bolus_u + 1e-9
    vetoes = [json.loads(d) for d in loop.journal.events("veto")["detail"]]
    assert any(v.get("confirmed") and v["reason"].startswith("max_bolus") for v in vetoes)


def test_advice_is_never_more_than_the_supervisor_allows(tmp_path):
    class Greedy:
        name = "greedy"

        def propose(self, inputs):
            return [Proposal(i.settings.basal_u_per_h, 30, 50.0 if i.carbs_announced_g else 0.0)
                    for i in inputs]  # fmt: skip

    built = build_controller("basal-bolus", None)
    _, pred = built.controller, built.predictor
    j = Journal(tmp_path / "g.db", sync="normal")
    loop = ControlLoop(SimBackend(world()), j, Greedy(), pred, mode="advisory",
                       person=AdvisoryPerson(1, 0.0, 0, 0), log=lambda m: None)  # fmt: skip
    loop.start()
    run_loop(loop, max_cycles=9)
    (offer,) = [e for e in advice_events(j) if e["action"] == "offered"]
    assert offer["plan"]["bolus_u"] == loop.settings[0].max_bolus_u
    assert offer["bolus"]["proposed_u"] == 50.0 and "max_bolus" in offer["bolus"]["vetoes"][0]


def test_mode_change_and_open_advice_survive_a_restart(tmp_path):
    logs: list[str] = []
    first = make_loop(tmp_path, "advisory", person=AdvisoryPerson(1, 1.0, 10, 0), w=world(tmp_path))
    run_loop(first, max_cycles=8)  # the meal bolus is offered at 06:35, due 06:45
    assert first.person.open[0] is not None
    first.journal.close()
    first.backend.world.close()
    again = make_loop(tmp_path, "advisory", person=AdvisoryPerson(1, 1.0, 10, 0),
                      w=SimulatedCohort.open(tmp_path / "dev.db"), logs=logs)  # fmt: skip
    assert again.person.open[0] is not None and again.person.open[0].offered == MEAL
    run_loop(again, max_cycles=4)
    assert [t for t, _ in boluses(again)] == [MEAL + pd.Timedelta(minutes=10)]  # once
    again.journal.close()
    again.backend.world.close()
    third = make_loop(tmp_path, "monitor", w=SimulatedCohort.open(tmp_path / "dev.db"), logs=logs)
    run_loop(third, max_cycles=2)
    modes = [json.loads(d) for d in third.journal.events("mode")["detail"]]
    assert [(m["from"], m["to"]) for m in modes] == [(None, "advisory"), ("advisory", "monitor")]
    assert modes[-1]["why"] == "restarted in another mode"
    assert any("ran in advisory mode" in m for m in logs)
    assert third.journal.meta("mode") == "monitor"
    assert list(third.journal.cycles()["mode"]) == ["advisory"] * 12 + ["monitor"] * 2
    assert third.journal.check() == []


def test_cli_modes(tmp_path, capsys):
    base = ["loop", "--backend", "sim", "--patient", P, "--speed", "fast", "--sensor", "none",
            "--controller", "basal-bolus", "--quiet", "--json", "--hours", "0.5"]  # fmt: skip
    argv = [*base, "--journal", str(tmp_path / "a.db"), "--mode", "advisory",
            "--accept-prob", "0.8", "--accept-delay", "10"]  # fmt: skip
    assert cli_main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["mode"] == "advisory" and out["journal"]["cycles"] == 6
    assert cli_main([*base, "--journal", str(tmp_path / "m.db"), "--mode", "monitor"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["mode"] == "monitor" and out["journal"]["commands"] == 0
    bad = [*base, "--journal", str(tmp_path / "b.db"), "--mode", "advisory", "--accept-prob", "2"]
    assert cli_main(bad) == 2
    assert "accept_prob" in capsys.readouterr().err


# --------------------------------------------------------------------------- the person alone


def bolus_plan(u=4.0, rate=1.0) -> Proposal:
    return Proposal(rate, 30, u, "meal")


def test_person_answers_after_the_delay_and_only_then_sees_new_advice():
    person = AdvisoryPerson(1, accept_prob=1.0, delay_min=10, seed=0)
    x = inp()
    assert person.filter(at(0), [bolus_plan()], [x]) == [None]
    assert person.last_offers[0] is not None and person.last_answers[0] is None
    assert person.filter(at(1), [bolus_plan(2.0)], [x]) == [None]  # waiting: nothing new shown
    assert person.last_offers[0] is None
    (got,) = person.filter(at(2), [bolus_plan(3.0)], [x])
    assert got is not None and got.bolus_u == 4.0  # the advice offered at 0, not the newer one
    assert person.last_answers[0].action == "confirmed" and person.last_answers[0].age_min == 10
    assert person.filter(at(3), [Proposal(1.0, 30, 0.0)], [x]) == [None]  # nothing to advise


def test_nothing_is_advised_that_would_not_change_the_pump():
    person = AdvisoryPerson(1, 1.0, 0, 0)
    x = inp()
    assert person.filter(at(0), [Proposal(1.01, 30, 0.0)], [x]) == [None]  # ≈ schedule
    assert person.filter(at(1), [Proposal(2.0, 30, 0.0)], [x], running_u_per_h=[2.0]) == [None]
    (got,) = person.filter(at(2), [Proposal(1.0, 30, 0.0)], [x], running_u_per_h=[2.0])
    assert got is not None and got.temp_basal_u_per_h == 1.0  # back to schedule is advice


def test_refusals_and_acceptance_rate_are_seeded():
    n = 2000
    xs = [inp() for _ in range(n)]

    def run(seed, p=0.8):
        person = AdvisoryPerson(n, p, 0, seed)
        return np.array([r is not None for r in person.filter(at(0), [bolus_plan()] * n, xs)])

    a = run(7)
    assert abs(a.mean() - 0.8) < 0.03
    assert (run(7) == a).all() and (run(8) != a).any()
    assert not run(7, 0.0).any() and run(7, 1.0).all()
    person = AdvisoryPerson(n, 0.8, 0, 7)
    person.filter(at(0), [bolus_plan()] * n, xs)
    acts = {a.action for a in person.last_answers if a is not None}
    assert acts == {"confirmed", "refused"}


def test_stale_advice_is_recalculated_and_never_grows():
    s = SETTINGS
    for g_now, shrinks in ((100.0, True), (250.0, False)):
        person = AdvisoryPerson(1, 1.0, 10, 0)
        x0 = inp(g=160.0, carbs=40.0)
        b = bolus_advice(time=at(0), glucose_mgdl=160.0, iob_u=x0.iob_u, carbs_g=40.0,
                         settings=s, proposed_u=5.0, advised_u=5.0)  # fmt: skip
        assert b.calculator_u == pytest.approx(40 / 10 + (160 - 110) / 50)
        person.step(0, at(0), bolus_plan(5.0), glucose_mgdl=160.0, iob_u=x0.iob_u, settings=s,
                    carbs_g=40.0, bolus=b)  # fmt: skip
        now = Proposal(s.basal_u_per_h, 30, 0.0, "now")
        (got,) = person.filter(at(2), [now], [inp(g=g_now)])
        ans = person.last_answers[0]
        assert ans.action == "readvised" and "glucose moved" in ans.stale
        if shrinks:  # 60 mg/dL lower: 1.2 U less correction
            assert got.bolus_u == pytest.approx(5.0 - 60 / 50)
        else:  # higher: the person confirmed 5 U, never more
            assert got.bolus_u == pytest.approx(5.0)
    person = AdvisoryPerson(1, 1.0, 20, 0)  # too late: stale by age
    person.filter(at(0), [bolus_plan(3.0)], [inp(g=150.0)])
    person.filter(at(4), [Proposal(2.0, 30, 0.0, "now")], [inp(g=150.0)])
    ans = person.last_answers[0]
    assert ans.action == "readvised" and "20 min old" in ans.stale
    assert ans.proposal.temp_basal_u_per_h == 2.0  # this cycle's basal advice, recalculated bolus


def test_a_meal_bolus_supersedes_a_waiting_temp_basal():
    person = AdvisoryPerson(1, 1.0, 10, 0)
    x = inp()
    person.filter(at(0), [Proposal(2.0, 30, 0.0)], [x])
    person.filter(at(1), [bolus_plan(4.0)], [x])
    assert person.last_answers[0].action == "superseded"
    assert person.open[0].proposal.bolus_u == 4.0
    (got,) = person.filter(at(3), [Proposal(1.0, 30, 0.0)], [x])
    assert got.bolus_u == 4.0


def test_person_state_round_trips_and_bad_settings_are_refused():
    person = AdvisoryPerson(1, 1.0, 10, 0)
    person.filter(at(0), [bolus_plan()], [inp(carbs=40.0)])
    state = json.loads(json.dumps(person.state(0)))
    other = AdvisoryPerson(1, 1.0, 10, 0)
    other.restore(0, state)
    assert other.open[0].due == at(2) and other.open[0].bolus.carbs_g == 40.0
    assert isinstance(other.open[0].bolus, BolusAdvice)
    for bad in ({"accept_prob": 1.5}, {"delay_min": -1.0}, {"seed": -1}, {"n": 0}):
        kw = {"n": 1, **bad}
        with pytest.raises(AdvisoryError):
            AdvisoryPerson(**kw)


def test_bolus_calculator_subtracts_net_iob():
    extra = 2.0
    x = inp(g=210.0, carbs=60.0)
    b = bolus_advice(time=at(0), glucose_mgdl=210.0, iob_u=x.iob_u + extra, carbs_g=60.0,
                     settings=SETTINGS, proposed_u=7.0, advised_u=7.0)  # fmt: skip
    assert net_iob_u(x.iob_u, SETTINGS.basal_u_per_h) == pytest.approx(
        0.0, abs=1e-9
    )  # resting on basal
    assert (b.carbs_u, b.correction_u, b.iob_u) == pytest.approx((6.0, 2.0, extra))
    assert b.calculator_u == pytest.approx(6.0)
    none = bolus_advice(time=at(0), glucose_mgdl=float("nan"), iob_u=x.iob_u, carbs_g=60.0,
                        settings=SETTINGS, proposed_u=6.0, advised_u=6.0)  # fmt: skip
    assert none.correction_u == 0.0 and none.calculator_u == pytest.approx(6.0)


# --------------------------------------------------------------------------- the trial helpers


def cohort_state(n, g=150.0):
    readings = [Reading(at(k), g, CGMStatus.OK) for k in range(-3, 1)]
    return [SafetyState(now=at(0), iob_u=0.0, cgm=assess_cgm(readings, at(0))) for _ in range(n)]


def test_confirm_batch_over_a_cohort():
    n = 4
    settings = [replace(SETTINGS, name=f"p{i}") for i in range(n)]
    xs = [inp(s=s) for s in settings]
    props = [bolus_plan(3.0), bolus_plan(30.0), Proposal(1.0, 30, 0.0), Proposal(3.0, 30, 0.0)]
    states = cohort_state(n)
    closed = confirm_batch(AutoAccept(n), at(0), settings, props, states, xs)
    assert closed.act.all()
    direct = check_batch(settings, props, states)
    assert [v.bolus_u for v in closed.verdicts] == [v.bolus_u for v in direct]
    assert closed.verdicts[1].bolus_u == SETTINGS.max_bolus_u  # over the limit: cut
    monitor = confirm_batch(confirmer_for("monitor", n), at(0), settings, props, states, xs)
    assert isinstance(monitor, object) and not monitor.act.any()
    assert all(v.bolus_u == 0 and v.temp_basal_u_per_h == 1.0 for v in monitor.verdicts)
    person = confirmer_for("advisory", n, accept_prob=1.0, delay_min=0, seed=0)
    adv = confirm_batch(person, at(0), settings, props, states, xs)
    assert list(adv.act) == [True, True, False, True]  # nothing to advise for the 3rd
    assert adv.verdicts[1].bolus_u == SETTINGS.max_bolus_u
    assert [a.action if a else None for a in adv.answers] == ["confirmed"] * 2 + [None, "confirmed"]
    assert adv.advice[1].bolus_u == SETTINGS.max_bolus_u  # advice already within the limit
    low = cohort_state(n, g=60.0)  # a low: the supervisor stops what the person confirmed
    adv = confirm_batch(AdvisoryPerson(n, 1.0, 0, 0), at(0), settings, props, low, xs)
    assert all(v.bolus_u == 0 and v.suspend for v, a in zip(adv.verdicts, adv.act) if a)
    assert isinstance(MonitorOnly(2).filter(at(0), [None, None], xs[:2]), list)


def test_advice_shows_the_verdict_not_the_raw_proposal():
    v = check_batch([SETTINGS], [bolus_plan(30.0)], cohort_state(1))[0]
    a = advice_from_verdict(v, bolus_plan(30.0), SETTINGS)
    assert a.bolus_u == SETTINGS.max_bolus_u and "max_bolus" in a.reason
    v = check_batch([SETTINGS], [bolus_plan(3.0)], cohort_state(1, g=60.0))[0]
    a = advice_from_verdict(v, bolus_plan(3.0), SETTINGS)
    assert (a.temp_basal_u_per_h, a.bolus_u) == (0.0, 0.0)  # a low: suspend, no bolus


def test_an_alarm_is_not_repeated_after_a_restart(tmp_path):
    first = make_loop(tmp_path, "monitor", w=world(tmp_path))
    first.backend.pump(0).set_reservoir(0.5)  # empty within the half hour: a pump fault
    run_loop(first, max_cycles=8)
    kinds = [json.loads(d)["kind"] for d in first.journal.events("alert")["detail"]]
    assert kinds == ["pump_fault"]
    first.journal.close()
    first.backend.world.close()
    again = make_loop(tmp_path, "monitor", w=SimulatedCohort.open(tmp_path / "dev.db"))
    run_loop(again, max_cycles=4)  # the pump still reports the fault
    assert again.backend.pump(0).status().fault
    kinds = [json.loads(d)["kind"] for d in again.journal.events("alert")["detail"]]
    assert kinds == ["pump_fault"]  # the episode goes on; a fresh engine would alarm again
