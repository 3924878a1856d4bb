"""One process of the FSDP2 test (torchrun, 2 processes, gloo): hf_sparse's gathered layers on FSDP2-sharded
weights (`torch.distributed.fsdp.fully_shard`), against the same model unsharded in the same process.

1. Fixed mask: forward + backward of each rank's half batch; the reduce-scattered gradient equals the
   single-process gradient of the whole batch, and the dropped units' entries are exactly zero.
2. A structure step as SparseTrainer takes it: masks drawn from the shared seed (identical on both ranks), two
   no-grad losses under FSDP2, all-reduced, VR-PGE, Adam on the scores, the projection: identical scores, and
   the scores and masks of the same three steps replayed in one process on the unsharded copy.
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

fixed_mask, names = hs.SparseStructure(reference).masks().clone(), list(hs.SparseStructure(reference).names)


# 2: the structure step, scores a buffer every rank holds whole
def structure_steps(net, batch, reduce=None):
    """Three structure steps from s = 0.5 on `net`: masks from the shared seed, no-grad losses on `batch` (then
    `reduce`d), VR-PGE, Adam, the projection. Returns the masks drawn and the structure."""
    structure = hs.SparseStructure(net)
    structure.set_scores(torch.full((structure.num_units,), 0.5))
    for g in structure:
        g.fixed.fill_(False)
    costs = structure.costs("params")
    target = 0.5 * float(costs.double().sum())
    optimizer = torch.optim.Adam([g.scores for g in structure], lr=0.1)
    masks_seen = []
    for step in range(3):
        masks = hs.sample_masks(structure.scores(), 2, 0, step)
        masks_seen.append(masks.clone())
        losses = torch.zeros(2)
        with torch.no_grad():
            for k in range(2):
                structure.set_masks(masks[k])
                losses[k] = net(batch, labels=batch).loss.float()
        if reduce is not None:
            losses = reduce(losses)
        delta = hs.vrpge_gradient(losses, masks, structure.scores())
        for g, d in zip(structure.groups, structure.split(delta)):
            g.scores.grad = d.view_as(g.scores)
        optimizer.step()
        structure.set_scores(project_to_budget(structure.scores(), costs, target, weights=costs))
    return torch.stack(masks_seen), structure


def mean_over_ranks(losses):
    dist.all_reduce(losses)
    return losses / world


masks_seen, sharded = structure_steps(model, half, mean_over_ranks)
# the known answer: the same steps in one process on the unsharded copy and the whole batch (its mean loss is the
# mean of the two halves' mean losses)
replay_masks, replayed = structure_steps(copy.deepcopy(reference), ids)
# 3: SparseTrainer on the sharded model outside an FSDP set-up is refused with the fix (it would wrap it in DDP)
try:
    from hf_sparse import SparseTrainer, SparseTrainingArguments

    SparseTrainer(model=model, args=SparseTrainingArguments(output_dir=os.path.join(out, "t"), use_cpu=True,
                                                           report_to=[]))
    refusal = None
except ValueError as e:
    refusal = str(e)
torch.save({"world": world, "refusal": refusal, "grads": grads, "ref_grads": ref_grads, "masks": masks_seen,
            "scores": sharded.scores().clone(), "replay_masks": replay_masks, "replay_scores": replayed.scores().clone(),
            "fixed_mask": fixed_mask, "names": names}, os.path.join(out, f"rank{rank}.pt"))
dist.destroy_process_group()
