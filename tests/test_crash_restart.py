"""Crash durability: SIGKILL the running loop ≥ 50 times over a simulated day, restart it each time.

Each life is a real process running `glucast loop` (`serving.commands.loop.main`) on the
simulated backend, whose pump and patient persist in their own state file — so a kill loses
exactly what a power cut on the loop's device would lose. Lives are forked from a warmed-up
parent (a "zygote": imports and JIT compilation done once), which is what keeps 50+ process
starts inside the test budget; every kill is a SIGKILL to the process running the loop, at
a random moment (some also from the `power-loss` fault injector, inside a pump command).

The journal runs with ``--journal-sync normal``: in WAL mode SQLite loses no committed
transaction to a process kill under NORMAL (only a power cut may cost the last commits), so
what survives each kill is exactly what FULL would keep, without an fsync per commit.

After the day: the journal is consistent, no bolus was delivered twice, the insulin the
journal recorded is exactly the insulin the pump delivered (and what the simulated patient
received), and IOB at every cycle equals the IOB the pump's own history implies — so IOB
is continuous across every restart.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from forecast.insulin import iob_before
from forecast.sim import load_patients
from forecast.windows import WindowConfig
from serving.insilico.simulated import WorldConfig
from serving.journal import Journal, bin_insulin

ROOT = Path(__file__).resolve().parents[1]
HOURS = 24
MIN_KILLS = 50
SLOT = pd.Timedelta(minutes=5)

ZYGOTE = r"""
import json, os, sys, tempfile
from serving.commands.loop import main
# warm up: imports, numba kernels, caches — everything a child would otherwise redo
with tempfile.TemporaryDirectory() as d:
    main(["--backend", "sim", "--journal", os.path.join(d, "w.db"), "--speed", "fast",
          "--hours", "0.25", "--quiet", "--sensor", "dexcom-noise"])
print("ready", flush=True)
for line in sys.stdin:
    cmd, _, arg = line.strip().partition(" ")
    if cmd == "run":
        log, argv = json.loads(arg)
        pid = os.fork()
        if pid == 0:
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(fd, 1); os.dup2(fd, 2)
            try:
                rc = main(argv)
            except BaseException as e:
                print(f"crashed: {type(e).__name__}: {e}", flush=True)
                rc = 3
            os._exit(rc)
        print(pid, flush=True)
    elif cmd == "wait":
        _, status = os.waitpid(int(arg), 0)
        print(os.waitstatus_to_exitcode(status), flush=True)
    else:
        break
