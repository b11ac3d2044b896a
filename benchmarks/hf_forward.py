"""moejax's forward against transformers' on the same checkpoint, for every architecture moejax imports (CPU).

  python benchmarks/hf_forward.py [--archs llama,qwen3_moe,...] [--seq-len 1024] [--batch 2] [--rounds 5]

For each ``model_type`` of ``moejax/interop/archs`` one random transformers model at a shared small
shape (4 layers, d_model 256, 8 query heads of 32, vocab 4096; MoE: 32 routed experts of width 128,
top-4, plus one shared expert where the architecture has them; the per-architecture fields are in
:data:`ARCHS`), with transformers' own initialisation, except DeepSeek-V4's hash-routing table,
which transformers initialises to zeros (every token to expert 0) and is drawn here as random
distinct experts per token, as a trained checkpoint spreads them. moejax loads it with
``moejax.interop.hf.from_transformers`` (float32, the config the import gives: attention ``auto``,
MoE backend ``auto``) and runs ``jax.jit(model.apply)``; transformers runs ``model(ids)`` under
``torch.no_grad()`` in float32 with its fastest implementations that run here: SDPA attention where
the architecture has it (DeepSeek-V4 has only eager), grouped-GEMM experts (``grouped_mm``) for MoE
models. Forward only, ``--batch`` x ``--seq-len`` random tokens.

Each round times both once (the order rotating, ``moejax.benchmarking.interleaved``), after one
warm-up call each (moejax's compile); the ratio is moejax's time over transformers' in the same
round (below 1: moejax is faster); ``--profile N`` records moejax's N most costly XLA ops
(``moejax.benchmarking.top_ops``) in the raw results and prints them. ``parity`` is max |logit difference| / max |logit|. At random
init the DSA/CSA indexers see near-ties in their top-k (exact zeros from the ReLU), where the two
implementations may keep different keys, so parity there is not the interop tests' 1e-4
(tests/interop/test_hf.py checks it on weights that avoid ties). Raw samples and provenance go to
``benchmarks/results/hf_forward/``.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from moejax.benchmarking import Results, interleaved, summary, top_ops

_MLA = dict(q_lora_rank=128, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
            num_key_value_heads=8)
_EXPERTS = dict(n_routed_experts=32, num_experts_per_tok=4, moe_intermediate_size=128, n_shared_experts=1)
_DS_MOE = dict(_EXPERTS, n_group=1, topk_group=1, intermediate_size=512, first_k_dense_replace=1)

# model_type -> (transformers config class, fields beyond the shared shape)
ARCHS = {
    "llama": ("LlamaConfig", dict(intermediate_size=512)),
    "qwen3": ("Qwen3Config", dict(intermediate_size=512, head_dim=32)),
    "qwen3_moe": ("Qwen3MoeConfig", dict(intermediate_size=512, head_dim=32, num_experts=32, num_experts_per_tok=4,
                                         moe_intermediate_size=128)),
    "mixtral": ("MixtralConfig", dict(intermediate_size=256, num_local_experts=8, num_experts_per_tok=2)),
    "glm4_moe": ("Glm4MoeConfig", dict(head_dim=32, use_qk_norm=True, num_nextn_predict_layers=0, **_DS_MOE)),
    "deepseek_v3": ("DeepseekV3Config", dict(**_MLA, **_DS_MOE)),
    "deepseek_v32": ("DeepseekV32Config", dict(index_topk=256, index_head_dim=32, index_n_heads=8, **_MLA,
                                               **_DS_MOE)),
    "deepseek_v4": ("DeepseekV4Config", dict(
        head_dim=32, num_key_value_heads=1, q_lora_rank=128, partial_rotary_factor=0.5, o_groups=2, o_lora_rank=64,
        index_n_heads=8, index_head_dim=32, index_topk=64, sliding_window=128, num_nextn_predict_layers=0,
        mlp_layer_types=["hash_moe", "moe", "moe", "moe"],
        layer_types=["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention",
                     "compressed_sparse_attention"],
        compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 128}, **_EXPERTS)),
}
SHAPE = dict(vocab_size=4096, hidden_size=256, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
             max_position_embeddings=4096, hidden_act="silu")
NO_SDPA = ("deepseek_v4",)  # transformers 5.24 refuses SDPA for these


def transformers_model(arch: str):
  """(model in eval mode, its attention implementation, its experts implementation or None)."""
  import torch
  import transformers

  cls, fields = ARCHS[arch]
  cfg = getattr(transformers, cls)(**{**SHAPE, **fields})
  attention = "eager" if arch in NO_SDPA else "sdpa"
  experts = "grouped_mm" if "moe" in arch or arch.startswith(("deepseek", "mixtral")) else None
  cfg._attn_implementation = attention
  if experts:
    cfg._experts_implementation = experts
  torch.manual_seed(0)
  model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
  rng = np.random.default_rng(0)
  with torch.no_grad():
    for name, buffer in model.named_buffers():
      if name.endswith("tid2eid"):  # DeepSeek-V4's hash routing table: zeros at init, a real checkpoint's is spread
        buffer.copy_(torch.from_numpy(np.stack([rng.permutation(cfg.n_routed_experts)[:buffer.shape[1]]
                                                for _ in range(buffer.shape[0])])))
  return model, attention, experts


def compare(arch: str, ids: np.ndarray, rounds: int, profile: int) -> dict:
  """One architecture: both forwards timed in interleaved rounds, then moejax's ``profile`` most costly XLA ops;
  a result row."""
  import jax
  import torch

  from moejax.interop import hf
  from moejax.layers.attention.options import attention_kernel, flash_block
  from moejax.layers.moe_dispatch import resolve_backend

  hf_model, attention, experts = transformers_model(arch)
  model, variables = hf.from_transformers(hf_model)
  forward = jax.jit(model.apply)
  ids_jax, ids_torch = jax.numpy.asarray(ids), torch.from_numpy(ids)
  start = time.perf_counter()
  ours = np.asarray(jax.block_until_ready(forward(variables, ids_jax)))
  compile_s = time.perf_counter() - start
  with torch.no_grad():
    theirs = hf_model(ids_torch).logits.numpy()

  def run_ours():
    start = time.perf_counter()
    jax.block_until_ready(forward(variables, ids_jax))
    return time.perf_counter() - start

  def run_theirs():
    start = time.perf_counter()
    with torch.no_grad():
      hf_model(ids_torch)
    return time.perf_counter() - start

  samples = interleaved({"transformers": run_theirs, "moejax": run_ours}, rounds)
  cfg = model.cfg
  kernel = attention_kernel(cfg, ids.shape[1])
  moe = set(cfg.mlp_types) & {"moe", "hash_moe"}
  return {"arch": arch, "moejax": summary(samples["moejax"], samples["transformers"]),
          "transformers": summary(samples["transformers"]), "compile_s": compile_s,
          "parity": float(np.abs(ours - theirs).max() / np.abs(theirs).max()),
          "moejax_kernels": f"attention {kernel}" + (f" (block {flash_block(cfg)})" if kernel == "chunked" else "")
          + (f", moe {resolve_backend(cfg.moe.backend, cfg.moe.dispatch == 'dropless', False)}" if moe else ""),
          "transformers_kernels": f"attention {attention}" + (f", experts {experts}" if experts else ""),
          "moejax_top_ops": top_ops(forward, variables, ids_jax, count=profile) if profile else []}


def table(record: dict) -> str:
  """Markdown: one row per architecture (``benchmarks/report.py``)."""
  lines = ["| architecture | transformers ms | moejax ms | moejax / transformers (per-round range) | parity | "
           "moejax kernels | transformers kernels |", "|---|---|---|---|---|---|---|"]
  for r in record["rows"]:
    ours, theirs = r["moejax"], r["transformers"]
    lines.append(f"| {r['arch']} | {theirs['median_s'] * 1e3:.0f} | {ours['median_s'] * 1e3:.0f} | "
                 f"**{ours['ratio']:.2f}** ({ours['ratio_min']:.2f}-{ours['ratio_max']:.2f}) | {r['parity']:.0e} | "
                 f"{r['moejax_kernels']} | {r['transformers_kernels']} |")
  return "\n".join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--archs", default=",".join(ARCHS), help="subset of: " + ", ".join(ARCHS))
  parser.add_argument("--seq-len", type=int, default=1024)
  parser.add_argument("--batch", type=int, default=2)
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--profile", type=int, default=12, help="record and print moejax's N most costly XLA ops")
  args = parser.parse_args()

  import jax
  import torch

  jax.config.update("jax_default_matmul_precision", "highest")  # float32 matmuls on both sides
  results = Results("hf_forward", params=vars(args))
  ids = np.random.default_rng(0).integers(0, SHAPE["vocab_size"], (args.batch, args.seq_len))
  print(f"forward, {args.batch} x {args.seq_len} tokens, {jax.devices()[0].platform}; torch {torch.__version__} with "
        f"{torch.get_num_threads()} threads")
  rows = []
  for arch in args.archs.split(","):
    row = compare(arch, ids, args.rounds, args.profile)
    rows.append(row)
    print(f"  {arch}: moejax {row['moejax']['median_s'] * 1e3:.0f} ms, transformers "
          f"{row['transformers']['median_s'] * 1e3:.0f} ms, ratio {row['moejax']['ratio']:.2f}, parity "
          f"{row['parity']:.0e}", flush=True)
    for op in row["moejax_top_ops"]:
      print(f"    {op['ms_per_call']:7.1f} ms x{op['calls']:g}  {op['shape']:28s} {op['source'][-90:]}")
  results.add_rows(rows, torch_version=torch.__version__, torch_threads=torch.get_num_threads())
  results.write()
  print(table(results.record))


if __name__ == "__main__":
  main()
