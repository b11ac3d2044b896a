"""Dense -> MoE upcycling (Komatsuzaki et al., 2022, "Sparse Upcycling"; fine-grained splitting as in
Qwen1.5-MoE / He et al., 2024): initialise an MoE model from a dense checkpoint.

Every parameter the two models share is copied; each layer that is ``dense``
in the dense config and ``moe`` in the MoE config gets its experts from the
dense SwiGLU ``w_gate [D, F]``, ``w_up [D, F]``, ``w_down [F, D]``:

* ``mode="copy"``: every expert is the whole MLP (``expert_ffn_dim == ffn_dim``);
* ``mode="partition"``: the F hidden units are cut into ``P = ffn_dim /
  expert_ffn_dim`` slices, expert ``e`` gets slice ``e mod P``.

``noise`` adds ``noise * std(W) * N(0, 1)`` to each expert copy (breaks the
symmetry between copies); the router is fresh (the MoE model's own init, or
zeros with ``router_init="zeros"``); shared experts start with ``w_down = 0``
(no output); the balancing bias starts at 0.

Same function at step 0 (:func:`preserves_function` says when) — ``y = sum_k w_k
expert_k(x)``:

* copy: all experts equal the MLP and the weights of each token sum to 1
  (``renormalize=True``, ``routed_scale=1``), whatever the router picks;
* partition: every slice is used once with weight 1: ``top_k = num_experts =
  P``, ``router_init="zeros"`` (equal scores), ``renormalize=True``,
  ``routed_scale = num_experts``.

Both also need ``noise=0``, dropless dispatch and no expert clamp
(``swiglu_limit=0``, as the dense MLP has none).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import traverse_util

from moejax.config import ConfigError, expand_schedule

MODES = ("copy", "partition")


def _mlp_types(model_cfg) -> list[str]:
  return list(expand_schedule(model_cfg.mlp_types, model_cfg.num_layers))


def check_upcycle(dense_cfg, moe_cfg, mode: str) -> list[int]:
  """The upcycled layer indices; ConfigError naming each field that prevents upcycling."""
  d, m = dense_cfg.model, moe_cfg.model
  e = []
  if mode not in MODES:
    e.append(f"mode={mode!r} is not one of {MODES}.")
  dense_types, moe_types = _mlp_types(d), _mlp_types(m)
  layers = [i for i, (a, b) in enumerate(zip(dense_types, moe_types)) if a == "dense" and b == "moe"]
  same = {k for k in d if k not in ("mlp_types", "moe")}
  diffs = [k for k in sorted(same) if d[k] != m.get(k)]
  if diffs:
    e.append(f"model fields {diffs} differ between the dense and the MoE config; only model.mlp_types and "
             "model.moe may differ.")
  if len(dense_types) != len(moe_types) or any(a != b for i, (a, b) in enumerate(zip(dense_types, moe_types))
                                               if i not in layers):
    e.append(f"model.mlp_types {tuple(moe_types)} may only turn 'dense' layers of {tuple(dense_types)} into 'moe'.")
  if not layers:
    e.append(f"model.mlp_types={tuple(moe_types)} turns no dense layer into 'moe'; nothing to upcycle.")
  if d.get("scan_layers") or m.get("scan_layers"):
    e.append("model.scan_layers=True: upcycling reads and writes unrolled parameters (layer_i); upcycle with "
             "scan_layers=False, then moejax.models.scan.stack the result if the MoE run scans.")
  f, fe = d.ffn_dim, m.moe.expert_ffn_dim
  if mode == "copy" and fe != f:
    e.append(f"mode='copy' needs model.moe.expert_ffn_dim == model.ffn_dim ({f}), got {fe}; or use "
             "mode='partition'.")
  if mode == "partition" and f % fe:
    e.append(f"mode='partition' needs model.moe.expert_ffn_dim={fe} to divide model.ffn_dim={f}.")
  if e:
    raise ConfigError("cannot upcycle:\n  - " + "\n  - ".join(e))
  return layers


def preserves_function(moe_cfg, mode: str, noise: float = 0.0, router_init: str = "fresh") -> bool:
  """Whether the upcycled model computes the dense model's function at step 0 (module docstring)."""
  moe = moe_cfg.model.moe
  common = (noise == 0 and moe.dispatch == "dropless" and moe.swiglu_limit == 0 and moe.renormalize
            and moe.router == "topk")
  if mode == "copy":
    return common and moe.routed_scale == 1.0
  return (common and router_init == "zeros" and moe.top_k == moe.num_experts
          and moe.num_experts * moe.expert_ffn_dim == moe_cfg.model.ffn_dim and moe.routed_scale == moe.num_experts)


