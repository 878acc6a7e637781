"""Property tests of the request parsers (api.fields, api.schemas, api.errors): no database.

What must hold for every input a client can send as JSON:

(a) a parser raises nothing but ValueError (which pydantic turns into a ValidationError) and a
    model nothing but ValidationError: never TypeError, OverflowError, RecursionError...;
(b) every accepted spelling of a value (512, 512.0, "512", " 512 ", "yes", true...) gives the
    same JobSpec as the canonical spelling;
(c) every out-of-range number is refused, naming the field: "<field> must be between A and B";
(d) `to_spec()` always has a seed in [0, 2**32-1] and one seed per sample;
(e) api.errors.field_messages turns every ValidationError the models raise into
    {field: [sentence, ...]}.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from typing import Any

import hypothesis
import pytest
from hypothesis import HealthCheck, example, given
from hypothesis import strategies as st
from pydantic import ValidationError

from api import fields
from api.errors import field_messages
from api.schemas import Img2ImgRequest, MixerRequest, Pix2PixRequest, V5MixerRequest
from darkroom import limits
from darkroom.jobspec import JobSpec
from tests.api.test_submit import IMG2IMG, MIXER_V5, MIXER_V6, PIX2PIX

Model = type[Pix2PixRequest] | type[MixerRequest] | type[Img2ImgRequest]
Body = dict[str, Any]

#: Bounded and reproducible: no example database written into the checkout.
bounded = hypothesis.settings(
    max_examples=80,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
#: For the whole-body tests, whose examples cost more.
bodies = hypothesis.settings(bounded, max_examples=50)

#: Integers a float cannot hold: JSON allows them, and json.loads returns them as ints.
HUGE_INTS = [10**309, -(10**309), 10**400, 2**1100]

MODELS: dict[str, tuple[Model, Body]] = {
    "pix2pix": (Pix2PixRequest, PIX2PIX),
    "mixer_v5": (V5MixerRequest, MIXER_V5),
    "mixer_v6": (MixerRequest, MIXER_V6),
    "img2img": (Img2ImgRequest, IMG2IMG),
}
FIELD_NAMES = sorted(
    {name for model, _ in MODELS.values() for name in model.model_fields}
    | {"steps", "num_inference_steps", "key"}
)


def json_values(*, huge_ints: bool = False) -> st.SearchStrategy[Any]:
    """Any value json.loads can return (NaN and Infinity included: Python's json reads them)."""
    ints = st.integers(min_value=-(10**300), max_value=10**300) | st.integers()
    if huge_ints:
        ints = ints | st.sampled_from(HUGE_INTS)
    scalars = (
        st.none()
        | st.booleans()
        | ints
        | st.floats(allow_nan=True, allow_infinity=True)
        | st.text(max_size=12)
        | st.sampled_from(["yes", "no", " 12 ", "1e400", "-0", "0x10", "http://127.0.0.1:9/a.png"])
    )
    return st.recursive(
        scalars,
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner),
        max_leaves=8,
    )


def refused_or_parsed(parse: Callable[[Any], Any], value: Any) -> None:
    """`parse(value)` returns, or raises ValueError (what a BeforeValidator may raise)."""
    with contextlib.suppress(ValueError):
        parse(value)


def validate(model: Model, body: Body) -> JobSpec | ValidationError:
    """The body's JobSpec, or the ValidationError refusing it; any other exception escapes."""
    try:
        request = model.model_validate(body)
    except ValidationError as exc:
        return exc
    return request.to_spec()


def assert_error_shape(exc: ValidationError) -> dict[str, list[str]]:
    """(e): the translated errors are a non-empty {str: [str, ...]}."""
    messages = field_messages(list(exc.errors()))
    assert isinstance(messages, dict)
    assert messages
    for field, sentences in messages.items():
        assert isinstance(field, str)
        assert field
        assert isinstance(sentences, list)
        assert sentences
        assert all(isinstance(sentence, str) and sentence for sentence in sentences)
    return messages


# --- (a) the field parsers ------------------------------------------------------------------

