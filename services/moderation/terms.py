"""Blocked terms in Discord AutoMod's keyword syntax, matched against a prompt however it is disguised.

A term is `word` (the whole word), `word*` (words that start with it), `*word` (words that end with it) or
`*word*` (anywhere, even inside a word); a term of several words matches them in a row. Admins know this
syntax from AutoMod, and it says what a substring list cannot: "kid" blocks the word kid, not "skid".

Prompts are matched after `normalise`: case and accents folded, compatibility forms (NFKC) and common
look-alike letters brought to plain Latin, invisible characters dropped, digit and symbol swaps undone
(`k1d`, `$`), and letters spelt out one at a time (`k.i.d`, `k i d`) or split by punctuation inside a
word (`ki-d`) joined again. Terms are normalised the same way, so `r34` and `rea` are one term. Each
way of reading the prompt is a "view"; a term that matches any view matches the prompt.
"""

from __future__ import annotations

import itertools
import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum

MAX_TERM_LENGTH = 60  # AutoMod's own limit for a keyword
MAX_TERMS = 1000  # AutoMod allows 1,000 keywords per rule

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
# Letters of other scripts that look like Latin ones (NFKC leaves them as they are).
_LOOK_ALIKES = {
    "а": "a",  # Cyrillic
    "в": "b",
    "е": "e",
    "ё": "e",
    "к": "k",
    "м": "m",
    "н": "h",
    "о": "o",
    "р": "p",
    "с": "c",
    "т": "t",
    "у": "y",
    "х": "x",
    "і": "i",
    "ї": "i",
    "ј": "j",
    "ѕ": "s",
    "ԁ": "d",
    "α": "a",  # Greek
    "β": "b",
    "ε": "e",
    "ι": "i",
    "κ": "k",
    "ν": "v",
    "ο": "o",
    "ρ": "p",
    "τ": "t",
    "υ": "u",
    "χ": "x",
}
_FOLD = str.maketrans({**_SWAPS, **_LOOK_ALIKES})
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

    def pattern(self) -> str:
        """A regular expression for this term over a view (words separated by single spaces)."""
        return self._pattern(self.words, " ", r"(?<![^ ])", r"(?![^ ])")

    def raw_pattern(self) -> str:
        """The same over text as written (case aside): words apart by anything but letters and digits."""
        return self._pattern(self.written or self.words, r"[\W_]+", r"(?<![^\W_])", r"(?![^\W_])")

    def _pattern(self, words: Sequence[str], between: str, word_start: str, word_end: str) -> str:
        body = between.join(re.escape(word) for word in words)
        before = "" if self.wildcard in (Wildcard.SUFFIX, Wildcard.ANYWHERE) else word_start
        after = "" if self.wildcard in (Wildcard.PREFIX, Wildcard.ANYWHERE) else word_end
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
    """The views of `text` a term is matched against, each as lowercase words joined by single spaces.

    1. every word as written, split at anything that is not a letter or digit;
    2. each space-separated chunk with the punctuation inside it removed (`k.i.d`, `ki-d` → `kid`);
    3. runs of single letters joined (`k i d` → `kid`), also with the run's first or last letter (or
       both) left apart, for a word of one letter beside them (`a k i d`).
    """
    folded = _fold(text)
    words = _WORD.findall(folded)
    joined_chunks = ["".join(_WORD.findall(chunk)) for chunk in _CHUNK.findall(folded)]
    views = [" ".join(words), " ".join(chunk for chunk in joined_chunks if chunk)]
    # "a k i d": the run may start or end with a word of one letter of its own ("a", "i").
    views += [" ".join(_join_letters(words, apart=apart)) for apart in ("", "first", "last", "both")]
    return tuple(dict.fromkeys(views))


def _fold(text: str) -> str:
    # NFKC first (full-width letters, ligatures, superscripts), then case, then accents and marks.
    decomposed = unicodedata.normalize("NFD", unicodedata.normalize("NFKC", text).casefold())
    kept = (
        char
        for char in decomposed
        # Marks (accents, combining overlays) and format characters (zero-width spaces and joiners,
        # soft hyphens, direction marks) change nothing a reader sees in the word.
        if unicodedata.category(char) not in ("Mn", "Me", "Cf")
    )
    return "".join(kept).translate(_FOLD)


def _join_letters(words: Sequence[str], *, apart: str) -> list[str]:
    """`words` with each run of one-letter words joined into one; `apart` ("first", "last", "both")
    keeps the run's first or last letter (or both) a word of its own, when it can be one."""
    joined: list[str] = []
    for spelt_out, group in itertools.groupby(words, key=lambda word: len(word) == 1):
        run = list(group)
        if not spelt_out or len(run) < 2:
            joined += run
            continue
        head = run[:1] if apart in ("first", "both") and run[0] in _ONE_LETTER_WORDS else []
        tail = run[-1:] if apart in ("last", "both") and run[-1] in _ONE_LETTER_WORDS else []
        middle = run[len(head) : len(run) - len(tail)]
        joined += [*head, "".join(middle), *tail] if middle else run
    return joined


class Blocklist:
    """Terms compiled into one expression: `match` returns the first term a prompt hits, or None;
    `spans` where terms match in one text, for an allow list to cover."""

    def __init__(self, terms: Iterable[Term]) -> None:
        self.terms = tuple(dict.fromkeys(terms))
        self._view_pattern = _alternation(term.pattern() for term in self.terms)
        self._raw_pattern = _alternation((term.raw_pattern() for term in self.terms), flags=re.IGNORECASE)

    def __bool__(self) -> bool:
        return bool(self.terms)

    def match(self, prompt: str) -> Term | None:
        for view in normalise(prompt) if self.terms else ():
            spans = self.spans(view)
            if spans:
                return spans[0][2]
        return None

    def spans(self, text: str, *, raw: bool = False) -> list[tuple[int, int, Term]]:
        """Where terms match in `text`: a view from `normalise`, or (`raw`) the text as written."""
        pattern = self._raw_pattern if raw else self._view_pattern
        if pattern is None:
            return []
        return [
            (found.start(), found.end(), self.terms[int(found.lastgroup[1:])])
            for found in pattern.finditer(text)
            if found.lastgroup is not None
        ]


def _alternation(patterns: Iterable[str], *, flags: int = 0) -> re.Pattern[str] | None:
    alternatives = [f"(?P<t{index}>{pattern})" for index, pattern in enumerate(patterns)]
    return re.compile("|".join(alternatives), flags) if alternatives else None
