"""Train-step time of Muon (and peers) vs AdamW on the same model, as ratios.

  python benchmarks/optimizer_step.py [--preset tiny|medium|small] [--steps 10]

Presets: ``tiny`` (configs/tiny.py, 0.9M params, 16 x 256 tokens), ``medium``
(6 layers, d=384, ~11M params, 8 x 256; CPU-feasible), ``small``
(configs/small.py, ~126M params, 8 x 2048 bf16; the GPU target: Muon <= 1.15x
AdamW). Every variant is timed in this run; ratios are to AdamW's median
step time measured here (absolute times on shared machines are noisy).
"""

import argparse

import jax

from moejax.config import load_config
from train_step import time_variant

PRESETS = {
    "tiny": ("configs/tiny.py", {}),
    "medium": ("configs/tiny.py", {"model.num_layers": 6, "model.d_model": 384, "model.num_heads": 6,
                                   "model.num_kv_heads": 2, "model.ffn_dim": 1024, "train.batch_size": 8}),
    "small": ("configs/small.py", {"train.batch_size": 8, "mesh.fsdp": 1}),
}

VARIANTS = {
    "adamw": {"optim.name": "adamw"},
    "muon (bf16 NS)": {"optim.name": "muon", "optim.muon.ns_dtype": "bfloat16"},
    "muon (fp32 NS)": {"optim.name": "muon", "optim.muon.ns_dtype": "float32"},
    "muon polar_express": {"optim.name": "muon", "optim.muon.coefficients": "polar_express"},
    "muon normuon": {"optim.name": "muon", "optim.muon.normuon": True},
    "optax_muon": {"optim.name": "optax_muon"},
    "lion": {"optim.name": "lion"},
}


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset (adamw first)")
  args = parser.parse_args()
  config, base = PRESETS[args.preset]
  cfg = load_config(config)
  tokens = base.get("train.batch_size", cfg.train.batch_size) * cfg.data.seq_len
  print(f"preset {args.preset}: {config} {base}, {tokens} tokens/step, {jax.devices()[0].platform}, "
        f"median of {args.steps} steps")
  print(f"{'variant':<22}{'step ms':>10}{'ratio to adamw':>16}")
  baseline = None
  for name in args.variants.split(","):
    t = time_variant(config, {**base, **VARIANTS[name]}, args.steps)
    baseline = baseline or t
    print(f"{name:<22}{t * 1e3:>10.1f}{t / baseline:>16.2f}", flush=True)


if __name__ == "__main__":
  main()
