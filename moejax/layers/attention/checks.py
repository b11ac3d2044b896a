"""Checks of ``model.attention`` that the attention types share, by declared capability.

:func:`validate_attention` checks only the fields the types in use read,
asking each type's declarations (``registry.py``), then runs each type's own
``validate_config``. Messages name the field, the value, the types that read
it and the fix.
"""

from __future__ import annotations

import ml_collections

from moejax.config import ATTENTION_IMPLEMENTATIONS, INDEXER_STAGES, ROPE_LAYOUTS
from moejax.layers import library_kernels
from moejax.layers.attention.options import LIBRARY_KERNELS, cudnn_problems
from moejax.layers.attention.registry import ATTENTION


def _yarn(e: list[str], y, where: str) -> None:
  _need(e, y.factor > 0, f"{where}.factor={y.factor} must be > 0 (<= 1 turns YaRN off).")
  if y.factor <= 1:
    return
  _need(e, y.original_max_len >= 1, f"{where}.original_max_len={y.original_max_len} must be >= 1.")
  _need(e, y.beta_fast > y.beta_slow > 0,
        f"{where}: beta_fast={y.beta_fast} must exceed beta_slow={y.beta_slow} > 0 (defaults 32 and 1).")
  for f in ("mscale", "mscale_all_dim", "attention_factor"):
    _need(e, y[f] >= 0, f"{where}.{f}={y[f]} must be >= 0 (0: unused / derived).")


def _need(e: list[str], ok: bool, msg: str) -> None:
  if not ok:
    e.append(msg)


