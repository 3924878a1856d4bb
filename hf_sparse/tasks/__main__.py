"""`python -m hf_sparse.tasks`: what the embedded tasks build by default, and how long it takes."""

from __future__ import annotations

from .genre import class_balance, load_genre_dataset, majority_class_accuracy, split_plays
from .lm import group_texts, load_lm_corpus, train_bpe_tokenizer
from .plays import DEFAULT_TEST_PLAYS, PLAYS, play_words, plays_by_genre


def main() -> None:
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
    main()
