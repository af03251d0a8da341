"""The 30 UVA/Padova S2008 virtual patients: parameters, initial state and therapy settings.

Parameters are shipped as data (``data/uva_padova_2008``, see its README for attribution) and
loaded into dense arrays once: the ODE kernel reads a ``[N, P]`` float64 matrix whose columns
are `PARAM_NAMES`, so there are no per-call look-ups by name (what makes simglucose slow).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd

from forecast.sim.errors import UnknownPatientError

# Columns of the parameter matrix, in the order the numba kernel indexes them (model.P_*).
PARAM_NAMES: tuple[str, ...] = (
    "BW", "kabs", "kmax", "kmin", "b", "d", "f", "Vg", "Vi", "Ib", "Vmx", "Km0", "k1", "k2",
    "p2u", "m1", "m2", "m4", "m30", "ki", "kp1", "kp2", "kp3", "ke1", "ke2", "Fsnc", "Vm0",
    "kd", "ksc", "ka1", "ka2", "u2ss",
)  # fmt: skip
STATE_NAMES: tuple[str, ...] = (
    "Qsto1", "Qsto2", "Qgut", "Gp", "Gt", "Ip", "X", "I1", "Id", "Il", "Isc1", "Isc2", "Gs",
)  # fmt: skip
N_STATES = 13
GROUPS: dict[str, str] = {"adolescents": "adolescent", "adults": "adult", "children": "child"}
DATA_ENV = "GLUCAST_DATA_DIR"


def data_dir() -> Path:
    """Folder holding the S2008 CSVs: ``$GLUCAST_DATA_DIR/uva_padova_2008`` or the repo copy."""
    return _data_dir(os.environ.get(DATA_ENV) or "")


@lru_cache(maxsize=8)
def _data_dir(env: str) -> Path:
    if env:
        return Path(env) / "uva_padova_2008"
    import forecast

    return Path(forecast.__file__).resolve().parents[1] / "data" / "uva_padova_2008"


def _read(name: str) -> pd.DataFrame:
    path = data_dir() / name
    if not path.exists():
        raise FileNotFoundError(
            f"UVA/Padova parameter file {path} not found; it ships in the repository's "
            f"data/uva_padova_2008 (or point {DATA_ENV} at a folder containing uva_padova_2008/)"
        )
    return pd.read_csv(path)


@lru_cache(maxsize=4)
def _tables(folder: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    vp = _read("vpatient_params.csv")
    quest = _read("Quest.csv")
    if list(vp["Name"]) != list(quest["Name"]):
        raise ValueError(f"{folder}: vpatient_params.csv and Quest.csv list different patients")
    return vp, quest


def all_names() -> list[str]:
    """The 30 patient names in file order (adolescent#001..#010, adult#..., child#...)."""
    vp, _ = _tables(str(data_dir()))
    return list(vp["Name"])


@dataclass(frozen=True, eq=False)
class Patients:
    """N virtual patients as arrays: one row each, in the order they were selected.

    ``ids`` is the patient's 0-based row in the parameter file; random streams are keyed on it,
    so a patient's meals and noise do not depend on which other patients share the cohort.
    """

    names: np.ndarray  # [N] str
    ids: np.ndarray  # [N] int64
    params: np.ndarray  # [N, P] float64, columns PARAM_NAMES
    x0: np.ndarray  # [N, 13] initial (basal steady) state
    cr: np.ndarray  # [N] carb ratio, g/U
    cf: np.ndarray  # [N] correction factor, mg/dL per U
    tdi: np.ndarray  # [N] total daily insulin, U/day
    age: np.ndarray  # [N] years

    def __len__(self) -> int:
        return len(self.names)

    def param(self, name: str) -> np.ndarray:
        """One parameter for every patient, [N]."""
        return self.params[:, PARAM_NAMES.index(name)]

    @property
    def bw(self) -> np.ndarray:
        return self.param("BW")

    @property
    def basal_u_per_min(self) -> np.ndarray:
        """The insulin rate that holds each patient at its basal steady state (u2ss·BW/6000)."""
        return self.param("u2ss") * self.bw / 6000.0

    @property
    def basal_u_per_h(self) -> np.ndarray:
        return self.basal_u_per_min * 60.0

    @property
    def vg(self) -> np.ndarray:
        return self.param("Vg")

    @property
    def bg0(self) -> np.ndarray:
        """Initial (basal) plasma glucose, mg/dL."""
        return self.x0[:, 3] / self.vg

    def subset(self, index: Sequence[int] | np.ndarray | slice | str) -> Patients:
        """A sub-cohort by positions, a boolean mask, a slice or a selection string."""
        if isinstance(index, str):
            wanted = load_patients(index).names
            pos = {n: i for i, n in enumerate(self.names)}
            missing = [n for n in wanted if n not in pos]
            if missing:
                raise UnknownPatientError(f"patients {missing} are not in this cohort")
            index = np.array([pos[n] for n in wanted])
        idx = np.arange(len(self))[index]
        return Patients(
            names=self.names[idx],
            ids=self.ids[idx],
            params=self.params[idx],
            x0=self.x0[idx],
            cr=self.cr[idx],
            cf=self.cf[idx],
            tdi=self.tdi[idx],
            age=self.age[idx],
        )

    def tile(self, n: int) -> Patients:
        """A cohort of n patients cycling through these ones (for trials and benchmarks).

        Copies beyond the first are named ``name~k`` (k = 1, 2, ...) and get their own random
        streams (ids offset by 1000·k), so they eat and read differently.
        """
        if n < 1:
            raise UnknownPatientError(f"tile needs n >= 1, got {n}")
        idx = np.arange(n) % len(self)
        rep = np.arange(n) // len(self)
        names = np.array(
            [nm if k == 0 else f"{nm}~{k}" for nm, k in zip(self.names[idx], rep, strict=True)],
            dtype=object,
        )
        out = self.subset(idx)
        return Patients(
            names=names, ids=out.ids + 1000 * rep, params=out.params, x0=out.x0, cr=out.cr,
            cf=out.cf, tdi=out.tdi, age=out.age,
        )  # fmt: skip

    def __repr__(self) -> str:
        shown = ", ".join(self.names[:4]) + (", ..." if len(self) > 4 else "")
        return f"Patients(N={len(self)}: {shown})"


def resolve_names(selection: str | Sequence[str] = "all") -> list[str]:
    """Turn "all" | "adults" | "adolescents" | "children" | "adult#001,child#002" into names.

    Group words may be mixed with names ("adults,child#001"); order is kept, names are
    case-insensitive, and a name given twice is an error (one row per subject in a frame).
    """
    names = all_names()
    if isinstance(selection, str):
        tokens = [t.strip() for t in selection.split(",") if t.strip()]
    else:
        tokens = [str(t).strip() for t in selection]
    if not tokens:
        raise UnknownPatientError("empty patient selection; use 'all', a group or names")
    lower = {n.lower(): n for n in names}
    out: list[str] = []
    for tok in tokens:
        t = tok.lower()
        if t == "all":
            out.extend(names)
        elif t in GROUPS:
            out.extend(n for n in names if n.startswith(GROUPS[t] + "#"))
        elif t in lower:
            out.append(lower[t])
        else:
            raise UnknownPatientError(
                f"unknown patient {tok!r}; expected 'all', 'adults', 'adolescents', 'children' "
                f"or names like 'adult#001' (adolescent#001..010, adult#001..010, child#001..010)"
            )
    dup = sorted({n for n in out if out.count(n) > 1})
    if dup:
        raise UnknownPatientError(f"patients selected more than once: {dup}")
    return out


def load_patients(selection: str | Sequence[str] = "all") -> Patients:
    """Load the selected virtual patients (see `resolve_names` for the selection syntax)."""
    vp, quest = _tables(str(data_dir()))
    wanted = resolve_names(selection)
    row = {n: i for i, n in enumerate(vp["Name"])}
    idx = np.array([row[n] for n in wanted], dtype=np.int64)
    sel = vp.iloc[idx]
    x0_cols = [c for c in vp.columns if c.replace(" ", "").startswith("x0_")]
    if len(x0_cols) != 13:
        raise ValueError(f"vpatient_params.csv has {len(x0_cols)} initial-state columns, not 13")
    q = quest.iloc[idx]
    return Patients(
        names=np.array(wanted, dtype=object),
        ids=idx,
        params=np.ascontiguousarray(sel[list(PARAM_NAMES)].to_numpy(np.float64)),
        x0=np.ascontiguousarray(sel[x0_cols].to_numpy(np.float64)),
        cr=q["CR"].to_numpy(np.float64),
        cf=q["CF"].to_numpy(np.float64),
        tdi=q["TDI"].to_numpy(np.float64),
        age=q["Age"].to_numpy(np.float64),
    )
