"""One process of the FSDP2 trainer test (torchrun, 2 processes, gloo): `SparseTrainer` through the Trainer's
own FSDP2 path (`fsdp="full_shard"`, `fsdp_config={"version": 2}`) on CPU processes.

1. Trains a tiny Llama 8 steps (search, then the fixed mask) with a checkpoint at step 4; writes every rank's
   scores, masks and gathered weights.
2. A second trainer resumes from checkpoint-4 and trains to step 8: its weights, scores and masks are written too.
3. The informed start, gradient accumulation and two mask groups (chunks that skip FSDP's gradient sync):
   every rank's scores and masks are written.
4. `distill_from="warmup"` under FSDP is refused (a sharded model cannot be copied as the teacher).
5. `save_model` gathers the sharded model into one sparse checkpoint, which rank 0 loads with `load_sparse_model`;
   `unsharded_model` gathers it the same way for the export: shrunk, with its model card, reloaded.
Writes rank{r}.pt under argv[1].
"""

import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import hf_sparse as hs  # noqa: E402
from trainer_helpers import FSDP_ARGS, arithmetic_sequences, tiny_llama  # noqa: E402


def fsdp_args(out: str, **kw):
    return hs.SparseTrainingArguments(
        output_dir=out, per_device_train_batch_size=4, use_cpu=True, ddp_backend="gloo",
        fsdp="full_shard", fsdp_config={"version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]},
        **{**FSDP_ARGS, **kw},
    )


def run(out: str, resume: str | None = None, **kw):
    args = fsdp_args(out, **kw)
    trainer = hs.SparseTrainer(model=tiny_llama(), args=args, sparse_config=hs.SparseConfig(sparsity=0.5),
                               train_dataset=arithmetic_sequences(256))
    trainer.train(resume_from_checkpoint=resume)
    params = {}
    for name, p in trainer.model.named_parameters():  # every rank gathers every parameter (a collective)
        params[name] = (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
    sharded = all(type(p).__name__ == "DTensor" for p in trainer.model.parameters())
    return trainer, {"scores": trainer.structure.scores().clone(), "masks": trainer.structure.masks().clone(),
                     "params": params, "sharded": sharded, "log_history": trainer.state.log_history}


def main():
    out = sys.argv[1]
    trainer, first = run(os.path.join(out, "run"))
    rank = trainer.accelerator.process_index
    folder = os.path.join(out, "final")
    trainer.save_model(folder)  # gathers the full state dict (FULL_STATE_DICT) and writes the sparse checkpoint
    gathered = trainer.unsharded_model()  # a collective: every rank calls it, the main one gets the model
    _, resumed = run(os.path.join(out, "resumed"), resume=os.path.join(out, "run", "checkpoint-4"))
    informed = dict(importance_warmup=0.25, budget_schedule_start=0.25, budget_schedule_end=0.25,
                    gradient_accumulation_steps=2, mask_groups=2, save_strategy="no", forward_search_steps=3)
    _, chunked = run(os.path.join(out, "chunked"), **informed)
    try:
        hs.SparseTrainer(model=tiny_llama(), args=fsdp_args(os.path.join(out, "t"), distill_from="warmup",
                                                            importance_warmup=0.25, budget_schedule_start=0.25,
                                                            budget_schedule_end=0.25),
                         train_dataset=arithmetic_sequences(16))
        refusal = None
    except ValueError as e:
        refusal = str(e)
    result = {"world": trainer.accelerator.num_processes, "fsdp": trainer.is_fsdp_enabled, "first": first,
              "resumed": resumed, "chunked": chunked, "refusal": refusal}
    if rank == 0:
        model = hs.load_sparse_model(folder)
        ids = torch.arange(16)[None] % 64
        result["reloaded_params"] = {n: p.detach().clone() for n, p in model.named_parameters()}
        result["reloaded_logits"] = model(ids).logits.detach()
        hs.fix_masks(gathered)
        result["gathered_logits"] = gathered(ids).logits.detach()
        hs.export_model(gathered, os.path.join(out, "shrunk"), export="shrink")
        hs.save_model_card(gathered, os.path.join(out, "shrunk"), export="shrink")
        shrunk = hs.load_sparse_model(os.path.join(out, "shrunk"))
        result["shrunk_logits"] = shrunk(ids).logits.detach()
        result["shrunk_params"] = sum(p.numel() for p in shrunk.parameters())
        result["dense_params"] = sum(p.numel() for p in model.parameters())
        result["card"] = open(os.path.join(out, "shrunk", "README.md")).read()
    torch.save(result, os.path.join(out, f"rank{rank}.pt"))
    trainer.accelerator.wait_for_everyone()
    trainer.accelerator.end_training()


if __name__ == "__main__":
    main()
