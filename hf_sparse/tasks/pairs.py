"""Structure-sensitive tasks built from the embedded Shakespeare corpus: decisions about a pair of text
segments that need the encoder's grasp of English (dialogue flow, clause order), not topic words.

- ``next_speech``: does speech B answer speech A? The negative B is a speech of the same play 3 to 20 speeches
  away (mostly the same scene: the same people and the same subject), so shared topic words do not decide it.
  A is the *end* of its speech, B the *start* of the other: where continuity lives.
- ``line_order``: are two consecutive lines of one speech in their original order, or swapped? Both orders hold
  the very same words, so any bag-of-words model of the pair is at chance by construction.
- ``word_swap``: is a verse line as written, or were two adjacent (different) words swapped? Again the same
  bag of words either way: only word order, i.e. syntax, decides it (``text_pair`` is empty).
- ``word_replace``: is a verse line as written, or was one word replaced by a word drawn from the same play
  (which keeps the play's word frequencies)? Only how the words fit together decides it.
- ``swap_where`` (3 classes): a verse line as written, or two adjacent different words swapped in its first
  half, or in its second half. The same bag of words in all three: the model must find a break in the syntax
  and say where it is. Kept out of the tuning of the defaults (issue 22's held-out task) until the warm-up's
  extension (`warmup_loss_drop`), which was designed on its loss curves.
- ``span_match``: is segment B (four consecutive words of verse line A) copied in A's order, or with two of its
  adjacent words swapped? The two segments hold the same words either way, so no bag of words decides it: the
  model must line the span up against its place in A (held out of the tuning of the warm-up's extension).

Train and test split by play (the genre task's test plays), one example per seeded draw, classes balanced.
Why these: the study needs tasks on which a good structure and a random one differ (the genre task is solved,
or not, by every method alike). `benchmarks/structure_tasks.py` measures dense, random units and a
bag-of-words model on them.
"""

from __future__ import annotations

import random
from typing import Sequence

from .plays import DEFAULT_TEST_PLAYS, PLAYS, play_speeches

PAIR_TASKS = ("next_speech", "line_order", "word_swap", "word_replace", "swap_where", "span_match")
LABELS = {"next_speech": ["not next", "next"], "line_order": ["swapped", "in order"],
          "word_swap": ["two words swapped", "as written"], "word_replace": ["a word replaced", "as written"],
          "swap_where": ["as written", "swap in the first half", "swap in the second half"],
          "span_match": ["two words swapped", "as in A"]}


def _head(text: str, words: int) -> str:
    return " ".join(text.split()[:words])


def _tail(text: str, words: int) -> str:
    return " ".join(text.split()[-words:])


def _next_speech_pairs(key: str, words: int, rng: random.Random) -> list[tuple[str, str, int]]:
    speeches = play_speeches(key)
    rows = []
    for i in range(len(speeches) - 1):
        a = _tail(speeches[i], words)
        if rng.random() < 0.5:
            rows.append((a, _head(speeches[i + 1], words), 1))
        else:
            offsets = [d for d in range(-20, 21) if abs(d) >= 3 and 0 <= i + 1 + d < len(speeches)]
            rows.append((a, _head(speeches[i + 1 + rng.choice(offsets)], words), 0))
    return rows


def _line_order_pairs(key: str, words: int, rng: random.Random) -> list[tuple[str, str, int]]:
    rows = []
    for speech in play_speeches(key):
        lines = [line for line in speech.split("\n") if len(line.split()) >= 3]
        for i in range(0, len(lines) - 1, 2):  # disjoint pairs: no line in two examples
            a, b = _head(lines[i], words), _head(lines[i + 1], words)
            rows.append((a, b, 1) if rng.random() < 0.5 else (b, a, 0))
    return rows


def _verse_lines(key: str, words: int):
    """The play's lines of at least 6 words, each cut to its first `words` words (a list of words)."""
    for speech in play_speeches(key):
        for line in speech.split("\n"):
            w = line.split()[:words]
            if len(w) >= 6:
                yield w


def _swapped(w: list[str], span: range, rng: random.Random) -> list[str] | None:
    """`w` with one pair of adjacent different words, the first of them in `span`, swapped (None: no such pair)."""
    spots = [i for i in span if w[i].lower().strip(",.;:!?") != w[i + 1].lower().strip(",.;:!?")]
    if not spots:
        return None
    i = rng.choice(spots)
    w = list(w)
    w[i], w[i + 1] = w[i + 1], w[i]
    return w


def _word_swap_pairs(key: str, words: int, rng: random.Random) -> list[tuple[str, str, int]]:
    """One verse line (text_pair empty): as written, or with two adjacent different words swapped."""
    rows = []
    for w in _verse_lines(key, words):
        if rng.random() < 0.5:
            rows.append((" ".join(w), "", 1))
            continue
        w = _swapped(w, range(len(w) - 1), rng)
        if w is not None:
            rows.append((" ".join(w), "", 0))
    return rows


