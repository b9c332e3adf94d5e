"""Blocked terms in Discord AutoMod's keyword syntax, matched against a prompt however it is disguised.

A term is `word` (the whole word), `word*` (words that start with it), `*word` (words that end with it) or
`*word*` (anywhere, even inside a word); a term of several words matches them in a row. Admins know this
syntax from AutoMod, and it says what a substring list cannot: "kid" blocks the word kid, not "skid".

Prompts are matched after `normalise`: case and accents folded, compatibility forms (NFKC) and common
look-alike letters brought to plain Latin, invisible characters dropped, digit and symbol swaps undone
(`k1d`, `$`), and letters spelt out one at a time (`k.i.d`, `k i d`) or split by punctuation inside a
word (`ki-d`) joined again. Each way of reading the prompt is a "view"; a term that matches any view
matches the prompt. Terms are folded the same way but keep their digits: `88` blocks "88", not "bb".
"""

from __future__ import annotations

import itertools
import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import re2

MAX_TERM_LENGTH = 60  # AutoMod's own limit for a keyword
MAX_TERMS = 1000  # AutoMod allows 1,000 keywords per rule
# A term of fewer letters and digits would block half the prompts there are ("a", "c++").
MIN_TERM_LETTERS = 2
# Single letters in a row joined into a word from this many on: "k i d", but not "plan b, b w".
MIN_SPELT_OUT = 3
# RE2's memory for a server's compiled terms; a thousand terms need a few MiB.
LITERALS_MEMORY = 64 << 20

# Digits and symbols read as letters; what a word filter sees first when someone writes around it.
_SWAPS = {
    "0": "o",
    "1": "i",
    "3": "e",
    "4": "a",
    "5": "s",
    "7": "t",
    "8": "b",
    "9": "g",
    "@": "a",
    "$": "s",
    "!": "i",
    "|": "i",
    "€": "e",
    "£": "l",
    "¢": "c",
}
# Letters of other scripts (and Latin small capitals) that look like Latin ones, by case, since a capital
# and its small letter can look like different Latin letters (Greek capital nu is N, its small letter
# v). NFKC leaves them.
_LOOK_ALIKES = dict(
    zip(
        "АВЕКМНОРСТУХЅІЈԁаеорсуххіјѕкмнтвёїΑΒΕΖΗΙΚΜΝΟΡΤΥΧαβεικνορτυχηᴀʙᴄᴅᴇꜰɢʜɪᴊᴋʟᴍɴᴏᴘʀꜱᴛᴜᴠᴡʏᴢıłȷ",
        "ABEKMHOPCTYXSIJdaeopcyxxijskmhtbeiABEZHIKMNOPTYXabeikvoptuxnabcdefghijklmnoprstuvwyzilj",
        strict=True,
    )
)
# Invisible in text, yet letters to Unicode: the Hangul fillers.
_INVISIBLE_LETTERS = dict.fromkeys(map(ord, "\u115f\u1160\u3164\uffa0"))
_LOOK = str.maketrans({**_LOOK_ALIKES, **{chr(code): None for code in _INVISIBLE_LETTERS}})
_SWAP_TO_I = str.maketrans(_SWAPS)
_SWAP_TO_L = str.maketrans({**_SWAPS, "1": "l", "|": "l"})
# Letters that are words of their own in common languages ("a", "I", "o", "e", "y", "u"): only these are
# kept apart from a run of spelt-out letters, so "s k i d" stays "skid".
_ONE_LETTER_WORDS = frozenset("aeiouy")
_WORD = re.compile(r"[^\W_]+")
_CHUNK = re.compile(r"\S+")


class TermError(ValueError):
    """A term that cannot be used, with the reason in words for the admin who typed it."""


class Wildcard(StrEnum):
    WORD = "word"  # word
    PREFIX = "prefix"  # word*
    SUFFIX = "suffix"  # *word
    ANYWHERE = "anywhere"  # *word*


