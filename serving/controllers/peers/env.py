"""The peers' own environments: created, pinned and checked by glucast.

Layout under the peers directory (``$GLUCAST_PEERS_DIR``, default ``~/.cache/glucast/peers``)::

    oref0/package.json              {"dependencies": {"oref0": "0.7.1"}}
    oref0/node_modules/oref0/       OpenAPS oref0 0.7.1 from the npm registry (MIT)
    loop/venv/                      a venv with opsb-pyloopkit==0.1.0 (BSD-2-Clause) and numpy 1.26.4
    <peer>/glucast-peer.json        what was installed, when, with which tools

oref0 is installed with ``--ignore-scripts``: neither it nor any of its dependencies has an
install script (checked for 0.7.1), and oref0's own ``global-install`` script would run sudo.
pyloopkit needs numpy < 2 (its only dependency), which is why it lives in a venv of its own.

`glucast peers install` creates them (npm and the package index must be reachable);
`glucast peers check` verifies them. The controllers call `require_oref0` / `require_loop`,
which raise `PeerEnvironmentError` with the command to run when a peer is absent.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from serving.controllers.peers.process import PeerEnvironmentError

OREF0_VERSION = "0.7.1"
PYLOOPKIT_VERSION = "0.1.0"
LOOP_PINS = (f"opsb-pyloopkit=={PYLOOPKIT_VERSION}", "numpy==1.26.4")  # numpy: pyloopkit's <2
PEERS = ("oref0", "loop")
MIN_NODE_MAJOR = 12
MARKER = "glucast-peer.json"
HERE = Path(__file__).resolve().parent
OREF0_DRIVER = HERE / "oref0_driver.js"
LOOP_DRIVER = HERE / "loop_driver.py"


def peers_dir() -> Path:
    """Where the peers' environments live (``$GLUCAST_PEERS_DIR`` or ~/.cache/glucast/peers)."""
    d = os.environ.get("GLUCAST_PEERS_DIR")
    return Path(d).expanduser() if d else Path.home() / ".cache" / "glucast" / "peers"


@dataclass
class PeerStatus:
    """What `check` found for one peer."""

    peer: str
    ok: bool
    path: str
    version: str = ""
    detail: str = ""
    runtime: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def _install_hint(peer: str) -> str:
    env = os.environ.get("GLUCAST_PEERS_DIR")
    prefix = f"GLUCAST_PEERS_DIR={env} " if env else ""
    return f"create it with `{prefix}glucast peers install {peer}`"


# --------------------------------------------------------------------------- oref0


def oref0_module_dir(root: Path | None = None) -> Path:
    return (root or peers_dir()) / "oref0" / "node_modules" / "oref0"


def node_executable() -> str | None:
    return shutil.which("node")


def require_oref0(root: Path | None = None) -> tuple[str, Path]:
    """(node executable, oref0 module dir) of a present, pinned oref0; else a clear error."""
    node = node_executable()
    mod = oref0_module_dir(root)
    if node is None:
        raise PeerEnvironmentError(
            f"oref0 needs Node.js (>= {MIN_NODE_MAJOR}) on PATH and none was found; install "
            "it (e.g. `apt-get install nodejs npm`), then `glucast peers install oref0`",
            peer="oref0",
        )
    pkg = mod / "package.json"
    if not pkg.is_file():
        raise PeerEnvironmentError(
            f"oref0 is not installed at {mod}; {_install_hint('oref0')}", peer="oref0"
        )
    version = json.loads(pkg.read_text()).get("version")
    if version != OREF0_VERSION:
        raise PeerEnvironmentError(
            f"{pkg}: oref0 version {version!r}, glucast pins {OREF0_VERSION}; "
            f"{_install_hint('oref0')} (it reinstalls the pinned version)",
            peer="oref0",
        )
    return node, mod


def _install_oref0(root: Path, log: Callable[[str], None]) -> None:
    npm = shutil.which("npm")
    if npm is None or node_executable() is None:
        raise PeerEnvironmentError(
            "installing oref0 needs Node.js and npm on PATH (e.g. `apt-get install nodejs npm`)",
            peer="oref0",
        )
    major = _node_major()
    if major is not None and major < MIN_NODE_MAJOR:
        raise PeerEnvironmentError(
            f"node {major} is too old for oref0 {OREF0_VERSION}; need >= {MIN_NODE_MAJOR}",
            peer="oref0",
        )
    d = root / "oref0"
    d.mkdir(parents=True, exist_ok=True)
    (d / "package.json").write_text(
        json.dumps(
            {
                "name": "glucast-peer-oref0",
                "private": True,
                "description": "OpenAPS oref0 for glucast's peer controller (created by glucast)",
                "dependencies": {"oref0": OREF0_VERSION},
            },
            indent=2,
        )
        + "\n"
    )
    cmd = [npm, "install", "--ignore-scripts", "--no-audit", "--no-fund", "--save-exact"]
    cmd.append(f"oref0@{OREF0_VERSION}")
    _run(cmd, d, log)


