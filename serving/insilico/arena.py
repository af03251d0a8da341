"""The arena: every controller on the same virtual patients, seeds and meals, in three scenarios.

    glucast arena --patients all --days 7 --seeds 0,1 --model DIR --out reports/arena

For each scenario × seed × controller one in-silico trial (`serving.insilico.trial.run_trial`)
runs the same patients with the same meals, announcements, sensor noise and pump (the random
streams are keyed on the run seed and the patient, not on the controller), so the rows of the
table differ only by the controller. Scenarios (`SCENARIOS`):

* ``announced`` — every meal announced at its start with a 20 % (SD) carb-count error;
* ``unannounced`` — meals are eaten, never announced (no meal bolus: the controller must see
  the rise; oref0's UAM and SMB are on for this, as its docs recommend);
* ``variability`` — as ``announced``, with every intra-patient variability effect on
  (`forecast.sim.variability`: circadian and day-to-day insulin sensitivity, per-meal
  absorption).

Controllers: ``basal-bolus`` (the usual therapy), ``pid``, the peers ``oref0`` (OpenAPS) and
``loop`` (Loop, pyloopkit) as their real code, and glucast's ``mpc`` over an exported forecaster
(``physio-mpc`` runs the MPC over the physiological forecaster instead).

Parallel: the patients are split into `workers` interleaved subsets and each (scenario, seed,
controller, subset) is one task in a process pool (spawned processes; each builds its own
controller, so a peer gets one process per worker). A patient's trajectory does not depend on
which other patients share its trial (per-patient random streams, per-patient decisions), so
the merged result equals an unsplit run (tests/test_arena.py checks it for basal-bolus).

Outputs: `ArenaResult.table()` (one row per scenario × controller × age group: TIR, TBR<70
and <54 on CGM and on true glucose, TAR>250, CV, LBGI/HBGI, insulin per day, patients with
any true glucose < 54, controller fallbacks and supervisor changes), per-patient outcomes,
`write_report` (index.html with the cohort CVGA of each scenario × controller, arena.json,
table.csv, patients.csv) and `log_mlflow` (the lab's `training.tracking`, imported there).
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from forecast.schema import GLUCOSE_MIN_MGDL, GlucastError
from serving.insilico.trial import TrialConfig, TrialResult, run_trial

ARENA_CONTROLLERS = ("basal-bolus", "pid", "oref0", "loop", "mpc")
SCENARIOS: dict[str, dict[str, Any]] = {
    "announced": {"carb_error": 0.2},
    "unannounced": {"unannounced": True},
    "variability": {"carb_error": 0.2, "variability": "all"},
}
GROUPS = ("all", "adults", "adolescents", "children")
_GROUP_OF = {"adult": "adults", "adolescent": "adolescents", "child": "children"}
# (key in TrialResult.patient_metrics, column of the table)
TABLE_METRICS = (
    ("tir", "TIR %"),
    ("tbr70", "TBR<70 %"),
    ("tbr54", "TBR<54 %"),
    ("bg_tir", "true TIR %"),
    ("bg_tbr70", "true TBR<70 %"),
    ("bg_tbr54", "true TBR<54 %"),
    ("tar250", "TAR>250 %"),
    ("cv", "CV %"),
    ("lbgi", "LBGI"),
    ("hbgi", "HBGI"),
    ("tdi_u", "insulin U/day"),
)


# MLflow metric name of each table column (the patient-metric keys of `TrialResult`)
METRIC_NAMES = {col: key for key, col in TABLE_METRICS} | {
    "runs": "runs",
    "runs with true BG<54": "runs_bg_below_54",
    "fallbacks": "controller_fallbacks",
    "supervisor changed %": "supervisor_changed_pct",
}


class ArenaError(GlucastError, ValueError):
    """An arena that cannot run as configured."""


@dataclass(frozen=True)
class ArenaConfig:
    """Who, how long, which seeds, scenarios and controllers; how many worker processes."""

    patients: str = "all"
    days: float = 7.0
    seeds: tuple[int, ...] = (0, 1)
    controllers: tuple[str, ...] = ARENA_CONTROLLERS
    scenarios: tuple[str, ...] = tuple(SCENARIOS)
    model_dir: str | None = None  # the mpc's exported forecaster
    workers: int = 2
    sensor: str = "dexcom"
    start: str = "2018-01-01 00:00"

    def __post_init__(self) -> None:
        from serving.controllers import CONTROLLER_NAMES

        bad = [c for c in self.controllers if c not in CONTROLLER_NAMES]
        if bad:
            raise ArenaError(f"unknown controller(s) {bad}; choose from {CONTROLLER_NAMES}")
        bad = [s for s in self.scenarios if s not in SCENARIOS]
        if bad:
            raise ArenaError(f"unknown scenario(s) {bad}; choose from {tuple(SCENARIOS)}")
        if "mpc" in self.controllers and not self.model_dir:
            raise ArenaError(
                "the mpc controller needs --model DIR (an exported forecaster); without one, "
                "run physio-mpc (the MPC over the physiological forecaster) instead"
            )
        if not self.controllers or not self.scenarios or not self.seeds:
            raise ArenaError("the arena needs at least one controller, scenario and seed")
        if not (isinstance(self.workers, int) and self.workers >= 1):
            raise ArenaError(f"workers must be a positive integer, got {self.workers!r}")
        self.trial_config("announced", self.seeds[0], self.controllers[0], self.patients)

    def trial_config(self, scenario: str, seed: int, controller: str, patients: str) -> TrialConfig:
        """The trial of one cell of the arena (TrialError on a bad setting)."""
        return TrialConfig(
            controller=controller,
            patients=patients,
            days=self.days,
            seed=int(seed),
            sensor=self.sensor,
            start=self.start,
            model_dir=self.model_dir if controller == "mpc" else None,
            **SCENARIOS[scenario],
        )


def patient_names(patients: str) -> list[str]:
    from forecast.sim import load_patients

    return [str(x) for x in load_patients(patients).names]


def group_of(name: str) -> str:
    """The age group of a simulated patient (``adult#001`` → ``adults``)."""
    return _GROUP_OF.get(name.split("#", 1)[0], "other")


def split_patients(names: Sequence[str], parts: int) -> list[list[str]]:
    """`names` in at most `parts` interleaved subsets (age groups spread over the workers)."""
    n = max(1, min(parts, len(names)))
    return [list(names[k::n]) for k in range(n) if names[k::n]]


# --------------------------------------------------------------------------- running


@dataclass(frozen=True)
class _Task:
    scenario: str
    seed: int
    controller: str
    patients: tuple[str, ...]
    config: TrialConfig


def _run_task(task: _Task) -> tuple[_Task, TrialResult]:
    """One trial in a worker (it builds its controller, and closes a peer's processes)."""
    import warnings

    from forecast.sim.errors import PhysiologyWarning

    with warnings.catch_warnings():  # flagged per patient in the result (sim_out_of_range)
        warnings.simplefilter("ignore", PhysiologyWarning)
        return task, run_trial(task.config)


def merge_results(parts: Sequence[TrialResult], order: Sequence[str]) -> TrialResult:
    """Trials of disjoint patient subsets (same settings otherwise) as one trial, patients in
    `order`. Wall time and decision time are the sums (the work, not the elapsed time)."""
    if not parts:
        raise ArenaError("nothing to merge")
    where = {n: (k, i) for k, r in enumerate(parts) for i, n in enumerate(r.names)}
    missing = [n for n in order if n not in where]
    if missing or len(where) != len(order):
        raise ArenaError(f"the parts do not hold exactly the patients {list(order)}: {missing}")
    t = [len(r.times) for r in parts]
    if len(set(t)) != 1:
        raise ArenaError(f"parts of different lengths ({t} cycles) cannot be merged")
    pick = [where[n] for n in order]
    first = parts[0]
    log = {key: np.stack([parts[k].log[key][i] for k, i in pick]) for key in first.log}
    info = dict(first.info)
    info["controller_faults"] = [f for r in parts for f in r.info.get("controller_faults", [])]
    return TrialResult(
        config=replace(first.config, patients=",".join(order)),
        names=list(order),
        settings=[parts[k].settings[i] for k, i in pick],
        times=first.times,
        log=log,
        veto_kinds=[parts[k].veto_kinds[i] for k, i in pick],
        cap_rate=np.array([parts[k].cap_rate[i] for k, i in pick]),
        wall_s=float(sum(r.wall_s for r in parts)),
        decision_s=np.sum([r.decision_s for r in parts], axis=0),
        forecaster_calls=int(sum(max(r.forecaster_calls, 0) for r in parts)),
        info=info,
        out_of_range=np.array(
            [
                bool(parts[k].out_of_range[i]) if len(parts[k].out_of_range) else False
                for k, i in pick
            ]
        ),  # fmt: skip
    )


@dataclass
class ArenaResult:
    """Every trial of the arena, merged per (scenario, seed, controller)."""

    config: ArenaConfig
    trials: dict[tuple[str, int, str], TrialResult]
    wall_s: float
    per_patient: pd.DataFrame = field(default_factory=pd.DataFrame)

    def __post_init__(self) -> None:
        if self.per_patient.empty and self.trials:
            self.per_patient = self._patients()

    def _patients(self) -> pd.DataFrame:
        rows = []
        for (scenario, seed, controller), r in self.trials.items():
            for name, m in r.patient_metrics().items():
                rows.append({"scenario": scenario, "seed": seed, "controller": controller,
                             "patient": name, "group": group_of(name), **m})  # fmt: skip
        return pd.DataFrame(rows)

    def table(self) -> pd.DataFrame:
        """One row per scenario × controller × age group: the means over patients and seeds
        of `TABLE_METRICS`, how many patient-runs had any true glucose < 54 mg/dL, the
        controller's fallbacks and how often the supervisor changed its command."""
        p = self.per_patient
        rows = []
        for scenario in self.config.scenarios:
            for controller in self.config.controllers:
                sel = p[(p.scenario == scenario) & (p.controller == controller)]
                for group in GROUPS:
                    g = sel if group == "all" else sel[sel.group == group]
                    if g.empty:
                        continue
                    row: dict[str, Any] = {"scenario": scenario, "controller": controller,
                                           "group": group, "runs": len(g)}  # fmt: skip
                    for key, col in TABLE_METRICS:
                        row[col] = float(np.nanmean(g[key])) if g[key].notna().any() else math.nan
                    row["runs with true BG<54"] = int((g["bg_min"] < 54.0).sum())
                    row["fallbacks"] = int(g["controller_fallbacks"].sum())
                    decided = len(g) * self.cycles - g["controller_fallbacks"].sum()
                    row["supervisor changed %"] = (
                        100.0 * g["controller_interventions"].sum() / decided
                        if decided > 0
                        else math.nan
                    )
                    rows.append(row)
        return pd.DataFrame(rows)

    @property
    def cycles(self) -> int:
        return len(next(iter(self.trials.values())).times) if self.trials else 0

    def cvga(self, scenario: str, controller: str) -> pd.DataFrame:
        """The CVGA table (min/max true BG per patient-run, 2.5th/97.5th percentiles)."""
        from forecast.glycemia import cvga

        bg = {}
        for (s, seed, c), r in self.trials.items():
            if s == scenario and c == controller:
                for i, n in enumerate(r.names):
                    bg[f"{n} s{seed}"] = np.clip(r.log["bg"][i], GLUCOSE_MIN_MGDL, None)
        return cvga(bg, percentiles=(2.5, 97.5))

    def run_info(self) -> dict[str, Any]:
        peers = {}
        for (_, _, c), r in self.trials.items():
            if "peer_settings" in r.info:
                peers[c] = r.info["peer_settings"]
        return {
            **{k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self.config).items()},
            "scenario_settings": SCENARIOS,
            "wall_s": self.wall_s,
            "trial_work_s": float(sum(r.wall_s for r in self.trials.values())),
            "cycles": self.cycles,
            "peer_settings": peers,
            "variability": {
                s: self.config.trial_config(s, 0, "basal-bolus", "adult#001")
                .variability_config()
                .describe()
                for s in self.config.scenarios
            },
        }

    def to_json(self) -> dict[str, Any]:
        return {
            "run": _clean(self.run_info()),
            "table": [_clean(r) for r in self.table().to_dict("records")],
            "patients": [_clean(r) for r in self.per_patient.to_dict("records")],
        }