PARSERS: dict[str, Callable[[Any], Any]] = {
    "to_int": fields.to_int,
    "to_float": fields.to_float,
    "to_flag": fields.to_flag,
    "to_url_list": fields.to_url_list,
    "to_weight_list": fields.to_weight_list,
    "to_track_id": fields.to_track_id,
    "to_url": fields.to_url,
    "to_optional_text": fields.to_optional_text,
}


@pytest.mark.parametrize("name", sorted(PARSERS))
@bounded
@given(value=json_values())
def test_parsers_raise_only_value_error(name: str, value: Any) -> None:
    refused_or_parsed(PARSERS[name], value)


@pytest.mark.parametrize("name", sorted(PARSERS))
@bounded
@given(value=st.sampled_from(HUGE_INTS) | st.lists(st.sampled_from(HUGE_INTS), min_size=1))
@example(value=10**309)
def test_parsers_refuse_integers_beyond_float_range_with_value_error(name: str, value: Any) -> None:
    refused_or_parsed(PARSERS[name], value)


# --- (a) + (e) the models -----------------------------------------------------------------


@pytest.mark.parametrize("endpoint", sorted(MODELS))
@bodies
@given(data=st.data())
def test_any_json_body_gives_a_spec_or_a_validation_error(
    endpoint: str, data: st.DataObject
) -> None:
    """A valid reference body with random fields replaced, or a body made of random fields."""
    model, reference = MODELS[endpoint]
    changes = data.draw(
        st.dictionaries(st.sampled_from(FIELD_NAMES) | st.text(max_size=6), json_values()),
        label="changes",
    )
    base = data.draw(st.sampled_from([reference, {}]), label="base")
    outcome = validate(model, {**base, **changes})
    if isinstance(outcome, ValidationError):
        assert_error_shape(outcome)
    else:
        assert 0 <= outcome.seed <= limits.MAX_SEED


@pytest.mark.parametrize("endpoint", sorted(MODELS))
@bounded
@given(field=st.sampled_from(["steps", "guidance_scale", "samples", "seed", "width"]))
@example(field="seed")
def test_an_integer_beyond_float_range_is_a_validation_error(endpoint: str, field: str) -> None:
    """Reproducer: {..., "seed": 10**309} raised OverflowError out of model_validate."""
    model, reference = MODELS[endpoint]
    if field == "steps" and "num_inference_steps" in reference:
        field = "num_inference_steps"  # the spelling the reference body uses wins over "steps"
    outcome = validate(model, {**reference, field: 10**309})
    assert isinstance(outcome, ValidationError)


# --- (b) spellings --------------------------------------------------------------------------


def int_spellings(value: int) -> st.SearchStrategy[Any]:
    return st.sampled_from(
        [value, float(value), str(value), f" {value} ", f"{value}.0", f"\t{float(value)}\n"]
    )


def float_spellings(value: float) -> st.SearchStrategy[Any]:
    spellings: list[Any] = [value, repr(value), f"  {value!r} "]
    if value.is_integer():
        spellings += [int(value), str(int(value)), f" {int(value)} "]
    return st.sampled_from(spellings)


def flag_spellings(value: bool) -> st.SearchStrategy[Any]:
    words = ["yes", "true", "1", "on", "y"] if value else ["no", "false", "0", "off", "n"]
    texts = [w for word in words for w in (word, word.upper(), f" {word.capitalize()} ")]
    return st.sampled_from([value, int(value), *texts])


#: (field, kind, low, high) of the numeric fields with a range, per endpoint.
RANGES: dict[str, list[tuple[str, str, float, float]]] = {
    "pix2pix": [
        ("width", "int", 64, 1024),
        ("height", "int", 64, 1024),
        ("guidance_scale", "float", 1, 20),
        ("seed", "int", 0, limits.MAX_SEED),
        ("samples", "int", 1, 4),
        ("image_guidance_scale", "float", 1, 10),
        ("steps", "int", 1, 50),
    ],
    "mixer_v5": [
        ("width", "int", 64, 1024),
        ("height", "int", 64, 1024),
        ("guidance_scale", "float", 1, 20),
        ("seed", "int", 0, limits.MAX_SEED),
        ("samples", "int", 1, 4),
        ("steps", "int", 1, 1000),
    ],
    "mixer_v6": [
        ("width", "int", 64, 1024),
        ("height", "int", 64, 1024),
        ("guidance_scale", "float", 1, 20),
        ("seed", "int", 0, limits.MAX_SEED),
        ("samples", "int", 1, 1),
        ("steps", "int", 1, 50),
    ],
    "img2img": [
        ("width", "int", 64, 1024),
        ("height", "int", 64, 1024),
        ("guidance_scale", "float", 1, 20),
        ("seed", "int", 0, limits.MAX_SEED),
        ("samples", "int", 1, 4),
        ("num_inference_steps", "int", 1, 50),
        ("strength", "float", 0, 1),
        ("clip_skip", "int", 1, 8),
    ],
}
FLAGS = ["use_karras_sigmas", "tomesd", "safety_checker", "enhance_prompt", "base64", "temp"]


