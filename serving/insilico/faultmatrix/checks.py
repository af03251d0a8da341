"""The checks: limits and consistency for every case, and each case's own (`CHECKS`)."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd

from forecast.schema import SLOT
from serving.hal.pump import MAX_TEMP_MINUTES
from serving.insilico.faultmatrix.models import ForecasterFault
from serving.insilico.faultmatrix.records import CaseRun
from serving.insilico.faults import Window
from serving.safety import STALE_MIN, max_basal
from serving.types import PatientSettings

IOB_TOLERANCE_U = 0.1  # pump increments and rounding


def _cap(s: PatientSettings) -> float:
    daily = s.max_daily_basal_u_per_h if s.max_daily_basal_u_per_h is not None else s.basal_u_per_h
    return float(max_basal(s.max_basal_u_per_h, daily, s.basal_u_per_h))


def common_checks(run: CaseRun) -> list[str]:
    """Limits and consistency, from the pump's history and the journal (every case)."""
    s, v = run.settings, []
    cap = _cap(s)
    for d in run.history:
        if d.kind == "basal" and d.minutes > 0 and d.units * 60 / d.minutes > cap + 1e-6:
            v.append(
                f"basal {d.units * 60 / d.minutes:.2f} U/h at {d.time} above the cap {cap:.2f}"
            )
    by_key: Counter = Counter()
    for d in run.history:
        if d.kind == "bolus":
            by_key[d.key] += d.units
    for key, u in by_key.items():
        ack = run.acks.get(key)
        if u > s.max_bolus_u + 1e-9:
            v.append(f"bolus {key} {u:.2f} U above max bolus {s.max_bolus_u}")
        if ack is None or u > ack.amount + 1e-9:
            v.append(f"bolus {key} delivered {u:.2f} U beyond its acknowledgement")
    v += _iob_check(run)
    for key, ack in run.acks.items():
        raises = ack.kind == "bolus" or (
            ack.kind == "temp_basal" and ack.amount > s.basal_u_per_h + 1e-9
        )
        if ack.accepted and raises and run.journal.command(key) is None:
            v.append(f"{ack.kind} {key} reached the pump without a journaled intent")
    for rec in run.journal.commands(patient=run.name):
        if rec.kind == "temp_basal" and rec.duration_min > MAX_TEMP_MINUTES:
            v.append(f"temp basal {rec.key} lasts {rec.duration_min} min")
    for r in run.records:
        c = r.cycle
        if c is None or not c.verdict.fallback:
            continue
        if c.verdict.bolus_u > 0 or c.verdict.temp_basal_u_per_h > s.basal_u_per_h + 1e-9:
            v.append(f"{r.time}: fallback {c.verdict.fallback} but insulin raised")
    problems = [p for p in run.journal.check() if run.name in p or "integrity" in p]
    v += [f"journal: {p}" for p in problems]
    seqs = list(run.journal.insulin_history(run.name)["seq"])
    pump = [d.seq for d in run.history]
    if seqs != pump:
        v.append(f"journal holds {len(seqs)} of the pump's {len(pump)} deliveries, or others")
    return v


