"""`POST /api/v1/enterprise/img2img` (reference 004): every field of the enterprise page."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable
from typing import Annotated, Any

from pydantic import AliasChoices, BeforeValidator, Field, PrivateAttr, model_validator

from api.fields import (
    Flag,
    Id,
    Int,
    OptionalInt,
    Steps,
    Strength,
    in_range,
    optional,
    to_float,
    to_url,
)
from api.schemas.common import SubmitBase
from darkroom import families, model_ids, prompt_style
from darkroom.identities import Family, Operation, SafetyCheckerType
from darkroom.jobspec import JobSpec, LoraRef
from darkroom.limits import (
    MAX_CLIP_SKIP,
    MAX_EMBEDDINGS,
    MAX_ID_CHARS,
    MAX_IMAGE_URL_CHARS,
    MAX_INLINE_IMAGE_BYTES,
    MAX_LORAS,
    MAX_STEPS,
    TOO_FEW_DENOISING_STEPS,
    denoises_nothing,
)
from darkroom.scheduler_names import ALGORITHM_TYPES, IMG2IMG_SCHEDULERS, REFUSED_SCHEDULERS
from darkroom.settings import Settings


def _names(kind: str, max_items: int) -> Callable[[Any], list[str]]:
    """A parser of a comma-separated list of at most `max_items` ids (or an array of them);
    blanks dropped, null is none."""

    def parse(value: Any) -> list[str]:
        if value is None:
            return []
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(item, str) for item in items):
            raise ValueError("must be a comma-separated list of names")
        names = [item.strip() for item in items if item.strip()]
        if len(names) > max_items:
            raise ValueError(f"must name at most {max_items} {kind}")
        if any(len(name) > MAX_ID_CHARS for name in names):
            raise ValueError(f"names must be at most {MAX_ID_CHARS} characters each")
        return names

    return parse


def _algorithm(value: Any) -> str | None:
    text = str(value).strip() if value is not None else ""
    if text.lower() in ("", "none", "null"):
        return None
    if text not in ALGORITHM_TYPES:
        raise ValueError(f"must be one of {', '.join(ALGORITHM_TYPES)} (or none)")
    return text


def _strengths(value: Any) -> list[float]:
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list):
        items = [items]
    if len(items) > MAX_LORAS:
        raise ValueError(f"must hold at most {MAX_LORAS} strengths, one per LoRA")
    return [to_float(item) for item in items]


LoraNames = Annotated[list[str], BeforeValidator(_names("LoRAs", MAX_LORAS))]
EmbeddingNames = Annotated[list[str], BeforeValidator(_names("embeddings", MAX_EMBEDDINGS))]
Strengths = Annotated[list[float] | None, BeforeValidator(optional(_strengths))]
ClipSkip = Annotated[OptionalInt, in_range(1, MAX_CLIP_SKIP)]
AlgorithmType = Annotated[str | None, BeforeValidator(_algorithm)]


class Img2ImgRequest(SubmitBase):
    """The enterprise img2img body. Flags default as the page says (most are "yes")."""

    model_id: Id = None
    init_image: Annotated[str, BeforeValidator(lambda v: v if isinstance(v, str) else "")]
    num_inference_steps: Steps = Field(
        default=30, validation_alias=AliasChoices("num_inference_steps", "steps")
    )
    strength: Strength = 0.7
    scheduler: Id = None
    use_karras_sigmas: Flag = True
    algorithm_type: AlgorithmType = None
    lora_model: LoraNames = Field(default_factory=list)
    lora_strength: Strengths = None
    vae: Id = None
    embeddings_model: EmbeddingNames = Field(default_factory=list)
    clip_skip: ClipSkip = None
    tomesd: Flag = True
    safety_checker: Flag = True
    safety_checker_type: SafetyCheckerType = "sensitive_content_text"
    enhance_prompt: Flag = True
    base64: Flag = False
    temp: Flag = False
    loadbalancer: Flag = False  # accepted: spreading jobs over workers is the queue's job here
    #: The model's family, read from its files by `model_errors` (which runs before `to_spec`).
    _family: Family = PrivateAttr(default=Family.SD)

    @model_validator(mode="after")
    def _check(self) -> Img2ImgRequest:
        self._check_scheduler()
        self._check_loras()
        if denoises_nothing(self.num_inference_steps, self.strength):
            raise ValueError(f"strength: {TOO_FEW_DENOISING_STEPS}")
        self.init_image = self._init_image()
        return self

    def _check_scheduler(self) -> None:
        if self.scheduler is None or self.scheduler in IMG2IMG_SCHEDULERS:
            return
        if self.scheduler in REFUSED_SCHEDULERS:
            reason = f"{self.scheduler} cannot run image to image (it has no add_noise)"
        else:
            reason = f"unknown scheduler '{self.scheduler[:100]}'"
        raise ValueError(f"scheduler: {reason}; use one of {', '.join(IMG2IMG_SCHEDULERS)}")

    def _check_loras(self) -> None:
        strengths = self.lora_strength
        if strengths is None:
            return
        if not self.lora_model:
            raise ValueError("lora_strength: given without lora_model")
        if len(strengths) not in (1, len(self.lora_model)):
            raise ValueError(
                f"lora_strength: {len(strengths)} strengths for {len(self.lora_model)} LoRAs;"
                " give one strength, or one per LoRA"
            )
        if any(not 0 <= strength <= 1 for strength in strengths):
            raise ValueError("lora_strength: each strength must be between 0 and 1")

    def _init_image(self) -> str:
        """A URL; with `base64: yes` also a base64 image, kept as a data: URI for the worker."""
        url = _try_url(self.init_image)
        if url is not None:
            return url
        if not self.base64:
            raise ValueError(
                "init_image: must be an http or https URL (or base64 with base64: yes)"
            )
        return _data_uri(self.init_image)

    def model_errors(self, settings: Settings) -> dict[str, list[str]]:
        """Unknown model, LoRA, VAE or embedding ids, each under its field."""
        checks: list[tuple[str, Callable[[], object]]] = [
            ("lora_model", lambda: [model_ids.resolve_lora(n, settings) for n in self.lora_model]),
            (
                "embeddings_model",
                lambda: [model_ids.resolve_embedding(n, settings) for n in self.embeddings_model],
            ),
        ]
        if self.model_id is not None:
            model_id = self.model_id
            checks.append(
                ("model_id", lambda: model_ids.resolve_model(Operation.IMG2IMG, model_id, settings))
            )
        if self.vae is not None:
            vae = self.vae
            checks.append(("vae", lambda: model_ids.resolve_vae(vae, settings)))
        errors: dict[str, list[str]] = {}
        for field, check in checks:
            try:
                check()
            except model_ids.UnknownModelError as exc:
                errors[field] = [str(exc)]
        if "model_id" not in errors:
            self._family = model_ids.model_family(self.model_id, settings)
            for field, why in families.refusals(self._family, self._asked()).items():
                errors.setdefault(field, []).append(why)
        return errors

    def _asked(self) -> families.AskedFields:
        """The family-dependent fields the client asked for. Page defaults a family cannot
        apply (tomesd "yes", enhance_prompt's negative text) are not refusals: only what the
        client wrote is."""
        written = self.model_fields_set
        return families.AskedFields(
            scheduler=self.scheduler,
            algorithm_type=self.algorithm_type,
            clip_skip=self.clip_skip,
            tomesd=self.tomesd and "tomesd" in written,
            embeddings=tuple(self.embeddings_model),
            negative_prompt=self.negative_prompt or "",
            width=self.width,
            height=self.height,
        )

    def loras(self) -> list[LoraRef]:
        """Each LoRA with its strength (one strength for all, one each, or 1.0 when omitted)."""
        strengths = self.lora_strength or [1.0]
        if len(strengths) == 1:
            strengths = strengths * len(self.lora_model)
        return [
            LoraRef(name=n, strength=s) for n, s in zip(self.lora_model, strengths, strict=True)
        ]

    def to_spec(self) -> JobSpec:
        common = self._common()
        if self.enhance_prompt:
            common["prompt"], common["negative_prompt"] = prompt_style.enhance(
                common["prompt"], common["negative_prompt"]
            )
        return JobSpec(
            operation=Operation.IMG2IMG,
            init_images=[self.init_image],
            steps=self.num_inference_steps,
            strength=self.strength,
            model_id=self.model_id,
            family=self._family,
            scheduler=self.scheduler,
            use_karras_sigmas=self.use_karras_sigmas,
            algorithm_type=self.algorithm_type,
            loras=self.loras(),
            vae=self.vae,
            embeddings=self.embeddings_model,
            clip_skip=self.clip_skip,
            tomesd=self.tomesd,
            safety_checker=self.safety_checker,
            safety_checker_type=self.safety_checker_type,
            base64_output=self.base64,
            temp=self.temp,
            **common,
        )


def _try_url(value: str) -> str | None:
    """`value` as a URL; None when it is not one (it may be base64)."""
    url = value.strip()
    if url.lower().startswith(("http://", "https://")) and len(url) > MAX_IMAGE_URL_CHARS:
        raise ValueError(f"init_image: URLs must be at most {MAX_IMAGE_URL_CHARS} characters")
    try:
        return to_url(value)
    except ValueError:
        return None


def _data_uri(value: str) -> str:
    """Raw base64 or a data: URI, checked to decode and to fit the size limit."""
    payload = value.partition(",")[2] if value.startswith("data:") else value
    payload = "".join(payload.split())
    if len(payload) * 3 // 4 > MAX_INLINE_IMAGE_BYTES:
        raise ValueError(f"init_image: the image is larger than {MAX_INLINE_IMAGE_BYTES} bytes")
    try:
        base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("init_image: not valid base64") from None
    if not payload:
        raise ValueError("init_image: the base64 image is empty")
    return f"data:application/octet-stream;base64,{payload}"


class V3Img2ImgRequest(Img2ImgRequest):
    """`POST /api/v3/img2img`, the older img2img: the same body, but its page offered 21, 31,
    41 and 51 steps. 51 is accepted and run as 50; `warnings()` says so in `meta`."""

    num_inference_steps: Annotated[Int, in_range(1, MAX_STEPS + 1)] = Field(
        default=30, validation_alias=AliasChoices("num_inference_steps", "steps")
    )

    def to_spec(self) -> JobSpec:
        spec = super().to_spec()
        return spec.model_copy(update={"steps": min(self.num_inference_steps, MAX_STEPS)})

    def warnings(self) -> list[str]:
        if self.num_inference_steps <= MAX_STEPS:
            return []
        return [
            f"num_inference_steps {self.num_inference_steps} is above the maximum of"
            f" {MAX_STEPS}; {MAX_STEPS} were run"
        ]