@st.composite
def canonical_and_respelled(draw: st.DrawFn, endpoint: str) -> tuple[Body, Body]:
    """A valid body in canonical types, and the same values in random accepted spellings."""
    canonical: Body = {}
    respelled: Body = {}
    for field, kind, low, high in RANGES[endpoint]:
        if not draw(st.booleans()):
            continue
        if kind == "int":
            number = draw(st.integers(min_value=int(low), max_value=int(high)))
            canonical[field], respelled[field] = number, draw(int_spellings(number))
        else:
            real = draw(
                st.floats(min_value=low, max_value=high)
                | st.integers(min_value=int(low), max_value=int(high)).map(float)
            )
            canonical[field], respelled[field] = real, draw(float_spellings(real))
    if endpoint == "img2img":
        # Valid only where some step is denoised: int(steps x strength) >= 1 (else a 422).
        steps = canonical.get(
            "num_inference_steps", int(MODELS[endpoint][1]["num_inference_steps"])
        )
        hypothesis.assume(not limits.denoises_nothing(steps, canonical.get("strength", 0.7)))
        for flag in FLAGS:
            if draw(st.booleans()):
                value = draw(st.booleans())
                canonical[flag], respelled[flag] = value, draw(flag_spellings(value))
        loras = draw(st.lists(st.sampled_from(["a", "b", "c"]), max_size=3, unique=True))
        if loras:
            canonical["lora_model"] = loras
            respelled["lora_model"] = draw(
                st.sampled_from([loras, ",".join(loras), " , ".join(loras) + ","])
            )
    if endpoint.startswith("mixer"):
        urls = [f"http://127.0.0.1:9/{n}.png" for n in range(draw(st.integers(1, 4)))]
        weights = draw(st.lists(st.sampled_from([0.0, 0.5, 1.0, 2.25]), min_size=len(urls)))
        weights = weights[: len(urls)]
        canonical["init_image"], canonical["init_image_weights"] = urls, weights
        respelled["init_image"] = draw(st.sampled_from([urls, ",".join(urls), ", ".join(urls)]))
        respelled["init_image_weights"] = draw(
            st.sampled_from([weights, ",".join(map(str, weights)), " , ".join(map(repr, weights))])
        )
    return canonical, respelled


@pytest.mark.parametrize("endpoint", sorted(MODELS))
@bounded
@given(data=st.data())
def test_every_spelling_gives_the_canonical_spec(endpoint: str, data: st.DataObject) -> None:
    model, reference = MODELS[endpoint]
    canonical, respelled = data.draw(canonical_and_respelled(endpoint))
    seed = data.draw(st.integers(0, limits.MAX_SEED), label="seed")
    base = {**reference, "seed": seed}
    expected = validate(model, {**base, **canonical})
    got = validate(model, {**base, **respelled})
    assert isinstance(expected, JobSpec), expected
    assert got == expected


# --- (c) out-of-range numbers -------------------------------------------------------------

RANGE_CASES = [
    (endpoint, field, kind, low, high)
    for endpoint, ranges in sorted(RANGES.items())
    for field, kind, low, high in ranges
]


def _fmt(number: float) -> str:
    return str(int(number)) if float(number).is_integer() else str(number)