@dataclass(frozen=True)
class Term:
    """One blocked term: `text` as the admin wrote it, `words` normalised, and where it may match."""

    text: str
    words: tuple[str, ...]
    wildcard: Wildcard
    written: tuple[str, ...] = ()  # the words as written, for `raw_pattern`

    @classmethod
    def parse(cls, text: str) -> Term:
        cleaned = " ".join(text.split())
        if len(cleaned) > MAX_TERM_LENGTH:
            raise TermError(f"“{cleaned[:20]}…” is longer than {MAX_TERM_LENGTH} characters")
        starts, ends = cleaned.startswith("*"), cleaned.endswith("*") and len(cleaned) > 1
        core = cleaned.strip("*")
        if "*" in core:
            raise TermError(f"“{cleaned}”: a * may only stand at the start or the end of a term")
        words = tuple(_WORD.findall(_fold(core)))
        if not words:
            raise TermError(f"“{cleaned}” has no letters or digits to match")
        if sum(map(len, words)) < MIN_TERM_LETTERS:
            raise TermError(f"“{cleaned}” is too short to block without blocking ordinary prompts")
        wildcard = (
            Wildcard.ANYWHERE
            if starts and ends
            else Wildcard.SUFFIX
            if starts
            else Wildcard.PREFIX
            if ends
            else Wildcard.WORD
        )
        return cls(cleaned, words, wildcard, tuple(_WORD.findall(core.casefold())) or words)

    def literal(self) -> str:
        """What this term is in a view (" a kid here "): its words, with a space where a word must end."""
        body = " ".join(self.words)
        before = "" if self.wildcard in (Wildcard.SUFFIX, Wildcard.ANYWHERE) else " "
        after = "" if self.wildcard in (Wildcard.PREFIX, Wildcard.ANYWHERE) else " "
        return before + body + after

    def raw_pattern(self) -> str:
        """The same over text as written (case aside): words apart by anything but letters and digits."""
        body = r"[\W_]+".join(re.escape(word) for word in self.written or self.words)
        before = "" if self.wildcard in (Wildcard.SUFFIX, Wildcard.ANYWHERE) else r"(?<![^\W_])"
        after = "" if self.wildcard in (Wildcard.PREFIX, Wildcard.ANYWHERE) else r"(?![^\W_])"
        return before + body + after


def parse_terms(text: str) -> list[Term]:
    """Comma-separated terms, as `/admin blocklist add terms:` takes them; TermError names a bad one."""
    pieces = [piece for piece in (part.strip() for part in text.split(",")) if piece]
    if not pieces:
        raise TermError("no terms given: separate several with commas, like `word, prefix*, *anywhere*`")
    if len(pieces) > MAX_TERMS:
        raise TermError(f"at most {MAX_TERMS} terms at once")
    return [Term.parse(piece) for piece in pieces]


def normalise(text: str) -> tuple[str, ...]:
    """The views of `text` a term is matched against: lowercase words, each view padded and joined by
    single spaces (" a kid here ").

    1. the words as written, split at anything that is not a letter or digit (`kid!` → `kid`; `88`);
    2. the same with digits and symbols read as letters (`k1d`, `$`): once with 1 as i, once as l;
    3. each space-separated chunk with the punctuation inside it removed (`k.i.d`, `ki-d` → `kid`);
    4. runs of three or more single letters joined (`k i d` → `kid`), also with the run's first or
       last letter (or both) left apart, when it is a word of its own (`a k i d`).
    """
    folded = _fold(text)
    views = [_WORD.findall(folded)]
    for swap in (_SWAP_TO_I, _SWAP_TO_L):
        swapped = folded.translate(swap)
        words = _WORD.findall(swapped)
        views.append(words)
        views.append(
            [joined for chunk in _CHUNK.findall(swapped) if (joined := "".join(_WORD.findall(chunk)))]
        )
        views += [_join_letters(words, apart=apart) for apart in ("", "first", "last", "both")]
    return tuple(dict.fromkeys(f" {' '.join(words)} " for words in views))


