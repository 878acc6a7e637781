"""The `enhance_prompt` option: a fixed, documented rewrite of the prompt, applied at submit.

The hosted API rewrites prompts with a photographic style suffix and a list of common defects
for the negative prompt (its example response shows both). Darkroom does the same with fixed
text, so the same request always gives the same prompt, and `meta.prompt` shows it.
"""

from __future__ import annotations

STYLE_SUFFIX = (
    "DSLR photography, sharp focus, Unreal Engine 5, Octane Render, Redshift, "
    "((cinematic lighting)), f/1.4, ISO 200, 1/160s, 8K, RAW, unedited, symmetrical balance, "
    "in-frame"
)
DEFECTS = (
    "((out of frame)), ((extra fingers)), mutated hands, ((poorly drawn hands)), "
    "((poorly drawn face)), (((mutation))), (((deformed))), (((tiling))), ((tile)), "
    "((fleshpile)), ((ugly)), (((abstract))), blurry, ((bad anatomy)), ((bad proportions)), "
    "((extra limbs)), cloned face, glitchy, ((extra arms)), ((extra hands)), "
    "((mangled fingers)), (missing lips), ((ugly face)), ((extra legs))"
)


def enhance(prompt: str, negative_prompt: str) -> tuple[str, str]:
    """The enhanced (prompt, negative prompt): each gains its fixed text unless already there."""
    return _append(prompt, STYLE_SUFFIX), _append(negative_prompt, DEFECTS)


def _append(text: str, addition: str) -> str:
    text = text.strip()
    if addition in text:
        return text
    return f"{text} {addition}" if text else addition
