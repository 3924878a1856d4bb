"""One process of the DeepSpeed test (torchrun, 2 processes, gloo; DeepSpeed's CPU accelerator): `SparseTrainer`
through the Trainer's DeepSpeed path with ZeRO stage argv[2], on the library's default schedule (the dense
warm-up with the Taylor importance, then the informed mask fixed).

1. Trains a tiny Llama 8 steps (4 dense, 4 fixed) with a checkpoint at step 6; writes scores, masks, the
   gathered model's logits on a fixed batch, and the losses.
2. A second trainer resumes from checkpoint-6 and trains to step 8: the same.
3. `unsharded_model` gathers one sparse checkpoint (rank 0 gets the model); its logits are written.
4. A schedule with a search is refused under DeepSpeed (the optimizer steps DeepSpeed's own partitions).
Writes rank{r}.pt under argv[1].
"""

import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import hf_sparse as hs  # noqa: E402
from trainer_helpers import DEEPSPEED_ARGS, arithmetic_sequences, deepspeed_config, tiny_llama  # noqa: E402

IDS = torch.arange(16)[None] % 64


def ds_args(out: str, stage: int, **kw):
    return hs.SparseTrainingArguments(output_dir=out, per_device_train_batch_size=4, use_cpu=True,
                                      deepspeed=deepspeed_config(stage), **{**DEEPSPEED_ARGS, **kw})


def run(out: str, stage: int, resume: str | None = None):
    trainer = hs.SparseTrainer(model=tiny_llama(), args=ds_args(out, stage), sparse_config=hs.SparseConfig(sparsity=0.5),
                               train_dataset=arithmetic_sequences(256))
    trainer.train(resume_from_checkpoint=resume)
    gathered = trainer.unsharded_model()  # every rank: a collective under ZeRO-3
    logits = gathered(IDS).logits.detach() if gathered is not None else None
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return trainer, {"scores": trainer.structure.scores().clone(), "masks": trainer.structure.masks().clone(),
                     "logits": logits, "losses": losses, "log_history": trainer.state.log_history}


def main():
    out, stage = sys.argv[1], int(sys.argv[2])
    trainer, first = run(os.path.join(out, "run"), stage)
    rank = trainer.accelerator.process_index
    _, resumed = run(os.path.join(out, "resumed"), stage, resume=os.path.join(out, "run", "checkpoint-6"))
    # the defaults' forward-only allocation search under ZeRO: the ranks average their losses, so they agree
    searched = hs.SparseTrainer(model=tiny_llama(), args=ds_args(os.path.join(out, "f"), stage, forward_search_steps=3,
                                                                save_strategy="no"),
                                sparse_config=hs.SparseConfig(sparsity=0.5), train_dataset=arithmetic_sequences(256))
    searched.train()
    forward = {"scores": searched.structure.scores().clone(), "masks": searched.structure.masks().clone(),
               "run": searched.structure_run()}
    try:
        searching = hs.SparseTrainer(model=tiny_llama(), args=ds_args(os.path.join(out, "s"), stage, fix_masks_at=0.75),
                                     sparse_config=hs.SparseConfig(sparsity=0.5), train_dataset=arithmetic_sequences(64))
        searching.train()
        refusal = None
    except ValueError as e:
        refusal = str(e)
    result = {"world": trainer.accelerator.num_processes, "deepspeed": trainer.is_deepspeed_enabled,
              "stage": trainer.model_wrapped.zero_optimization_stage(), "first": first, "resumed": resumed,
              "forward": forward, "refusal": refusal}
    torch.save(result, os.path.join(out, f"rank{rank}.pt"))
    trainer.accelerator.wait_for_everyone()
    trainer.accelerator.end_training()


if __name__ == "__main__":
    main()