def _iob_check(run: CaseRun) -> list[str]:
    """Every bolus: IOB before it (from the pump's deliveries) + bolus ≤ max IOB."""
    from forecast.insulin import InsulinCurve

    kernel = InsulinCurve().iob_kernel(5)
    if not run.records:
        return []
    t0 = run.run_start - SLOT * len(kernel)
    slots = pd.date_range(t0, run.records[-1].time + SLOT, freq=SLOT)
    dose = np.zeros(len(slots))
    bolus = np.zeros(len(slots))
    idx = (
        ((pd.DatetimeIndex([d.time for d in run.history]) - t0) // SLOT).to_numpy()
        if run.history
        else []
    )
    for k, d in zip(idx, run.history):
        if 0 <= k < len(slots):
            dose[k] += d.units
            if d.kind == "bolus":
                bolus[k] += d.units
    before = slots < run.run_start
    dose[before] = run.settings.basal_u_per_h * 5 / 60  # the pump's schedule before the loop
    out = []
    for k in np.flatnonzero(bolus > 0):
        past = dose[max(0, k - len(kernel) + 1) : k][::-1]
        iob = float(past @ kernel[1 : 1 + len(past)])
        if iob + bolus[k] > run.settings.max_iob_u + IOB_TOLERANCE_U:
            out.append(f"bolus {bolus[k]:.2f} U at {slots[k]} on IOB {iob:.2f} U > max IOB {run.settings.max_iob_u}")  # fmt: skip
    return out


def _vetoes(run: CaseRun, *, during: bool = True) -> Counter:
    """Veto labels (cgm_unusable, pump_fault...) journaled, during the fault or over the run."""
    c: Counter = Counter()
    for r in run.records:
        if r.cycle is None or (during and not r.fault_on):
            continue
        for reason in r.cycle.verdict.vetoes:
            c[reason.split(":")[0]] += 1
    return c


def _journaled_vetoes(run: CaseRun, label: str) -> int:
    ev = run.events("veto")
    return int(ev["detail"].str.contains(f'"reason":"{label}', regex=False).sum())


def check_cgm_outage(run: CaseRun) -> list[str]:
    """From 15 min into the outage (newest reading > 12 min old, oref0) until it ends: a
    fallback, no bolus; `cgm_unusable` journaled; closed loop again after the outage."""
    v = []
    grace = STALE_MIN + 5
    hit = 0
    for r, c in run.fault_cycles(after_min=grace):
        hit += 1
        if c.verdict.fallback not in ("scheduled_basal", "suspend") or c.verdict.bolus_u > 0:
            v.append(f"{r.time}: CGM out for {run.since_start(r.time):.0f} min but fallback "
                     f"{c.verdict.fallback!r}, bolus {c.verdict.bolus_u:.2f}")  # fmt: skip
    if not hit:
        v.append("no cycle late enough in the outage to judge")
    if _journaled_vetoes(run, "cgm_unusable") == 0:
        v.append("no cgm_unusable veto in the journal")
    resumed = [r for r in run.records if r.cycle and run.after(r.time, run.case.tail) and not r.cycle.verdict.fallback]  # fmt: skip
    if run.case.check == "cgm_outage" and not resumed and any(w.end for w in run.windows):
        v.append("closed-loop control never resumed after the fault")
    return v


def check_compression(run: CaseRun) -> list[str]:
    """A compression low: its sudden drop and its rebound are distrusted (jumps), and the
    cycle that sees the rebound raises no insulin; a jump veto is journaled."""
    v = []
    s = run.settings
    for w in run.windows:
        onset = [r for r in run.records if r.cycle and w.start <= r.time < w.start + 2 * SLOT]
        if onset and not any(r.cycle.verdict.fallback for r in onset):
            v.append(f"{w.start}: the sudden drop was acted on as real glucose")
        rebound = [r for r in run.records if r.cycle and w.end <= r.time < w.end + SLOT]
        for r in rebound:
            c = r.cycle
            if c.verdict.bolus_u > 0 or c.verdict.temp_basal_u_per_h > s.basal_u_per_h + 1e-9:
                v.append(f"{r.time}: insulin raised on the rebound of a compression low")
            if not c.verdict.fallback:
                v.append(f"{r.time}: the rebound jump was trusted")
    if not run.events("veto")["detail"].str.contains("jump", regex=False).any():
        v.append("no jump journaled")
    return v


def check_spikes(run: CaseRun) -> list[str]:
    """No insulin above scheduled on a cycle whose newest reading is a spike; jump journaled."""
    v, spiked = [], 0
    s = run.settings
    for r in run.records:
        c, rep = r.cycle, r.reported
        if c is None or rep is None or not r.fault_on:
            continue
        truth = r.true.get(rep.time.value)
        if truth is None or rep.glucose_mgdl - truth < 40:
            continue
        spiked += 1
        if c.verdict.bolus_u > 0 or c.verdict.temp_basal_u_per_h > s.basal_u_per_h + 1e-9:
            v.append(f"{r.time}: insulin raised on a +{rep.glucose_mgdl - truth:.0f} mg/dL spike")
    if not spiked:
        v.append("no upward spike reached a cycle")
    if not run.events("veto")["detail"].str.contains("jump", regex=False).any():
        v.append("no jump journaled")
    return v


def check_tolerated(run: CaseRun) -> list[str]:
    """Duplicates/shuffles are harmless: no CGM fallback because of them; the raw readings are
    journaled as the device gave them."""
    v = []
    for r, c in run.fault_cycles():
        if any(x.startswith("cgm_unusable") for x in c.verdict.vetoes):
            v.append(f"{r.time}: CGM judged unusable ({c.verdict.vetoes[0][:80]})")
    cyc = run.cycles()
    during = cyc[[run.on(t) for t in cyc["time"]]]
    raw = [json.loads(x) for x in during["readings"]]
    if run.case.spec == "duplicated":
        if not any(len(rs) > len({x["time"] for x in rs}) for rs in raw):
            v.append("journal does not show the duplicated readings")
    elif not any([x["time"] for x in rs] != sorted(x["time"] for x in rs) for rs in raw):
        v.append("journal does not show the out-of-order readings")
    return v


def check_flat(run: CaseRun) -> list[str]:
    """After 9 identical readings (45 min): fallback until the sensor recovers; `flat` journaled."""
    v = []
    for r, c in run.fault_cycles(after_min=45):
        if c.verdict.fallback not in ("scheduled_basal", "suspend"):
            v.append(f"{r.time}: flat for {run.since_start(r.time):.0f} min, no fallback")
    if not run.events("veto")["detail"].str.contains("flat", regex=False).any():
        v.append("no flat-line veto journaled")
    return v


def _acked_after(run: CaseRun, t: pd.Timestamp) -> list[Any]:
    return [a for a in run.acks.values() if a.time >= t]


def check_pump_lost(run: CaseRun) -> list[str]:
    """Lost commands: the pump hears nothing, its temp expires → programmed basal within
    30 min; failures journaled; no key sent twice (the pump saw none of them)."""
    v = []
    s = run.settings
    for w in run.windows:
        if w.start is None or w.end is None:
            continue
        if [a for a in run.acks.values() if w.start <= a.time < w.end]:
            v.append("the pump acknowledged a command that was lost")
        settle = w.start + pd.Timedelta(minutes=MAX_TEMP_MINUTES)
        for d in run.history:
            if d.kind == "basal" and settle <= d.time < w.end and d.minutes > 0:
                if abs(d.units * 60 / d.minutes - s.basal_u_per_h) > 0.051:
                    v.append(f"{d.time}: {d.units * 60 / d.minutes:.2f} U/h, not the programmed "
                             f"{s.basal_u_per_h:.2f}, {MAX_TEMP_MINUTES}+ min into the outage")  # fmt: skip
                    break
            if d.kind == "bolus" and settle <= d.time < w.end:
                v.append(f"{d.time}: bolus delivered during the outage")
    if not run.events("fault")["detail"].str.contains("PumpTimeout", regex=False).any():
        v.append("no PumpTimeout fault journaled")
    st = Counter(r.status for r in run.journal.commands(patient=run.name))
    if not st.get("failed"):
        v.append(f"no command journaled as failed ({dict(st)})")
    return v


def check_pump_answer(run: CaseRun) -> list[str]:
    """The pump acted, the answer was lost: resolved by query (acked), nothing resent."""
    v = []
    if not run.events("fault")["detail"].str.contains("resolved", regex=False).any():
        v.append("no fault journaled for the lost answers")
    unresolved = run.journal.unresolved(run.name)
    if unresolved:
        v.append(f"{len(unresolved)} command(s) left unresolved")
    recs = run.journal.commands(patient=run.name)
    during = [r for r in recs if run.on(r.cycle_time)]
    if during and not any(r.status == "acked" for r in during):
        v.append("no command of the fault window was resolved as acked by query")
    return v


def check_pump_unreachable(run: CaseRun) -> list[str]:
    """No contact: no bolus delivered while unreachable; afterwards every command resolved
    by query (reconcile events), and the pump on its programmed basal within 30 min."""
    v = []
    s = run.settings
    for w in run.windows:
        for d in run.history:
            if d.kind == "bolus" and w.active(d.time):
                v.append(f"{d.time}: bolus delivered while the pump was unreachable")
            settle = w.start + pd.Timedelta(minutes=MAX_TEMP_MINUTES)
            if d.kind == "basal" and d.minutes > 0 and settle <= d.time and w.active(d.time):
                if abs(d.units * 60 / d.minutes - s.basal_u_per_h) > 0.051:
                    v.append(f"{d.time}: not the programmed basal 30+ min into the outage")
                    break
    if run.journal.unresolved(run.name):
        v.append("commands left unresolved after contact came back")
    if not run.events("fault")["detail"].str.contains("unreachable", regex=False).any():
        v.append("no 'unreachable' fault journaled")
    return v


def _alarm_due(run: CaseRun, w: Window) -> bool:
    """Whether the pump pushed enough insulin early enough in the window to trip its alarm
    (1 U missed for an occlusion, the reservoir's last units) and tell the supervisor at a
    later cycle. A suspended pump or a low-basal child's occluded line can stay silent for
    hours, on real pumps as here — the loop then over-counts IOB, the safe direction — so
    the matrix reports such an occurrence instead of failing it."""
    if w.start is None or w.end is None:
        return True
    pushed = sum(d.units for d in run.history if w.start <= d.time < w.end - SLOT)
    if run.case.spec.startswith("occlusion"):
        need = 1.0  # PumpFirmware.occlusion_alarm_u
    else:
        need = float(run.case.spec.partition("units=")[2] or 0.2)
    return pushed >= 1.05 * need


def check_pump_fault(run: CaseRun) -> list[str]:
    """Occlusion / empty reservoir: the alarm fires, the supervisor commands a faulted pump
    nothing (no ack between the alarm and the fix), `pump_fault` journaled."""
    v = []
    alarms = [r.time for r in run.records if r.cycle and any(x.startswith("pump_fault") for x in r.cycle.verdict.vetoes)]  # fmt: skip
    silent = 0
    for w in run.windows:
        first = next((t for t in alarms if w.active(t)), None)
        if first is None:
            if _alarm_due(run, w):
                v.append(f"no alarm during the occurrence at {w.start}")
            else:
                silent += 1
            continue
        sent = [a for a in run.acks.values() if first <= a.time < w.end]
        if sent:
            v.append(f"{len(sent)} command(s) sent to a faulted pump ({sent[0].kind})")
        if not any(
            r.cycle and r.cycle.verdict.suspend for r in run.records if first <= r.time < w.end
        ):
            v.append("no suspend verdict while the pump was faulted")
    run.notes["silent_occurrences"] = silent
    if alarms and _journaled_vetoes(run, "pump_fault") == 0:
        v.append("no pump_fault veto journaled")
    return v


def check_pred_fallback(run: CaseRun) -> list[str]:
    """The damaged forecaster was asked and bypassed: the fallback's use is journaled and the
    loop kept deciding (no controller failure)."""
    v = []
    fault: ForecasterFault = run.notes["forecaster_fault"]
    if not fault.calls:
        v.append("the faulty forecaster was never called during the fault")
    ev = run.events("predictor")
    if not ev["detail"].str.contains("fallback", regex=False).any():
        v.append("no switch to the fallback forecaster journaled")
    if run.events("fault")["detail"].str.contains("controller", regex=False).any():
        v.append("the controller failed although a fallback forecaster was there")
    cyc = run.cycles()
    during = cyc[[run.on(t) for t in cyc["time"]]]
    if len(during) and not during["predictor"].str.contains("fallback").all():
        v.append("a cycle during the fault was not answered by the fallback forecaster")
    return v


def check_pred_dead(run: CaseRun) -> list[str]:
    """No forecaster at all: the controller fails → scheduled basal, no bolus; fault journaled."""
    v = []
    for r, c in run.fault_cycles():
        if c.verdict.fallback != "scheduled_basal" or c.verdict.bolus_u > 0:
            v.append(f"{r.time}: fallback {c.verdict.fallback!r} with no forecaster")
    if not run.events("fault")["detail"].str.contains("controller", regex=False).any():
        v.append("the controller's failure was not journaled")
    return v


def check_model_refused(run: CaseRun) -> list[str]:
    """The damaged model was refused at load (typed reason kept), the loop ran on the
    fallback forecaster for every cycle, and the journal says so."""
    v = []
    pred = run.notes["predictor"]
    reason = getattr(pred, "degraded_reason", "")
    if getattr(pred, "primary", None) is not None or "model refused" not in reason:
        v.append(f"the damaged model was not refused ({reason!r})")
    if run.case.mode == "corrupt" and "sha256" not in reason:
        v.append(f"refusal does not name the hash mismatch ({reason[:120]!r})")
    if run.case.mode == "mismatch" and not ("manifest" in reason or "window" in reason):
        v.append(f"refusal does not name the manifest/window mismatch ({reason[:120]!r})")
    start = run.journal.events("start")
    if not start["detail"].str.contains("model refused", regex=False).any():
        v.append("the start event does not journal the refused model")
    cyc = run.cycles()
    if len(cyc) == 0 or not cyc["predictor"].str.startswith("fallback").all():
        v.append("cycles not journaled as answered by the fallback forecaster")
    return v


def check_journal_down(run: CaseRun) -> list[str]:
    """Unwritable journal: while the loop knows it (journal_unavailable veto) nothing above
    scheduled basal and no bolus; nothing that raises insulin reaches the pump without its
    intent journaled (common check); a warning each failing cycle; recovery journaled; the
    pump's history synced afterwards (common check)."""
    v = []
    failed = [r for r in run.records if r.cycle is not None and not r.cycle.journal_ok]
    if not failed:
        v.append("the journal never failed (the fault did not bite)")
    if run.case.mode == "query_only":  # every write fails: the supervisor must know it
        known = [r for r in run.records if r.cycle is not None
                 and any(x.startswith("journal_unavailable") for x in r.cycle.verdict.vetoes)]  # fmt: skip
        if not known:
            v.append("the supervisor never learnt that the journal was down")
        for w in run.windows:
            for d in run.history:
                if d.kind == "bolus" and w.active(d.time):
                    v.append(f"{d.time}: bolus delivered while the journal was read-only")
    warned = sum("journal unavailable" in line for line in run.notes["log"])
    if warned < len(failed):
        v.append(f"{warned} warnings for {len(failed)} cycles that could not be journaled")
    if not run.events("warning")["detail"].str.contains("journal_recovered", regex=False).any():
        v.append("no journal_recovered event after the journal came back")
    return v


CHECKS: dict[str, Callable[[CaseRun], list[str]]] = {
    "cgm_outage": check_cgm_outage,
    "compression": check_compression,
    "spikes": check_spikes,
    "tolerated": check_tolerated,
    "flat": check_flat,
    "pump_lost": check_pump_lost,
    "pump_answer": check_pump_answer,
    "pump_unreachable": check_pump_unreachable,
    "pump_fault": check_pump_fault,
    "pred_fb": check_pred_fallback,
    "pred_dead": check_pred_dead,
    "model_refused": check_model_refused,
    "journal_down": check_journal_down,
}
