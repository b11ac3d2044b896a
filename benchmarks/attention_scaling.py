"""Forward+backward time and peak memory of each attention type vs sequence length.

  python benchmarks/attention_scaling.py [--lengths 1024 4096 16384 65536] [--types dense sliding ...]
      [--repeats 3] [--out docs/attention_scaling] [--plot-only]

One attention layer (batch 1, d_model 128, 4 heads of 32, default
``model.attention`` kernel choice: XLA up to 2048 tokens, chunked above), one
CPU device. Time: median wall time of ``grad(sum(y * w))`` w.r.t. parameters
and input (compiled ahead of time, so no run includes compilation; after one
run longer than a minute no further repeats are made). Memory: peak of the compiled program's buffers
(XLA's memory analysis: arguments + outputs + temporaries), which on CPU is
what the program needs, independent of allocator noise. Each type is reported
as a ratio to ``dense`` measured in the same run. Writes ``OUT.json`` and a
log-log plot ``OUT.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from moejax.config import base_config
from moejax.layers.attention import ATTENTION

TYPES = ("dense", "sliding", "mla", "dsa", "swa", "csa", "hca")


def bench_config():
  m = base_config().model
  m.update(d_model=128, num_heads=4, num_kv_heads=2)
  m.attention.update(
      window=128, chunk_size=512,
      q_lora_rank=64, kv_lora_rank=64, qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=32,
      index_heads=2, index_head_dim=16, index_topk=256, indexer_stage="sparse", indexer_recall_queries=0,
      rope_dim=16, rope_layout="interleave", csa_ratio=4, hca_ratio=128, o_groups=2, o_lora_rank=64)
  return m


def measure(attention_type: str, seq_len: int, repeats: int) -> dict:
  cfg = bench_config()
  attn = ATTENTION.get(attention_type)(cfg=cfg)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(1, seq_len, cfg.d_model)), jnp.float32)
  w = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
  pos, seg = jnp.arange(seq_len)[None], jnp.ones((1, seq_len), jnp.int32)
  params = nn.meta.unbox(jax.jit(attn.init)(jax.random.key(0), x[:, :256], pos[:, :256], seg[:, :256]))["params"]

  def loss(params, x):
    y, sown = attn.apply({"params": params}, x, pos, seg, mutable=["aux_loss"])
    return jnp.sum(y * w) + sum(jnp.sum(v) for v in jax.tree.leaves(sown))

  step = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, x).compile()
  mem = step.memory_analysis()
  peak = mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes - mem.alias_size_in_bytes
  times = []
  while len(times) < repeats and sum(times) < 60:
    start = time.perf_counter()
    jax.block_until_ready(step(params, x))
    times.append(time.perf_counter() - start)
  return {"type": attention_type, "seq_len": seq_len, "seconds": statistics.median(times), "peak_bytes": peak}


def plot(results: list[dict], path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
  for name in dict.fromkeys(r["type"] for r in results):
    rows = sorted((r for r in results if r["type"] == name), key=lambda r: r["seq_len"])
    lengths = [r["seq_len"] for r in rows]
    style = dict(marker="o", label=name, linestyle="--" if name in ("dense", "mla") else "-")
    ax_t.plot(lengths, [r["seconds"] for r in rows], **style)
    ax_m.plot(lengths, [r["peak_bytes"] / 2**20 for r in rows], **style)
  for ax, label in ((ax_t, "fwd+bwd seconds"), (ax_m, "peak memory (MiB)")):
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length T")
    ax.set_ylabel(label)
    ax.grid(True, which="both", alpha=0.3)
  ax_t.legend(fontsize=8)
  fig.suptitle("One attention layer, batch 1, d=128, 4 heads x 32, CPU")
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384, 65536])
  parser.add_argument("--types", nargs="+", default=list(TYPES))
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--out", default="docs/attention_scaling")
  parser.add_argument("--plot-only", action="store_true", help="re-plot OUT.json without measuring")
  args = parser.parse_args()
  if args.plot_only:
    with open(args.out + ".json") as f:
      plot(json.load(f), args.out + ".png")
    return
  results = []
  print(f"{jax.devices()[0].platform}, {os.cpu_count()} cores; median of {args.repeats}")
  print(f"{'type':<8}{'T':>7}{'seconds':>10}{'x dense':>9}{'peak MiB':>10}{'x dense':>9}")
  for seq_len in args.lengths:
    base = None
    for name in args.types:
      r = measure(name, seq_len, args.repeats)
      results.append(r)
      base = base or (r if name == "dense" else None)
      ratio = lambda key: f"{r[key] / base[key]:>9.3f}" if base else f"{'-':>9}"
      print(f"{name:<8}{seq_len:>7}{r['seconds']:>10.3f}{ratio('seconds')}{r['peak_bytes'] / 2**20:>10.1f}"
            f"{ratio('peak_bytes')}", flush=True)
      with open(args.out + ".json", "w") as f:
        json.dump(results, f, indent=1)
  plot(results, args.out + ".png")


if __name__ == "__main__":
  main()
