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
the elapsed time, medians over ``--reps`` interleaved rounds after one warm-up
(one step of each variant per round, the order rotating, so a change of machine
load hits every variant alike); tokens/s from wall time; the ratio is CPU time
over the dense baseline's CPU time in the same round (median and range over
rounds); ``max load`` the busiest expert's assignments / mean (it sets the
dropless einsum capacity) and ``dropped`` the share of assignments capacity
dispatch drops, both at init on these tokens. Slow variants (one-hot,
ragged_dot, transformers' batched_mm on CPU) are measured once, after the
rounds. Raw samples and provenance go to ``benchmarks/results/moe_layer/``.
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

from moejax.benchmarking import Results, interleaved, summary
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


def moejax_step(x_BxTxD, mlp_type: str, cfg):
  """A compiled fwd+bwd step of one moejax MLP layer, and its routing at init: {max load / mean,
  dropped fraction} (empty for a dense layer)."""
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
  routing = {"max_load": float(metrics["load_max_over_mean"][0]),
             "dropped_fraction": float(metrics["dropped_fraction"][0])} if metrics else {}
  return (lambda: jax.block_until_ready(grads(*args))), routing


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


def table(record: dict) -> str:
  """Markdown: one row per variant (``benchmarks/report.py``)."""
  lines = ["| variant | cpu ms (quartiles) | wall ms | tokens/s | cpu ratio (per-round range) | max load | dropped |",
           "|---|---|---|---|---|---|---|"]
  for r in record["rows"]:
    spread = f"({r['ratio_min']:.2f}-{r['ratio_max']:.2f})" if r["n"] > 1 else "(1 sample)"
    routing = lambda k, f: format(r[k], f) if k in r else "-"
    lines.append(f"| {r['variant']} | {r['median_s'] * 1e3:.1f} ({r['q1_s'] * 1e3:.0f}-{r['q3_s'] * 1e3:.0f}) | "
                 f"{r['wall_median_s'] * 1e3:.1f} | {record['tokens'] / r['wall_median_s']:,.0f} | "
                 f"{r['ratio']:.2f} {spread} | {routing('max_load', '.2f')} | {routing('dropped_fraction', '.3f')} |")
  return "\n".join(lines)


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

  results = Results("moe_layer", params=dict(vars(args)))
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
    import transformers  # noqa: F401

    for model in ("deepseek_v3", "deepseek_v4"):
      for implementation in ("eager", "batched_mm", "grouped_mm"):
        if args.skip_slow and implementation in slow:
          continue
        variants.append((f"transformers {model} MoE, experts={implementation}", "torch", (model, implementation)))

  steps, routing = {}, {}
  for label, kind, spec in variants:
    try:
      if kind == "moejax":
        steps[label], routing[label] = moejax_step(x, *spec)
      else:
        steps[label] = transformers_step(args, x, *spec)
      steps[label]()  # compile / warm up
    except Exception as err:  # e.g. an experts implementation that does not run on this platform
      print(f"{label}: skipped ({type(err).__name__}: {str(err).splitlines()[0][:80]})")
      steps.pop(label, None)
  cpu: dict[str, list[float]] = {label: [] for label in steps}

  def timed(label):
    def run():
      c0, w0 = time.process_time(), time.perf_counter()
      steps[label]()
      cpu[label].append(time.process_time() - c0)
      return time.perf_counter() - w0
    return run

  is_slow = lambda label: platform == "cpu" and any(s in label for s in SLOW_ON_CPU)
  wall = interleaved({label: timed(label) for label in steps if not is_slow(label)}, args.reps)
  wall.update({label: [timed(label)()] for label in steps if is_slow(label)})
  results.add_rows([{"variant": label, **summary(cpu[label], cpu[BASELINE][:len(cpu[label])]),
                     "wall_median_s": summary(wall[label])["median_s"], "wall_samples_s": wall[label],
                     **routing.get(label, {})} for label in steps],
                   tokens=args.tokens, dropless_capacities=list(caps), platform=platform)
  results.write()
  print(table(results.record))


if __name__ == "__main__":
  main()
