"""Forward+backward time and peak memory of each attention type vs sequence length.

  python benchmarks/attention_scaling.py [--lengths 1024 4096 16384] [--types dense sliding ...]
      [--rounds 3] [--plot docs/attention_scaling.png] [--plot-only]

One attention layer (batch 1, d_model 128, 4 heads of 32, default
``model.attention`` kernel choice: XLA up to 2048 tokens, chunked above), one
CPU device. Time: wall time of ``grad(sum(y * w))`` w.r.t. parameters and
input, compiled ahead of time (no sample includes compilation); at each T every
type runs once per round, the order rotating, for ``--rounds`` rounds; medians,
quartiles, and the ratio to ``dense`` in the same round. Memory: peak of the
compiled program's buffers (XLA's memory analysis: arguments + outputs +
temporaries), which on CPU is what the program needs, independent of allocator
noise. Raw results and provenance go to ``benchmarks/results/attention_scaling/``;
``--plot`` draws the newest result as a log-log plot.
"""

from __future__ import annotations

import argparse
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from moejax.benchmarking import Results, interleaved, latest, summary
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


def compile_step(attention_type: str, seq_len: int):
  """(a callable running one timed fwd+bwd, peak bytes of the compiled program)."""
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

  def run() -> float:
    start = time.perf_counter()
    jax.block_until_ready(step(params, x))
    return time.perf_counter() - start

  return run, peak


def plot(results: list[dict], path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
  for name in dict.fromkeys(r["type"] for r in results):
    rows = sorted((r for r in results if r["type"] == name), key=lambda r: r["seq_len"])
    lengths = [r["seq_len"] for r in rows]
    style = dict(marker="o", label=name, linestyle="--" if name in ("dense", "mla") else "-")
    ax_t.plot(lengths, [r["median_s"] for r in rows], **style)
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


def table(record: dict) -> str:
  """Markdown: one row per (T, type) (``benchmarks/report.py``)."""
  lines = ["| T | type | fwd+bwd s (quartiles) | x dense (per-round range) | peak MiB | x dense |",
           "|---|---|---|---|---|---|"]
  for r in record["rows"]:
    dense = next(d for d in record["rows"] if d["seq_len"] == r["seq_len"] and d["type"] == "dense")
    lines.append(f"| {r['seq_len'] // 1024}K | {r['type']} | {r['median_s']:.3g} ({r['q1_s']:.3g}-{r['q3_s']:.3g}) | "
                 f"{r['ratio']:.3g} ({r['ratio_min']:.3g}-{r['ratio_max']:.3g}) | {r['peak_bytes'] / 2**20:.0f} | "
                 f"{r['peak_bytes'] / dense['peak_bytes']:.2f} |")
  return "\n".join(lines)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384])
  parser.add_argument("--types", nargs="+", default=list(TYPES), help="dense first: the baseline")
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--plot", default="docs/attention_scaling.png")
  parser.add_argument("--plot-only", action="store_true", help="re-plot the newest result without measuring")
  args = parser.parse_args()
  if args.plot_only:
    plot(latest("attention_scaling")["rows"], args.plot)
    return
  results = Results("attention_scaling", params={"lengths": args.lengths, "types": args.types, "rounds": args.rounds})
  rows = []
  for seq_len in args.lengths:
    steps, peaks = {}, {}
    for name in args.types:
      steps[name], peaks[name] = compile_step(name, seq_len)
    samples = interleaved(steps, args.rounds)
    rows += [{"type": n, "seq_len": seq_len, "peak_bytes": peaks[n], **summary(s, samples[args.types[0]])}
             for n, s in samples.items()]
    print(f"T={seq_len}: " + ", ".join(f"{r['type']} {r['median_s']:.3g}s" for r in rows[-len(steps):]), flush=True)
  results.add_rows(rows)
  results.write()
  print(table(results.record))
  plot(rows, args.plot)


if __name__ == "__main__":
  main()
