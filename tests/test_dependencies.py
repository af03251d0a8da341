"""The dependency rule, checked on the import graph (every import, including those inside
functions), not only by importing:

* `forecast` imports neither `training` nor `serving`;
* the runtime — `serving/` without the lab (`serving/insilico/`) and the command line
  (`serving/commands/`, the shells that wire the two) — never reaches torch, lightning,
  mlflow, onnx (the package; onnxruntime is the runtime's), `training` or the lab, directly
  or through any module it imports;
* inside the runtime no arrow runs back up the layers below (a controller never imports
  the supervisor that judges it, the safety rules never import the journal, ...).
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("forecast", "training", "serving")
HEAVY = {"torch", "lightning", "pytorch_lightning", "mlflow", "onnx"}

# Lowest first. A runtime module may import its own layer or those below, never above.
LAYERS: list[tuple[str, ...]] = [
    ("serving", "serving.types"),
    ("serving.hal", "serving.predictor"),
    ("serving.safety.cgm", "serving.safety.rules"),  # pure rules: a controller may read limits
    ("serving.controllers", "serving.modes", "serving.alerts", "serving.journal"),
    ("serving.safety.supervisor", "serving.safety"),  # the one road to the pump
    ("serving.engine",),
    ("serving.loop",),
]


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


@cache
def modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for p in (ROOT / pkg).rglob("*.py"):
            out[module_name(p)] = p
    return out


@cache
def imports_of(name: str) -> frozenset[str]:
    """Absolute names every import statement of the module names (any depth)."""
    path = modules()[name]
    tree = ast.parse(path.read_text(), filename=str(path))
    is_pkg = path.name == "__init__.py"
    base = name.split(".") if is_pkg else name.split(".")[:-1]
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                stem = base[: len(base) - node.level + 1]
                mod = ".".join(stem + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.add(mod)
            for a in node.names:  # `from pkg import submodule`
                if f"{mod}.{a.name}" in modules():
                    out.add(f"{mod}.{a.name}")
    return frozenset(out)


def local(target: str) -> str | None:
    """The repository module an import name lands in (a package's __init__ counts)."""
    parts = target.split(".")
    while parts:
        cand = ".".join(parts)
        if cand in modules():
            return cand
        parts.pop()
    return None


def is_runtime(name: str) -> bool:
    return name.startswith("serving") and not name.startswith(
        ("serving.insilico", "serving.commands")
    )


def reach(start: str) -> dict[str, str]:
    """Every import name reachable from `start` through repository modules → the module
    that imports it (for the error message)."""
    seen: dict[str, str] = {}
    todo = [start]
    visited = set()
    while todo:
        m = todo.pop()
        if m in visited:
            continue
        visited.add(m)
        for target in imports_of(m):
            seen.setdefault(target, m)
            loc = local(target)
            if loc is not None and loc not in visited:
                todo.append(loc)
            parent = loc.rsplit(".", 1)[0] if loc and "." in loc else None
            if parent in modules() and parent not in visited:  # importing a.b runs a/__init__
                todo.append(parent)
    return seen


def test_the_graph_is_found():
    assert "serving.loop" in modules() and "forecast.windows" in modules()
    assert "serving.engine" in imports_of("serving.loop")
    assert any(t.startswith("serving.insilico") for t in imports_of("serving.commands.loop"))


RUNTIME = sorted(m for m in modules() if is_runtime(m))


@pytest.mark.parametrize("name", RUNTIME)
def test_the_runtime_reaches_no_lab_no_training_no_heavy_package(name):
    bad = {
        t: via
        for t, via in reach(name).items()
        if t.split(".")[0] in HEAVY
        or t.split(".")[0] == "training"
        or t.startswith("serving.insilico")
        or t.startswith("serving.commands")
    }
    assert not bad, f"{name} reaches {bad} (target: importing module)"


@pytest.mark.parametrize("name", sorted(m for m in modules() if m.startswith("forecast")))
def test_forecast_imports_neither_training_nor_serving(name):
    bad = [t for t in imports_of(name) if t.split(".")[0] in ("training", "serving")]
    assert not bad, f"{name} imports {bad}"


def layer(name: str) -> int | None:
    best, depth = None, -1
    for i, group in enumerate(LAYERS):
        for prefix in group:
            nested = prefix != "serving" and name.startswith(prefix + ".")  # the package alone
            if (name == prefix or nested) and len(prefix) > depth:
                best, depth = i, len(prefix)
    return best


@pytest.mark.parametrize("name", RUNTIME)
def test_no_import_runs_back_up_inside_the_runtime(name):
    mine = layer(name)
    assert mine is not None, f"{name} has no layer: add it to LAYERS"
    up = [
        t
        for t in imports_of(name)
        if (loc := local(t)) and is_runtime(loc) and (layer(loc) or 0) > mine
    ]
    assert not up, f"{name} (layer {mine}) imports {up} from a layer above it"


def test_the_rule_catches_a_violation(tmp_path, monkeypatch):
    """The checker itself: a runtime module importing the lab inside a function is caught."""
    imports_of.cache_clear()
    modules.cache_clear()
    fake = ROOT / "serving" / "controllers" / "_probe_violation.py"
    fake.write_text("def f():\n    from serving.insilico.trial import run_trial\n")
    try:
        bad = [t for t in reach("serving.controllers._probe_violation") if "insilico" in t]
        assert bad
    finally:
        fake.unlink()
        imports_of.cache_clear()
        modules.cache_clear()
