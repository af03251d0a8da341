"""The fault cases: each fault, how long it lasts in the short matrix, and what the loop must do.

Expected behaviour, and the peers it is measured against: oref0 refuses CGM data older
than 12 min or more than 5 min in the future and flat traces; Loop rejects glucose older
than 15 min and momentum across jumps > 40 mg/dL; Omnipod 5 enters limited mode after
20 min without CGM; CamAPS reverts to the programmed basal after about 30 min. glucast's
supervisor falls back to scheduled basal (or zero, after a recent low) once the newest
reading is > 12 min old, so every CGM outage must show the fallback by 15 min — stricter
than Omnipod's 20 and CamAPS's 30 — and every temp basal lasts ≤ 30 min, so a loop that
cannot reach the pump leaves it on its programmed basal within 30 min (CamAPS's rule).
"""

from __future__ import annotations

from dataclasses import dataclass

from forecast.schema import GlucastError

TAIL_MIN = 20  # after the fault: recovery is watched, outcome reported


class FaultMatrixError(GlucastError):
    """The matrix cannot be set up (unknown case or patient, unusable model directory)."""


@dataclass(frozen=True)
class FaultCase:
    """One fault, how long it lasts in the short matrix, and what the loop must do."""

    name: str
    group: str  # "device" (HAL wrappers) | "predictor" | "model" | "journal"
    minutes: int
    expect: str
    spec: str = ""  # HAL fault spec without start/minutes, e.g. "stale:lag_min=20"
    check: str = ""  # name of the case-specific check (see CHECKS)
    patient: str = ""  # default patient (each case its own, so a cohort runs them together)
    clear_after: bool = False  # the user replaces the infusion set / cartridge at the end
    mode: str = ""  # predictor fault: nan | inf | raise; model fault: corrupt | mismatch
    before_meal: int = 5  # short matrix: the fault starts this long before a meal is announced
    tail: int = TAIL_MIN  # minutes watched after the fault


