"""The causal-LM corpus of the embedded data.

Task 2: causal language modelling on held-out plays (`load_lm_corpus`)
-----------------------------------------------------------------------------
The spoken text of the 36 plays, one row per speech (verse line breaks kept), split by play:
``DEFAULT_LM_VALIDATION_PLAYS`` (Twelfth Night, Henry V, Hamlet: one play per genre) are held out for
validation perplexity and the other 33 plays are the training text: 27,247 speeches, 704,025 words
(train) and 2,799 speeches, 73,856 words (validation). `train_bpe_tokenizer` trains a byte-level
BPE tokenizer (``tokenizers`` library; ``<s>``, ``</s>``, ``<pad>``, ``<unk>`` special tokens) on the
training text (with 4,096 tokens: 1,120,794 training and 120,196 validation tokens, plus one ``</s>``
a speech), and `group_texts` tokenizes and packs it into fixed blocks with ``labels`` =
``input_ids``, as ``run_clm.py`` does.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Iterable, Sequence

from .plays import DEFAULT_LM_VALIDATION_PLAYS, PLAYS, check_play_keys, play_speeches

if TYPE_CHECKING:  # pragma: no cover
    import datasets
    import transformers


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

    validation = check_play_keys(
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