"""


class Zygote:
    def __init__(self) -> None:
        self.p = subprocess.Popen(
            [sys.executable, "-c", ZYGOTE],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        line = self.p.stdout.readline().strip()
        assert line == "ready", f"zygote did not start: {line!r}"

    def spawn(self, argv: list[str], log: Path) -> int:
        self.p.stdin.write(f"run {json.dumps([str(log), argv])}\n")
        self.p.stdin.flush()
        return int(self.p.stdout.readline())

    def wait(self, pid: int) -> int:
        self.p.stdin.write(f"wait {pid}\n")
        self.p.stdin.flush()
        return int(self.p.stdout.readline())

    def close(self) -> None:
        try:
            self.p.stdin.write("exit\n")
            self.p.stdin.flush()
            self.p.wait(timeout=10)
        except Exception:
            self.p.kill()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _cycles(db: Path) -> int:
    if not db.exists():
        return 0
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    try:
        return con.execute("SELECT count(*) FROM cycles").fetchone()[0]
    except sqlite3.OperationalError:
        return 0
    finally:
        con.close()


@pytest.mark.slow
def test_sigkill_fifty_times_over_a_day(tmp_path):
    journal, state = tmp_path / "loop.db", tmp_path / "devices.db"
    base = ["--backend", "sim", "--patient", "adult#001", "--journal", str(journal),
            "--device-state", str(state), "--speed", "fast", "--hours", str(HOURS), "--quiet",
            "--sensor", "dexcom-noise", "--seed", "7", "--journal-sync", "normal"]  # fmt: skip
    rng = random.Random(20260301)
    z = Zygote()
    kills = power_losses = lives = 0
    cycle_s = 0.05
    t_start = time.monotonic()
    try:
        while True:
            lives += 1
            assert lives < 400, "the loop makes no progress between kills"
            argv = list(base)
            if lives % 3 == 0:  # some lives also die inside pump commands
                argv += ["--fault", f"power-loss:prob=0.15,seed={lives}"]
            before = _cycles(journal)
            pid = z.spawn(argv, tmp_path / f"life{lives}.log")
            t0 = time.monotonic()
            while _alive(pid) and _cycles(journal) <= before and time.monotonic() - t0 < 60:
                time.sleep(0.003)
            t1 = time.monotonic()
            if _alive(pid):
                time.sleep(rng.uniform(0.0, 3 * cycle_s))  # ~100 kills a day, whatever the load
            we_killed = _alive(pid)
            if we_killed:
                os.kill(pid, signal.SIGKILL)
            rc = z.wait(pid)
            done = _cycles(journal) - before
            if done > 0:
                cycle_s = 0.8 * cycle_s + 0.2 * (time.monotonic() - t1) / done
            if rc == -signal.SIGKILL:
                kills += 1
                power_losses += not we_killed
                continue
            assert rc == 0, (tmp_path / f"life{lives}.log").read_text()[-3000:]
            break  # the day is over
    finally:
        z.close()
    wall = time.monotonic() - t_start
    assert kills >= MIN_KILLS, f"only {kills} kills in {lives} lives"
    _check_day(journal, state)
    assert power_losses >= 1
    print(f"\n{lives} lives, {kills} SIGKILLs ({power_losses} inside pump commands), {wall:.1f} s")


def _check_day(journal: Path, state: Path) -> None:
    j = Journal(journal, readonly=True)
    assert j.check() == [], j.check()
    # one cycle per 5-minute slot over the whole day, none twice, none missing
    cyc = j.cycles()
    start = pd.Timestamp(j.meta("run_start"))
    expected = pd.date_range(start, start + pd.Timedelta(hours=HOURS) - SLOT, freq=SLOT)
    assert list(cyc["time"]) == list(expected)
    assert j.unresolved() == []
    # the pump's own history (the simulated device's durable memory)
    dev = sqlite3.connect(f"file:{state}?mode=ro", uri=True)
    pump_hist = pd.DataFrame(
        [json.loads(d) for (d,) in dev.execute("SELECT delivery FROM deliveries ORDER BY seq")]
    )
    steps = dev.execute("SELECT k, basal, bolus FROM steps ORDER BY n").fetchall()
    acks = {k: json.loads(a) for k, a in dev.execute("SELECT key, ack FROM acks")}
    dev.close()
    jh = j.insulin_history("adult#001")
    # insulin recorded == insulin the pump delivered, row by row
    assert list(jh["seq"]) == list(pump_hist["seq"])
    assert np.array_equal(jh["units"].to_numpy(), pump_hist["units"].to_numpy())
    assert list(jh["key"]) == list(pump_hist["key"])
    # ... == insulin the simulated patient was given, step by step
    given = sum(
        np.array(json.loads(b))[0] * k / 60 + np.array(json.loads(bo))[0] for k, b, bo in steps
    )
    assert given == pytest.approx(pump_hist["units"].sum(), abs=1e-9)
    # no bolus twice: per key, delivered == what the pump acknowledged, once
    boluses = pump_hist[pump_hist["kind"] == "bolus"].groupby("key")["units"].sum()
    assert len(boluses) >= 5, "the day should contain boluses to protect"
    for key, units in boluses.items():
        assert acks[key]["accepted"] and units == pytest.approx(acks[key]["amount"], abs=1e-9), key
        assert j.command(key).status == "acked"
    per_cycle = pd.Series([k.split("/")[1] for k in boluses.index]).value_counts()
    assert per_cycle.max() == 1
    # IOB at every cycle == IOB from the pump's history (continuous across restarts)
    w = WindowConfig()
    k_ins = w.insulin_curve.iob_kernel(w.slot_minutes)
    world = WorldConfig.from_json(j.meta("world"))
    scheduled = float(load_patients(world.patients).basal_u_per_h[0])
    hist = pump_hist.assign(time=pd.to_datetime(pump_hist["time"], utc=True))
    for t, iob in zip(cyc["time"], cyc["iob_u"]):
        slots = pd.date_range(t - SLOT * (len(k_ins) + 1), t, freq=SLOT)
        dose = bin_insulin(hist, slots, None)
        dose[slots < start] = scheduled * 5 / 60  # the pump's schedule before the run
        assert iob == pytest.approx(iob_before(dose, k_ins), abs=1e-9), t
    assert len(j.events("reconcile")) >= 1, "no kill landed between an intent and its ack"
