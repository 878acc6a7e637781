"""Loading a single-file checkpoint (the original layout) as a diffusers pipeline: the one home
of `from_single_file`, for the worker's model cache and the installer's conversion alike.

diffusers builds each component from the file. A component the file leaves out it should read
from the configuration folder, but it cannot: it converts a VAE from the file even when the file
has none, and looks for a text encoder's weights under diffusers' file names only, never
transformers' `model.safetensors`. Black Forest Labs ship Flux as the transformer alone
(`flux1-dev.safetensors`, and most Flux fine-tunes after them), so each component the file
leaves out (`darkroom.families.SingleFile.borrowed`) is loaded here from the configuration
folder, with the class its `model_index.json` names, and handed to `from_single_file`. A Flux
file's own tensors also say whether its transformer takes a guidance input (dev) or not
(schnell), which the configuration folder's transformer config would otherwise decide.
`darkroom.model_ids.single_file_config_problem` refused at submit any model whose configuration
folder lacks those weights.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

from darkroom import families

#: The libraries a configuration folder's `model_index.json` may name a component's class from.
_LIBRARIES = ("diffusers", "transformers")


def load_single_file(pipeline_class: Any, path: Path, config: Path, **options: Any) -> Any:
    """`pipeline_class` from the checkpoint `path`, configured by the local pipeline folder
    `config` (nothing downloaded; a `.ckpt` is read with `torch.load(weights_only=True)` by
    diffusers' loader, so no pickled code runs). `options` go to `from_single_file`."""
    options["local_files_only"] = True
    dtype = {"dtype": options["dtype"]} if "dtype" in options else {}
    probed = families.probe_file(path)
    if probed.embedded_guidance is not None:
        # A schnell file under a dev configuration (or the reverse) would otherwise be built
        # with (or without) a guidance input its tensors do not have: the file decides.
        options["guidance_embeds"] = probed.embedded_guidance
    index = json.loads((config / "model_index.json").read_text(encoding="utf-8"))
    for part in probed.borrowed:
        options[part] = _component_class(config, index, part).from_pretrained(
            str(config / part), local_files_only=True, **dtype
        )
    return pipeline_class.from_single_file(str(path), config=str(config), **options)


def _component_class(config: Path, index: dict[str, Any], part: str) -> Any:
    """The class the configuration folder's model_index (`index`) names for `part`."""
    library, class_name = index[part]
    if library not in _LIBRARIES:
        raise ValueError(f"{config.name}/model_index.json names {part} from {library!r}.")
    return getattr(importlib.import_module(library), class_name)
