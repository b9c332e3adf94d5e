"""Discord's request limits and error bodies, as enforced by the local Discord stand-in.

The limits mirror what Discord rejects with 400/413 so that a bot bug (an
over-long message, too many buttons, an oversize image) fails under test the
same way it would in production.
"""

from __future__ import annotations

import math
import time
from typing import Any

from devtools.fakes.discord.models import FLAG_COMPONENTS_V2, RecordedFile, iter_components

Path = tuple[str | int, ...]

ERROR_MESSAGES: dict[int, str] = {
    0: "General error",
    10003: "Unknown Channel",
    10004: "Unknown Guild",
    10008: "Unknown Message",
    10013: "Unknown User",
    10015: "Unknown Webhook",
    10062: "Unknown interaction",
    10063: "Unknown application command",
    10066: "Unknown auto moderation rule",
    40005: "Request entity too large",
    40060: "Interaction has already been acknowledged.",
    50001: "Missing Access",
    50005: "Cannot edit a message authored by another user",
    50006: "Cannot send an empty message",
    50007: "Cannot send messages to this user",
    50013: "Missing Permissions",
    50027: "Invalid Webhook Token",
    50035: "Invalid Form Body",
    50109: "The request body contains invalid JSON.",
}

HTTP_REASONS = {
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    413: "Request Entity Too Large",
    429: "Too Many Requests",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}

MAX_CONTENT = 2000
MAX_EMBEDS = 10
MAX_FILES = 10
MAX_EMBED_TOTAL = 6000
MAX_ACTION_ROWS = 5
MAX_ROW_WIDTH = 5
MAX_V2_COMPONENTS = 40
MAX_CUSTOM_ID = 100
MAX_BUTTON_LABEL = 80
MAX_SELECT_OPTIONS = 25
MAX_MODAL_TITLE = 45
EMBED_LIMITS: dict[str, int] = {"title": 256, "description": 4096}
FIELD_LIMITS: dict[str, int] = {"name": 256, "value": 1024}
MAX_EMBED_FIELDS = 25
MAX_FOOTER = 2048
MAX_AUTHOR = 256

BUTTON = 2
ACTION_ROW = 1
SELECT_TYPES = frozenset({3, 5, 6, 7, 8})
TEXT_INPUT = 4
LINK_STYLE = 5
PREMIUM_STYLE = 6


