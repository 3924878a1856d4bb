"""The genre task of the embedded data.

Task 1: genre of a passage (`load_genre_dataset`)
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
answering "comedy" or "tragedy") is 0.375 (`majority_class_accuracy`). An 80-word passage is
about 115 MiniLM (BERT uncased) tokens: 92% of them fit a 128-token model without truncation.
"""

from __future__ import annotations

import random
from collections import Counter
from typing import TYPE_CHECKING, Sequence

from .plays import DEFAULT_TEST_PLAYS, GENRES, PLAYS, check_play_keys, get_play, play_passages

if TYPE_CHECKING:  # pragma: no cover
    import datasets
    import transformers


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
    test = check_play_keys(DEFAULT_TEST_PLAYS if test_plays is None else test_plays, "test plays")
    validation = check_play_keys(validation_plays or (), "validation plays")
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
            chunks = play_passages(key, passage_words)
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
