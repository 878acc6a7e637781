"""Every limit a request is held to, defined once: the API refuses what is out of range before a
job is queued, and the worker checks the same numbers again (its second line) or sizes its work
by them. Torch-free; docs/PARAMETERS.md lists them for clients.

No real request comes near the caps on what one request carries: they bound the work, memory
and answer size (`meta` echoes the request) that one request can cost.
"""

from __future__ import annotations

# --- text ---------------------------------------------------------------------------------------

#: Characters of a prompt or negative prompt (checked by the API).
MAX_PROMPT_CHARS = 5000
#: Tokens of text in one CLIP window (77 positions with BOS and EOS).
CHUNK_TOKENS = 75
#: Windows of CHUNK_TOKENS a prompt may fill: 600 tokens (checked by the worker's tokenizer).
MAX_PROMPT_WINDOWS = 8
#: Tokens Flux's T5 encoder reads (the pipeline's `max_sequence_length`); the rest is cut.
T5_TOKENS = 512
#: Characters of a model, LoRA, VAE, embedding or scheduler id: the API caps its fields, and the
#: model registry refuses longer ids before any file-system lookup.
MAX_ID_CHARS = 200
MAX_TRACK_ID_CHARS = 200
MAX_WEBHOOK_URL_CHARS = 2048
#: Presigned links carrying session tokens run to a few thousand characters.
MAX_IMAGE_URL_CHARS = 4096

# --- add-ons ------------------------------------------------------------------------------------

MAX_LORAS = 5
MAX_EMBEDDINGS = 10
#: `clip_skip` goes from 1 (the last layer, like none) to this many layers from the end.
MAX_CLIP_SKIP = 8

# --- images -------------------------------------------------------------------------------------

#: Init images the image mixer takes (every other operation takes exactly one).
MAX_IMAGES = 4
#: Decoded bytes of one inline (base64) init image; the worker re-checks the image itself.
MAX_INLINE_IMAGE_BYTES = 10 * 1024 * 1024
#: Pixels one image may have (40 MP: 40,000,000 accepted, one more refused): an init image, or an
#: image uploaded to the server.
MAX_PIXELS = 40_000_000
#: Pixels all of one request's init images may have together (the mixer takes up to four): two
#: full-size images' worth, so four 12 MP photos pass, four 40 MP bombs do not.
MAX_REQUEST_PIXELS = 2 * MAX_PIXELS
#: Output sides (the pages' "Max Height: Width: 1024x1024").
MIN_SIDE = 64
MAX_SIDE = 1024
#: Output sides are multiples of this (a family may ask for more: `darkroom.families`).
SIDE_MULTIPLE = 8

# --- sampling -----------------------------------------------------------------------------------

MAX_STEPS = 50
MAX_SAMPLES = 4
#: img2img denoises int(steps x strength) steps (diffusers): none at all is refused.
TOO_FEW_DENOISING_STEPS = "num_inference_steps x strength must be at least 1 for img2img."


def denoises_nothing(steps: int, strength: float) -> bool:
    """Whether an img2img request of `steps` and `strength` would denoise no step at all."""
    return int(steps * strength) < 1


#: Seeds are 32-bit: sample i of seed s uses (s + i) mod 2**32.
MAX_SEED = 2**32 - 1
MIN_GUIDANCE_SCALE, MAX_GUIDANCE_SCALE = 1, 20
#: pix2pix: the page gives no range; below 1 diffusers turns image guidance off, above 10 is noise.
MIN_IMAGE_GUIDANCE_SCALE, MAX_IMAGE_GUIDANCE_SCALE = 1, 10