def _word_replace_pairs(key: str, words: int, rng: random.Random) -> list[tuple[str, str, int]]:
    """One verse line: as written, or with one word replaced by a word drawn from the whole play (so the
    replacement follows the play's own word frequencies: no single word gives the corruption away)."""
    lines = [line.split()[:words] for speech in play_speeches(key) for line in speech.split("\n")]
    vocabulary = [w for line in lines for w in line]
    rows = []
    for w in lines:
        if len(w) < 6:
            continue
        if rng.random() < 0.5:
            rows.append((" ".join(w), "", 1))
            continue
        w = list(w)
        i = rng.randrange(len(w))
        new = rng.choice(vocabulary)
        if new.lower() == w[i].lower():
            continue
        w[i] = new
        rows.append((" ".join(w), "", 0))
    return rows


def _swap_where_pairs(key: str, words: int, rng: random.Random) -> list[tuple[str, str, int]]:
    """One verse line: as written (0), or two adjacent different words swapped in its first half (1) or its
    second half (2); the pair's first word decides the half."""
    rows = []
    for w in _verse_lines(key, words):
        label = rng.randrange(3)
        if label == 0:
            rows.append((" ".join(w), "", 0))
            continue
        half = len(w) // 2
        w = _swapped(w, range(half) if label == 1 else range(half, len(w) - 1), rng)
        if w is not None:
            rows.append((" ".join(w), "", label))
    return rows


def _span_match_pairs(key: str, words: int, rng: random.Random) -> list[tuple[str, str, int]]:
    """A verse line of at least 8 words and four consecutive words of it (B): in A's order (1), or with two
    adjacent different words of the four swapped (0)."""
    rows = []
    for w in _verse_lines(key, words):
        if len(w) < 8:
            continue
        start = rng.randrange(len(w) - 3)
        span = w[start:start + 4]
        if rng.random() < 0.5:
            rows.append((" ".join(w), " ".join(span), 1))
            continue
        span = _swapped(span, range(3), rng)
        if span is not None:
            rows.append((" ".join(w), " ".join(span), 0))
    return rows


_BUILDERS = {"next_speech": _next_speech_pairs, "line_order": _line_order_pairs, "word_swap": _word_swap_pairs,
             "word_replace": _word_replace_pairs, "swap_where": _swap_where_pairs, "span_match": _span_match_pairs}
_SINGLE = ("word_swap", "word_replace", "swap_where")  # one segment: text_pair is empty


def load_pair_task(
    task: str,
    tokenizer=None,
    max_pairs_per_play: int | None = 200,
    test_plays: Sequence[str] | None = None,
    seed: int = 0,
    words: int = 24,
    max_length: int = 64,
):
    """The pair task `task` as a ``DatasetDict`` (``train``, ``test``): columns ``text``, ``text_pair``, ``label``
    (the class id), ``play``, plus the tokenizer's columns (the pair encoded as two segments, truncated to `max_length`).

    `max_pairs_per_play`: a seeded choice of at most this many pairs of each play (``None``: all); `words`: at
    most this many words per segment. Classes are balanced in both splits (down-sampled to the smaller)."""
    import datasets

    if task not in PAIR_TASKS:
        raise ValueError(f"task must be one of {PAIR_TASKS}, got {task!r}")
    test = tuple(DEFAULT_TEST_PLAYS if test_plays is None else test_plays)
    unknown = sorted(set(test) - {p.key for p in PLAYS})
    if unknown:
        raise ValueError(f"unknown test plays {unknown}; choose from hf_sparse.tasks.PLAYS")
    splits = {"train": [p.key for p in PLAYS if p.key not in test], "test": list(test)}
    out = {}
    for name, keys in splits.items():
        rows = []
        for key in keys:
            rng = random.Random(f"{seed}:{task}:{key}")
            pairs = _BUILDERS[task](key, words, rng)
            if max_pairs_per_play is not None and len(pairs) > max_pairs_per_play:
                pairs = rng.sample(pairs, max_pairs_per_play)
            rows += [(a, b, y, key) for a, b, y in pairs]
        rng = random.Random(f"{seed}:{task}:{name}:balance")
        by_label = {y: [r for r in rows if r[2] == y] for y in range(len(LABELS[task]))}
        n = min(len(v) for v in by_label.values())
        rows = [r for y in sorted(by_label) for r in rng.sample(by_label[y], n)]
        rng.shuffle(rows)
        out[name] = datasets.Dataset.from_dict({
            "text": [r[0] for r in rows], "text_pair": [r[1] for r in rows], "label": [r[2] for r in rows],
            "play": [r[3] for r in rows],
        }, features=datasets.Features({
            "text": datasets.Value("string"), "text_pair": datasets.Value("string"),
            "label": datasets.ClassLabel(names=LABELS[task]), "play": datasets.Value("string"),
        }))
    dsd = datasets.DatasetDict(out)
    if tokenizer is not None:
        def encode(b):
            if task in _SINGLE:
                return tokenizer(b["text"], truncation=True, max_length=max_length)
            return tokenizer(b["text"], b["text_pair"], truncation=True, max_length=max_length)

        dsd = dsd.map(encode, batched=True, desc=f"Tokenizing {task}")
    return dsd
