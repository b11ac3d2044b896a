"""Optimizer ablation at tiny scale: AdamW vs Muon vs Lion vs Adafactor, each LR-tuned.

  moejax sweep --config configs/tiny.py --sweep experiments/sweeps/optimizers.py

On the embedded stdlib text (byte-level): a 2-layer d=128 model, 200 steps of
8 x 128 tokens (cosine schedule, 20 warm-up steps), validation every 20 steps
on the same 4 held-out batches. Every arm gets 3 learning rates x 2 seeds;
AdamW's best trial also runs at 0.5x, 2x and 4x the steps for the D_eff fit.
About 30 CPU-minutes on 2 cores. Results: experiments/optimizer_ablation.md.
Muon's Newton-Schulz runs in float32 here (bfloat16 matmuls are emulated,
hence slower, on CPU; use the bfloat16 default on GPU/TPU).
"""

from moejax.sweep import Arm, Sweep


def get_sweep():
  return Sweep(
      arms={
          "adamw": Arm({"optim.name": "adamw"}, {"optim.learning_rate": [3e-4, 1e-3, 3e-3]}),
          "muon": Arm({"optim.name": "muon", "optim.muon.ns_dtype": "float32"},
                      {"optim.learning_rate": [3e-3, 1e-2, 3e-2]}),
          # Lion's standard b2 is 0.99 (Chen et al., 2023), not the sweep's common 0.95.
          "lion": Arm({"optim.name": "lion", "optim.b2": 0.99}, {"optim.learning_rate": [3e-4, 1e-3, 3e-3]}),
          "adafactor": Arm({"optim.name": "adafactor"}, {"optim.learning_rate": [1e-3, 3e-3, 1e-2]}),
      },
      common={
          "model.num_layers": 2, "data.seq_len": 128, "train.batch_size": 8,
          "train.steps": 200, "optim.warmup_steps": 20, "optim.schedule": "cosine",
          "train.log_every": 10, "train.eval_every": 20, "train.eval_batches": 4,
          "train.checkpoint_every": 100, "train.keep_checkpoints": 1,
      },
      seeds=(0, 1),
      baseline="adamw",
      budgets=(0.5, 2.0, 4.0),
  )
