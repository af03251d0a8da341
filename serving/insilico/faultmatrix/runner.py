"""Running the matrix: each planned cohort through the real loop, then every case evaluated."""

from __future__ import annotations

import contextlib
import io
import shutil
import sqlite3
import tempfile
import time as _time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from serving.insilico.faultmatrix.backend import MatrixBackend
from serving.insilico.faultmatrix.cases import CASES, FaultCase
from serving.insilico.faultmatrix.evaluation import evaluate
from serving.insilico.faultmatrix.models import (
    FaultyModel,
    FaultySettingsPhysio,
    ForecasterFault,
    damage_model_dir,
    write_model_dir,
)
from serving.insilico.faultmatrix.planning import (
    MatrixConfig,
    _Group,
    meal_start,
    occurrences,
    plan,
)
from serving.insilico.faultmatrix.records import CaseResult, CaseRun, CycleRecord
from serving.insilico.faults import Window
from serving.journal import Journal
from serving.loop import ControlLoop


def _world(names: Sequence[str], cfg: MatrixConfig):
    from serving.insilico.simulated import SimulatedCohort, WorldConfig

    return SimulatedCohort(
        WorldConfig(patients=",".join(names), seed=cfg.seed, sensor=cfg.sensor, start=cfg.start)
    )


def _controller(cfg: MatrixConfig, fault: ForecasterFault | None = None, *, dead: bool = False,
                model_dir: str | None = None):  # fmt: skip
    """(controller, predictor): the MPC over the checked predictor, its forecaster faulty
    when asked. Default: the settings-based physiological forecaster (no trained model)."""
    from serving.controllers import build_controller
    from serving.controllers.mpc import MPCController
    from serving.predictor import FallbackPredictor, Predictor, physio_fallback

    model_dir = model_dir or cfg.model_dir
    if fault is None and (model_dir is not None or not dead):  # as `glucast loop` builds it
        b = build_controller("mpc" if model_dir else "physio-mpc", model_dir, strict=False)
        return b.controller, b.predictor
    if model_dir is not None:
        checked = Predictor(model_dir)
        primary = FaultyModel(checked.model, fault)
        fb = None if dead else checked.fallback
        pred = FallbackPredictor(primary, fb, rules=checked.rules)
        pred.manifest = checked.manifest  # the journal names the model by its hash
        return MPCController(pred, name="mpc"), pred
    from forecast.windows import WindowConfig

    w, q = WindowConfig(), (0.1, 0.5, 0.9)
    primary = FaultySettingsPhysio(w, q, fault) if fault is not None else physio_fallback(w, q)
    pred = FallbackPredictor(primary, None if dead else physio_fallback(w, q))
    return MPCController(pred, name="physio-mpc"), pred