def run_arena(
    config: ArenaConfig,
    *,
    progress: Callable[[str], None] | None = None,
) -> ArenaResult:
    """Run every (scenario, seed, controller) trial, the patients split over `workers`
    processes; `progress(line)` hears of each finished part."""
    say = progress or (lambda line: print(line, file=sys.stderr, flush=True))
    names = patient_names(config.patients)
    subsets = split_patients(names, config.workers)
    tasks = [
        _Task(s, seed, c, tuple(sub), config.trial_config(s, seed, c, ",".join(sub)))
        for s in config.scenarios
        for seed in config.seeds
        for c in config.controllers
        for sub in subsets
    ]
    t0 = time.perf_counter()
    done: dict[tuple[str, int, str], list[TrialResult]] = {}

    def finished(k: int, task: _Task, r: TrialResult) -> None:
        done.setdefault((task.scenario, task.seed, task.controller), []).append(r)
        say(f"arena: {k}/{len(tasks)} {task.scenario} seed {task.seed} {task.controller} "
            f"({len(task.patients)} patients): {r.wall_s:.0f} s, elapsed "
            f"{time.perf_counter() - t0:.0f} s")  # fmt: skip

    if config.workers == 1 or len(tasks) == 1:
        for k, task in enumerate(tasks, 1):
            finished(k, *_run_task(task))
    else:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor, as_completed

        # spawned workers: no inherited threads or locks (onnxruntime, the peers' readers)
        with ProcessPoolExecutor(config.workers, mp_context=mp.get_context("spawn")) as pool:
            futures = [pool.submit(_run_task, task) for task in tasks]
            for k, fut in enumerate(as_completed(futures), 1):
                finished(k, *fut.result())
    trials = {key: merge_results(parts, names) for key, parts in done.items()}
    ordered = {
        (s, seed, c): trials[(s, seed, c)]
        for s in config.scenarios
        for seed in config.seeds
        for c in config.controllers
    }
    return ArenaResult(config, ordered, time.perf_counter() - t0)


