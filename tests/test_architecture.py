"""Rules of the architecture that a refactor could silently break."""

from __future__ import annotations

import subprocess
import sys

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
