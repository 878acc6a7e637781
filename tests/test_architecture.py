"""Rules of the architecture that a refactor could silently break."""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

HEAVY = ("torch", "diffusers", "transformers")


def modules_loaded_by(code: str) -> set[str]:
    """The top-level module names a fresh interpreter has loaded after running `code`."""
    probe = (
        f"{code}\nimport sys\nprint('\\n'.join(sorted({{m.split('.')[0] for m in sys.modules}})))"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=120
    )
    return set(done.stdout.split())


def test_the_api_process_never_imports_torch() -> None:
    loaded = modules_loaded_by("from api.app import create_app\ncreate_app()\nimport cli.main")
    assert "fastapi" in loaded  # the probe did load the app
    assert not loaded.intersection(HEAVY)


def test_the_dispatcher_never_imports_torch() -> None:
    loaded = modules_loaded_by("import worker.dispatcher_app\nimport worker.sweeper")
    assert "celery" in loaded
    assert not loaded.intersection(HEAVY)


# --- layers -------------------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parent.parent

#: Each layer and the layers its modules may import (docs/ARCHITECTURE.md). `darkroom` is the
#: shared kernel, `db` the rows and their queries, `services` the domain operations, `api` and
#: `worker` the tiers (shells over services, never each other), `cli` the entry point on top.
MAY_IMPORT: dict[str, set[str]] = {
    "darkroom": {"darkroom"},
    "db": {"darkroom", "db"},
    "services": {"darkroom", "db", "services"},
    "api": {"darkroom", "db", "services", "api"},
    "worker": {"darkroom", "db", "services", "worker"},
    "cli": {"darkroom", "db", "services", "api", "worker", "cli"},
    "migrations": {"darkroom", "db", "migrations"},
}


def project_imports(path: Path) -> Iterator[tuple[int, str]]:
    """(line, top-level package) of each import of a project package in `path`, function-level
    imports included: a lazy import crosses a layer all the same."""
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        for name in names:
            top = name.split(".")[0]
            if top in MAY_IMPORT:
                yield node.lineno, top


def layer_violations() -> list[str]:
    """`file:line imports layer` for every import that reaches above the file's layer."""
    found = []
    for layer, allowed in MAY_IMPORT.items():
        for path in sorted((ROOT / layer).rglob("*.py")):
            for line, imported in project_imports(path):
                if imported not in allowed:
                    found.append(f"{path.relative_to(ROOT)}:{line} imports {imported}")
    return found


def test_no_module_imports_a_higher_layer() -> None:
    assert layer_violations() == []


def test_the_layer_check_sees_a_violation(tmp_path: Path) -> None:
    """The rule above can fail: a kernel module importing the database layer is reported."""
    module = tmp_path / "bad.py"
    module.write_text("def f() -> None:\n    from db.models import Job\n")
    assert list(project_imports(module)) == [(2, "db")]
    assert "db" not in MAY_IMPORT["darkroom"]


def test_repositories_hold_queries_only() -> None:
    """SQL is built only in db/: no other layer imports SQLAlchemy's statement builders."""
    builders = {"select", "update", "delete", "insert", "text", "func", "and_", "or_"}
    found = []
    for layer in ("darkroom", "services", "api", "worker", "cli"):
        for path in sorted((ROOT / layer).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
                    "sqlalchemy"
                ):
                    used = builders.intersection(alias.name for alias in node.names)
                    if used:
                        found.append(f"{path.relative_to(ROOT)}:{node.lineno} {sorted(used)}")
    assert found == []


def test_module_names_that_meant_two_things_mean_one() -> None:
    """`registry`, `prompts`, `schedulers`, `affinity` and `admin` each named two modules that
    did different things; each name now belongs to one module at most."""
    names = {"registry", "prompts", "schedulers", "affinity", "admin"}
    seen: dict[str, list[str]] = {}
    for layer in MAY_IMPORT:
        for path in (ROOT / layer).rglob("*.py"):
            if path.stem in names:
                seen.setdefault(path.stem, []).append(str(path.relative_to(ROOT)))
    assert {name: paths for name, paths in seen.items() if len(paths) > 1} == {}
