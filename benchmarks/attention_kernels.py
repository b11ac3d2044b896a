"""The causal attention kernels against each other: ``xla`` (one fused call, a [T, T] mask) and ``chunked``
(flash-style, per block size), forward and forward+backward, per sequence length.

  python benchmarks/attention_kernels.py [--lengths 256 512 1024 2048] [--blocks 128 256 512] [--rounds 5]

The kernel core alone (``moejax.layers.attention.core.causal_attention``), batch 2, 8 query heads
sharing 2 kv heads, head dim 32 (the GQA shape of ``benchmarks/hf_forward.py``), float32, one
segment per row. At each length every variant runs once per round, the order rotating; the ratio
is to ``xla`` in the same round. This is what ``attention.implementation="auto"`` is tuned from on
each platform (``moejax.layers.attention.options``: ``CPU_XLA_MAX_LEN``, ``CPU_BLOCK``). Raw results
and provenance go to ``benchmarks/results/attention_kernels/``.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from moejax.benchmarking import Results, interleaved, summary
from moejax.layers.attention import core

BATCH, HEADS, KV_HEADS, HEAD_DIM = 2, 8, 2, 32


def kernel_fn(kernel: str, block: int, backward: bool):
  """A jitted forward (or gradient of a sum of squares) of one kernel."""
  def forward(q, k, v, seg):
    return core.causal_attention(q, k, v, seg, scale=HEAD_DIM ** -0.5, kernel=kernel, block=block)[0]
  if not backward:
    return jax.jit(forward)
  return jax.jit(jax.grad(lambda q, k, v, seg: jnp.sum(forward(q, k, v, seg) ** 2), argnums=(0, 1, 2)))


def measure(t: int, blocks: list[int], rounds: int) -> list[dict]:
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.normal(size=(BATCH, t, HEADS, HEAD_DIM)), jnp.float32)
  k, v = (jnp.asarray(rng.normal(size=(BATCH, t, KV_HEADS, HEAD_DIM)), jnp.float32) for _ in range(2))
  seg = jnp.ones((BATCH, t), jnp.int32)
  rows = []
  for pass_ in ("forward", "forward+backward"):
    variants = {"xla": ("xla", 0)} | {f"chunked, block {b}": ("chunked", b) for b in blocks if b <= t}
    fns = {name: kernel_fn(*spec, backward=pass_ != "forward") for name, spec in variants.items()}

    def timed(fn):
      def run():
        start = time.perf_counter()
        jax.block_until_ready(fn(q, k, v, seg))
        return time.perf_counter() - start
      return run

    for fn in fns.values():
      jax.block_until_ready(fn(q, k, v, seg))  # compile, warm up
    samples = interleaved({name: timed(fn) for name, fn in fns.items()}, rounds)
    rows += [{"seq_len": t, "pass": pass_, "variant": name, **summary(s, samples["xla"])}
             for name, s in samples.items()]
  return rows


def table(record: dict) -> str:
  """Markdown: one row per length and pass, one column per variant (``benchmarks/report.py``)."""
  variants = list(dict.fromkeys(r["variant"] for r in record["rows"]))
  lines = ["| T | pass | " + " | ".join(f"{v} ms (x xla)" for v in variants) + " |",
           "|---|---|" + "---|" * len(variants)]
  keys = list(dict.fromkeys((r["seq_len"], r["pass"]) for r in record["rows"]))
  for t, pass_ in keys:
    cells = []
    for v in variants:
      r = next((r for r in record["rows"] if (r["seq_len"], r["pass"], r["variant"]) == (t, pass_, v)), None)
      cells.append("-" if r is None else f"{r['median_s'] * 1e3:.1f} ({r['ratio']:.2f}, "
                   f"{r['ratio_min']:.2f}-{r['ratio_max']:.2f})")
    lines.append(f"| {t} | {pass_} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--lengths", type=int, nargs="+", default=[256, 512, 1024, 2048])
  parser.add_argument("--blocks", type=int, nargs="+", default=[128, 256, 512])
  parser.add_argument("--rounds", type=int, default=5)
  args = parser.parse_args()
  results = Results("attention_kernels", params=vars(args))
  for t in args.lengths:
    rows = measure(t, args.blocks, args.rounds)
    results.add_rows(rows)
    print("  " + "; ".join(f"T={r['seq_len']} {r['pass']} {r['variant']}: {r['median_s'] * 1e3:.1f} ms"
                           for r in rows), flush=True)
  results.add_rows([], platform=jax.devices()[0].platform, shape=dict(batch=BATCH, heads=HEADS, kv_heads=KV_HEADS,
                                                                     head_dim=HEAD_DIM))
  results.write()
  print(table(results.record))


if __name__ == "__main__":
  main()
