"""MoE layer throughput, forward + backward: every dispatch backend vs a dense SwiGLU.

  python benchmarks/moe_layer.py [--tokens 4096] [--experts 64] [--top-k 6] [--reps 5]

One run times, on the same tokens (E=64 routed experts of width F, top-6, one
shared expert, d_model 256 by default):

* moejax ``moe`` with every dropless backend and in capacity mode (each backend),
* the naive one-hot (GShard) dispatch,
* a dense SwiGLU of the same *active* FLOPs (width (top_k + shared) * F): the baseline,
* transformers' DeepSeek-V3 and DeepSeek-V4 MoE blocks (torch, every experts
  implementation that runs here) when torch + transformers import.

Times are per step (loss = sum of squares of the output, gradients w.r.t. all
parameters and the input): ``cpu ms`` is the process CPU time, ``wall ms``
the elapsed time, both the minimum over ``--reps`` round-robin repetitions
after one warm-up (so a change of machine load hits every variant alike);
tokens/s from wall time; the ratio is CPU time over the dense baseline's CPU
time; ``max load`` the busiest expert's assignments / mean (it sets the
dropless einsum capacity). Slow variants (one-hot, ragged_dot, transformers'
batched_mm on CPU) are measured once.
"""

from __future__ import annotations

import argparse
import contextlib
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from moejax.config import base_config
from moejax.layers import moe as _moe  # noqa: F401  (registers moe)
from moejax.layers.mlp import MLP
from moejax.layers.moe_dispatch import BACKENDS, dropless_capacities

BASELINE = "dense SwiGLU, same active FLOPs (baseline)"
SLOW_ON_CPU = ("onehot", "ragged_dot", "batched_mm")  # measured once: seconds to minutes per step on CPU


def _model_cfg(args, **moe) -> ml_collections.FrozenConfigDict:
  cfg = base_config().model
  cfg.update(d_model=args.d_model, ffn_dim=(args.top_k + args.shared) * args.ffn, vocab_size=320)
  cfg.moe.update(num_experts=args.experts, top_k=args.top_k, expert_ffn_dim=args.ffn, num_shared=args.shared,
                 score="softmax", capacity_factor=args.capacity_factor)
  cfg.moe.update(moe)
  return ml_collections.FrozenConfigDict(cfg)


def _measure(step) -> tuple[float, float]:
  """(CPU seconds, wall seconds) of one call."""
  c0, w0 = time.process_time(), time.perf_counter()
  step()
  return time.process_time() - c0, time.perf_counter() - w0


def moejax_step(x_BxTxD, mlp_type: str, cfg):
  """A compiled fwd+bwd step of one moejax MLP layer, and its busiest expert's load / mean."""
  layer = MLP.get(mlp_type)(cfg=cfg)
  ids = jnp.asarray(np.random.default_rng(1).integers(0, cfg.vocab_size, x_BxTxD.shape[:2]), jnp.int32)
  variables = nn.meta.unbox(jax.jit(layer.init)(jax.random.key(0), x_BxTxD, ids))
  state = {k: v for k, v in variables.items() if k in ("hash_table", "router_bias")}

  def loss(params, x, state, ids):  # everything an argument: no routing folded into constants
    y, sown = layer.apply({"params": params, **state}, x, ids, mutable=["metrics", "aux_loss", "stats"])
    return jnp.sum(jnp.square(y)), sown.get("metrics", {})

  grads = jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))
  args = (variables["params"], x_BxTxD, state, ids)
  metrics = grads(*args)[1]
  busiest = float(metrics["load_max_over_mean"][0]) if metrics else None
  return (lambda: jax.block_until_ready(grads(*args))), busiest