def validate_attention(cfg: ml_collections.ConfigDict, types: set[str]) -> list[str]:
  """Errors of ``model.attention`` for the attention ``types`` in use (schedule and MTP)."""
  e: list[str] = []
  m = cfg.model
  a, w = m.attention, "model.attention"
  has = lambda capability: ATTENTION.having(types, capability)
  head = m.head_dim or (m.d_model // m.num_heads if m.num_heads >= 1 else 0)
  _need(e, a.implementation in ATTENTION_IMPLEMENTATIONS,
        f"{w}.implementation={a.implementation!r} is not one of {ATTENTION_IMPLEMENTATIONS}.")
  _need(e, a.chunk_size >= 1, f"{w}.chunk_size={a.chunk_size} must be >= 1 (e.g. 512).")
  _need(e, a.xla_max_len >= 0, f"{w}.xla_max_len={a.xla_max_len} must be >= 0.")
  _need(e, a.cudnn_max_len >= 0, f"{w}.cudnn_max_len={a.cudnn_max_len} must be >= 0 (0: never cuDNN under auto).")
  _need(e, a.rope_layout in ROPE_LAYOUTS, f"{w}.rope_layout={a.rope_layout!r} is not one of {ROPE_LAYOUTS}.")
  _need(e, a.compress_rope_theta >= 0, f"{w}.compress_rope_theta={a.compress_rope_theta} must be >= 0 "
        "(0: model.rope_theta).")
  _yarn(e, a.yarn, f"{w}.yarn")
  _yarn(e, a.compress_yarn, f"{w}.compress_yarn")
  if has("windowed"):
    _need(e, a.window >= 1, f"{w}.window={a.window} must be >= 1 for {has('windowed')} layers.")
  if has("rope_dim"):
    rotated = a.rope_dim or head
    _need(e, 0 <= a.rope_dim <= head and rotated % 2 == 0,
          f"{w}.rope_dim={a.rope_dim} must be even and in [0, head dim {head}] (0 rotates the whole head).")
  if a.qk_norm:
    users = ATTENTION.having(ATTENTION.names(), "qk_norm")
    _need(e, bool(has("qk_norm")), f"{w}.qk_norm=True has no effect on {sorted(types)} layers (only "
          f"{', '.join(users)} use it; the others have their own q/kv norms); set it to False.")
  if has("latent_kv"):
    for f in ("kv_lora_rank", "qk_nope_head_dim", "v_head_dim"):
      _need(e, a[f] >= 1, f"{w}.{f}={a[f]} must be >= 1 for {'/'.join(has('latent_kv'))} layers.")
    _need(e, a.qk_rope_head_dim >= 2 and a.qk_rope_head_dim % 2 == 0,
          f"{w}.qk_rope_head_dim={a.qk_rope_head_dim} must be even and >= 2 for {'/'.join(has('latent_kv'))} layers.")
  _need(e, a.q_lora_rank >= 0, f"{w}.q_lora_rank={a.q_lora_rank} must be >= 0 (0: plain query projection).")
  if has("needs_q_lora"):
    _need(e, a.q_lora_rank >= 1, f"{w}.q_lora_rank=0 but {has('needs_q_lora')} layers need a low-rank query "
          "(their indexer reads it); set e.g. --config.model.attention.q_lora_rank=64.")
  if has("grouped_output"):
    _need(e, a.o_groups >= 1 and m.num_heads % a.o_groups == 0,
          f"{w}.o_groups={a.o_groups} must divide model.num_heads={m.num_heads}.")
    _need(e, a.o_lora_rank >= 1, f"{w}.o_lora_rank={a.o_lora_rank} must be >= 1.")
  if has("indexed"):
    for f in ("index_heads", "index_head_dim", "index_topk"):
      _need(e, a[f] >= 1, f"{w}.{f}={a[f]} must be >= 1 for {has('indexed')} layers.")
    _need(e, a.indexer_stage in INDEXER_STAGES,
          f"{w}.indexer_stage={a.indexer_stage!r} is not one of {INDEXER_STAGES}.")
    _need(e, a.indexer_loss_weight >= 0, f"{w}.indexer_loss_weight={a.indexer_loss_weight} must be >= 0.")
    _need(e, a.indexer_recall_queries >= 0,
          f"{w}.indexer_recall_queries={a.indexer_recall_queries} must be >= 0 (0: no recall metric).")
  if a.implementation in LIBRARY_KERNELS:
    e.extend(_library_kernel(m, types))
  for check in ATTENTION.checks(types):
    e.extend(check(cfg))
  return e


def _library_kernel(m: ml_collections.ConfigDict, types: set[str]) -> list[str]:
  """Errors of ``implementation`` = cudnn / tokamax: the types in use, the library, the options."""
  e: list[str] = []
  field = f"model.attention.implementation={m.attention.implementation!r}"
  runs = set(ATTENTION.having(types, "library_kernels"))
  _need(e, types <= runs, f"{field} runs only on {ATTENTION.having(ATTENTION.names(), 'library_kernels')} layers; "
        f"the schedule also has {sorted(types - runs)}; use implementation='auto', 'xla' or 'chunked'.")
  if m.attention.implementation == "cudnn":
    e.extend(cudnn_problems(m) if m.num_heads >= 1 else [])  # platform and T: checked when the layer runs
  else:
    why = library_kernels.tokamax_problem()
    _need(e, why is None, f"{field} cannot run here: {why}; use implementation='auto'.")
    _need(e, not m.attention.sinks, f"{field}: tokamax.dot_product_attention has no attention sinks "
          "(model.attention.sinks=True); set sinks=False or implementation='xla' / 'chunked'.")
  return e


def validate_qk_clip(cfg: ml_collections.ConfigDict, types: set[str]) -> list[str]:
  """Errors of ``optim.qk_clip_*``: the clipped types must declare per-head (query, key) projections."""
  e: list[str] = []
  o = cfg.optim
  _need(e, o.qk_clip_tau >= 0, f"optim.qk_clip_tau={o.qk_clip_tau} must be >= 0 (0 disables QK-clip).")
  _need(e, len(o.qk_clip_params) == 2,
        f"optim.qk_clip_params={tuple(o.qk_clip_params)} must name two parameters: (query, key).")
  if o.qk_clip_tau > 0:
    clippable = set(ATTENTION.having(types, "qk_clip_params"))
    supported = ATTENTION.having(ATTENTION.names(), "qk_clip_params")
    _need(e, types <= clippable, f"optim.qk_clip_tau={o.qk_clip_tau}: QK-clip rescales per-head (query, key) "
          f"projections {tuple(o.qk_clip_params)}, which only {supported} layers have; the schedule "
          f"also has {sorted(types - clippable)} (latent / shared-KV projections); set qk_clip_tau=0.")
    for t in sorted(clippable):
      names = tuple(ATTENTION.capability(t, "qk_clip_params"))
      _need(e, names == tuple(o.qk_clip_params),
            f"optim.qk_clip_params={tuple(o.qk_clip_params)} but {t} layers name their (query, key) projections "
            f"{names}; set --config.optim.qk_clip_params=\"{names}\".")
  _need(e, o.qk_clip_tau == 0 or cfg.model.attention.track_max_logit,
        f"optim.qk_clip_tau={o.qk_clip_tau} needs the attention layers' max logits; set "
        "--config.model.attention.track_max_logit=True (or qk_clip_tau=0).")
  return e
