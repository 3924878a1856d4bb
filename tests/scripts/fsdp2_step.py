"""One process of the FSDP2 test (torchrun, 2 processes, gloo): hf_sparse's gathered layers on FSDP2-sharded
weights (`torch.distributed.fsdp.fully_shard`), against the same model unsharded in the same process.

1. Fixed mask: forward + backward of each rank's half batch; the reduce-scattered gradient equals the
   single-process gradient of the whole batch, and the dropped units' entries are exactly zero.
2. A structure step as SparseTrainer takes it: masks drawn from the shared seed (identical on both ranks), two
   no-grad losses under FSDP2, all-reduced, VR-PGE, Adam on the scores, the projection: identical scores.
3. `SparseTrainer` given the sharded model outside an FSDP set-up refuses it, naming the fix.
Writes rank{r}.pt under argv[1].
"""

import copy
import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import hf_sparse as hs  # noqa: E402
from hf_sparse.budget import project_to_budget  # noqa: E402
from trainer_helpers import tiny_llama  # noqa: E402

out = sys.argv[1]
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
torch.manual_seed(0)
model = hs.sparsify_model(tiny_llama(), hs.SparseConfig(sparsity=0.5))
structure = hs.SparseStructure(model)
structure.set_scores(torch.rand(structure.num_units, generator=torch.Generator().manual_seed(1)))
hs.fix_masks(model)
ids = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(2))

reference = copy.deepcopy(model)
reference(ids, labels=ids).loss.backward()
for layer in model.model.layers:
    fully_shard(layer)
fully_shard(model)
half = ids[rank * 2:(rank + 1) * 2]
model(half, labels=half).loss.backward()
grads, ref_grads = {}, {}
for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
    if p.grad is not None:
        grads[name] = p.grad.full_tensor().detach().clone()
        ref_grads[name] = q.grad.detach().clone()
model.zero_grad(set_to_none=True)

# 2: the structure step, scores a buffer every rank holds whole
sharded = hs.SparseStructure(model)
sharded.set_scores(torch.full((sharded.num_units,), 0.5))
for g in sharded:
    g.fixed.fill_(False)
costs = sharded.costs("params")
target = 0.5 * float(costs.double().sum())
optimizer = torch.optim.Adam([g.scores for g in sharded], lr=0.1)
masks_seen = []
for step in range(3):
    masks = hs.sample_masks(sharded.scores(), 2, 0, step)
    masks_seen.append(masks.clone())
    losses = torch.zeros(2)
    with torch.no_grad():
        for k in range(2):
            sharded.set_masks(masks[k])
            losses[k] = model(half, labels=half).loss.float()
    dist.all_reduce(losses)
    losses /= world
    delta = hs.vrpge_gradient(losses, masks, sharded.scores())
    for g, d in zip(sharded.groups, sharded.split(delta)):
        g.scores.grad = d.view_as(g.scores)
    optimizer.step()
    sharded.set_scores(project_to_budget(sharded.scores(), costs, target, weights=costs))
# 3: SparseTrainer on the sharded model outside an FSDP set-up is refused with the fix (it would wrap it in DDP)
try:
    from hf_sparse import SparseTrainer, SparseTrainingArguments

    SparseTrainer(model=model, args=SparseTrainingArguments(output_dir=os.path.join(out, "t"), use_cpu=True,
                                                           report_to=[]))
    refusal = None
except ValueError as e:
    refusal = str(e)
torch.save({"world": world, "refusal": refusal, "grads": grads, "ref_grads": ref_grads, "masks": torch.stack(masks_seen),
            "scores": sharded.scores().clone(), "fixed_mask": hs.SparseStructure(reference).masks(),
            "names": list(hs.SparseStructure(reference).names)}, os.path.join(out, f"rank{rank}.pt"))
dist.destroy_process_group()