def transformers_step(args, x_BxTxD, model: str, implementation: str):
  """A fwd+bwd step of transformers' DeepSeek MoE block (torch, float32)."""
  import torch

  if model == "deepseek_v3":
    from transformers.models.deepseek_v3 import modeling_deepseek_v3 as m
    cfg = m.DeepseekV3Config(hidden_size=args.d_model, moe_intermediate_size=args.ffn, n_routed_experts=args.experts,
                             num_experts_per_tok=args.top_k, n_shared_experts=args.shared, n_group=1, topk_group=1)
    cfg._experts_implementation = implementation
    block = m.DeepseekV3MoE(cfg)
  else:
    from transformers.models.deepseek_v4 import modeling_deepseek_v4 as m
    cfg = m.DeepseekV4Config(hidden_size=args.d_model, moe_intermediate_size=args.ffn, n_routed_experts=args.experts,
                             num_experts_per_tok=args.top_k, num_hidden_layers=1, mlp_layer_types=["moe"])
    cfg._experts_implementation = implementation
    block = m.DeepseekV4SparseMoeBlock(cfg, 0)
  with torch.no_grad():
    for p in block.parameters():
      p.normal_(0.0, 0.02)
  x = torch.tensor(np.asarray(x_BxTxD), requires_grad=True)

  def step():
    block.zero_grad()
    torch.sum(block(x) ** 2).backward()

  return step


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--tokens", type=int, default=4096, help="tokens per step (batch 8 x tokens/8)")
  parser.add_argument("--d-model", type=int, default=256)
  parser.add_argument("--ffn", type=int, default=128, help="width of each expert")
  parser.add_argument("--experts", type=int, default=64)
  parser.add_argument("--top-k", type=int, default=6)
  parser.add_argument("--shared", type=int, default=1)
  parser.add_argument("--capacity-factor", type=float, default=1.25)
  parser.add_argument("--reps", type=int, default=5)
  parser.add_argument("--skip-slow", action="store_true", help="skip the variants that take seconds per step on CPU")
  args = parser.parse_args()

  x = jnp.asarray(np.random.default_rng(0).normal(size=(8, args.tokens // 8, args.d_model)).astype(np.float32))
  platform = jax.devices()[0].platform
  slow = SLOW_ON_CPU if platform == "cpu" else ()
  caps = dropless_capacities(args.tokens, args.top_k, args.experts)
  print(f"MoE layer fwd+bwd on {platform}: {args.tokens} tokens, d={args.d_model}, E={args.experts} x F={args.ffn}, "
        f"top-{args.top_k}, {args.shared} shared; dense baseline width {(args.top_k + args.shared) * args.ffn}; "
        f"capacity factor {args.capacity_factor}; dropless einsum capacities {caps}")

  variants = [(BASELINE, "moejax", ("dense", _model_cfg(args)))]
  for name in BACKENDS.names():
    backend = BACKENDS.get(name)
    for dispatch in ("dropless", "capacity"):
      if getattr(backend, dispatch) and not (args.skip_slow and any(n in name for n in slow)):
        variants.append((f"moejax {dispatch}, backend={name}", "moejax",
                         ("moe", _model_cfg(args, dispatch=dispatch, backend=name))))
  # The learned router at init is somewhat unbalanced; random hash routing shows
  # a balanced load (what the aux-free bias or a balance loss aims for).
  variants.append(("moejax dropless, backend=einsum, hash routing", "moejax",
                   ("hash_moe", _model_cfg(args, backend="einsum"))))
  with contextlib.suppress(ImportError):
    import torch
    import transformers  # noqa: F401

    for model in ("deepseek_v3", "deepseek_v4"):
      for implementation in ("eager", "batched_mm", "grouped_mm"):
        if args.skip_slow and implementation in slow:
          continue
        variants.append((f"transformers {model} MoE, experts={implementation}", "torch", (model, implementation)))

  steps, times, busiest = {}, {}, {}
  for label, kind, spec in variants:
    try:
      if kind == "moejax":
        steps[label], busiest[label] = moejax_step(x, *spec)
      else:
        steps[label] = transformers_step(args, x, *spec)
      steps[label]()  # compile / warm up
    except Exception as err:  # e.g. an experts implementation that does not run on this platform
      print(f"{label}: skipped ({type(err).__name__}: {str(err).splitlines()[0][:80]})")
      steps.pop(label, None)
  # Round-robin repetitions, so a change of machine load hits every variant alike.
  for rep in range(args.reps):
    for label, step in steps.items():
      if rep == 0 or not any(s in label for s in SLOW_ON_CPU) or platform != "cpu":
        times.setdefault(label, []).append(_measure(step))

  print(f"{'variant':<58}{'cpu ms':>10}{'wall ms':>10}{'tokens/s':>11}{'cpu ratio':>11}{'max load':>10}")
  base = min(c for c, _ in times[BASELINE])
  for label, samples in times.items():
    cpu, wall = min(c for c, _ in samples), min(w for _, w in samples)
    load = f"{busiest[label]:.2f}" if busiest.get(label) else "-"
    print(f"{label:<58}{cpu * 1e3:>10.1f}{wall * 1e3:>10.1f}{args.tokens / wall:>11,.0f}{cpu / base:>11.2f}"
          f"{load:>10}")


if __name__ == "__main__":
  main()
