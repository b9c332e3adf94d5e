"""A server's AutoMod keyword rules applied to prompts: keywords, patterns, allow lists and exemptions."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from services.moderation.automod import AutoModRule, first_hit

MEMBER_ROLE, MOD_ROLE = 11, 12
CHANNEL, STAFF_CHANNEL = 21, 22


def rule(**changes: Any) -> dict[str, Any]:
    """A rule as Discord sends it."""
    data: dict[str, Any] = {
        "id": "9001",
        "guild_id": "1",
        "name": "No cats",
        "creator_id": "5",
        "event_type": 1,
        "trigger_type": 1,
        "trigger_metadata": {"keyword_filter": ["*cat*"], "regex_patterns": [], "allow_list": ["black cat*"]},
        "actions": [{"type": 1, "metadata": {}}],
        "enabled": True,
        "exempt_roles": [str(MOD_ROLE)],
        "exempt_channels": [str(STAFF_CHANNEL)],
    }
    data.update(changes)
    return data


def read(data: dict[str, Any]) -> AutoModRule:
    parsed = AutoModRule.from_payload(data)
    assert parsed is not None
    return parsed


def test_keywords_match_the_disguised_prompt_and_the_allow_list_lets_its_phrases_through() -> None:
    cats = read(rule())
    hit = cats.match("a photo of a C4T on a sofa")
    assert hit is not None and (hit.rule_id, hit.rule_name, hit.matched) == (9001, "No cats", "*cat*")
    assert cats.match("a concatenated scene") is not None  # *cat* is anywhere, as on Discord
    assert cats.match("a black cat on a wall") is None
    assert cats.match("black cats everywhere") is None
    assert cats.match("a black cat and a cat") is not None  # the second one is not covered


def test_patterns_match_the_prompt_as_typed_and_as_undisguised() -> None:
    phones = read(
        rule(trigger_metadata={"regex_patterns": [r"\d{3}-\d{4}", r"d[o0]g+"], "keyword_filter": []})
    )
    assert phones.match("call 555-1234 now") is not None
    assert phones.match("a DOGGG") is not None  # case-insensitive, like AutoMod
    assert phones.match("a d.o.g") is not None  # through the views
    assert phones.match("a cat") is None


def test_exempt_roles_and_channels_are_not_filtered() -> None:
    cats = read(rule())
    prompt = "a cat"
    assert first_hit([cats], prompt, role_ids=[MEMBER_ROLE], channel_ids=[CHANNEL]) is not None
    assert first_hit([cats], prompt, role_ids=[MEMBER_ROLE, MOD_ROLE], channel_ids=[CHANNEL]) is None
    # A thread inherits its parent channel's exemption.
    assert first_hit([cats], prompt, role_ids=[MEMBER_ROLE], channel_ids=[99, STAFF_CHANNEL]) is None


@pytest.mark.parametrize(
    "changes",
    [
        {"enabled": False},
        {"trigger_type": 3},  # spam
        {"trigger_type": 4},  # Discord's own word lists, which no client can read
        {"event_type": 2},  # member profile updates
        {"trigger_metadata": {"keyword_filter": [], "regex_patterns": []}},
        # Alert or time out only: Discord lets such a message through, so a prompt goes through too.
        {"actions": [{"type": 2, "metadata": {"channel_id": "1"}}, {"type": 3, "metadata": {}}]},
        {"actions": []},
    ],
)
def test_rules_that_do_not_filter_messages_by_keyword_are_left_out(changes: dict[str, Any]) -> None:
    assert AutoModRule.from_payload(rule(**changes)) is None


@pytest.mark.parametrize(
    "changes",
    [{"id": None}, {"id": "not a number"}, {"trigger_metadata": "nonsense"}, {"exempt_roles": ["x"]}],
)
def test_a_rule_that_cannot_be_read_is_left_out_with_a_warning(
    changes: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    assert AutoModRule.from_payload(rule(**changes)) is None
    assert "left out" in caplog.text


def test_a_pattern_that_does_not_compile_is_left_out_and_the_rest_still_apply(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING)
    mixed = read(
        rule(trigger_metadata={"regex_patterns": ["(unclosed", "x" * 300, "fine"], "keyword_filter": []})
    )
    assert mixed.match("a fine day") is not None
    assert "(unclosed" in caplog.text and "longer than 260" in caplog.text


@pytest.mark.timeout(30)
def test_no_pattern_can_hang_the_bot() -> None:
    # Catastrophic for a backtracking engine (Python's own re would not finish here); RE2 is linear.
    hostile = read(rule(trigger_metadata={"regex_patterns": [r"(a+)+$"], "keyword_filter": []}))
    assert hostile.match("a" * 5000 + "!") is None
