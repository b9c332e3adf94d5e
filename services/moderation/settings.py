"""One server's settings, as its admins set them with `/admin`: limits, role tiers, blocklist, strikes."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from functools import cached_property
from typing import Any

from services.moderation.terms import Blocklist, Term, TermError

log = logging.getLogger(__name__)

NO_LIMIT = -1  # a role tier that lifts the daily limit
MAY_NOT_GENERATE = 0
MAX_BLOCKED_TERMS = 1000
MAX_ROLE_TIERS = 50


class Scope(StrEnum):
    EVERYWHERE = "everywhere"
    OUTSIDE_NSFW = "outside-nsfw"  # allowed in age-restricted channels


@dataclass(frozen=True)
class BlockedTerm:
    term: Term
    scope: Scope = Scope.EVERYWHERE


@dataclass(frozen=True)
class GuildSettings:
    """What a server's admins set; None (or empty) means the `.env` default applies.

    Kept as one record per server in the store, so every shard reads the same, and changed through the
    store's own read-modify-write, so two admins changing it at once both land.
    """

    guild_id: int
    daily_images: int | None = None
    max_concurrent: int | None = None
    role_tiers: Mapping[int, int] = field(default_factory=dict)  # role id -> daily images (or the above)
    blocked: tuple[BlockedTerm, ...] = ()
    automod: bool = False
    strike_blocks: int | None = None  # blocked prompts within 24 h that ban automatically
    strike_hours: int | None = None  # for how long
    modlog_channel_id: int | None = None

    @cached_property
    def blocklist(self) -> Blocklist:
        return Blocklist(entry.term for entry in self.blocked)

    @cached_property
    def blocklist_outside_nsfw(self) -> Blocklist:
        return Blocklist(entry.term for entry in self.blocked if entry.scope is Scope.EVERYWHERE)

    def blocklist_for(self, *, age_restricted: bool) -> Blocklist:
        """The terms that apply in a channel: all of them, or in an age-restricted one only those blocked
        everywhere."""
        return self.blocklist_outside_nsfw if age_restricted else self.blocklist

    def daily_limit(self, role_ids: Iterable[int], default: int) -> int | None:
        """The member's daily images here: None for no limit. The most generous tier a member holds wins
        (no limit, then the most images); a member with no tier has the server's limit or `default`."""
        tiers = [self.role_tiers[role] for role in role_ids if role in self.role_tiers]
        if not tiers:
            return self.daily_images if self.daily_images is not None else default
        return None if NO_LIMIT in tiers else max(tiers)

    def with_terms(self, terms: Iterable[Term], scope: Scope) -> GuildSettings:
        """These terms added (or moved to `scope`); TermError when the list would grow past its limit."""
        kept = {entry.term.text.casefold(): entry for entry in self.blocked}
        for term in terms:
            kept[term.text.casefold()] = BlockedTerm(term, scope)
        if len(kept) > MAX_BLOCKED_TERMS:
            raise TermError(f"a server can block at most {MAX_BLOCKED_TERMS} terms")
        return replace(self, blocked=tuple(kept.values()))

    def without_terms(self, texts: Iterable[str]) -> tuple[GuildSettings, list[str]]:
        """These terms removed, and the ones that were not on the list."""
        wanted = {" ".join(text.split()).casefold(): text for text in texts}
        kept = tuple(entry for entry in self.blocked if entry.term.text.casefold() not in wanted)
        found = {entry.term.text.casefold() for entry in self.blocked}
        missing = [text for key, text in wanted.items() if key not in found]
        return replace(self, blocked=kept), missing

    def to_json(self) -> str:
        return json.dumps(
            {
                "guild_id": self.guild_id,
                "daily_images": self.daily_images,
                "max_concurrent": self.max_concurrent,
                "role_tiers": {str(role): daily for role, daily in self.role_tiers.items()},
                "blocked": [{"term": entry.term.text, "scope": entry.scope.value} for entry in self.blocked],
                "automod": self.automod,
                "strike_blocks": self.strike_blocks,
                "strike_hours": self.strike_hours,
                "modlog_channel_id": self.modlog_channel_id,
            },
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, guild_id: int, text: str | bytes | None) -> GuildSettings:
        """The stored settings; a record that cannot be read gives the defaults (with a warning), field by
        field, so one bad value never takes the rest of a server's settings with it."""
        if not text:
            return cls(guild_id)
        try:
            data = json.loads(text)
            if not isinstance(data, dict):
                raise ValueError("not an object")
        except ValueError as error:
            log.warning("settings of server %d are unreadable (%s); the defaults apply", guild_id, error)
            return cls(guild_id)
        return cls(
            guild_id,
            daily_images=_optional_int(data, "daily_images", guild_id, least=0),
            max_concurrent=_optional_int(data, "max_concurrent", guild_id, least=1),
            role_tiers=_tiers(data.get("role_tiers"), guild_id),
            blocked=_blocked(data.get("blocked"), guild_id),
            automod=data.get("automod") is True,
            strike_blocks=_optional_int(data, "strike_blocks", guild_id, least=1),
            strike_hours=_optional_int(data, "strike_hours", guild_id, least=1),
            modlog_channel_id=_optional_int(data, "modlog_channel_id", guild_id, least=1),
        )


def _optional_int(data: Mapping[str, Any], key: str, guild_id: int, *, least: int) -> int | None:
    value = data.get(key)
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool) and value >= least:
        return value
    log.warning("settings of server %d: %s=%r is not usable; the default applies", guild_id, key, value)
    return None


def _tiers(value: object, guild_id: int) -> dict[int, int]:
    tiers: dict[int, int] = {}
    for role, daily in value.items() if isinstance(value, dict) else ():
        try:
            role_id, images = int(role), daily
            if not isinstance(images, int) or isinstance(images, bool) or images < NO_LIMIT:
                raise ValueError(f"daily {images!r}")
        except ValueError as error:
            log.warning("settings of server %d: role tier %r left out (%s)", guild_id, role, error)
            continue
        tiers[role_id] = images
    return tiers


def _blocked(value: object, guild_id: int) -> tuple[BlockedTerm, ...]:
    blocked = []
    for entry in value if isinstance(value, list) else ():
        try:
            blocked.append(
                BlockedTerm(Term.parse(str(entry["term"])), Scope(entry.get("scope", "everywhere")))
            )
        except (TermError, KeyError, TypeError, ValueError, AttributeError) as error:
            log.warning("settings of server %d: blocked term %r left out (%s)", guild_id, entry, error)
    return tuple(blocked)
