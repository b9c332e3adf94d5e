"""Blocked terms: what must match a disguised word, and what must not (a longer word that contains it)."""

from __future__ import annotations

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from services.moderation.terms import Blocklist, TermError, Wildcard, normalise, parse_terms

LETTERS = "abcdefghijklmnopqrstuvwxyz"
# How people write around a word filter, letter by letter.
SWAPS = {"i": "1!|", "e": "3€", "o": "0", "a": "4@", "s": "5$", "t": "7", "b": "8", "g": "9"}
LOOK_ALIKES = {"a": "а", "e": "е", "o": "о", "p": "р", "c": "с", "x": "х", "y": "у", "i": "і", "k": "к"}
INVISIBLE = ["\u200b", "\u200c", "\u200d", "\u2060", "\ufeff", "\u00ad"]
ACCENTS = ["\u0301", "\u0300", "\u0308", "\u0302", "\u0327"]

words = st.text(LETTERS, min_size=3, max_size=10)
context = st.lists(st.text(LETTERS, min_size=2, max_size=8), max_size=4)


@st.composite
def disguised(draw: st.DrawFn, word: str, *, spelled_out: bool = True, symbols: bool = True) -> str:
    """`word` as someone evading a filter might write it (`symbols`: swaps like @ for a, which also end
    words: "kid!" is "kid")."""
    out = []
    for letter in word:
        form = draw(st.sampled_from(["plain", "upper", "accent", "swap", "look-alike", "full-width"]))
        if form == "upper":
            written = letter.upper()
        elif form == "accent":
            written = letter + draw(st.sampled_from(ACCENTS))
        elif form == "swap" and letter in SWAPS:
            written = draw(st.sampled_from([c for c in SWAPS[letter] if symbols or c.isdigit()] or [letter]))
        elif form == "look-alike" and letter in LOOK_ALIKES:
            written = LOOK_ALIKES[letter]
        elif form == "full-width":
            written = chr(ord(letter) - ord("a") + 0xFF41)
        else:
            written = letter
        if draw(st.booleans()):
            written += draw(st.sampled_from(INVISIBLE))
        out.append(written)
    separator = draw(st.sampled_from(["", "", ".", " ", "-", "_", " . "])) if spelled_out else ""
    return separator.join(out)


def prompt_with(word: str, before: list[str], after: list[str]) -> str:
    return " ".join([*before, word, *after])


@settings(max_examples=300)
@given(data=st.data(), word=words, before=context, after=context)
def test_a_whole_word_term_blocks_the_word_however_it_is_disguised(
    data: st.DataObject, word: str, before: list[str], after: list[str]
) -> None:
    blocklist = Blocklist(parse_terms(word))
    prompt = prompt_with(data.draw(disguised(word)), before, after)
    assert blocklist.match(prompt) is not None, (prompt, normalise(prompt))


@settings(max_examples=300)
@given(data=st.data(), word=words, prefix=st.text(LETTERS, max_size=3), suffix=st.text(LETTERS, max_size=3))
def test_a_whole_word_term_never_blocks_a_longer_word_that_contains_it(
    data: st.DataObject, word: str, prefix: str, suffix: str
) -> None:
    assume(prefix or suffix)
    longer = prefix + word + suffix
    others = data.draw(context)
    assume(word not in others)
    blocklist = Blocklist(parse_terms(word))
    prompt = prompt_with(data.draw(disguised(longer, spelled_out=False, symbols=False)), others, [])
    assert blocklist.match(prompt) is None, (prompt, normalise(prompt))


@settings(max_examples=200)
@given(
    data=st.data(),
    word=words,
    prefix=st.text(LETTERS, min_size=1, max_size=3),
    suffix=st.text(LETTERS, max_size=3),
)
def test_wildcards_match_at_the_ends_they_stand_at(
    data: st.DataObject, word: str, prefix: str, suffix: str
) -> None:
    starting, ending = word + suffix, prefix + word
    assume((not ending.startswith(word) and not starting.endswith(word)) or not suffix)
    write = lambda text: data.draw(disguised(text, spelled_out=False, symbols=False))  # noqa: E731
    assert Blocklist(parse_terms(f"{word}*")).match(write(starting)) is not None
    assert Blocklist(parse_terms(f"*{word}")).match(write(ending)) is not None
    assert Blocklist(parse_terms(f"*{word}*")).match(write(prefix + word + suffix)) is not None
    if not ending.startswith(word):
        assert Blocklist(parse_terms(f"{word}*")).match(write(ending)) is None
    if suffix and not starting.endswith(word):
        assert Blocklist(parse_terms(f"*{word}")).match(write(starting)) is None


@pytest.mark.parametrize(
    "prompt",
    [
        "KID",
        "kíd",
        "k1d",
        "k\u200bid",
        "k.i.d",
        "k i d",
        "a k i d",
        "a k i d a",
        "ｋｉｄ",
        "кid",
        "kid!",
        "ᴋɪᴅ",
        "kıd",
        "k\u3164id",
    ],
)
def test_kid_is_blocked_however_it_is_written(prompt: str) -> None:
    assert Blocklist(parse_terms("kid")).match(f"a photo of {prompt} smiling") is not None


@pytest.mark.parametrize(
    "prompt",
    ["skid marks on the road", "kidney beans", "kids", "a skidding car", "plan b, b w photo of a kite"],
)
def test_kid_does_not_block_other_words(prompt: str) -> None:
    assert Blocklist(parse_terms("kid")).match(prompt) is None


def test_a_term_of_several_words_matches_them_in_a_row() -> None:
    blocklist = Blocklist(parse_terms("ice cream"))
    assert blocklist.match("A bowl of ICE-CREAM, please") is not None
    assert blocklist.match("ice, cream") is not None  # punctuation between the words is no gap
    assert blocklist.match("ice and cream") is None


def test_terms_are_parsed_in_automods_syntax() -> None:
    terms = parse_terms("kid, pre*, *post, *any*,  two  words ")
    assert [(t.text, t.words, t.wildcard) for t in terms] == [
        ("kid", ("kid",), Wildcard.WORD),
        ("pre*", ("pre",), Wildcard.PREFIX),
        ("*post", ("post",), Wildcard.SUFFIX),
        ("*any*", ("any",), Wildcard.ANYWHERE),
        ("two words", ("two", "words"), Wildcard.WORD),
    ]
    # Terms keep their digits: "88" blocks 88, never "bb cream".
    assert Blocklist(parse_terms("88")).match("88 stickers") is not None
    assert Blocklist(parse_terms("88")).match("bb cream") is None
    assert Blocklist(parse_terms("r34")).match("R34 art") is not None
    assert Blocklist(parse_terms("r34")).match("rea") is None


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "no terms"),
        (" , ,", "no terms"),
        ("*", "no letters"),
        ("**", "no letters"),
        ("a*b", "start or the end"),
        ("x" * 61, "longer than 60"),
    ],
)
def test_a_term_that_cannot_be_used_is_refused_with_the_reason(text: str, reason: str) -> None:
    with pytest.raises(TermError, match=reason):
        parse_terms(text)


def test_an_empty_blocklist_blocks_nothing() -> None:
    assert not Blocklist([]) and Blocklist([]).match("anything") is None
