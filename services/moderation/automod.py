"""A server's own AutoMod keyword rules, applied to prompts (Discord's AutoMod never sees command options).

Rules come as Discord sends them (`GET /guilds/{id}/auto-moderation/rules` and the gateway's
AUTO_MODERATION_RULE_* events). Only enabled KEYWORD rules on message sends that block the message apply
(an alert-only rule lets a message through, so it lets a prompt through too): their keywords (the
same wildcard syntax as the bot's own blocklist, matched on the normalised prompt), their regex patterns
(Rust-flavoured on Discord; here RE2, the same family: linear time, so no pattern can hang the bot), their
allow list, and the roles and channels they exempt. A rule Discord sends that cannot be read is left out,
with a warning, rather than stopping the others.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import re2

from services.moderation.terms import Blocklist, Term, TermError, normalise

log = logging.getLogger(__name__)

TRIGGER_KEYWORD = 1
EVENT_MESSAGE_SEND = 1
ACTION_BLOCK_MESSAGE = 1
MAX_PATTERN_LENGTH = 260  # Discord's own limit
MAX_PATTERNS = 10
# RE2 refuses a pattern whose program would outgrow this, instead of using the memory.
PATTERN_MEMORY = 1 << 20


@dataclass(frozen=True)
class AutoModHit:
    """What matched: the rule's name and the keyword or pattern, for the mod log (never the member)."""

    rule_id: int
    rule_name: str
    matched: str


@dataclass(frozen=True)
class AutoModRule:
    id: int
    name: str
    keywords: Blocklist
    patterns: tuple[Any, ...]  # compiled RE2 patterns
    allow: Blocklist
    exempt_roles: frozenset[int]
    exempt_channels: frozenset[int]

    @classmethod
    def from_payload(cls, data: Mapping[str, Any]) -> AutoModRule | None:
        """The rule, or None when it does not apply to prompts (another trigger, disabled, unreadable)."""
        try:
            if data.get("trigger_type") != TRIGGER_KEYWORD or data.get("event_type") != EVENT_MESSAGE_SEND:
                return None
            if data.get("enabled") is not True:
                return None
            # A rule that only alerts or times out lets the message through on Discord: so does a prompt.
            if not any(
                isinstance(a, Mapping) and a.get("type") == ACTION_BLOCK_MESSAGE
                for a in data.get("actions") or ()
            ):
                return None
            rule_id = int(data["id"])
            name = str(data.get("name") or rule_id)[:100]
            metadata = data.get("trigger_metadata") or {}
            keywords = Blocklist(_terms(metadata.get("keyword_filter"), name))
            allow = Blocklist(_terms(metadata.get("allow_list"), name))
            patterns = tuple(_patterns(metadata.get("regex_patterns"), name))
            exempt_roles = frozenset(int(role) for role in data.get("exempt_roles") or ())
            exempt_channels = frozenset(int(channel) for channel in data.get("exempt_channels") or ())
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            log.warning("an AutoMod rule could not be read and is left out: %s", error)
            return None
        if not keywords and not patterns:
            return None
        return cls(rule_id, name, keywords, patterns, allow, exempt_roles, exempt_channels)

    def applies_to(self, role_ids: Collection[int], channel_ids: Collection[int]) -> bool:
        """Whether the rule applies to a member with `role_ids` in a channel (and its parent) `channel_ids`."""
        return not (self.exempt_roles & set(role_ids)) and not (self.exempt_channels & set(channel_ids))

    def match(self, prompt: str) -> AutoModHit | None:
        views = normalise(prompt)
        for view in views:
            allowed = self.allow.spans(view)
            for start, end, term in self.keywords.spans(view):
                if not _covered(start, end, allowed):
                    return AutoModHit(self.id, self.name, term.text)
        # Patterns are written for messages as typed, and a disguise is undone in the views.
        for text, raw in ((prompt, True), *((view, False) for view in views)):
            allowed = self.allow.spans(text, raw=raw)
            for pattern in self.patterns:
                for found in pattern.finditer(text):
                    if found.end() > found.start() and not _covered(found.start(), found.end(), allowed):
                        return AutoModHit(self.id, self.name, pattern.pattern)
        return None


def first_hit(
    rules: Iterable[AutoModRule], prompt: str, *, role_ids: Collection[int], channel_ids: Collection[int]
) -> AutoModHit | None:
    for rule in rules:
        if rule.applies_to(role_ids, channel_ids) and (hit := rule.match(prompt)) is not None:
            return hit
    return None


def _covered(start: int, end: int, allowed: list[tuple[int, int, Term]]) -> bool:
    return any(a_start <= start and end <= a_end for a_start, a_end, _term in allowed)


def _terms(values: object, rule: str) -> list[Term]:
    terms = []
    for value in values if isinstance(values, list) else ():
        try:
            terms.append(Term.parse(str(value)))
        except TermError as error:
            log.warning("AutoMod rule %r: keyword left out: %s", rule, error)
    return terms


def _patterns(values: object, rule: str) -> list[Any]:
    options = re2.Options()
    options.case_sensitive = False
    options.log_errors = False
    options.max_mem = PATTERN_MEMORY
    compiled = []
    for value in (values if isinstance(values, list) else ())[:MAX_PATTERNS]:
        text = str(value)
        if len(text) > MAX_PATTERN_LENGTH:
            log.warning(
                "AutoMod rule %r: a pattern longer than %d characters is left out", rule, MAX_PATTERN_LENGTH
            )
            continue
        try:
            compiled.append(re2.compile(text, options))
        except re2.error as error:
            reason = error.args[0] if error.args else error
            if isinstance(reason, bytes):
                reason = reason.decode(errors="replace")
            log.warning("AutoMod rule %r: pattern %r left out: %s", rule, text[:60], reason)
    return compiled
