"""A server's settings: what its tiers and blocklist mean, and reading back what was stored, even damaged."""

from __future__ import annotations

import json
import logging

import pytest

from services.moderation.settings import NO_LIMIT, GuildSettings, Scope
from services.moderation.terms import TermError, parse_terms

GUILD = 42
ARTISTS, BANNED, PATRONS = 1, 2, 3


def test_the_most_generous_tier_a_member_holds_wins_and_others_have_the_servers_limit() -> None:
    settings = GuildSettings(GUILD, daily_images=20, role_tiers={ARTISTS: 60, BANNED: 0, PATRONS: NO_LIMIT})
    assert settings.daily_limit([], default=40) == 20
    assert settings.daily_limit([ARTISTS], default=40) == 60
    assert settings.daily_limit([BANNED], default=40) == 0
    assert settings.daily_limit([BANNED, ARTISTS], default=40) == 60
    assert settings.daily_limit([ARTISTS, PATRONS], default=40) is None
    assert GuildSettings(GUILD).daily_limit([], default=40) == 40  # the .env default


def test_outside_nsfw_terms_are_allowed_in_age_restricted_channels_only() -> None:
    settings = GuildSettings(GUILD).with_terms(parse_terms("gore"), Scope.OUTSIDE_NSFW)
    settings = settings.with_terms(parse_terms("kid"), Scope.EVERYWHERE)
    assert settings.blocklist_for(age_restricted=False).match("gore") is not None
    assert settings.blocklist_for(age_restricted=True).match("gore") is None
    assert settings.blocklist_for(age_restricted=True).match("a kid") is not None


def test_terms_are_added_once_moved_between_scopes_and_removed_by_what_was_typed() -> None:
    settings = GuildSettings(GUILD).with_terms(parse_terms("kid, gore*"), Scope.EVERYWHERE)
    settings = settings.with_terms(parse_terms("GORE*"), Scope.OUTSIDE_NSFW)
    assert [(entry.term.text, entry.scope) for entry in settings.blocked] == [
        ("kid", Scope.EVERYWHERE),
        ("GORE*", Scope.OUTSIDE_NSFW),
    ]
    settings, missing = settings.without_terms(["gore*", "never added"])
    assert [entry.term.text for entry in settings.blocked] == ["kid"] and missing == ["never added"]


def test_the_blocklist_has_a_limit() -> None:
    many = parse_terms(", ".join(f"word{n}" for n in range(1000)))
    settings = GuildSettings(GUILD).with_terms(many, Scope.EVERYWHERE)
    with pytest.raises(TermError, match="at most 1000"):
        settings.with_terms(parse_terms("one more"), Scope.EVERYWHERE)


def test_settings_read_back_as_they_were_stored() -> None:
    settings = GuildSettings(
        GUILD,
        daily_images=5,
        max_concurrent=1,
        role_tiers={ARTISTS: 60, PATRONS: NO_LIMIT},
        automod=True,
        strike_blocks=3,
        strike_hours=24,
        modlog_channel_id=77,
    ).with_terms(parse_terms("kid, *gore*"), Scope.OUTSIDE_NSFW)
    again = GuildSettings.from_json(GUILD, settings.to_json())
    assert again.to_json() == settings.to_json()
    assert again.blocklist.match("goretex") is not None


def test_a_damaged_record_keeps_what_can_be_read_and_says_what_was_not(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING)
    damaged = json.dumps(
        {
            "daily_images": -3,
            "max_concurrent": 2,
            "role_tiers": {"x": 5, str(ARTISTS): "lots", str(PATRONS): -1},
            "blocked": [{"term": "kid"}, {"term": "*"}, "nonsense", {"term": "gore", "scope": "sometimes"}],
            "automod": "yes",
            "modlog_channel_id": True,
        }
    )
    settings = GuildSettings.from_json(GUILD, damaged)
    assert settings.daily_images is None and settings.max_concurrent == 2
    assert dict(settings.role_tiers) == {PATRONS: NO_LIMIT}
    assert [entry.term.text for entry in settings.blocked] == ["kid"]
    assert settings.automod is False and settings.modlog_channel_id is None
    assert "daily_images" in caplog.text and "left out" in caplog.text
    for text in (None, "", "not json", "[1, 2]"):
        assert GuildSettings.from_json(GUILD, text) == GuildSettings(GUILD)