@st.composite
def out_of_range(draw: st.DrawFn, kind: str, low: float, high: float) -> Any:
    """A finite number (maybe spelled as a string) outside [low, high]."""
    if kind == "int":
        number: float = draw(
            st.integers(max_value=int(low) - 1)
            | st.integers(min_value=int(high) + 1)
            | st.sampled_from([int(low) - 1, int(high) + 1, int(high) + 4, -(10**6), 10**12])
        )
    else:
        number = draw(
            st.floats(max_value=low, exclude_max=True, allow_infinity=False, allow_nan=False)
            | st.floats(min_value=high, exclude_min=True, allow_infinity=False, allow_nan=False)
            | st.sampled_from([math.nextafter(low, -math.inf), math.nextafter(high, math.inf)])
        )
    spell = draw(st.sampled_from(["as is", "string", "padded"]))
    if spell == "string":
        return repr(number)
    if spell == "padded":
        return f" {number!r} "
    return number


@pytest.mark.parametrize(("endpoint", "field", "kind", "low", "high"), RANGE_CASES)
@bounded
@given(data=st.data())
def test_out_of_range_numbers_are_refused_naming_the_field(
    endpoint: str, field: str, kind: str, low: float, high: float, data: st.DataObject
) -> None:
    model, reference = MODELS[endpoint]
    value = data.draw(out_of_range(kind, low, high), label="value")
    outcome = validate(model, {**reference, field: value})
    assert isinstance(outcome, ValidationError), f"{field}={value!r} was accepted"
    assert assert_error_shape(outcome) == {
        field: [f"{field} must be between {_fmt(low)} and {_fmt(high)}"]
    }


@pytest.mark.parametrize(
    ("endpoint", "alias", "high"),
    [
        ("pix2pix", "num_inference_steps", 50),
        ("mixer_v5", "num_inference_steps", 1000),
        ("mixer_v6", "num_inference_steps", 50),
        ("img2img", "steps", 50),
    ],
)
@bounded
@given(value=st.integers(max_value=0) | st.integers(min_value=1001))
@example(value=0)
def test_out_of_range_steps_under_the_other_spelling_name_one_field_once(
    endpoint: str, alias: str, high: int, value: int
) -> None:
    model, reference = MODELS[endpoint]
    body = {k: v for k, v in reference.items() if k not in ("steps", "num_inference_steps")}
    outcome = validate(model, {**body, alias: value})
    assert isinstance(outcome, ValidationError)
    [(field, [sentence])] = assert_error_shape(outcome).items()
    assert sentence == f"{field} must be between 1 and {high}"


# --- (d) seeds ------------------------------------------------------------------------------

SEEDS = (
    st.none()
    | st.just("")
    | st.just("  ")
    | st.integers(0, limits.MAX_SEED).flatmap(int_spellings)
    | st.sampled_from([0, limits.MAX_SEED, str(limits.MAX_SEED), float(limits.MAX_SEED)])
)


@pytest.mark.parametrize("endpoint", sorted(MODELS))
@bounded
@given(seed=SEEDS, samples=st.integers(1, 4), present=st.booleans())
def test_spec_seed_is_32_bit_and_there_is_one_seed_per_sample(
    endpoint: str, seed: Any, samples: int, present: bool
) -> None:
    model, reference = MODELS[endpoint]
    if endpoint == "mixer_v6":
        samples = 1
    body = {k: v for k, v in reference.items() if k != "seed"}
    if present:
        body["seed"] = seed
    spec = validate(model, {**body, "samples": samples})
    assert isinstance(spec, JobSpec), spec
    assert 0 <= spec.seed <= limits.MAX_SEED
    assert spec.samples == samples
    assert len(spec.seeds) == samples
    assert all(0 <= each <= limits.MAX_SEED for each in spec.seeds)
    if present and seed is not None and str(seed).strip():
        assert spec.seed == fields.to_int(seed)


# --- (e) field_messages on whole random bodies ---------------------------------------------


@pytest.mark.parametrize("endpoint", sorted(MODELS))
@bodies
@given(body=st.dictionaries(st.sampled_from(FIELD_NAMES), json_values(), min_size=1))
def test_field_messages_shape_for_any_refused_body(endpoint: str, body: Body) -> None:
    model, _ = MODELS[endpoint]
    outcome = validate(model, body)
    if isinstance(outcome, ValidationError):
        messages = assert_error_shape(outcome)
        assert set(messages) <= set(body) | set(model.model_fields) | {"body"}
