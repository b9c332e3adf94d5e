"""AutoMod rules as Discord's API v10 holds them, for the local Discord stand-in.

`normalize_rule` fills in what a caller leaves out the way Discord does and refuses (ValueError)
what Discord would answer with 400 Invalid Form Body, so a bot under test only ever sees rules
that could exist on a real server.
See https://discord.com/developers/docs/resources/auto-moderation.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

TRIGGER_KEYWORD = 1
TRIGGER_SPAM = 3
TRIGGER_KEYWORD_PRESET = 4
TRIGGER_MENTION_SPAM = 5
TRIGGER_MEMBER_PROFILE = 6
# Type 2 (harmful link) was retired; Discord no longer accepts it.
TRIGGER_TYPES = frozenset(
    {TRIGGER_KEYWORD, TRIGGER_SPAM, TRIGGER_KEYWORD_PRESET, TRIGGER_MENTION_SPAM, TRIGGER_MEMBER_PROFILE}
)

EVENT_MESSAGE_SEND = 1
EVENT_MEMBER_UPDATE = 2

ACTION_BLOCK_MESSAGE = 1
ACTION_SEND_ALERT_MESSAGE = 2
ACTION_TIMEOUT = 3
ACTION_BLOCK_MEMBER_INTERACTION = 4

# How many rules of each trigger type one guild may have.
MAX_RULES_PER_TRIGGER = {
    TRIGGER_KEYWORD: 6,
    TRIGGER_SPAM: 1,
    TRIGGER_KEYWORD_PRESET: 1,
    TRIGGER_MENTION_SPAM: 1,
    TRIGGER_MEMBER_PROFILE: 1,
}
# The names Discord's client gives new rules, used when a caller names none.
DEFAULT_RULE_NAMES = {
    TRIGGER_KEYWORD: "Block Custom Words",
    TRIGGER_SPAM: "Block Suspected Spam Content",
    TRIGGER_KEYWORD_PRESET: "Block Commonly Flagged Words",
    TRIGGER_MENTION_SPAM: "Block Mention Spam",
    TRIGGER_MEMBER_PROFILE: "Block Words in Member Profile Names",
}
MAX_RULE_NAME = 100
MAX_KEYWORDS = 1000
MAX_KEYWORD_LENGTH = 60
MAX_REGEX_PATTERNS = 10
MAX_REGEX_LENGTH = 260
MAX_ALLOW_LIST = {TRIGGER_KEYWORD: 100, TRIGGER_MEMBER_PROFILE: 100, TRIGGER_KEYWORD_PRESET: 1000}
MAX_MENTION_TOTAL_LIMIT = 50
MAX_EXEMPT_ROLES = 20
MAX_EXEMPT_CHANNELS = 50
MAX_TIMEOUT_SECONDS = 4 * 7 * 24 * 3600
MAX_CUSTOM_MESSAGE = 150
PRESETS = frozenset({1, 2, 3})  # profanity, sexual content, slurs
# Timeouts only exist for keyword and mention spam rules; blocking interactions only for profiles.
ACTIONS_FOR_TRIGGER = {
    TRIGGER_KEYWORD: frozenset({ACTION_BLOCK_MESSAGE, ACTION_SEND_ALERT_MESSAGE, ACTION_TIMEOUT}),
    TRIGGER_SPAM: frozenset({ACTION_BLOCK_MESSAGE, ACTION_SEND_ALERT_MESSAGE}),
    TRIGGER_KEYWORD_PRESET: frozenset({ACTION_BLOCK_MESSAGE, ACTION_SEND_ALERT_MESSAGE}),
    TRIGGER_MENTION_SPAM: frozenset({ACTION_BLOCK_MESSAGE, ACTION_SEND_ALERT_MESSAGE, ACTION_TIMEOUT}),
    TRIGGER_MEMBER_PROFILE: frozenset({ACTION_SEND_ALERT_MESSAGE, ACTION_BLOCK_MEMBER_INTERACTION}),
}


def normalize_rule(
    rule: Mapping[str, Any],
    existing: Mapping[str, Any] | None,
    *,
    rule_id: int,
    guild_id: int,
    creator_id: int,
    others: Iterable[Mapping[str, Any]] = (),
) -> dict[str, Any]:
    """The full rule Discord would store for a create (`existing` None) or an update of `existing`.

    An update changes only the fields given, as a PATCH does; `others` are the guild's other
    rules, for the per-trigger-type rule limit."""
    if existing is not None:
        trigger_type = int(existing["trigger_type"])
        if "trigger_type" in rule and int(rule["trigger_type"]) != trigger_type:
            raise ValueError("an AutoMod rule's trigger_type cannot be changed once created")
        merged = {**existing, **rule}
    else:
        trigger_type = int(rule.get("trigger_type", TRIGGER_KEYWORD))
        if trigger_type not in TRIGGER_TYPES:
            raise ValueError(
                f"unknown AutoMod trigger_type {trigger_type}; Discord accepts {sorted(TRIGGER_TYPES)}"
            )
        same_kind = sum(1 for other in others if int(other["trigger_type"]) == trigger_type)
        if same_kind >= MAX_RULES_PER_TRIGGER[trigger_type]:
            raise ValueError(
                f"a guild may have at most {MAX_RULES_PER_TRIGGER[trigger_type]} AutoMod rules "
                f"of trigger_type {trigger_type}"
            )
        merged = dict(rule)
    profile = trigger_type == TRIGGER_MEMBER_PROFILE
    default_event = EVENT_MEMBER_UPDATE if profile else EVENT_MESSAGE_SEND
    default_action = ACTION_BLOCK_MEMBER_INTERACTION if profile else ACTION_BLOCK_MESSAGE
    name = str(merged.get("name") or DEFAULT_RULE_NAMES[trigger_type])
    if len(name) > MAX_RULE_NAME:
        raise ValueError(f"AutoMod rule name is over {MAX_RULE_NAME} characters")
    event_type = int(merged.get("event_type", default_event))
    if event_type != default_event:
        raise ValueError(
            f"trigger_type {trigger_type} rules need event_type {default_event}, not {event_type}"
        )
    metadata = (
        existing.get("trigger_metadata") if existing is not None and "trigger_metadata" not in rule else None
    )
    if metadata is None:
        metadata = _trigger_metadata(trigger_type, merged.get("trigger_metadata") or {})
    actions = merged.get("actions")
    if actions is None:
        actions = [{"type": default_action, "metadata": {}}]
    exempt_roles = _snowflakes(merged.get("exempt_roles"), "exempt_roles", MAX_EXEMPT_ROLES)
    exempt_channels = _snowflakes(merged.get("exempt_channels"), "exempt_channels", MAX_EXEMPT_CHANNELS)
    return {
        "id": str(rule_id),
        "guild_id": str(guild_id),
        "name": name,
        "creator_id": str(
            existing["creator_id"] if existing is not None else merged.get("creator_id", creator_id)
        ),
        "event_type": event_type,
        "trigger_type": trigger_type,
        "trigger_metadata": metadata,
        "actions": [_action(trigger_type, a) for a in actions],
        "enabled": bool(merged.get("enabled", True)),
        "exempt_roles": exempt_roles,
        "exempt_channels": exempt_channels,
    }


def _trigger_metadata(trigger_type: int, given: Mapping[str, Any]) -> dict[str, Any]:
    if trigger_type in (TRIGGER_KEYWORD, TRIGGER_MEMBER_PROFILE):
        keywords = _strings(given.get("keyword_filter"), "keyword_filter", MAX_KEYWORDS, MAX_KEYWORD_LENGTH)
        patterns = _strings(
            given.get("regex_patterns"), "regex_patterns", MAX_REGEX_PATTERNS, MAX_REGEX_LENGTH
        )
        allow = _strings(
            given.get("allow_list"), "allow_list", MAX_ALLOW_LIST[trigger_type], MAX_KEYWORD_LENGTH
        )
        return {"keyword_filter": keywords, "regex_patterns": patterns, "allow_list": allow}
    if trigger_type == TRIGGER_KEYWORD_PRESET:
        presets = [int(p) for p in given.get("presets") or []]
        if not set(presets) <= PRESETS:
            raise ValueError(f"unknown AutoMod keyword presets {sorted(set(presets) - PRESETS)}")
        allow = _strings(
            given.get("allow_list"), "allow_list", MAX_ALLOW_LIST[trigger_type], MAX_KEYWORD_LENGTH
        )
        return {"presets": presets, "allow_list": allow}
    if trigger_type == TRIGGER_MENTION_SPAM:
        if given.get("mention_total_limit") is None:
            raise ValueError("mention spam rules need trigger_metadata.mention_total_limit")
        limit = int(given["mention_total_limit"])
        if not 1 <= limit <= MAX_MENTION_TOTAL_LIMIT:
            raise ValueError(f"mention_total_limit {limit} is outside [1, {MAX_MENTION_TOTAL_LIMIT}]")
        raid = bool(given.get("mention_raid_protection_enabled", False))
        return {"mention_total_limit": limit, "mention_raid_protection_enabled": raid}
    return {}


def _strings(values: Any, field: str, max_count: int, max_length: int) -> list[str]:
    items = [str(v) for v in values or []]
    if len(items) > max_count:
        raise ValueError(f"AutoMod {field} has {len(items)} entries; Discord allows {max_count}")
    too_long = [v for v in items if len(v) > max_length]
    if too_long:
        raise ValueError(f"AutoMod {field} entry {too_long[0]!r} is over {max_length} characters")
    return items


def _snowflakes(values: Any, field: str, max_count: int) -> list[str]:
    ids = [str(int(v)) for v in values or []]
    if len(ids) > max_count:
        raise ValueError(f"AutoMod {field} has {len(ids)} ids; Discord allows {max_count}")
    return ids


def _action(trigger_type: int, action: Mapping[str, Any]) -> dict[str, Any]:
    action_type = int(action.get("type", 0))
    if action_type not in ACTIONS_FOR_TRIGGER[trigger_type]:
        allowed = sorted(ACTIONS_FOR_TRIGGER[trigger_type])
        raise ValueError(
            f"AutoMod action type {action_type} is not allowed for trigger_type {trigger_type} ({allowed})"
        )
    given = action.get("metadata") or {}
    metadata: dict[str, Any] = {}
    if action_type == ACTION_SEND_ALERT_MESSAGE:
        if given.get("channel_id") is None:
            raise ValueError("send-alert actions need metadata.channel_id")
        metadata["channel_id"] = str(int(given["channel_id"]))
    elif action_type == ACTION_TIMEOUT:
        seconds = int(given.get("duration_seconds") or 0)
        if not 1 <= seconds <= MAX_TIMEOUT_SECONDS:
            raise ValueError(f"timeout duration_seconds {seconds} is outside [1, {MAX_TIMEOUT_SECONDS}]")
        metadata["duration_seconds"] = seconds
    elif action_type == ACTION_BLOCK_MESSAGE and given.get("custom_message") is not None:
        message = str(given["custom_message"])
        if len(message) > MAX_CUSTOM_MESSAGE:
            raise ValueError(f"custom_message is over {MAX_CUSTOM_MESSAGE} characters")
        metadata["custom_message"] = message
    return {"type": action_type, "metadata": metadata}


__all__ = [
    "EVENT_MEMBER_UPDATE",
    "EVENT_MESSAGE_SEND",
    "TRIGGER_KEYWORD",
    "TRIGGER_KEYWORD_PRESET",
    "TRIGGER_MEMBER_PROFILE",
    "TRIGGER_MENTION_SPAM",
    "TRIGGER_SPAM",
    "TRIGGER_TYPES",
    "normalize_rule",
]
