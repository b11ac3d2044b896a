"""Decode cache bytes per token of context, per layer and attention type; decode speed on CPU.

  python benchmarks/decode_memory.py [--contexts 8192 131072 1048576] [--speed-tokens 64]

Memory (no allocation: cache shapes from ``moejax.generate.cache_shapes``,
bfloat16 caches): one layer of each type at "flash" dims (d_model 4096, 64
heads; dense/sliding GQA 8 kv heads x 128; mla/dsa DeepSeek-V3's latent 512 +
64 and indexer 128; swa/csa/hca DeepSeek-V4-Flash's head 512, window 128,
csa m=4, hca m=128, indexer 128) and at the tiny config. For each context S
it prints the bytes per token of context (total cache / S) and, as a ratio,
against dense measured in the same run; "fixed" is what does not grow with S
(rings and partial-window state).

Speed: greedy ``moejax.generate.sample`` of a tiny 2-layer model of each type
(batch 1, prompt 64), after compilation, timed in interleaved rounds (every
type once per round, the order rotating): ``prefill`` is a call that emits one
token (the prompt's prefill plus one sampled token), ``decode`` the extra time
of a call that emits ``--speed-tokens`` tokens, per extra token; ratios to
dense. Raw results and provenance go to ``benchmarks/results/decode_memory/``.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from moejax.benchmarking import Results, interleaved, summary
from moejax.config import base_config
from moejax.generate import cache_shapes, sample
from moejax.models.transformer import build_model

TYPES = ("dense", "sliding", "mla", "dsa", "swa", "csa", "hca")


def flash_config(attention_type: str):
  m = base_config().model
  m.update(num_layers=1, d_model=4096, num_heads=64, num_kv_heads=8, head_dim=128, vocab_size=1024,
           attention_types=(attention_type,), dtype="bfloat16", param_dtype="bfloat16")
  m.attention.update(window=128, q_lora_rank=1024, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
                     v_head_dim=128, index_heads=64, index_head_dim=128, index_topk=512)
  if attention_type in ("swa", "csa", "hca"):
    m.update(num_kv_heads=1, head_dim=512)
    m.attention.update(rope_dim=64, csa_ratio=4, hca_ratio=128, o_groups=8, o_lora_rank=1024)
  return m


def tiny_config(attention_type: str):
  m = base_config().model
  m.update(num_layers=1, attention_types=(attention_type,), dtype="bfloat16", param_dtype="bfloat16")
  m.attention.update(q_lora_rank=64)
  return m


def cache_bytes(model_cfg, context: int) -> int:
  model = build_model(model_cfg)
  variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
  shapes = cache_shapes(model, variables, 1, context)
  return sum(int(np.prod(s.shape)) * s.dtype.itemsize for s in jax.tree.leaves(shapes))


def memory_rows(name: str, make_cfg, contexts) -> list[dict]:
  """Cache bytes of one layer of each type at each context (exact, from shapes)."""
  rows = []
  for t in TYPES:
    cfg = make_cfg(t)
    rows.append({"kind": "memory", "dims": name, "type": t, "contexts": list(contexts),
                 "cache_bytes": [cache_bytes(cfg, c) for c in contexts]})
  return rows


def speed_rows(new_tokens: int, rounds: int) -> list[dict]:
  """Prefill (+1 token) and per-token decode times of a tiny 2-layer model of each type."""
  timers = {}
  for t in TYPES:
    m = base_config().model
    m.update(num_layers=2, attention_types=(t,))
    m.attention.update(q_lora_rank=64)
    model = build_model(m)
    variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
    prompt = np.arange(64, dtype=np.int32)[None] % 200 + 3
    for n in (1, new_tokens):
      run = lambda n=n, model=model, variables=variables: sample(
          model, variables, prompt, np.array([64]), rng=jax.random.key(0), max_new_tokens=n,
          temperature=0.0).tokens_BxN.block_until_ready()
      run()  # compile
      timers[(t, n)] = lambda run=run: _timed(run)
  samples = interleaved({f"{t} {n}": fn for (t, n), fn in timers.items()}, rounds)
  rows = []
  for t in TYPES:
    one, many = samples[f"{t} 1"], samples[f"{t} {new_tokens}"]
    per_token = [(b - a) / (new_tokens - 1) for a, b in zip(one, many)]  # same round: same load
    rows.append({"kind": "speed", "type": t, "new_tokens": new_tokens, "prefill": summary(one),
                 "decode_per_token": summary(per_token)})
  return rows


def table(record: dict) -> str:
  """Markdown: the memory tables (per dims) and the speed table (``benchmarks/report.py``)."""
  out = []
  memory = [r for r in record["rows"] if r["kind"] == "memory"]
  for dims in dict.fromkeys(r["dims"] for r in memory):
    rows = [r for r in memory if r["dims"] == dims]
    contexts = rows[0]["contexts"]
    dense = next(r for r in rows if r["type"] == "dense")
    out += [f"**{dims}**: cache bytes per token of context, one layer, batch 1 (bfloat16)", "",
            "| type | fixed (bytes) | " + " | ".join(f"S={c} B/token | vs dense" for c in contexts) + " |",
            "|---|---|" + "---|---|" * len(contexts)]
    for r in rows:
      sizes = r["cache_bytes"]
      # what grows with S (per token) from the two largest contexts; the rest is fixed
      per = (sizes[-1] - sizes[-2]) / (contexts[-1] - contexts[-2])
      cells = [f"{b / c:.1f} | {b / d:.3f}x" for c, b, d in zip(contexts, sizes, dense["cache_bytes"])]
      out.append(f"| {r['type']} | {sizes[-1] - per * contexts[-1]:.0f} | " + " | ".join(cells) + " |")
    out.append("")
  speed = [r for r in record["rows"] if r["kind"] == "speed"]
  if speed:
    base = speed[0]
    out += [f"**Speed**, tiny 2-layer model, batch 1, prompt 64, {base['new_tokens']} new tokens; medians of "
            f"{base['prefill']['n']} interleaved rounds (quartiles)", "",
            "| type | prefill + 1 token ms | vs dense | decode ms per token | tokens/s | vs dense |",
            "|---|---|---|---|---|---|"]
    for r in speed:
      p, d = r["prefill"], r["decode_per_token"]
      out.append(f"| {r['type']} | {p['median_s'] * 1e3:.1f} ({p['q1_s'] * 1e3:.1f}-{p['q3_s'] * 1e3:.1f}) | "
                 f"{p['median_s'] / base['prefill']['median_s']:.2f}x | {d['median_s'] * 1e3:.2f} "
                 f"({d['q1_s'] * 1e3:.2f}-{d['q3_s'] * 1e3:.2f}) | {1 / d['median_s']:.0f} | "
                 f"{base['decode_per_token']['median_s'] / d['median_s']:.2f}x |")
  return "\n".join(out)


def _timed(fn) -> float:
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--contexts", type=int, nargs="+", default=[8192, 131072, 1048576])
  parser.add_argument("--speed-tokens", type=int, default=64, help="0: skip the speed table")
  parser.add_argument("--rounds", type=int, default=5)
  args = parser.parse_args()
  results = Results("decode_memory", params=vars(args))
  rows = (memory_rows("DeepSeek-V4-Flash-like dims", flash_config, args.contexts)
          + memory_rows("tiny config (d_model 128)", tiny_config, args.contexts))
  if args.speed_tokens:
    rows += speed_rows(args.speed_tokens, args.rounds)
  results.add_rows(rows)
  results.write()
  print(table(results.record))


if __name__ == "__main__":
  main()
