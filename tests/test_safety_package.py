"""serving.safety's layering: cgm ← rules ← supervisor, and none of them imports the journal.

The supervisor is handed its journal; what it calls on it is `SupervisorJournal`, which the
real `serving.journal.Journal` must keep satisfying.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from serving.journal import Journal
from serving.safety import SupervisorJournal

ROOT = Path(__file__).resolve().parents[1]

PROBE = r"""
import json, sys
import serving.safety
print(json.dumps(sorted(k for k in sys.modules if k.split(".")[0] == "serving")))
"""

# what each file may import from serving at run time (its docstring says so); anything else
# is an import arrow running the wrong way (the journal, the loop, a controller, the lab)
ALLOWED = {
    "cgm.py": {"serving.types"},
    "rules.py": {"serving.types", "serving.hal.pump", "serving.safety.cgm"},
    "supervisor.py": {"serving.types", "serving.hal.pump", "serving.safety.rules"},
    "__init__.py": {"serving.safety.cgm", "serving.safety.rules", "serving.safety.supervisor"},
}


def _runtime_imports(path: Path) -> set[str]:
    """Modules a file imports, except under `if TYPE_CHECKING:` (annotations only)."""
    tree = ast.parse(path.read_text(), str(path))
    skip = {
        id(n)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING"
        for stmt in node.body
        for n in ast.walk(stmt)
    }
    out: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return out


@pytest.mark.parametrize("name", sorted(ALLOWED))
def test_each_safety_file_imports_only_what_its_docstring_allows(name):
    used = {
        m for m in _runtime_imports(ROOT / "serving" / "safety" / name) if m.startswith("serving")
    }
    assert used <= ALLOWED[name], f"serving/safety/{name} imports {sorted(used - ALLOWED[name])}"


def test_every_safety_file_is_checked():
    assert {p.name for p in (ROOT / "serving" / "safety").glob("*.py")} == set(ALLOWED)


def test_importing_safety_loads_no_journal_loop_or_controller():
    out = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr[-3000:]
    loaded = set(json.loads(out.stdout.strip().splitlines()[-1]))
    below = ("serving.safety", "serving.hal")  # hal's package brings its protocol modules
    outside = {m for m in loaded if not m.startswith(below)} - {"serving", "serving.types"}
    assert outside == set(), f"import serving.safety loaded {sorted(outside)}"


def test_the_real_journal_is_what_the_supervisor_calls(tmp_path):
    with Journal(tmp_path / "j.db") as j:
        assert isinstance(j, SupervisorJournal)


def test_journal_error_is_one_class():
    from serving import journal, types

    assert journal.JournalError is types.JournalError
    assert issubclass(journal.JournalUnavailable, types.JournalError)
