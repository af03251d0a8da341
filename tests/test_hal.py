"""The HAL: pump firmware and idempotency, simulated devices (and their durability), replay, faults."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from serving.hal import CGM, Pump
from serving.hal.pump import (
    Command,
    CommandKind,
    PumpCommandError,
    PumpFault,
    PumpFirmware,
    PumpNoAck,
    PumpTimeout,
)
from serving.insilico.faults import (
    FAULTS,
    CommandTimeout,
    FaultSpecError,
    NoAck,
    Unreachable,
    Window,
    build_fault,
    parse_fault,
)
from serving.insilico.replay import ReplayCGM
from serving.insilico.simulated import (
    DeviceStateError,
    ManualClock,
    SimulatedCohort,
    VirtualPump,
    WorldConfig,
    simulated_patient,
)
from serving.safety import CGMProblem, Supervisor, assess_cgm
from serving.types import CGMStatus, PatientSettings, Verdict

T0 = pd.Timestamp("2018-01-01 00:00", tz="UTC")
P1 = "adult#001"
FIVE = pd.Timedelta(minutes=5)


# --------------------------------------------------------------------------- firmware


command = st.tuples(
    st.sampled_from(list(CommandKind)),
    st.integers(0, 5),  # key: few distinct keys, so repeats are frequent
    st.floats(0.0, 12.0),
    st.integers(1, 30),
)


@settings(max_examples=150, deadline=None)
@given(st.lists(command, min_size=1, max_size=25))
def test_pump_repeats_nothing_for_a_key_it_acknowledged(cmds):
    pump = VirtualPump(1.0, ManualClock(T0))
    first = {}
    for kind, k, amount, dur in cmds:
        key = f"k{k}"
        ack = pump.firmware.command(Command(key, kind, amount, dur), pump.clock.now())
        first.setdefault(key, ack)
        assert ack == first[key]  # the first answer, whatever was asked the second time
        pump.advance(5)
    pump.advance(5)
    delivered = {}
    for d in pump.deliveries():
        if d.kind == "bolus":
            delivered[d.key] = delivered.get(d.key, 0.0) + d.units
    for key, units in delivered.items():
        a = first[key]
        assert a.kind is CommandKind.BOLUS and a.accepted
        assert units == pytest.approx(a.amount)  # once, and only what was acknowledged
    assert [d.seq for d in pump.deliveries()] == list(range(1, len(pump.deliveries()) + 1))


def test_temp_basal_expires_to_scheduled_and_rounds_down():
    pump = VirtualPump(1.0, ManualClock(T0))
    ack = pump.temp_basal(2.37, 15, "t")
    assert ack.accepted and ack.amount == 2.35  # whole increments, never above the ask
    for _ in range(4):
        pump.advance(5)
    rates = [d.units * 60 / d.minutes for d in pump.deliveries()]
    assert rates == pytest.approx([2.35, 2.35, 2.35, 1.0])
    assert pump.status().temp_basal is None and pump.status().current_rate_u_per_h == 1.0
    with pytest.raises(PumpCommandError):
        pump.temp_basal(1.0, 45, "too-long")
    with pytest.raises(PumpCommandError):
        pump.bolus(1.0, "")


def test_bolus_while_one_is_in_progress_and_suspend_are_refused_or_stop():
    pump = VirtualPump(1.0, ManualClock(T0))
    assert pump.bolus(3.0, "b1").accepted
    assert not pump.bolus(1.0, "b2").accepted  # one at a time
    pump.suspend("s")
    assert pump.status().pending_bolus_u == 0.0  # a suspend stops the bolus
    assert not pump.temp_basal(2.0, 30, "t").accepted
    pump.advance(5)
    assert sum(d.units for d in pump.deliveries()) == 0.0
    pump.resume("r")
    pump.advance(5)
    assert pump.deliveries()[-1].units == pytest.approx(1.0 / 12)


def test_firmware_state_roundtrips_through_json():
    fw = PumpFirmware(1.2, reservoir_u=50.0)
    fw.command(Command("t", CommandKind.TEMP_BASAL, 2.0, 30), T0)
    fw.command(Command("b", CommandKind.BOLUS, 1.0), T0)
    fw.record(T0, 5, 2.0 / 12, fw.take_bolus() * 0.5)
    back = PumpFirmware.from_state(fw.state_dict(), list(fw.acks.values()), fw.history)
    assert (
        back.state_dict() == fw.state_dict() and back.acks == fw.acks and back.history == fw.history
    )


# --------------------------------------------------------------------------- simulated devices


@pytest.fixture(scope="module")
def pair():
    """Two patients on one vectorised simulator (noise-only sensor, deterministic)."""
    return SimulatedCohort(
        WorldConfig(patients="adult#001,child#001", sensor="dexcom-noise", seed=3)
    )


def test_cohort_devices_are_views_onto_one_simulator(pair):
    assert isinstance(pair.cgm(0), CGM) and isinstance(pair.pump(1), Pump)
    assert pair.names == ["adult#001", "child#001"]
    t = pair.now()
    pair.pump(1).bolus(1.0, "child-bolus")
    pair.pump(0).temp_basal(0.0, 30, "adult-zero")
    pair.advance(10)
    assert pair.now() == t + pd.Timedelta(minutes=10)
    d0, d1 = pair.pump(0).deliveries(), pair.pump(1).deliveries()
    assert sum(d.units for d in d0) == 0.0
    assert [d.kind for d in d1].count("bolus") == 1
    basal1 = pair.settings("child#001").basal_u_per_h
    assert sum(d.units for d in d1) == pytest.approx(1.0 + basal1 * 10 / 60)
    r = pair.cgm("child#001").recent(15)
    assert [x.time for x in r] == [t, t + FIVE, t + 2 * FIVE]
    assert pair.cgm(0).latest().time == pair.now() and pair.cgm(0).latest().status is CGMStatus.OK
    assert math.isfinite(pair.cgm(0).latest().trend_mgdl_per_min)
    with pytest.raises(DeviceStateError):
        pair.index("adult#999")


def test_state_file_restores_the_same_world(tmp_path):
    path = tmp_path / "dev.db"
    cfg = WorldConfig(patients="adult#002", sensor="dexcom-noise", seed=5)
    a = SimulatedCohort(cfg, state_path=path)
    twin = SimulatedCohort(cfg)
    for w in (a, twin):
        w.pump(0).bolus(2.0, "b")
        w.advance(5)
        w.pump(0).temp_basal(3.0, 20, "t")
        for _ in range(5):
            w.advance(5)
    a.close()
    b = SimulatedCohort(cfg, state_path=path)  # a restarted process
    assert b.now() == twin.now()
    assert b.pump(0).deliveries() == twin.pump(0).deliveries()
    assert b.pump(0).ack_for("b") == twin.pump(0).ack_for("b")
    assert b.firmware[0].state_dict() == twin.firmware[0].state_dict()
    for w in (b, twin):
        w.advance(5)
    assert b.cgm(0).recent(60) == twin.cgm(0).recent(60)
    assert b.true_bg() == pytest.approx(twin.true_bg())
    b.close()
    assert SimulatedCohort.open(path).now() == twin.now()
    with pytest.raises(DeviceStateError, match="another simulated world"):
        SimulatedCohort(WorldConfig(patients="adult#003"), state_path=path)


def test_occlusion_raises_the_alarm_and_empty_reservoir_faults():
    world, cgm, pump = simulated_patient("adult#001", sensor="none")
    clock = world
    occl = build_fault("occlusion:fraction=0", pump, clock)
    occl.status()  # the line blocks
    for _ in range(30):
        occl.temp_basal(4.0, 30, f"t{world.now().value}")
        world.advance(5)
        if occl.status().fault:
            break
    assert occl.status().fault is PumpFault.OCCLUSION
    assert not occl.bolus(1.0, "after-alarm").accepted
    pump.clear_fault()
    empty = build_fault("empty-reservoir:units=0.1", pump, clock)
    empty.status()
    world.advance(5)
    assert empty.status().fault is PumpFault.RESERVOIR_EMPTY and empty.status().reservoir_u == 0.0


# --------------------------------------------------------------------------- replay


def test_replay_cgm_releases_readings_on_the_clock():
    times = pd.date_range(T0, periods=12, freq="5min")
    frame = pd.DataFrame(
        {
            "subject_id": "ohio-1",
            "time": times,
            "glucose": [100.0 + 2 * k if k != 4 else np.nan for k in range(12)],
            "basal_u": 0.1,
            "bolus_u": 0.0,
            "carbs_g": [0.0] * 6 + [30.0] + [0.0] * 5,
        }
    )
    clock = ManualClock(T0 + 5 * FIVE + pd.Timedelta(minutes=2))
    cgm = ReplayCGM(frame, "ohio-1", clock)
    rs = cgm.recent(60)
    assert [r.time for r in rs] == [times[k] for k in (0, 1, 2, 3, 5)]  # no NaN, no future
    assert cgm.latest().glucose_mgdl == 110.0 and math.isfinite(cgm.latest().trend_mgdl_per_min)
    assert cgm.announced_carbs(times[6], times[7]) == 30.0
    clock.advance(30)
    assert cgm.latest().time == times[-1]
    clock.advance(60)  # the recording is over: the CGM has nothing to say
    assert cgm.latest().status is CGMStatus.NO_DATA


# --------------------------------------------------------------------------- faults


@pytest.fixture
def steady():
    """A 2-hour noise-free CGM history on a manual clock (a VirtualPump beside it)."""
    world = SimulatedCohort(WorldConfig(patients="adult#001", sensor="none", seed=1))
    for _ in range(24):
        world.advance(5)
    return world


@pytest.mark.parametrize(
    ("spec", "problem"),
    [
        ("dropout:start=-30", CGMProblem.STALE),
        ("stale:lag_min=20", CGMProblem.STALE),
        ("future:ahead_min=15", CGMProblem.FUTURE),
        ("clock-jump:offset_min=60,start=-10", CGMProblem.FUTURE),
        ("noise-spikes:size_mgdl=80,every=1,start=-5", CGMProblem.JUMP),
        ("compression-low:depth_mgdl=60,start=-3", CGMProblem.JUMP),
        ("flat:start=-60", CGMProblem.FLAT),
        ("sensor-error:start=-3", CGMProblem.ERROR),
        ("sensor-error:status=warmup,start=-3", CGMProblem.WARMUP),
    ],
)
def test_cgm_faults_are_caught_by_the_supervisor(steady, spec, problem):
    cgm = build_fault(spec, steady.cgm(0), steady)
    assert assess_cgm(steady.cgm(0).recent(60), steady.now()).usable
    check = assess_cgm(cgm.recent(60), steady.now())
    assert problem in check.problem, (spec, check)


@pytest.mark.parametrize(
    "spec", ["duplicated", "out-of-order", "clock-jump:offset_min=-60,start=-3"]
)
def test_benign_cgm_faults_keep_a_usable_cgm(steady, spec):
    cgm = build_fault(spec, steady.cgm(0), steady)
    check = assess_cgm(cgm.recent(60), steady.now())
    assert check.usable, (spec, check)
    # the newest trustworthy reading (before a backward clock jump: the one before the jump)
    assert check.glucose_mgdl == pytest.approx(steady.cgm(0).latest().glucose_mgdl, abs=0.5)
    assert check.readings[-1].time >= steady.now() - FIVE


def _sup(pump) -> Supervisor:
    return Supervisor(PatientSettings("p", 1.0, 10.0, 40.0, 3.0, 10.0, 8.0), pump)


def test_timeout_that_lost_the_command_is_not_retried():
    pump = VirtualPump(1.0, ManualClock(T0))
    faulty = CommandTimeout(pump, pump.clock, Window(), kinds="bolus", lost=True)
    res = _sup(faulty).apply(Verdict(2.0, 30, 1.5), T0)
    assert [r.status for r in res] == ["acked", "failed"]  # temp fine; bolus never arrived
    assert "no record of the key" in res[1].detail
    assert pump.ack_for(res[1].command.key) is None and len(pump.firmware.acks) == 1


def test_timeout_or_no_ack_after_delivery_is_found_by_query_not_resent():
    for wrapper in (
        lambda p: CommandTimeout(p, p.clock, Window(), kinds="bolus", lost=False),
        lambda p: NoAck(p, p.clock, Window()),
    ):
        pump = VirtualPump(1.0, ManualClock(T0))
        faulty = wrapper(pump)
        with pytest.raises((PumpTimeout, PumpNoAck)):
            faulty.bolus(1.0, "direct")
        res = _sup(faulty).apply(Verdict(1.0, 30, 1.5), T0)
        bolus = [r for r in res if r.command.kind is CommandKind.BOLUS]
        assert len(bolus) <= 1
        pump.advance(5)
        sent = [d for d in pump.deliveries() if d.kind == "bolus"]
        assert len(sent) == 1  # the "direct" one; the supervisor sent no second bolus
        if bolus:
            assert bolus[0].status in ("acked", "failed") and bolus[0].ack is not None


def test_unreachable_pump_leaves_the_command_unknown():
    pump = VirtualPump(1.0, ManualClock(T0))
    faulty = Unreachable(pump, pump.clock, Window())
    res = _sup(faulty).apply(Verdict(2.0, 30, 1.0), T0)
    assert [r.status for r in res] == ["unknown"]  # stopped after the first: no blind sends
    assert not pump.firmware.acks
    with pytest.raises(PumpTimeout):
        faulty.deliveries()


def test_fault_specs():
    assert parse_fault("dropout:start=30,minutes=60") == ("dropout", {"start": 30, "minutes": 60})
    assert len(FAULTS) >= 16
    with pytest.raises(FaultSpecError, match="unknown fault"):
        parse_fault("gremlins")
    with pytest.raises(FaultSpecError):
        build_fault("dropout:nonsense=1", object(), ManualClock(T0))
    w = Window.after(ManualClock(T0), 10, 20)
    assert not w.active(T0) and w.active(T0 + pd.Timedelta(minutes=10))
    assert not w.active(T0 + pd.Timedelta(minutes=30))


def test_a_slow_pump_books_one_bolus_over_two_intervals_and_a_suspend_stops_it():
    world = SimulatedCohort(WorldConfig(patients=P1, sensor="none", sim_pump="Insulet"))
    pump = world.pump(0)
    assert pump.bolus(10.0, "big").accepted
    world.advance(5)  # 1.5 U/min: 7.5 U in the first 5 minutes
    assert pump.status().pending_bolus_u == pytest.approx(2.5)
    assert not pump.bolus(1.0, "second").accepted  # still delivering
    world.advance(5)
    big = [d.units for d in pump.deliveries() if d.key == "big"]
    assert big == pytest.approx([7.5, 2.5]) and pump.status().pending_bolus_u == 0.0
    assert pump.bolus(6.0, "stopped").accepted
    world.advance(2)  # 3 U in
    pump.suspend("s")
    world.advance(5)
    assert sum(d.units for d in pump.deliveries() if d.key == "stopped") == pytest.approx(3.0)
    assert world.sim.pump.pending_bolus_u[0] == 0.0  # the motor stopped with the firmware
