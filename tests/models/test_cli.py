"""`darkroom models add|list|inspect|remove`: the same code as load_model, from a terminal."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

from darkroom.settings import Settings
from tests.models.conftest import TinyFiles, models_folder
from tests.support.system import darkroom, settings_env


def test_models_add_list_inspect_remove(
    settings: Settings, tmp_path: Path, tiny_files: TinyFiles
) -> None:
    root = models_folder(tmp_path / "models", tiny_files)
    env = {
        **settings_env(settings, tmp_path / "data"),
        "DARKROOM_MODEL_PRESET": "",
        "DARKROOM_MODELS_DIR": str(root),
    }
    local = tmp_path / "dreamshaper.safetensors"
    local.write_bytes(tiny_files.sd_checkpoint)
    model_id = f"cli-{uuid.uuid4().hex[:6]}"
    added = json.loads(
        darkroom(env, "models", "add", str(local), "--id", model_id).splitlines()[-1]
    )
    assert added["model_status"] == "ready", added
    assert added["family"] == "sd"
    assert (root / model_id / "model_index.json").is_file()
    listing = darkroom(env, "models", "list")
    assert listing.splitlines()[0].split() == [
        "MODEL_ID",
        "TYPE",
        "STATE",
        "FAMILY",
        "FORMAT",
        "SIZE",
    ]
    assert any(
        line.split()[:4] == [model_id, "model", "ready", "sd"] for line in listing.splitlines()
    )
    inspected = json.loads(darkroom(env, "models", "inspect", model_id))
    assert inspected["files"] == [str(root / model_id)]
    assert inspected["workers"] == []
    assert inspected["dtype"] == "float32"  # the tiny model's UNet, read from its header
    text = tmp_path / "notes.txt"
    text.write_text("not a model")
    refused = subprocess.run(
        [sys.executable, "-m", "cli.main", "models", "add", str(text), "--id", f"{model_id}-x"],
        env=env, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert refused.returncode == 1
    assert "did not give a model" in refused.stdout
    removed = json.loads(darkroom(env, "models", "remove", model_id))
    assert removed == {"model_id": model_id, "removed": ["model"]}
    assert not (root / model_id).exists()