CASES: tuple[FaultCase, ...] = (
    FaultCase("cgm-dropout-30", "device", 30, "no CGM: scheduled basal (zero after a low) from "
              "12 min, no bolus; closed loop again when readings return", "dropout",
              "cgm_outage", "child#001", before_meal=20),
    FaultCase("cgm-dropout-60", "device", 60, "as dropout-30, held for the whole hour "
              "(Omnipod 5 would be in limited mode from 20 min)", "dropout", "cgm_outage",
              "adolescent#005", before_meal=20),
    FaultCase("cgm-dropout-180", "device", 180, "as dropout-30 for 3 h: the pump stays on "
              "the programmed basal, never a bolus without CGM", "dropout", "cgm_outage",
              "adolescent#004", before_meal=20),
    FaultCase("cgm-compression-low", "device", 30, "false low (-60 mg/dL): the drop and the "
              "rebound are jumps > 40 mg/dL/5 min (Loop) and are not acted on; no insulin is "
              "raised on the rebound", "compression-low:depth_mgdl=60", "compression",
              "adolescent#001"),
    FaultCase("cgm-noise-spikes", "device", 30, "±80 mg/dL spikes: a reading jumping > 40 "
              "mg/dL/5 min is not trusted (Loop's rule); no bolus on a spike",
              "noise-spikes:size_mgdl=80,every=3", "spikes", "adult#007"),
    FaultCase("cgm-stale", "device", 30, "readings 20 min late: stale (> 12 min, oref0) → "
              "scheduled basal for the whole fault", "stale:lag_min=20", "cgm_outage",
              "adolescent#009", before_meal=20),
    FaultCase("cgm-future-timestamps", "device", 30, "readings stamped 15 min ahead (> 5 min, "
              "oref0): not trusted → scheduled basal", "future:ahead_min=15", "cgm_outage",
              "adolescent#010", before_meal=20),
    FaultCase("cgm-duplicated", "device", 30, "every reading twice: de-duplicated, the loop "
              "keeps closed-loop control; the journal keeps what the device reported",
              "duplicated", "tolerated", "adolescent#004"),
    FaultCase("cgm-out-of-order", "device", 30, "shuffled readings (a backfill): sorted, the "
              "loop keeps closed-loop control", "out-of-order", "tolerated", "adolescent#005"),
    FaultCase("cgm-clock-jump-forward", "device", 60, "sensor clock +1 h (daylight saving): "
              "future readings not trusted → scheduled basal, until the future-stamped "
              "readings are in the past again (up to an hour after the clock is fixed)",
              "clock-jump:offset_min=60", "cgm_outage", "child#001", before_meal=20,
              tail=75),
    FaultCase("cgm-clock-jump-back", "device", 60, "sensor clock -1 h: readings look an hour "
              "old → stale → scheduled basal", "clock-jump:offset_min=-60", "cgm_outage",
              "adult#007", before_meal=20),
    FaultCase("cgm-flat-line", "device", 60, "a sensor stuck on one value: after 9 identical "
              "readings (45 min, oref0's flat rule) → scheduled basal", "flat", "flat",
              "adolescent#007", before_meal=50),
    FaultCase("cgm-sensor-error", "device", 30, "error codes instead of values → scheduled "
              "basal", "sensor-error", "cgm_outage", "child#003", before_meal=20),
    FaultCase("pump-timeout-lost", "device", 60, "commands time out and never arrive: each "
              "key sent once, the pump returns to its programmed basal within 30 min "
              "(temps expire; CamAPS's rule)", "timeout:lost=true", "pump_lost",
              "child#010"),
    FaultCase("pump-timeout-answer-lost", "device", 30, "the pump acts but its answer is "
              "lost: the key is queried, never resent; nothing delivered twice",
              "timeout:lost=false", "pump_answer", "child#010"),
    FaultCase("pump-no-ack", "device", 30, "applied, never acknowledged: resolved by query, "
              "no second delivery", "no-ack", "pump_answer", "child#006"),
    FaultCase("pump-unreachable", "device", 30, "no contact: commands stay unknown and block "
              "boluses; reconciled by query afterwards; programmed basal within 30 min",
              "unreachable", "pump_unreachable", "adult#006"),
    FaultCase("pump-occlusion", "device", 60, "delivered < commanded: the occlusion alarm "
              "fires, the supervisor sends a faulted pump nothing; set replaced at the end",
              "occlusion:fraction=0", "pump_fault", "adult#006", clear_after=True),
    FaultCase("pump-empty-reservoir", "device", 30, "reservoir runs dry: alarm, nothing sent "
              "to the faulted pump; cartridge replaced at the end",
              "empty-reservoir:units=0.2", "pump_fault", "adolescent#007", clear_after=True),
    FaultCase("predictor-nan", "predictor", 30, "model returns NaN: the physiological "
              "fallback answers (journaled), control goes on within limits", check="pred_fb",
              patient="child#006", mode="nan"),
    FaultCase("predictor-inf", "predictor", 30, "model returns ±inf: fallback forecaster, "
              "journaled", check="pred_fb", patient="child#006", mode="inf"),
    FaultCase("predictor-raises", "predictor", 30, "model raises (as onnxruntime does): "
              "fallback forecaster, journaled", check="pred_fb", patient="child#006",
              mode="raise"),
    FaultCase("predictor-dead", "predictor", 30, "model fails and no fallback: the "
              "controller fails → scheduled basal, prediction invalid, fault journaled",
              check="pred_dead", patient="child#006", mode="raise"),
    FaultCase("model-corrupt", "model", 30, "a model file whose sha256 is not the "
              "manifest's is refused at load; the loop runs on the fallback forecaster and "
              "journals why", check="model_refused", patient="adolescent#001", mode="corrupt"),
    FaultCase("model-mismatched", "model", 30, "a manifest whose window disagrees with the "
              "graph is refused; fallback forecaster, journaled", check="model_refused",
              patient="adolescent#001", mode="mismatch"),
    FaultCase("journal-read-only", "journal", 30, "journal cannot be written: no bolus, "
              "nothing above scheduled basal, a warning every cycle; recovery journaled and "
              "the pump history synced", check="journal_down", patient="adolescent#001",
              mode="query_only"),
    FaultCase("journal-disk-full", "journal", 30, "nearly full disk (SQLITE_FULL for every write "
              "that needs a new page; small ones may still fit): cycles that cannot be recorded "
              "are warned about, no insulin reaches the pump without its intent journaled, "
              "recovery journaled and the pump history synced", check="journal_down",
              patient="adolescent#001", mode="disk_full"),
)  # fmt: skip
CASE_NAMES = tuple(c.name for c in CASES)
