"""The scheduler a request names, built fresh from the model's own scheduler config.

Every request gets a new scheduler object (`from_config(pipeline.scheduler.config, **overrides)`),
so the noise schedule the model was trained with is kept and no step state crosses requests.

- `IMG2IMG_SCHEDULERS`: the 14 names of the enterprise page that can do img2img. The page lists 4
  more (`REFUSED_SCHEDULERS`) that cannot: DDIMInverse, IPNDM, KarrasVe and ScoreSdeVe have no
  usable `add_noise`, which img2img needs to noise the init image; they are refused by name.
- `use_karras_sigmas` is passed only to schedulers whose config has it; elsewhere it is ignored,
  as the page's default ("yes") must not break the schedulers without Karras sigmas.
- `algorithm_type` is passed only to schedulers whose config has it (the DPM-Solver family and
  DEIS); a value a scheduler rejects is a `ValueError`.

`dpmsolver+++` (the page's only documented value) is not a diffusers value. It is mapped to
`DPMSOLVER_PLUS_PLUS_PLUS`: the SDE variant of DPM-Solver++ at third order. The extra "+" reads as
"DPM-Solver++, one step further", and the two ways diffusers goes further than `dpmsolver++`
(order 2) are the stochastic variant and a higher order; diffusers 0.42 implements the third-order
`sde-dpmsolver++` update (`multistep_dpm_solver_third_order_update`), and the tests run it. Its
noise comes from each sample's own generator, so results stay deterministic per seed.
"""

from __future__ import annotations

from typing import Any

import diffusers

from darkroom.scheduler_names import (
    IMG2IMG_SCHEDULERS,
    PAGE_DPMSOLVER_PLUS_PLUS_PLUS,
    REFUSED_SCHEDULERS,
)

DPMSOLVER_PLUS_PLUS_PLUS: dict[str, Any] = {"algorithm_type": "sde-dpmsolver++", "solver_order": 3}


def scheduler_overrides(
    config: Any, use_karras_sigmas: bool, algorithm_type: str | None
) -> dict[str, Any]:
    """The config values to change for a scheduler whose default config is `config`."""
    overrides: dict[str, Any] = {}
    if use_karras_sigmas and "use_karras_sigmas" in config:
        overrides["use_karras_sigmas"] = True
    if algorithm_type is not None and "algorithm_type" in config:
        if algorithm_type == PAGE_DPMSOLVER_PLUS_PLUS_PLUS:
            overrides |= DPMSOLVER_PLUS_PLUS_PLUS
        else:
            overrides["algorithm_type"] = algorithm_type
    return overrides


def build_scheduler(
    name: str | None, model_config: Any, use_karras_sigmas: bool, algorithm_type: str | None
) -> Any:
    """A new scheduler `name` (None: the model's own class) on the model's config."""
    scheduler_class = _scheduler_class(name, model_config)
    defaults = scheduler_class.from_config(model_config).config
    overrides = scheduler_overrides(defaults, use_karras_sigmas, algorithm_type)
    try:
        return scheduler_class.from_config(model_config, **overrides)
    except (NotImplementedError, ValueError) as exc:
        raise ValueError(
            f"{scheduler_class.__name__} does not support these settings "
            f"({_describe(overrides)}): {exc}"
        ) from exc


def _scheduler_class(name: str | None, model_config: Any) -> Any:
    """The diffusers class for `name` (None: the model's own)."""
    if name is None:
        return getattr(diffusers, str(model_config["_class_name"]))
    check_scheduler_name(name)
    return getattr(diffusers, name)


def check_scheduler_name(name: str) -> None:
    """Refuse a scheduler name that cannot do img2img, listing those that can."""
    if name not in IMG2IMG_SCHEDULERS:
        reason = "cannot do img2img (it has no add_noise)" if name in REFUSED_SCHEDULERS else ""
        raise ValueError(
            f"Scheduler {name!r} {reason or 'is not supported'}; use one of: "
            f"{', '.join(IMG2IMG_SCHEDULERS)}."
        )


def _describe(overrides: dict[str, Any]) -> str:
    return ", ".join(f"{key}={value!r}" for key, value in overrides.items()) or "defaults"
