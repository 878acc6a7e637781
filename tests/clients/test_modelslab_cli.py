"""The official CLI (`modelslab-cli` from PyPI, a Go binary), unchanged, against `darkroom up`.

It submits to `/api/v7/images/image-to-image`, polls `/api/v7/images/fetch/{id}` and downloads
what `output` links to. Its update check is switched off (flag and variable): the test sends
nothing beyond loopback.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from tests.support.servers import ImageServer
from tests.support.system import RunningSystem

pytestmark = pytest.mark.slow


def cli_binary() -> Path:
    """The Go binary the wheel ships (the `modelslab` script only execs it)."""
    spec = importlib.util.find_spec("modelslab_cli")
    assert spec is not None, "modelslab-cli is not installed (it is in the dev extra)"
    assert spec.origin is not None
    binary = Path(spec.origin).parent / "bin" / "modelslab"
    assert binary.is_file(), f"modelslab-cli ships no binary at {binary}"
    return binary


def modelslab(system: RunningSystem, key: str, home: Path, *args: str) -> Any:
    """Run the CLI with JSON output; its last JSON document."""
    env = {"HOME": str(home), "MODELSLAB_NO_UPDATE_CHECK": "1", "PATH": "/usr/bin:/bin"}
    command = [str(cli_binary()), "--no-update-check", "--no-color", "--base-url"]
    done = subprocess.run(
        [*command, system.base_url, "--api-key", key, "-o", "json", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert done.returncode == 0, (done.stdout, done.stderr, system.log_tail())
    start = done.stdout.index("{")
    return json.JSONDecoder().raw_decode(done.stdout[start:])[0]


def saved_pngs(folder: Path) -> list[tuple[Path, Image.Image]]:
    """The files the CLI saved, each opened as a PNG."""
    saved: list[tuple[Path, Image.Image]] = [(p, Image.open(p)) for p in sorted(folder.iterdir())]
    assert all(image.format == "PNG" for _, image in saved)
    return saved


def test_generate_image_to_image_submits_polls_and_downloads(
    system: RunningSystem, image_server: ImageServer, tmp_path: Path
) -> None:
    key = system.create_key()["key"]
    out = tmp_path / "generated"

    done = modelslab(
        system,
        key,
        tmp_path,
        *("generate", "image-to-image", "--init-image", image_server.url("/red.png")),
        *("--prompt", "a red square", "--model", "tiny-sd", "--strength", "0.5"),
        *("--output-dir", str(out), "--timeout", "3m"),
    )

    assert done["status"] == "success", done
    assert done["meta"]["prompt"] == "a red square"
    assert done["meta"]["strength"] == 0.5
    [(path, image)] = saved_pngs(out)
    assert image.size == (64, 64)  # the init image's size
    [link] = done["output"]
    assert path.read_bytes() == httpx.get(link, timeout=10).content

    # `generate fetch` reads the same job again by its id, and downloads it again.
    again = tmp_path / "again"
    job_id = done["id"]
    fetched = modelslab(
        system, key, tmp_path, "generate", "fetch", "--id", str(job_id), "--output-dir", str(again)
    )
    assert fetched["status"] == "success"
    assert fetched["id"] == job_id
    assert [png.size for _, png in saved_pngs(again)] == [(64, 64)]
