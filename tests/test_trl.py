"""Structure learning under TRL's SFTTrainer (`hf_sparse.sparse_trainer_class`), with the real `trl` (a test extra)."""

from __future__ import annotations

import pytest
import torch

trl = pytest.importorskip("trl")  # in the test extras: `make install` puts it there

import hf_sparse as hs  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

WORDS = "the king and queen of rome sat down to speak of war and love in the night".split()


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from hf_sparse.tasks.lm import train_bpe_tokenizer

    g = torch.Generator().manual_seed(0)
    texts = [" ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (12,), generator=g)) for _ in range(200)]
    return train_bpe_tokenizer(texts, vocab_size=300, save_dir=tmp_path_factory.mktemp("tok"))


def text_data(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):  # a learnable pattern: each line repeats its first three words
        head = [WORDS[int(i)] for i in torch.randint(0, len(WORDS), (3,), generator=g)]
        rows.append({"text": " ".join(head * 4)})
    return Dataset.from_list(rows)


def tiny_llama(vocab):
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64))


def sft_args(tmp_path, cls, **kw):
    base = dict(output_dir=str(tmp_path), max_steps=8, per_device_train_batch_size=8, learning_rate=3e-3,
                max_length=32, logging_steps=2, save_strategy="no", report_to=[], disable_tqdm=True, seed=0,
                use_cpu=True, bf16=False)
    base.update(kw)
    return cls(**base)


SEARCH = dict(importance_warmup=0.0, budget_schedule_start=0.0, budget_schedule_end=0.5, fix_masks_at=0.75)


def test_sparse_sft_searches_saves_reloads_and_exports(tmp_path, tokenizer):
    from trl import SFTConfig, SFTTrainer

    SparseSFTTrainer = hs.sparse_trainer_class(SFTTrainer)
    args = sft_args(tmp_path, hs.sparse_args_class(SFTConfig), **SEARCH)
    model = tiny_llama(len(tokenizer))
    trainer = SparseSFTTrainer(model=model, args=args, train_dataset=text_data(), processing_class=tokenizer,
                               sparse_config=hs.SparseConfig(sparsity=0.5))
    assert isinstance(trainer, SFTTrainer) and isinstance(trainer, hs.SparseTrainingMixin)
    trainer.train()
    # the policy-gradient updates ran (6 search steps of Adam on the scores), then the mask was fixed at 50%
    state = trainer.structure_optimizer.state[trainer.structure.groups[0].scores]
    assert int(state["step"]) == 6
    assert hs.masks_fixed(model) and abs(hs.sparsity_report(model).sparsity - 0.5) < 0.05
    logs = trainer.state.log_history
    assert any("sparse/loss_diff" in h for h in logs) and any("mean_token_accuracy" in h for h in logs)
    # TRL's token count is that of the batches trained on, not of every mask's forward: equal to a plain SFT run's
    plain = SFTTrainer(model=tiny_llama(len(tokenizer)), args=sft_args(tmp_path / "plain", SFTConfig),
                       train_dataset=text_data(), processing_class=tokenizer)
    plain.train()
    assert trainer._total_train_tokens == plain._total_train_tokens > 0
    # save_model -> the sparse checkpoint reloads the same model; its shrunk export loads with the same outputs
    trainer.save_model(str(tmp_path / "saved"))
    ids = tokenizer("the king of rome", return_tensors="pt")["input_ids"]
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        reloaded = hs.load_sparse_model(str(tmp_path / "saved"))
        torch.testing.assert_close(reloaded(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-5)
        hs.export_model(reloaded, str(tmp_path / "shrunk"), export="shrink")
        shrunk = hs.load_sparse_model(str(tmp_path / "shrunk"))
        torch.testing.assert_close(shrunk(input_ids=ids).logits, expected, atol=1e-4, rtol=1e-4)


def test_plain_sft_config_is_converted_and_peft_config_goes_on_first(tmp_path, tokenizer):
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    SparseSFTTrainer = hs.sparse_trainer_class(SFTTrainer)
    assert hs.sparse_trainer_class(SparseSFTTrainer) is SparseSFTTrainer
    args = sft_args(tmp_path, SFTConfig, max_steps=2)  # TRL's own config: the structure defaults are added
    trainer = SparseSFTTrainer(model=tiny_llama(len(tokenizer)), args=args, train_dataset=text_data(16),
                               processing_class=tokenizer, peft_config=LoraConfig(r=4, target_modules=["q_proj"]))
    assert isinstance(trainer.args, hs.sparse_args_class(SFTConfig)) and trainer.args.max_length == 32
    assert trainer.args.fix_masks_at == hs.SparseTrainingArguments(output_dir="x", use_cpu=True).fix_masks_at
    assert hs.is_sparsified(trainer.model) and hasattr(trainer.model, "peft_config")


def test_trainers_that_generate_in_their_step_are_refused():
    from trl import DPOTrainer, GRPOTrainer

    for cls in (GRPOTrainer, DPOTrainer):
        with pytest.raises(ValueError, match="not supported"):
            hs.sparse_trainer_class(cls)
    with pytest.raises(TypeError, match="Trainer subclass"):
        hs.sparse_trainer_class(dict)
