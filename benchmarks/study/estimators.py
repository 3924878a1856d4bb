"""The estimator-variance study: the variance of the structure-gradient estimators (VR-PGE, DisARM, REINFORCE
with and without a moving-average baseline) on the MLP neurons of one MiniLM layer, measured at several points of
a plain dense fine-tuning of the classification task."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch

from .common import CACHE_VERSION, digest, log

if TYPE_CHECKING:
    from .runs import Cache
    from .tasks import ClsTask

ESTIMATORS = ("vrpge", "disarm", "reinforce", "reinforce_baseline")
ESTIMATOR_LABELS = {
    "vrpge": "VR-PGE (2 independent samples)",
    "disarm": "DisARM (antithetic pair)",
    "reinforce": "REINFORCE (1 sample, no baseline)",
    "reinforce_baseline": "REINFORCE (1 sample, moving-average baseline)",
}
ESTIMATOR_FORWARDS = {"vrpge": 2, "disarm": 2, "reinforce": 1, "reinforce_baseline": 1}


def _variance(estimates: torch.Tensor) -> dict[str, float]:
    """Per-unit sample variance across the draws (rows), summed and averaged over units."""
    var = estimates.double().var(0, unbiased=True)
    mean = estimates.double().mean(0)
    return {"variance_sum": float(var.sum()), "variance_mean": float(var.mean()),
            "mean_norm_sq": float((mean**2).sum()), "draws": int(estimates.shape[0])}


@torch.no_grad()
def estimator_variances(
    model, structure, batches: list, scores: torch.Tensor, pairs: int, seed: int, step: int
) -> dict:
    """Losses under 2*pairs independent masks and `pairs` antithetic pairs (eval mode, no dropout), then every
    estimator for both score functions. The two masks of pair i (independent or antithetic) see batches[i % len]:
    one fixed batch when `batches` has one (the masks are the only noise), or a new batch per pair, as in
    training, where REINFORCE's moving-average baseline also has to absorb the batch-to-batch loss changes."""
    from hf_sparse import disarm_gradient, sample_masks, score_function, vrpge_gradient

    def losses_of(masks: torch.Tensor) -> torch.Tensor:
        out = []
        for j, m in enumerate(masks):
            structure.set_masks(m)
            out.append(float(model(**batches[(j // 2) % len(batches)]).loss.float()))
        structure.set_masks(torch.ones(structure.num_units))
        return torch.tensor(out, dtype=torch.float32)

    independent = sample_masks(scores, 2 * pairs, seed, step)
    antithetic = sample_masks(scores, 2 * pairs, seed + 1, step, antithetic=True)
    li, la = losses_of(independent), losses_of(antithetic)
    out = {"loss_mean": float(li.mean()), "loss_std": float(li.std()), "forwards": 4 * pairs}
    warm = min(4, len(li) // 2)
    for sf in ("fisher", "exact"):
        est: dict[str, torch.Tensor] = {}
        est["vrpge"] = torch.stack([vrpge_gradient(li[2 * i : 2 * i + 2], independent[2 * i : 2 * i + 2], scores, sf)
                                    for i in range(pairs)])
        est["disarm"] = torch.stack([disarm_gradient(la[2 * i : 2 * i + 2], antithetic[2 * i : 2 * i + 2], scores, sf)
                                     for i in range(pairs)])
        g = score_function(independent, scores, sf)
        est["reinforce"] = li[:, None] * g
        # moving-average baseline (EMA 0.9) over the sequence of draws, warmed on the first `warm` losses; each
        # estimate uses the baseline from before its own loss, so it stays unbiased
        b = float(li[:warm].mean())
        rows = []
        for j in range(warm, len(li)):
            rows.append((li[j] - b) * g[j])
            b = 0.9 * b + 0.1 * float(li[j])
        est["reinforce_baseline"] = torch.stack(rows)
        out[sf] = {}
        for name, e in est.items():
            stats = _variance(e)
            # at equal forward passes (2 per estimate): a 1-forward estimator averages two draws, variance / 2
            stats["variance_sum_at_2_forwards"] = stats["variance_sum"] * ESTIMATOR_FORWARDS[name] / 2.0
            stats["forwards_per_estimate"] = ESTIMATOR_FORWARDS[name]
            out[sf][name] = stats
    return out


def run_estimator_study(
    task: "ClsTask", cache: Cache, points: list[int], pairs: int, layer: int, batch_size: int
) -> dict:
    from torch.utils.data import DataLoader
    from transformers import set_seed

    import hf_sparse
    from hf_sparse import SparseConfig, SparseStructure

    content = {"v": CACHE_VERSION, "study": 2, "points": points, "pairs": pairs, "layer": layer, "bs": batch_size,
               "settings": task.s.for_task("cls")}
    key = f"estimator__{digest(content)}"
    cached = cache.get(key)
    if cached is not None:
        log(f"estimator study: cached ({cache.path(key)})")
        return cached
    start = time.perf_counter()
    set_seed(0)
    model = task.model(0)
    target = f"encoder.layer.{layer}.intermediate.dense"
    hf_sparse.sparsify_model(model, SparseConfig(sparsity=0.5, granularity=["neuron"], target_modules=[target],
                                                 score_init="ones"))
    structure = SparseStructure(model)
    n = structure.num_units
    train = task.ds["train"]
    fixed = [task.collator([train[i] for i in range(min(batch_size, len(train)))])]
    # a new batch per pair: consecutive training passages (fixed across points)
    rotating = [task.collator([train[(k * batch_size + i) % len(train)] for i in range(batch_size)])
                for k in range(pairs)]
    gen = torch.Generator().manual_seed(0)
    loader = DataLoader(train, batch_size=batch_size, shuffle=True, collate_fn=task.collator, generator=gen)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=task.s.cls_lr)
    spread = 0.05 + 0.9 * torch.rand(n, generator=torch.Generator().manual_seed(1))
    settings = {  # name -> (keep probabilities, batches)
        "uniform_0.5": (torch.full((n,), 0.5), fixed),
        "spread": (spread, fixed),
        "spread_new_batches": (spread, rotating),
    }
    records = []
    step, it = 0, iter(loader)
    for point in sorted(set(points)):
        model.train()  # plain dense fine-tuning between the points (every unit kept)
        while step < point:
            try:
                batch = next(it)
            except StopIteration:
                it = iter(loader)
                batch = next(it)
            loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
        model.eval()
        for name, (s, batches) in settings.items():
            t = time.perf_counter()
            rec = estimator_variances(model, structure, batches, s, pairs, seed=1234, step=point)
            rec.update(step=point, scores=name)
            records.append(rec)
            log(f"estimator study: step {point}, scores {name}: {rec['forwards']} forwards in "
                f"{time.perf_counter() - t:.1f}s, "
                f"VR-PGE/REINFORCE variance (fisher) {rec['fisher']['vrpge']['variance_sum']:.3g} / "
                f"{rec['fisher']['reinforce']['variance_sum']:.3g}")
    result = {"layer": layer, "group": structure.names[0], "units": n, "pairs": pairs, "batch_size": batch_size,
              "points": sorted(set(points)), "records": records, "seconds": time.perf_counter() - start}
    cache.put(key, result)
    return result
