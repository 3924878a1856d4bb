"""How well the plain search finds a planted structure: the set-up of the planted-units test
(`tests/test_trainer_contract.py::test_the_structure_update_drops_planted_harmful_units`): a briefly fitted tiny
Llama, 16 of the 64 neurons of each MLP made harmful (noise where computed), a budget keeping 75%, the weights
frozen; the search alone must drop the 32 harmful units. Prints, per structure learning rate, mask groups and
steps, how many harmful units the final top-K mask still keeps (a random choice keeps 24).

    python benchmarks/planted_units.py        # about 1 minute on 2 CPU cores
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))  # the test's own set-up, so the numbers are the test's


def kept_harmful(lr: float, groups: int, steps: int) -> int:
    from test_trainer_contract import make_args, plant_harmful_neurons, trained_tiny_llama
    from trainer_helpers import arithmetic_sequences

    import hf_sparse as hs

    model = hs.sparsify_model(trained_tiny_llama(), hs.SparseConfig(sparsity=0.25, granularity=["neuron"]))
    harmful = plant_harmful_neurons(model, scale=1.0)
    args = make_args(tempfile.mkdtemp(), max_steps=steps, learning_rate=0.0, fix_masks_at=1.0, budget_schedule_end=0.5,
                     structure_learning_rate=lr, mask_groups=groups, logging_steps=steps)
    trainer = hs.SparseTrainer(model=model, args=args, train_dataset=arithmetic_sequences(256))
    trainer.train()
    mask = dict(zip(trainer.structure.groups, trainer.structure.split(trainer.topk_mask())))
    return sum(int(mask[g][bad].sum()) for g, bad in harmful.items())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--settings", nargs="+", default=["0.02,4,150", "0.02,1,150", "0.1,4,150", "0.1,1,60"],
                   help="structure_learning_rate,mask_groups,steps")
    a = p.parse_args(argv)
    rows = []
    for setting in a.settings:
        lr, groups, steps = setting.split(",")
        rows.append((float(lr), int(groups), int(steps), kept_harmful(float(lr), int(groups), int(steps))))
    print("\n| structure lr | mask groups | steps | harmful units kept (of 32; random: 24) |")
    print("|---:|---:|---:|---:|")
    for lr, groups, steps, kept in rows:
        print(f"| {lr} | {groups} | {steps} | {kept} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
