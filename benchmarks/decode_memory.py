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
(batch 1, prompt 64), decode tokens/s after compilation, ratio to dense.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

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


def memory_table(name: str, make_cfg, contexts) -> None:
  print(f"\n## {name}: cache bytes per token of context, one layer, batch 1 (bfloat16)\n")
  print("| type | fixed (bytes) | " + " | ".join(f"S={s} B/token | vs dense" for s in contexts) + " |")
  print("|---|---|" + "---|---|" * len(contexts))
  base = {}
  for t in TYPES:
    cfg = make_cfg(t)
    sizes = [cache_bytes(cfg, s) for s in contexts]
    # what grows with S (per token) from the two largest contexts; the rest is fixed
    per = (sizes[-1] - sizes[-2]) / (contexts[-1] - contexts[-2])
    fixed = sizes[-1] - per * contexts[-1]
    cells = []
    for s, b in zip(contexts, sizes):
      base.setdefault(s, b / s) if t == "dense" else None
      cells.append(f"{b / s:.1f} | {b / s / base[s]:.3f}x")
    print(f"| {t} | {fixed:.0f} | " + " | ".join(cells) + " |")


def speed_table(new_tokens: int) -> None:
  print(f"\n## decode speed, tiny 2-layer model, CPU ({jax.devices()[0].device_kind}), batch 1, prompt 64\n")
  print("| type | tokens/s | vs dense |\n|---|---|---|")
  base = None
  for t in TYPES:
    m = base_config().model
    m.update(num_layers=2, attention_types=(t,))
    m.attention.update(q_lora_rank=64)
    model = build_model(m)
    variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
    prompt = np.arange(64, dtype=np.int32)[None] % 200 + 3
    run = lambda: sample(model, variables, prompt, np.array([64]), rng=jax.random.key(0),
                         max_new_tokens=new_tokens, temperature=0.0).tokens_BxN.block_until_ready()
    run()  # compile
    best = min(_timed(run) for _ in range(3))
    rate = new_tokens / best
    base = base or rate
    print(f"| {t} | {rate:.0f} | {rate / base:.2f}x |")


def _timed(fn) -> float:
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--contexts", type=int, nargs="+", default=[8192, 131072, 1048576])
  parser.add_argument("--speed-tokens", type=int, default=64, help="0: skip the speed table")
  args = parser.parse_args()
  memory_table("DeepSeek-V4-Flash-like dims", flash_config, args.contexts)
  memory_table("tiny config (d_model 128)", tiny_config, args.contexts)
  if args.speed_tokens:
    speed_table(args.speed_tokens)


if __name__ == "__main__":
  main()
