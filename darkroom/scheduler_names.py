"""The scheduler names of the enterprise page: which can run img2img and which cannot; and the
`algorithm_type` values it takes.

Torch-free, so the API refuses impossible names before queueing and the worker builds from the
same list (worker/pipelines/schedulers.py).
"""

from __future__ import annotations

#: The page's names that can run img2img (they implement `add_noise`).
IMG2IMG_SCHEDULERS = (
    "DDPMScheduler",
    "DDIMScheduler",
    "PNDMScheduler",
    "LMSDiscreteScheduler",
    "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
    "DPMSolverMultistepScheduler",
    "HeunDiscreteScheduler",
    "KDPM2DiscreteScheduler",
    "DPMSolverSinglestepScheduler",
    "KDPM2AncestralDiscreteScheduler",
    "UniPCMultistepScheduler",
    "DEISMultistepScheduler",
    "LCMScheduler",
)
#: Named on the page but unable to noise an init image (no usable `add_noise`): refused.
REFUSED_SCHEDULERS = (
    "DDIMInverseScheduler",
    "IPNDMScheduler",
    "KarrasVeScheduler",
    "ScoreSdeVeScheduler",
)

#: The page's `algorithm_type` that is no diffusers value: the worker maps it deliberately
#: (to `sde-dpmsolver++` with `solver_order=3`, worker/pipelines/schedulers.py).
PAGE_DPMSOLVER_PLUS_PLUS_PLUS = "dpmsolver+++"
#: `algorithm_type` values: the page's "dpmsolver+++" and diffusers' own DPM-Solver variants.
ALGORITHM_TYPES = (
    PAGE_DPMSOLVER_PLUS_PLUS_PLUS,
    "dpmsolver++",
    "sde-dpmsolver++",
    "dpmsolver",
    "sde-dpmsolver",
)
