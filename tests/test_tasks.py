"""The structure tasks built from the embedded corpus (hf_sparse/tasks/pairs.py)."""

from __future__ import annotations

import collections

from hf_sparse.tasks import load_pair_task
from hf_sparse.tasks.plays import play_speeches


def test_swap_where_is_three_balanced_classes_whose_words_are_the_line_s_and_whose_swap_is_in_the_named_half():
    data = load_pair_task("swap_where", max_pairs_per_play=40, seed=3)
    for split in ("train", "test"):
        counts = collections.Counter(data[split]["label"])
        assert sorted(counts) == [0, 1, 2] and len(set(counts.values())) == 1  # balanced
    assert data["train"].features["label"].names == ["as written", "swap in the first half", "swap in the second half"]
    lines = {}
    for row in data["test"]:
        if row["play"] not in lines:
            lines[row["play"]] = {" ".join(line.split()[:24]) for s in play_speeches(row["play"]) for line in s.split("\n")}
        w = row["text"].split()
        if row["label"] == 0:
            assert row["text"] in lines[row["play"]]
            continue
        # undo one adjacent swap: exactly the swaps in the named half give back a line of the play
        half = len(w) // 2
        found = set()
        for i in range(len(w) - 1):
            v = list(w)
            v[i], v[i + 1] = v[i + 1], v[i]
            if " ".join(v) in lines[row["play"]]:
                found.add(1 if i < half else 2)
        assert found == {row["label"]}, (row, found)


def test_span_match_holds_the_same_words_in_both_classes_and_a_swap_exactly_when_labelled_so():
    data = load_pair_task("span_match", max_pairs_per_play=40, seed=3)
    for split in ("train", "test"):
        counts = collections.Counter(data[split]["label"])
        assert sorted(counts) == [0, 1] and counts[0] == counts[1]
    for row in data["test"]:
        a, b = row["text"].split(), row["text_pair"].split()
        assert len(b) == 4 and collections.Counter(b) <= collections.Counter(a)  # B's words are A's, either class
        in_order = any(a[i:i + 4] == b for i in range(len(a) - 3))
        assert in_order == (row["label"] == 1), row
        if row["label"] == 0:  # one adjacent swap of B gives back a span of A
            undone = [b[:i] + [b[i + 1], b[i]] + b[i + 2:] for i in range(3)]
            assert any(a[j:j + 4] == u for u in undone for j in range(len(a) - 3)), row
