"""Muon's AdamW-branch learning rate (embeddings, head, norms, routers): a ratio to Muon's own.

  moejax sweep --config configs/tiny.py --sweep experiments/sweeps/muon_adam_lr.py \
    --workdir workdirs/sweep-muon_adam_lr

The optimizer ablation's Muon arm (experiments/optimizer_ablation.md) at its
best learning rate 1e-2, with ``optim.muon.adam_lr_ratio`` in {0.1, 0.3, 1, 3, 10}
(1 = what the ablation ran), 2 seeds; the same data, model and schedule as
experiments/sweeps/optimizers.py. 10 runs of ~25 s of training each on 2 idle cores
(4 min in all). The first grid ended at 3, which won on its edge; 10 was added.
Stored runs and the report: experiments/muon_adam_lr/.
"""

import os

from moejax.sweep import Arm, Sweep, load_sweep


def get_sweep():
  common = load_sweep(os.path.join(os.path.dirname(os.path.abspath(__file__)), "optimizers.py")).common
  return Sweep(
      arms={"muon": Arm({"optim.name": "muon", "optim.muon.ns_dtype": "float32", "optim.learning_rate": 1e-2},
                        {"optim.muon.adam_lr_ratio": [0.1, 0.3, 1.0, 3.0, 10.0]})},
      common=common, seeds=(0, 1), baseline="muon")