def _fold(text: str) -> str:
    """Compatibility forms (NFKC: full-width letters, ligatures), look-alike letters, then case, then
    accents, marks and invisible characters dropped. Digits and symbols stay as they are."""
    looked = unicodedata.normalize("NFKC", text).translate(_LOOK)
    decomposed = unicodedata.normalize("NFD", looked.casefold())
    # Marks (accents, combining overlays) and format characters (zero-width spaces and joiners, soft
    # hyphens, direction marks) change nothing a reader sees in the word.
    return "".join(char for char in decomposed if unicodedata.category(char) not in ("Mn", "Me", "Cf"))


def _join_letters(words: Sequence[str], *, apart: str) -> list[str]:
    """`words` with each run of one-letter words joined into one; `apart` ("first", "last", "both")
    keeps the run's first or last letter (or both) a word of its own, when it can be one."""
    joined: list[str] = []
    for spelt_out, group in itertools.groupby(words, key=lambda word: len(word) == 1):
        run = list(group)
        if not spelt_out or len(run) < MIN_SPELT_OUT:
            joined += run
            continue
        head = run[:1] if apart in ("first", "both") and run[0] in _ONE_LETTER_WORDS else []
        tail = run[-1:] if apart in ("last", "both") and run[-1] in _ONE_LETTER_WORDS else []
        middle = run[len(head) : len(run) - len(tail)]
        joined += [*head, "".join(middle), *tail] if middle else run
    return joined


class Blocklist:
    """Terms compiled into one expression: `match` returns the first term a prompt hits, or None;
    `spans` where terms match in one text, for an allow list to cover.

    Every term is a literal in the views (words and spaces), so the expression is an alternation of
    literals run by RE2: linear in the prompt whatever the number of terms, where a backtracking engine
    tries each of a thousand terms at every position."""

    def __init__(self, terms: Iterable[Term]) -> None:
        self.terms = tuple(dict.fromkeys(terms))
        self._by_literal: dict[str, Term] = {}
        for term in self.terms:
            self._by_literal.setdefault(term.literal(), term)
        self._view_pattern = _literals(self._by_literal) if self.terms else None
        self._raw: re.Pattern[str] | None = None

    def __bool__(self) -> bool:
        return bool(self.terms)

    def match(self, prompt: str) -> Term | None:
        if self._view_pattern is None:
            return None
        for view in normalise(prompt):
            found = self._view_pattern.search(view)
            if found is not None:
                return self._by_literal[found.group()]
        return None

    def spans(self, text: str, *, raw: bool = False) -> list[tuple[int, int, Term]]:
        """Where terms match in `text`: a view from `normalise`, or (`raw`) the text as written."""
        if not self.terms:
            return []
        if raw:
            if self._raw is None:
                self._raw = _alternation((term.raw_pattern() for term in self.terms), flags=re.IGNORECASE)
            pattern: Any = self._raw
            return [
                (found.start(), found.end(), self.terms[int(found.lastgroup[1:])])
                for found in pattern.finditer(text)
                if found.lastgroup is not None
            ]
        assert self._view_pattern is not None
        return [
            (found.start(), found.end(), self._by_literal[found.group()])
            for found in self._view_pattern.finditer(text)
        ]


def _literals(literals: Iterable[str]) -> Any:
    options = re2.Options()
    options.log_errors = False
    options.max_mem = LITERALS_MEMORY
    # Longest first, so that of two terms matching at one place the longer one is named.
    ordered = sorted(literals, key=len, reverse=True)
    return re2.compile("|".join(ordered), options)


def _alternation(patterns: Iterable[str], *, flags: int = 0) -> re.Pattern[str] | None:
    alternatives = [f"(?P<t{index}>{pattern})" for index, pattern in enumerate(patterns)]
    return re.compile("|".join(alternatives), flags) if alternatives else None
