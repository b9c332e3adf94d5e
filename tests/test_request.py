from __future__ import annotations

import random
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.request import SCHEDULERS, GenerationRequest, RequestValidationError, nearest_valid_sizes

API_NAMES = {
    "prompt",
    "negative_prompt",
    "samples",
    "scheduler",
    "num_inference_steps",
    "guidance_scale",
    "seed",
    "img_width",
    "img_height",
    "base64",
}

valid_sizes = st.integers(512 // 8, 2048 // 8).map(lambda n: n * 8)
valid_requests = st.fixed_dictionaries(
    {"prompt": st.text(min_size=1).filter(str.strip)},
    optional={
        "negative_prompt": st.text(),
        "samples": st.integers(1, 4),
        "scheduler": st.sampled_from(SCHEDULERS),
        "num_inference_steps": st.integers(20, 100),
        "guidance_scale": st.one_of(st.integers(1, 25), st.floats(1, 25)),
        "seed": st.integers(-1, 999_999_999_999_999),
        "img_width": valid_sizes,
        "img_height": valid_sizes,
        "base64": st.booleans(),
    },
)

# Each entry: a field and values the API page forbids for it.
invalid_values: dict[str, st.SearchStrategy[Any]] = {
    "prompt": st.one_of(st.text(alphabet=" \t\n"), st.integers(), st.none()),
    "negative_prompt": st.one_of(st.integers(), st.none()),
    "samples": st.one_of(st.integers(max_value=0), st.integers(min_value=5), st.booleans(), st.floats()),
    "scheduler": st.text().filter(lambda s: s not in SCHEDULERS),
    "num_inference_steps": st.one_of(st.integers(max_value=19), st.integers(min_value=101), st.floats()),
    "guidance_scale": st.one_of(
        st.floats(max_value=0.999),
        st.floats(min_value=25.001),
        st.just(float("nan")),
        st.booleans(),
        st.text(),
    ),
    "seed": st.one_of(st.integers(max_value=-2), st.integers(min_value=10**15), st.floats(), st.booleans()),
    "img_width": st.one_of(
        st.integers(max_value=511), st.integers(min_value=2049), valid_sizes.map(lambda n: n + 3)
    ),
    "img_height": st.one_of(
        st.integers(max_value=511), st.integers(min_value=2049), valid_sizes.map(lambda n: n - 1)
    ),
    "base64": st.one_of(st.integers(), st.text(), st.none()),
}


@given(valid_requests)
def test_every_valid_combination_is_accepted_and_serialised_with_the_api_names(
    fields: dict[str, Any],
) -> None:
    request = GenerationRequest.from_payload(fields)
    payload = request.to_payload()
    assert set(payload) == API_NAMES
    for name, value in fields.items():
        assert payload[name] == value
    assert GenerationRequest.from_payload(payload) == request


@given(valid_requests, st.sampled_from(sorted(invalid_values)), st.data())
def test_every_invalid_value_is_rejected_naming_its_field(
    fields: dict[str, Any], field: str, data: Any
) -> None:
    bad = data.draw(invalid_values[field])
    with pytest.raises(RequestValidationError) as caught:
        GenerationRequest.from_payload({**fields, field: bad})
    assert caught.value.field == field
    assert field in str(caught.value)


def test_defaults_are_the_api_pages() -> None:
    payload = GenerationRequest(prompt="a cat").to_payload()
    assert payload == {
        "prompt": "a cat",
        "negative_prompt": "",
        "samples": 1,
        "scheduler": "UniPC",
        "num_inference_steps": 30,
        "guidance_scale": 7.5,
        "seed": -1,
        "img_width": 1024,
        "img_height": 1024,
        "base64": False,
    }


def test_twelve_schedulers() -> None:
    assert len(SCHEDULERS) == 12
    assert {"DDPM", "UniPC", "DPM2 a Karras"} <= set(SCHEDULERS)


@pytest.mark.parametrize(
    ("value", "nearest"), [(515, (512, 520)), (1023, (1016, 1024)), (2047, (2040, 2048))]
)
def test_size_not_a_multiple_of_8_names_the_two_nearest(value: int, nearest: tuple[int, int]) -> None:
    assert nearest_valid_sizes(value) == nearest
    with pytest.raises(RequestValidationError) as caught:
        GenerationRequest(prompt="x", img_width=value)
    assert f"{nearest[0]} and {nearest[1]}" in str(caught.value)
    assert str(value) in str(caught.value)


def test_error_names_field_value_and_what_is_allowed() -> None:
    with pytest.raises(RequestValidationError) as caught:
        GenerationRequest(prompt="x", num_inference_steps=101)
    assert str(caught.value) == "num_inference_steps=101 is not allowed: a whole number from 20 to 100"


def test_unknown_field_is_rejected() -> None:
    with pytest.raises(RequestValidationError) as caught:
        GenerationRequest.from_payload({"prompt": "x", "steps": 30})
    assert caught.value.field == "steps"


def test_random_seed_becomes_concrete_and_fixed_seed_stays() -> None:
    request = GenerationRequest(prompt="x")
    concrete = request.with_concrete_seed(random.Random(7))
    assert 0 <= concrete.seed <= 999_999_999_999_999
    assert concrete.with_concrete_seed() == concrete
    assert GenerationRequest(prompt="x", seed=42).with_concrete_seed().seed == 42
    assert concrete.with_new_seed(random.Random(8)).seed != concrete.seed
