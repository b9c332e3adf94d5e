"""Replies that echo an option's value show it as the member typed it, inside a code span it cannot leave."""

from __future__ import annotations

import re
from types import SimpleNamespace

import discord
import pytest
from discord import app_commands
from discord.app_commands import TransformerError

from cogs.render import app_command_error_reply, validation_reply
from services.request import RequestValidationError

# Discord's inline-code rule (simple-markdown's, as in CommonMark): a run of backticks opens a span that
# only the next run of the same length closes; one space of padding next to a backtick is dropped.
INLINE_CODE = re.compile(r"(?<!`)(`+)(?!`)(.+?)(?<!`)\1(?!`)", re.DOTALL)


def code_spans(message: str) -> list[str]:
    return [re.sub(r"^ (?= *`)|(?<=`) $", "", body) for _, body in INLINE_CODE.findall(message)]


def transformer_error(value: object) -> TransformerError:
    return TransformerError(
        value,
        discord.AppCommandOptionType.integer,
        app_commands.Range[int, 1, 4],  # type: ignore[arg-type]
    )


@pytest.mark.parametrize(
    "value",
    [-512, "-512", "a*b_c~d|e>f", "one`two", "`leading", "trailing`", "``double``", "`"],
)
def test_validation_reply_shows_the_value_as_typed_in_one_code_span(value: object) -> None:
    reply = validation_reply(RequestValidationError("img_width", value, "a multiple of 8 from 512 to 2048"))
    assert code_spans(reply) == ["width", str(value)], reply
    assert "\\" not in reply, "an escape inside a code span shows as a backslash"
    assert reply.endswith(": it must be a multiple of 8 from 512 to 2048.")


def test_validation_reply_shortens_a_long_value_inside_its_span() -> None:
    reply = validation_reply(RequestValidationError("prompt", "`-" * 500, "at most 2000 characters"))
    spans = code_spans(reply)
    assert spans[0] == "prompt"
    assert spans[1].startswith("`-" * 25) and spans[1].endswith("…") and len(spans[1]) <= 60


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        ("1`2", "1`2"),
        (discord.Object(id=123456789012345678), "123456789012345678"),
        (SimpleNamespace(id=42, name="general"), "general"),
    ],
    ids=["backtick", "object-id", "object-name"],
)
def test_a_transformer_error_shows_the_value_or_the_objects_id_or_name(value: object, shown: str) -> None:
    reply = app_command_error_reply(transformer_error(value), "/imagine").text
    assert code_spans(reply) == [shown], reply
    assert "<Object" not in reply and "namespace(" not in reply
    assert reply.endswith(" is not a valid value for this option.")


def test_a_wrapped_validation_error_gets_the_validation_reply() -> None:
    error = RequestValidationError("seed", -2, "-1 (random) or 0 to 2^53")
    wrapped = app_commands.CommandInvokeError(
        SimpleNamespace(name="imagine"),  # type: ignore[arg-type]
        error,
    )
    reply = app_command_error_reply(wrapped, "/imagine")
    assert reply.text == validation_reply(error)
    assert code_spans(reply.text) == ["seed", "-2"]