def run_group(group: _Group, cfg: MatrixConfig, workdir: Path, log: Callable[[str], None]) -> list[CaseRun]:  # fmt: skip
    """Run one cohort through its cases with the real loop; return one CaseRun per pair."""
    names = [p for _, p in group.pairs]
    world = _world(names, cfg)
    t0 = world.now()
    cases = [c for c, _ in group.pairs]
    first = cases[0]
    idx = [world.index(p) for p in names]
    occ = [occurrences(c, cfg, meal_start(c, world, j, cfg)) for c, j in zip(cases, idx)]
    total = max(tot for _, tot in occ)

    def spec_list(c: FaultCase, when: list[tuple[int, int]]) -> list[str]:
        if c.group != "device":
            return []
        sep = "," if ":" in c.spec else ":"
        return [f"{c.spec}{sep}start={s},minutes={m}" for s, m in when]

    loop_names = [f"{c.name}/{p}" for c, p in group.pairs]
    backend = MatrixBackend(world, loop_names, names, [spec_list(c, o) for c, (o, _) in zip(cases, occ)])  # fmt: skip
    windows = [
        w if w else [Window(t0 + pd.Timedelta(minutes=s), t0 + pd.Timedelta(minutes=s + m)) for s, m in o]
        for w, (o, _) in zip(backend.windows, occ)
    ]  # fmt: skip
    jpath = workdir / f"{'-'.join(map(str, group.key))}-{group.pairs[0][1]}.journal.db".replace(
        "#", ""
    )
    journal = Journal(jpath, sync="normal")
    notes: dict[str, Any] = {}
    fault = None
    model_dir = None
    if first.group == "predictor":
        fault = ForecasterFault(world, windows[0], first.mode)
        notes["forecaster_fault"] = fault
    if first.group == "model":
        src = Path(cfg.model_dir) if cfg.model_dir else write_model_dir(workdir / "model-ok")
        from serving.predictor import Predictor

        Predictor(src)  # the undamaged model loads: the refusal below is the damage's doing
        model_dir = str(damage_model_dir(src, workdir / f"model-{first.mode}", first.mode))
    controller, predictor = _controller(
        cfg, fault, dead=first.check == "pred_dead", model_dir=model_dir
    )
    notes["predictor"] = predictor
    lines: list[str] = []
    loop = ControlLoop(backend, journal, controller, predictor, log=lines.append)
    loop.start(describe=backend.describe())
    records: list[list[CycleRecord]] = [[] for _ in names]
    stderr = io.StringIO()
    down = False
    n_cycles = total // 5
    for k in range(n_cycles):
        t = world.now()
        if first.group == "journal":
            on = any(w.active(t) for w in windows[0])
            if on and not down:
                _break_journal(journal, first.mode)
                down = True
            elif down and not on:
                _mend_journal(journal, first.mode)
                down = False
        with contextlib.redirect_stderr(stderr):
            recs = {r.patient: r for r in loop.cycle()}
        bg = world.true_bg()
        for i, name in enumerate(loop_names):
            rec = recs.get(name)
            reported = max(rec.readings, key=lambda r: r.time) if rec and rec.readings else None
            true = {r.time.value: r.glucose_mgdl for r in world.cgm(idx[i]).recent(15)}
            on = any(w.active(t) for w in windows[i])
            records[i].append(CycleRecord(t, float(bg[idx[i]]), rec, reported, true, on))
        backend.advance(5)
        for i, c in enumerate(cases):  # the user replaces the set / cartridge after an alarm
            if c.clear_after and any(w.end == world.now() for w in windows[i]):
                world.pump(idx[i]).clear_fault(reservoir_u=300.0)
        if cfg.long and k and k % 288 == 0:
            log(f"  {group.key[0]}: day {k // 288} of {cfg.days:g}")
    if down:
        _mend_journal(journal, first.mode)
    with contextlib.redirect_stderr(stderr):
        loop.cycle()  # one more cycle syncs the last deliveries into the journal
    loop.stop("faultmatrix")
    notes["log"] = lines
    notes["stderr"] = stderr.getvalue().splitlines()
    out = []
    for i, (c, p) in enumerate(group.pairs):
        fw = world.firmware[idx[i]]
        out.append(CaseRun(c, p, loop_names[i], loop.settings[i], windows[i], records[i], journal,
                           list(fw.history), dict(fw.acks), t0, dict(notes)))  # fmt: skip
    return out


def _break_journal(journal: Journal, mode: str) -> None:
    """Make SQLite refuse writes as a read-only file system or a full disk would."""
    if mode == "query_only":
        journal.con.execute("PRAGMA query_only = ON")
    else:
        journal.con.execute("CREATE TABLE IF NOT EXISTS _ballast(x BLOB)")
        pages = journal.con.execute("PRAGMA page_count").fetchone()[0]
        journal.con.execute(f"PRAGMA max_page_count = {int(pages)}")
        for size in (4096, 1024, 256, 64, 16, 1):  # fill the free pages to the last byte
            while True:
                try:
                    journal.con.execute(f"INSERT INTO _ballast VALUES (zeroblob({size}))")
                except sqlite3.Error:
                    break


def _mend_journal(journal: Journal, mode: str) -> None:
    if mode == "query_only":
        journal.con.execute("PRAGMA query_only = OFF")
    else:
        journal.con.execute("PRAGMA max_page_count = 1073741823")


def run_matrix(
    cfg: MatrixConfig = MatrixConfig(),  # noqa: B008 (a frozen dataclass)
    *,
    log: Callable[[str], None] | None = None,
    runs_out: dict[str, list[CaseRun]] | None = None,
) -> list[CaseResult]:
    """Run every chosen case and return its result (in CASES order).

    `runs_out` receives the raw `CaseRun`s (journals open; give `cfg.workdir` so they are
    not deleted) for callers that inspect them further."""
    log = log or (lambda msg: None)
    own = cfg.workdir is None
    workdir = Path(cfg.workdir or tempfile.mkdtemp(prefix="glucast-faults-"))
    workdir.mkdir(parents=True, exist_ok=True)
    runs: dict[str, list[CaseRun]] = {}
    try:
        for g in plan(cfg):
            t = _time.monotonic()
            for run in run_group(g, cfg, workdir, log):
                runs.setdefault(run.case.name, []).append(run)
            log(f"ran {', '.join(c.name for c, _ in g.pairs)} in {_time.monotonic() - t:.1f} s")
        results = [evaluate(runs[c.name]) for c in CASES if c.name in runs]
        if runs_out is not None:
            runs_out.update(runs)
        else:
            for rs in runs.values():
                rs[0].journal.close()
        return results
    finally:
        if own:
            shutil.rmtree(workdir, ignore_errors=True)