def _node_major() -> int | None:
    node = node_executable()
    if node is None:
        return None
    try:
        v = subprocess.run([node, "--version"], capture_output=True, text=True, timeout=30)
        return int(v.stdout.strip().lstrip("v").split(".")[0])
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return None


# --------------------------------------------------------------------------- loop


def loop_python(root: Path | None = None) -> Path:
    venv = (root or peers_dir()) / "loop" / "venv"
    return venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def require_loop(root: Path | None = None) -> Path:
    """The peer venv's python with pyloopkit pinned; else a clear error. (Cheap: the marker
    file only; `check` imports it for real.)"""
    py = loop_python(root)
    marker = (root or peers_dir()) / "loop" / MARKER
    if not py.exists() or not marker.is_file():
        raise PeerEnvironmentError(
            f"the Loop (pyloopkit) venv is not installed at {py.parent.parent}; "
            f"{_install_hint('loop')}",
            peer="loop",
        )
    pins = json.loads(marker.read_text()).get("pins")
    if pins != list(LOOP_PINS):
        raise PeerEnvironmentError(
            f"{marker}: installed pins {pins}, glucast pins {list(LOOP_PINS)}; "
            f"{_install_hint('loop')} (it reinstalls the pinned versions)",
            peer="loop",
        )
    return py


def _install_loop(root: Path, log: Callable[[str], None]) -> None:
    venv = root / "loop" / "venv"
    if venv.exists():
        shutil.rmtree(venv)
    venv.parent.mkdir(parents=True, exist_ok=True)
    base = getattr(sys, "_base_executable", None) or sys.executable
    _run([base, "-m", "venv", str(venv)], venv.parent, log)
    py = loop_python(root)
    # PIP_CONSTRAINT of glucast's own environment must not leak into the peer's
    env = {k: v for k, v in os.environ.items() if k not in ("PIP_CONSTRAINT", "PYTHONPATH")}
    _run(
        [str(py), "-m", "pip", "install", "--disable-pip-version-check", "-q", *LOOP_PINS],
        venv.parent,
        log,
        env=env,
    )


# --------------------------------------------------------------------------- both


def _run(
    cmd: Sequence[str], cwd: Path, log: Callable[[str], None], env: dict | None = None
) -> None:
    log("$ " + " ".join(cmd))
    r = subprocess.run(list(cmd), cwd=cwd, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        tail = (r.stderr or r.stdout).strip().splitlines()[-15:]
        raise PeerEnvironmentError(
            f"`{' '.join(cmd)}` failed (exit {r.returncode}) in {cwd}:\n" + "\n".join(tail)
        )


def install(
    peers: Sequence[str] = PEERS, *, root: Path | None = None, log: Callable[[str], None] = print
) -> list[PeerStatus]:
    """Create (or re-create) the peers' environments, then `check` them."""
    root = root or peers_dir()
    for p in peers:
        if p not in PEERS:
            raise PeerEnvironmentError(f"unknown peer {p!r}; choose from {PEERS}")
    for p in peers:
        t0 = time.perf_counter()
        log(f"installing {p} into {root / p}")
        (root / p / MARKER).unlink(missing_ok=True)
        if p == "oref0":
            _install_oref0(root, log)
            pins = [f"oref0@{OREF0_VERSION}"]
        else:
            _install_loop(root, log)
            pins = list(LOOP_PINS)
        took = time.perf_counter() - t0
        (root / p / MARKER).write_text(
            json.dumps(
                {
                    "peer": p,
                    "pins": pins,
                    "installed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "seconds": round(took, 1),
                },  # fmt: skip
                indent=2,
            )
            + "\n"
        )
        log(f"installed {p} in {took:.1f} s")
    return check(peers, root=root)


def check(peers: Sequence[str] = PEERS, *, root: Path | None = None) -> list[PeerStatus]:
    """Verify each peer for real: start its driver and read the version it reports."""
    from serving.controllers.peers.process import PeerError, PeerProcess, child_env

    root = root or peers_dir()
    out = []
    for p in peers:
        try:
            if p == "oref0":
                node, mod = require_oref0(root)
                argv = [node, str(OREF0_DRIVER), str(mod)]
                path = mod
            elif p == "loop":
                py = require_loop(root)
                argv = [str(py), "-I", str(LOOP_DRIVER)]
                path = py.parent.parent
            else:
                raise PeerEnvironmentError(f"unknown peer {p!r}; choose from {PEERS}")
            with PeerProcess(p, argv, env=child_env(), timeout_s=30) as proc:
                proc.start()
                info = dict(proc.info)
            want = OREF0_VERSION if p == "oref0" else PYLOOPKIT_VERSION
            ok = info.get("version") == want and (p != "loop" or info.get("numpy") == "1.26.4")
            detail = "" if ok else f"driver reports {info}, pinned {want}"
            runtime = {k: str(v) for k, v in info.items() if k not in ("ready", "peer", "version")}
            out.append(PeerStatus(p, ok, str(path), str(info.get("version")), detail, runtime))
        except PeerError as e:
            out.append(PeerStatus(p, False, str(root / p), detail=str(e)))
    return out