# --------------------------------------------------------------------------- outputs


def table_markdown(table: pd.DataFrame, *, groups: Sequence[str] = GROUPS) -> str:
    """The arena table as Markdown (for the README)."""
    t = table[table.group.isin(list(groups))]
    cols = [c for c in t.columns if c != "runs"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, row in t.iterrows():
        cells = []
        for c in cols:
            v = row[c]
            if isinstance(v, float | np.floating):
                cells.append("–" if not math.isfinite(float(v)) else f"{float(v):.1f}"
                             if c not in ("LBGI", "HBGI") else f"{float(v):.2f}")  # fmt: skip
            else:
                cells.append(str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(result: ArenaResult, out_dir: str | Path) -> Path:
    """index.html (the table, the cohort CVGA of each scenario × controller, per-patient
    outcomes), arena.json, table.csv, patients.csv in `out_dir`. Returns the index path."""
    import json

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from forecast.htmlreport import HtmlReport
    from forecast.plots import cvga_plot

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = result.to_json()
    (out / "arena.json").write_text(json.dumps(data, indent=1) + "\n")
    table = result.table()
    table.to_csv(out / "table.csv", index=False)
    result.per_patient.to_csv(out / "patients.csv", index=False)
    cfg = result.config
    rep = HtmlReport(
        "glucast arena",
        subtitle=f"{len(patient_names(cfg.patients))} patients · {cfg.days:g} days · seeds "
        f"{', '.join(map(str, cfg.seeds))} · sensor {cfg.sensor} · "
        f"{', '.join(cfg.controllers)}",
    )
    rep.add_text(
        "Every controller ran the same virtual patients with the same meals, announcements, "
        "sensor noise and pump, per seed; every dose went through glucast's safety supervisor. "
        "Scenarios: announced = meals announced with a 20 % carb-count error; unannounced = "
        "meals never announced; variability = announced, with circadian and day-to-day insulin "
        "sensitivity and per-meal absorption variation (forecast/sim/variability.py). "
        "Outcomes on CGM and on true plasma glucose ('true'); means over patients and seeds; "
        "'runs with true BG<54' counts patient-runs whose true glucose went below 54 mg/dL; "
        "'supervisor changed %' is the share of the controller's decided cycles whose command "
        "the supervisor changed; 'fallbacks' counts cycles the controller failed (scheduled "
        "basal instead)."
    )
    for scenario in cfg.scenarios:
        rep.add_heading(f"Scenario: {scenario}")
        sub = table[table.scenario == scenario].drop(columns=["scenario"])
        rep.add_table(sub, float_format="{:.2f}", index=False)
        n = len(cfg.controllers)
        fig, axes = plt.subplots(1, n, figsize=(3.6 * n, 3.6), squeeze=False)
        for ax, controller in zip(axes[0], cfg.controllers):
            cvga_plot(result.cvga(scenario, controller), title=controller, ax=ax,
                      label_points=False)  # fmt: skip
        fig.tight_layout()
        rep.add_figure(fig, caption=f"Cohort CVGA (true BG, 2.5th/97.5th percentiles), {scenario}")
        fig.savefig(out / f"cvga_{scenario}.png", dpi=100, bbox_inches="tight")
        plt.close(fig)
    rep.add_heading("Per-patient outcomes")
    p = result.per_patient
    wide = p.pivot_table(
        index=["scenario", "patient"], columns="controller", values=["bg_tir", "bg_tbr54"],
        aggfunc="mean",
    )  # fmt: skip
    wide.columns = [f"{m} {c}" for m, c in wide.columns]
    wide = wide.reset_index()
    rep.add_table(wide.round(2), caption="True-glucose TIR and TBR<54 (%), mean over seeds",
                  max_rows=None, index=False)  # fmt: skip
    rep.add_heading("Run")
    rep.add_json(data["run"])
    return rep.write(out / "index.html")


def log_mlflow(result: ArenaResult, experiment: str, report: Path | None = None) -> dict[str, str]:
    """One MLflow run: the arena's settings as params, every table cell as a metric
    (``<scenario>.<controller>.<group>.<column>``), the report folder as artifacts."""
    from training import tracking  # the lab's MLflow helpers; the runtime never imports them

    cfg = result.config
    tags = tracking.lineage_tags(cfg.model_dir) if cfg.model_dir else {}
    desc = (
        f"glucast arena: {', '.join(cfg.controllers)} on {cfg.patients} for {cfg.days:g} days, "
        f"seeds {list(cfg.seeds)}, scenarios {', '.join(cfg.scenarios)}."
    )
    started = time.time() - result.wall_s
    with tracking.run(experiment, run_name="arena", tags=tags, kind="arena", description=desc,
                      started_s=started) as active:  # fmt: skip
        info = result.run_info()
        tracking.log_params(
            {k: v for k, v in info.items() if isinstance(v, str | int | float | bool | list)}
        )
        metrics: dict[str, float] = {}
        for row in result.table().to_dict("records"):
            key = f"{row['scenario']}.{row['controller']}.{row['group']}"
            for col, v in row.items():
                if col in ("scenario", "controller", "group"):
                    continue
                metrics[f"{key}.{METRIC_NAMES.get(col, col)}"] = v
        tracking.log_metrics(metrics)
        if report is not None:
            tracking.log_artifact(Path(report).parent, "arena_report")
        return tracking._run_ref(active)


def _clean(d: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, float | np.floating) and not math.isfinite(float(v)):
            out[k] = None
        elif isinstance(v, np.floating | np.integer | np.bool_):
            out[k] = v.item()
        else:
            out[k] = v
    return out


__all__ = [
    "ARENA_CONTROLLERS",
    "SCENARIOS",
    "ArenaConfig",
    "ArenaError",
    "ArenaResult",
    "log_mlflow",
    "merge_results",
    "run_arena",
    "split_patients",
    "table_markdown",
    "write_report",
]