def upcycle_params(dense_params, moe_params, dense_cfg, moe_cfg, mode: str = "copy", noise: float = 0.0,
                   router_init: str = "fresh", seed: int = 0):
  """MoE parameters: ``moe_params`` (a fresh init, for the router and the shapes) with every shared
  parameter taken from ``dense_params`` and the experts of the upcycled layers built from the MLP."""
  layers = check_upcycle(dense_cfg, moe_cfg, mode)
  dense, out = traverse_util.flatten_dict(dense_params), dict(traverse_util.flatten_dict(moe_params))
  for path, value in out.items():
    if path in dense:
      out[path] = jnp.asarray(dense[path], value.dtype)
  e, fe, f = moe_cfg.model.moe.num_experts, moe_cfg.model.moe.expert_ffn_dim, dense_cfg.model.ffn_dim
  rng = np.random.default_rng(seed)
  for i in layers:
    mlp = (f"layer_{i}", "mlp")
    for name in ("w_gate", "w_up", "w_down"):
      w = np.asarray(dense[mlp + (name,)], np.float32)  # [D, F] or [F, D]
      axis = 1 if name != "w_down" else 0
      slices = [np.take(w, np.arange((k % (f // fe)) * fe, (k % (f // fe) + 1) * fe), axis=axis) for k in range(e)]
      experts = np.stack(slices)  # [E, D, Fe] or [E, Fe, D]
      if noise:
        experts = experts + noise * np.std(w) * rng.normal(size=experts.shape)
      out[mlp + (name,)] = jnp.asarray(experts, out[mlp + (name,)].dtype)
    if router_init == "zeros":
      out[mlp + ("router", "w_gate")] = jnp.zeros_like(out[mlp + ("router", "w_gate")])
    if mlp + ("shared", "w_down") in out:
      out[mlp + ("shared", "w_down")] = jnp.zeros_like(out[mlp + ("shared", "w_down")])
  return traverse_util.unflatten_dict(out)


def upcycle_checkpoint(dense_cfg: ml_collections.ConfigDict, dense_workdir: str, moe_cfg: ml_collections.ConfigDict,
                       moe_workdir: str, mode: str = "copy", noise: float = 0.0, router_init: str = "fresh",
                       devices=None):
  """Writes the upcycled model as step 0 of ``moe_workdir`` (``moejax train`` there resumes from it);
  returns ``(Experiment, state)``. The optimizer state is fresh."""
  import os

  from moejax import config as config_lib
  from moejax.checkpoint import Checkpointer
  from moejax.train import Experiment, load_checkpoint

  check_upcycle(dense_cfg, moe_cfg, mode)
  _, _, dense_state = load_checkpoint(dense_cfg, dense_workdir, devices)
  exp = Experiment(moe_cfg, devices)
  state = exp.init_state()
  params = upcycle_params(jax.device_get(dense_state.params), jax.device_get(state.params), dense_cfg, moe_cfg,
                          mode, noise, router_init, moe_cfg.seed)
  params = jax.device_put(params, exp.state_shardings.params)
  with exp._context():
    state = state.replace(params=params, opt_state=exp.tx.init(params))
  os.makedirs(moe_workdir, exist_ok=True)
  with open(os.path.join(moe_workdir, "config.json"), "w") as f:
    f.write(config_lib.to_json(moe_cfg))
  ckpt = Checkpointer(moe_workdir, keep=moe_cfg.train.keep_checkpoints, async_save=False)
  ckpt.save(0, state, exp.data_iterator("train"))
  ckpt.wait()
  ckpt.close()
  return exp, state