class DiscordError(Exception):
    """An HTTP error answer in Discord's format, raised by handlers and rendered by the server."""

    def __init__(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
        super().__init__(f"{status}: {body}")
        self.status = status
        self.body = body
        self.headers = headers or {}


def api_error(status: int, code: int | None = None, message: str | None = None) -> DiscordError:
    if code is None or code == 0:
        return DiscordError(
            status, {"message": message or f"{status}: {HTTP_REASONS.get(status, 'Error')}", "code": 0}
        )
    return DiscordError(status, {"message": message or ERROR_MESSAGES.get(code, "Error"), "code": code})


def unknown_message() -> DiscordError:
    return api_error(404, 10008)


def invalid_webhook_token() -> DiscordError:
    return api_error(401, 50027)


def unknown_interaction() -> DiscordError:
    return api_error(404, 10062)


def too_large() -> DiscordError:
    return api_error(413, 40005)


def rate_limited(retry_after: float, *, bucket: str = "stand-in") -> DiscordError:
    """A 429 as Discord sends it; discord.py only honours it when a `Via` header is present
    (otherwise it assumes a Cloudflare ban and raises)."""
    now = time.time()
    headers = {
        "Retry-After": str(math.ceil(retry_after)),
        "X-RateLimit-Limit": "5",
        "X-RateLimit-Remaining": "0",
        "X-RateLimit-Reset": f"{now + retry_after:.3f}",
        "X-RateLimit-Reset-After": f"{retry_after:.3f}",
        "X-RateLimit-Bucket": bucket,
        "X-RateLimit-Scope": "user",
        "Via": "1.1 google",
    }
    body = {"message": "You are being rate limited.", "retry_after": retry_after, "global": False}
    return DiscordError(429, body, headers)


class FormErrors:
    """Collects field errors into Discord's nested `errors` object."""

    def __init__(self, prefix: Path = ()) -> None:
        self._prefix = prefix
        self._errors: dict[str, Any] = {}

    def __bool__(self) -> bool:
        return bool(self._errors)

    def add(self, path: Path, code: str, message: str) -> None:
        node = self._errors
        for part in (*self._prefix, *path):
            node = node.setdefault(str(part), {})
        node.setdefault("_errors", []).append({"code": code, "message": message})

    def too_long(self, path: Path, value: object, limit: int) -> None:
        if isinstance(value, str | list) and len(value) > limit:
            self.add(path, "BASE_TYPE_MAX_LENGTH", f"Must be {limit} or fewer in length.")

    def required(self, path: Path) -> None:
        self.add(path, "BASE_TYPE_REQUIRED", "This field is required")

    def raise_if_any(self) -> None:
        if self._errors:
            raise DiscordError(400, {"message": "Invalid Form Body", "code": 50035, "errors": self._errors})


def check_file_sizes(files: list[RecordedFile], limit: int) -> None:
    """Discord answers 413 when one file, or all files of a request together, exceed the limit."""
    if any(len(f.data) > limit for f in files) or sum(len(f.data) for f in files) > limit:
        raise too_large()


def validate_message(
    payload: dict[str, Any], files: list[RecordedFile], *, creating: bool, prefix: Path = ()
) -> None:
    """Raises DiscordError (400) for a message create/edit body Discord would reject."""
    errors = FormErrors(prefix)
    content = payload.get("content")
    if content is not None and not isinstance(content, str):
        errors.add(("content",), "BASE_TYPE_STRING", "Must be a string.")
    errors.too_long(("content",), content, MAX_CONTENT)
    embeds = payload.get("embeds") or []
    _validate_embeds(errors, embeds)
    if len(files) > MAX_FILES:
        errors.add(("files",), "BASE_TYPE_MAX_LENGTH", f"Must be {MAX_FILES} or fewer in length.")
    flags = int(payload.get("flags") or 0)
    components = payload.get("components") or []
    if flags & FLAG_COMPONENTS_V2:
        if content or embeds:
            errors.add(
                ("content" if content else "embeds",),
                "MESSAGE_CANNOT_USE_LEGACY_FIELDS_WITH_COMPONENTS_V2",
                "The 'content' and 'embeds' fields cannot be used when using MessageFlags.IS_COMPONENTS_V2",
            )
        _validate_v2_components(errors, components)
    else:
        _validate_action_rows(errors, components)
    _check_duplicate_custom_ids(errors, components)
    errors.raise_if_any()
    if creating and not _has_body(payload, files):
        raise api_error(400, 50006)


def validate_modal(data: dict[str, Any], *, prefix: Path = ("data",)) -> None:
    errors = FormErrors(prefix)
    title = data.get("title")
    if not title:
        errors.required(("title",))
    errors.too_long(("title",), title, MAX_MODAL_TITLE)
    custom_id = data.get("custom_id")
    if not custom_id:
        errors.required(("custom_id",))
    errors.too_long(("custom_id",), custom_id, MAX_CUSTOM_ID)
    components = data.get("components") or []
    if not 1 <= len(components) <= MAX_ACTION_ROWS:
        errors.add(
            ("components",), "BASE_TYPE_BAD_LENGTH", f"Must be between 1 and {MAX_ACTION_ROWS} in length."
        )
    _check_custom_ids(errors, components, ("components",))
    _check_duplicate_custom_ids(errors, components)
    errors.raise_if_any()


def _has_body(payload: dict[str, Any], files: list[RecordedFile]) -> bool:
    return bool(
        payload.get("content")
        or payload.get("embeds")
        or payload.get("components")
        or payload.get("sticker_ids")
        or payload.get("poll")
        or files
    )


def _validate_embeds(errors: FormErrors, embeds: list[dict[str, Any]]) -> None:
    errors.too_long(("embeds",), embeds, MAX_EMBEDS)
    total = 0
    for index, embed in enumerate(embeds):
        path: Path = ("embeds", index)
        for key, limit in EMBED_LIMITS.items():
            errors.too_long((*path, key), embed.get(key), limit)
            total += len(embed.get(key) or "")
        fields = embed.get("fields") or []
        errors.too_long((*path, "fields"), fields, MAX_EMBED_FIELDS)
        for field_index, embed_field in enumerate(fields):
            for key, limit in FIELD_LIMITS.items():
                value = embed_field.get(key)
                if value in (None, ""):
                    errors.required((*path, "fields", field_index, key))
                errors.too_long((*path, "fields", field_index, key), value, limit)
                total += len(value or "")
        footer = (embed.get("footer") or {}).get("text")
        errors.too_long((*path, "footer", "text"), footer, MAX_FOOTER)
        author = (embed.get("author") or {}).get("name")
        errors.too_long((*path, "author", "name"), author, MAX_AUTHOR)
        total += len(footer or "") + len(author or "")
    if total > MAX_EMBED_TOTAL:
        errors.add(
            ("embeds",), "MAX_EMBED_SIZE_EXCEEDED", f"Embed size exceeds maximum size of {MAX_EMBED_TOTAL}"
        )


def _validate_action_rows(errors: FormErrors, rows: list[dict[str, Any]]) -> None:
    if len(rows) > MAX_ACTION_ROWS:
        errors.add(("components",), "BASE_TYPE_MAX_LENGTH", f"Must be {MAX_ACTION_ROWS} or fewer in length.")
    for row_index, row in enumerate(rows):
        path: Path = ("components", row_index)
        if row.get("type") != ACTION_ROW:
            errors.add((*path, "type"), "UNION_TYPE_CHOICES", 'Value of field "type" must be one of (1,).')
            continue
        children = row.get("components") or []
        if not 1 <= len(children) <= MAX_ROW_WIDTH:
            errors.add(
                (*path, "components"),
                "BASE_TYPE_BAD_LENGTH",
                f"Must be between 1 and {MAX_ROW_WIDTH} in length.",
            )
        if any(c.get("type") in SELECT_TYPES for c in children) and len(children) > 1:
            errors.add(
                (*path, "components"),
                "COMPONENT_LAYOUT_WIDTH_EXCEEDED",
                "The specified component exceeds the maximum width",
            )
        for child_index, child in enumerate(children):
            _validate_interactive(errors, child, (*path, "components", child_index))


def _validate_v2_components(errors: FormErrors, components: list[dict[str, Any]]) -> None:
    count = 0

    def walk(items: list[dict[str, Any]], path: Path) -> None:
        nonlocal count
        for index, item in enumerate(items):
            count += 1
            item_path = (*path, index)
            _validate_interactive(errors, item, item_path)
            walk(item.get("components") or [], (*item_path, "components"))
            for key in ("accessory", "component"):
                child = item.get(key)
                if isinstance(child, dict):
                    walk([child], (*item_path, key))

    walk(components, ("components",))
    if count > MAX_V2_COMPONENTS:
        errors.add(
            ("components",), "BASE_TYPE_MAX_LENGTH", f"Must be {MAX_V2_COMPONENTS} or fewer in length."
        )


def _validate_interactive(errors: FormErrors, component: dict[str, Any], path: Path) -> None:
    kind = component.get("type")
    custom_id = component.get("custom_id")
    errors.too_long((*path, "custom_id"), custom_id, MAX_CUSTOM_ID)
    if kind == BUTTON:
        errors.too_long((*path, "label"), component.get("label"), MAX_BUTTON_LABEL)
        style = component.get("style")
        if style == LINK_STYLE:
            if not component.get("url"):
                errors.required((*path, "url"))
            if custom_id:
                errors.add(
                    (*path, "custom_id"),
                    "BUTTON_COMPONENT_CUSTOM_ID_NOT_ALLOWED",
                    "Link buttons cannot have a custom_id",
                )
        elif style != PREMIUM_STYLE and not custom_id:
            errors.required((*path, "custom_id"))
        if style not in (LINK_STYLE, PREMIUM_STYLE) and not (
            component.get("label") or component.get("emoji")
        ):
            errors.add((*path, "label"), "BUTTON_COMPONENT_LABEL_REQUIRED", "A label or emoji is required")
    elif kind in SELECT_TYPES:
        if not custom_id:
            errors.required((*path, "custom_id"))
        errors.too_long((*path, "options"), component.get("options"), MAX_SELECT_OPTIONS)
    elif kind == TEXT_INPUT and not custom_id:
        errors.required((*path, "custom_id"))


def _check_custom_ids(errors: FormErrors, components: list[dict[str, Any]], path: Path) -> None:
    for index, component in enumerate(components):
        item_path = (*path, index)
        errors.too_long((*item_path, "custom_id"), component.get("custom_id"), MAX_CUSTOM_ID)
        _check_custom_ids(errors, component.get("components") or [], (*item_path, "components"))
        child = component.get("component")
        if isinstance(child, dict):
            _check_custom_ids(errors, [child], (*item_path, "component"))


def _check_duplicate_custom_ids(errors: FormErrors, components: list[dict[str, Any]]) -> None:
    seen: set[str] = set()
    for component in iter_components(components):
        custom_id = component.get("custom_id")
        if not custom_id:
            continue
        if custom_id in seen:
            errors.add(
                ("components",), "COMPONENT_CUSTOM_ID_DUPLICATED", "Component custom id cannot be duplicated"
            )
            return
        seen.add(custom_id)
