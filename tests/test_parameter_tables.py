"""The bot's parameter table (`services.request`) and the Segmind stand-in's (`devtools.fakes.segmind.params`)
agree.

They are kept apart on purpose: each follows Segmind's API page on its own, so a misreading in one is not
copied into the other. Here they must read the page the same way: the same parameters in the same order,
with the same types and defaults (the dataclasses' and the stand-in parser's own); the same schedulers;
the same ranges, each bound probed from both sides; the same values of the wrong type refused; and every
request the bot can build accepted by the stand-in as it is.

One difference is by design and left alone: the stand-in ignores unknown fields, as a lenient public API
does, while the bot refuses them (a typo must not pass silently).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from devtools.fakes.segmind import params as stand_in
from services import request as bot

PROMPT = {"prompt": "a lighthouse"}


def bot_accepts(payload: dict[str, Any]) -> bool:
    try:
        bot.GenerationRequest.from_payload(payload)
    except bot.RequestValidationError:
        return False
    return True


def stand_in_accepts(payload: dict[str, Any]) -> bool:
    try:
        stand_in.parse_generation_params(payload)
    except stand_in.InvalidParameter:
        return False
    return True


def test_the_same_parameters_in_the_same_order_with_the_same_types_and_defaults() -> None:
    def table(cls: type) -> list[tuple[str, object, object]]:
        return [(field.name, field.type, field.default) for field in dataclasses.fields(cls)]

    assert table(bot.GenerationRequest) == table(stand_in.GenerationParams)
    # The stand-in's parser fills in defaults of its own; they must be the same too.
    parsed = stand_in.parse_generation_params(dict(PROMPT)).as_payload()
    assert parsed == bot.GenerationRequest(**PROMPT).to_payload()
    assert [type(value) for value in parsed.values()] == [
        type(value) for value in bot.GenerationRequest(**PROMPT).to_payload().values()
    ]


def test_the_same_schedulers() -> None:
    assert bot.SCHEDULERS == stand_in.SCHEDULERS
    for scheduler in bot.SCHEDULERS:
        payload = {**PROMPT, "scheduler": scheduler}
        assert bot_accepts(payload) and stand_in_accepts(payload), scheduler
    for unknown in ("unipc", "UniPC ", "", "Euler A"):
        payload = {**PROMPT, "scheduler": unknown}
        assert not bot_accepts(payload) and not stand_in_accepts(payload), unknown


def test_the_same_bounds_for_seed_and_size() -> None:
    assert bot.SEED_RANGE == (stand_in.MIN_SEED, stand_in.MAX_SEED)
    assert bot.SIZE_RANGE == (stand_in.MIN_SIDE, stand_in.MAX_SIDE)
    assert bot.SIZE_STEP == stand_in.SIDE_MULTIPLE


def probes(name: str) -> list[tuple[object, bool]]:
    """Values around each of the bot's bounds for `name`, each with whether the API page allows it."""
    if name == "guidance_scale":
        low, high = bot.GUIDANCE_RANGE
        return [
            (low - 0.5, False),
            (low, True),
            (int(low), True),
            ((low + high) / 2, True),
            (high, True),
            (high + 0.5, False),
            (math.nan, False),
            (math.inf, False),
        ]
    if name in ("img_width", "img_height"):
        (low, high), step = bot.SIZE_RANGE, bot.SIZE_STEP
        return [
            (low - step, False),
            (low, True),
            (low + 1, False),
            (low + step, True),
            (high - 1, False),
            (high, True),
            (high + step, False),
        ]
    low, high = {
        "samples": bot.SAMPLES_RANGE,
        "num_inference_steps": bot.STEPS_RANGE,
        "seed": bot.SEED_RANGE,
    }[name]
    return [(low - 1, False), (low, True), ((low + high) // 2, True), (high, True), (high + 1, False)]


@pytest.mark.parametrize(
    "name", ["samples", "num_inference_steps", "guidance_scale", "seed", "img_width", "img_height"]
)
def test_the_same_ranges(name: str) -> None:
    for value, allowed in probes(name):
        payload = {**PROMPT, name: value}
        assert (bot_accepts(payload), stand_in_accepts(payload)) == (allowed, allowed), (name, value)


@pytest.mark.parametrize(
    ("name", "wrong"),
    [
        ("prompt", ["", "   ", 5, None, ["a"]]),
        ("negative_prompt", [5, None, ["a"]]),
        ("samples", [True, 2.0, "2", None]),
        ("num_inference_steps", [False, 30.0, "30", None]),
        ("guidance_scale", [True, "7.5", None]),
        ("seed", [True, 5.0, "5", None]),
        ("img_width", [True, 1024.0, "1024", None]),
        ("img_height", [False, 1024.0, "1024", None]),
        ("scheduler", [None, 5, ["UniPC"]]),
        ("base64", [1, 0, "true", None]),
    ],
)
def test_the_same_values_of_the_wrong_type_are_refused(name: str, wrong: list[object]) -> None:
    for value in wrong:
        payload = {**PROMPT, name: value}
        assert not bot_accepts(payload), (name, value)
        assert not stand_in_accepts(payload), (name, value)


valid_requests = st.builds(
    bot.GenerationRequest,
    prompt=st.text(min_size=1).filter(str.strip),
    negative_prompt=st.text(),
    samples=st.integers(*bot.SAMPLES_RANGE),
    scheduler=st.sampled_from(bot.SCHEDULERS),
    num_inference_steps=st.integers(*bot.STEPS_RANGE),
    guidance_scale=st.floats(*bot.GUIDANCE_RANGE) | st.integers(1, 25),
    seed=st.integers(*bot.SEED_RANGE),
    img_width=st.integers(bot.SIZE_RANGE[0] // bot.SIZE_STEP, bot.SIZE_RANGE[1] // bot.SIZE_STEP).map(
        lambda n: n * bot.SIZE_STEP
    ),
    img_height=st.integers(bot.SIZE_RANGE[0] // bot.SIZE_STEP, bot.SIZE_RANGE[1] // bot.SIZE_STEP).map(
        lambda n: n * bot.SIZE_STEP
    ),
    base64=st.booleans(),
)


@given(valid_requests)
def test_every_request_the_bot_can_build_is_accepted_by_the_stand_in_as_it_is(
    request: bot.GenerationRequest,
) -> None:
    payload = request.to_payload()
    assert stand_in.parse_generation_params(payload).as_payload() == payload
