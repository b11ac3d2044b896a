"""The one config schema, and its validation.

Every config file in ``configs/`` starts from :func:`base_config` and changes
fields; no field exists anywhere else. :func:`validate` runs before anything
is built or compiled and raises :class:`ConfigError` listing every problem,
each naming the field, the value and the fix.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import ml_collections

DTYPES = ("float32", "bfloat16", "float16")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch", "offload_dots")
NONFINITE_POLICIES = ("skip", "stop", "rollback")
MESH_AXES = ("data", "fsdp", "tensor", "expert", "context")
SCORES = ("softmax", "sigmoid", "sqrtsoftplus")
DISPATCH_MODES = ("dropless", "capacity")


class ConfigError(ValueError):
  """An invalid config; the message names each bad field and its fix."""


def base_config() -> ml_collections.ConfigDict:
  """All fields with their defaults (a small dense byte-level LM on stdlib)."""
  from moejax.distill.config import distill_config
  from moejax.optim.muon import DEFAULT_EXCLUDE

  c = ml_collections.ConfigDict()
  c.seed = 0

  c.model = ml_collections.ConfigDict(dict(
      vocab_size=320,          # >= the tokenizer's vocabulary (byte: 259); padded for sharding
      num_layers=4,
      d_model=128,
      num_heads=4,
      num_kv_heads=2,          # grouped-query attention: num_heads % num_kv_heads == 0
      head_dim=0,              # 0: d_model // num_heads
      ffn_dim=384,             # SwiGLU hidden width
      # Per-layer schedule: one entry per layer, or a single entry for all layers.
      attention_types=("dense",),
      mlp_types=("dense",),
      rope_theta=10_000.0,
      norm_eps=1e-6,
      tie_embeddings=False,
      init_std=0.02,
      dtype="float32",         # compute dtype
      param_dtype="float32",
      remat=("none",),         # none | full | dots | dots_no_batch | offload_dots; one, or one per layer
  ))
  # Residual: 1 stream is the plain pre-norm residual; N > 1 streams are
  # manifold-constrained hyper-connections (moejax/layers/hyper.py).
  c.model.hc = ml_collections.ConfigDict(dict(
      streams=1,               # N residual streams per token (DeepSeek-V4: 4)
      sinkhorn_iters=20,       # Sinkhorn-Knopp iterations for the stream-mixing matrix
      eps=1e-6,                # floor of the pre weights and of Sinkhorn's denominators
  ))
  # Multi-token prediction (DeepSeek-V3 §2.2, moejax/models/mtp.py): sequential
  # modules sharing the embedding and output head; module k predicts t+k+1.
  c.model.mtp = ml_collections.ConfigDict(dict(
      depth=0,                 # number of MTP modules; 0: off
      loss_weight=0.3,         # lambda: the objective adds lambda / depth * sum_k CE_k
      attention_type="dense",  # the attention / MLP type of each module's block
      mlp_type="dense",
  ))
  # Sparse MoE layers (mlp_types "moe" / "hash_moe"; see moejax/layers/moe.py).
  # Unused by dense layers. Defaults: softmax top-2 of 8 experts, dropless.
  c.model.moe = ml_collections.ConfigDict(dict(
      num_experts=8,
      top_k=2,                 # experts per token
      expert_ffn_dim=128,      # F of each routed expert (DeepSeek: moe_intermediate_size)
      num_shared=0,            # shared experts: one SwiGLU of width num_shared * expert_ffn_dim
      router="topk",           # see moejax/layers/routers.py: topk | expert_choice | hash | yours
      score="softmax",         # softmax | sigmoid | sqrtsoftplus (scores the top-k weights come from)
      renormalize=False,       # divide each token's top-k weights by their sum
      routed_scale=1.0,        # multiply the routed weights (DeepSeek routed_scaling_factor)
      num_groups=1,            # group-limited routing: experts in num_groups groups, ...
      topk_groups=1,           # ... each token picks its experts inside its topk_groups best groups
      score_bias=False,        # aux-loss-free balancing: a bias on the scores for selection only
      bias_update_rate=1e-3,   # its step after each train step (sign rule); 0 = frozen
      load_balance_weight=0.0, # Switch load-balance loss
      seq_balance_weight=0.0,  # DeepSeek-V3 sequence-wise balance loss
      z_loss_weight=0.0,       # router z-loss
      dispatch="dropless",     # dropless | capacity (drops what does not fit)
      capacity_factor=1.25,    # capacity dispatch and expert_choice: C = ceil(cf * N * top_k / E)
      backend="auto",          # auto | einsum | ragged_dot | onehot (moejax/layers/moe_dispatch.py)
      swiglu_limit=0.0,        # > 0: clamp expert pre-activations (DeepSeek-V4: 10)
      collapse_steps=100,      # warn when an expert gets ~no tokens this many steps in a row; 0: never
  ))
  c.model.attention = attention_config()

  c.data = ml_collections.ConfigDict(dict(
      source="stdlib",         # stdlib | passkey | mqar | copy | files
      seq_len=256,
      tokenizer="byte",        # byte | path to a SentencePiece .model or tokenizers .json
      files="",                # source=files: comma-separated globs of .txt/.jsonl
      stdlib_packages="",      # source=stdlib: only these top-level packages, e.g. "email,json"
      jsonl_field="text",      # source=files: the text field of each JSONL line
      task_length=128,         # synthetic tasks: tokens per example
      val_fraction=0.05,       # stdlib/files: share of *files* held out
      shards=1,                # independent data shards per global batch (multiple of #processes)
  ))

  c.train = ml_collections.ConfigDict(dict(
      steps=500,
      batch_size=16,           # global, in sequences
      grad_accum_steps=1,      # micro-batches per step (batch_size % this == 0)
      loss_chunk=1024,         # logits are formed this many positions at a time (memory at long T)
      log_every=10,
      eval_every=100,          # 0: never
      eval_batches=4,
      checkpoint_every=100,
      keep_checkpoints=3,
      async_checkpoint=True,   # write checkpoints while training continues (a kill during
                               # the write loses that checkpoint, never an older one)
      nonfinite="skip",        # NaN/Inf loss or gradient: skip | stop | rollback
      nonfinite_limit=3,       # consecutive bad steps before skip stops / rollback reloads
  ))

  c.optim = ml_collections.ConfigDict(dict(
      name="adamw",            # see moejax/optim
      learning_rate=3e-3,      # peak
      schedule="cosine",       # constant | cosine | wsd
      warmup_steps=50,
      decay_fraction=0.2,      # wsd: share of steps spent decaying
      min_lr_ratio=0.1,
      weight_decay=0.1,
      b1=0.9,
      b2=0.95,
      eps=1e-8,
      grad_clip_norm=1.0,      # 0: no clipping
      qk_clip_tau=0.0,         # > 0: QK-clip (Kimi K2) heads whose max logit exceeds this; needs
                               # model.attention.track_max_logit
      qk_clip_params=("w_q", "w_k"),  # the (query, key) projection names in an attention module
  ))
  # name="muon" / "optax_muon" (moejax/optim/muon.py). The AdamW branch (embeddings, LM head,
  # norms, routers, ...) uses b1, b2, eps, weight_decay above.
  c.optim.muon = ml_collections.ConfigDict(dict(
      momentum=0.95,
      nesterov=True,
      coefficients="quintic",  # quintic (Keller Jordan) | polar_express (Amsel et al., 2025)
      ns_steps=5,
      ns_dtype="bfloat16",     # bfloat16 | float32: precision of the Newton-Schulz iteration
      scale="moonlight",       # moonlight: rms * sqrt(max(in, out)) | keller: sqrt(max(1, out / in))
      rms=0.2,                 # moonlight's target update RMS (AdamW's), so lr / wd transfer
      normuon=False,           # NorMuon: per-neuron second moment (decay b2) after orthogonalization
      adam_lr_ratio=1.0,       # AdamW branch learning rate = this * learning_rate
      exclude=DEFAULT_EXCLUDE, # path regexes sent to AdamW (besides vocab-axis and 1-D leaves):
                               # routers, hyper-connections, embeddings/heads by name
  ))

  # Multi-process runs (moejax/distributed.py): explicit, or auto-detected by JAX.
  c.distributed = ml_collections.ConfigDict(dict(
      coordinator_address="",  # e.g. "localhost:12355"; empty: single process unless auto
      num_processes=1,
      process_id=0,
      auto=False,              # let jax.distributed detect a managed cluster (TPU, SLURM, MPI)
  ))

  # Multi-specialist distillation (`moejax distill`; moejax/distill/config.py, docs/distill.md).
  c.distill = distill_config()

  # Device mesh; -1 on at most one axis means "all remaining devices".
  c.mesh = ml_collections.ConfigDict({a: 1 for a in MESH_AXES})
  c.mesh.data = -1
  # Multi-slice (TPU) / multi-node (GPU) meshes: slices or nodes along each axis, which
  # then spans DCN between them and ICI/NVLink within (moejax/sharding.py:device_array).
  # mesh.<axis> stays the whole axis; the product of dcn_* is the number of slices/nodes.
  c.mesh.update({f"dcn_{a}": 1 for a in MESH_AXES})
  return c


def yarn_config(factor: float = 1.0) -> ml_collections.ConfigDict:
  """YaRN RoPE scaling (moejax/layers/rope.py:Yarn); factor 1 = off."""
  return ml_collections.ConfigDict(dict(
      factor=factor,             # context extension factor; <= 1 disables YaRN
      original_max_len=4096,     # the pre-training context length
      beta_fast=32.0,            # rotations above which frequencies are kept
      beta_slow=1.0,             # rotations below which frequencies are divided by factor
      mscale=0.0,                # with mscale_all_dim: cos/sin scale = mscale(f, mscale) / mscale(f, all_dim)
      mscale_all_dim=0.0,        # != 0: softmax scale *= mscale(factor, mscale_all_dim)^2 (DeepSeek-V3 MLA)
      attention_factor=0.0,      # cos/sin multiplier; 0 = derived (0.1 ln(factor) + 1); DeepSeek-V4 uses 1.0
  ))


def attention_config() -> ml_collections.ConfigDict:
  """``model.attention``: options of the attention types (docs/attention.md)."""
  return ml_collections.ConfigDict(dict(
      # Kernel of the dense-type paths (dense, sliding, mla, swa): "xla" is
      # jax.nn.dot_product_attention with a [T, T] mask (cuDNN/XLA fused), "chunked"
      # the flash-style kernel (O(T * chunk_size) memory), "auto" xla up to xla_max_len.
      implementation="auto",     # auto | xla | chunked
      xla_max_len=2048,
      chunk_size=512,            # block of the chunked kernel and query chunk of sparse types
      window=128,                # sliding window (sliding, swa, csa, hca): t sees s iff t - window < s <= t
      sinks=False,               # learned per-head sink logit (dense, sliding, mla, dsa; V4 types always)
      rope_dim=0,                # rotated channels per head (0: all); dense/sliding: leading, V4: trailing
      rope_layout="half",        # half (rotate-half pairs i, i+d/2) | interleave (pairs 2i, 2i+1)
      qk_norm=False,             # dense/sliding: RMSNorm of each q and k head (Qwen3, OLMo-2)
      track_max_logit=False,     # sow max pre-softmax logit per head into "max_stats" (QK-clip)
      yarn=yarn_config(),        # YaRN of the main rope (model.rope_theta)
      compress_rope_theta=0.0,   # csa/hca rope theta; 0: model.rope_theta (DeepSeek-V4: 160000)
      compress_yarn=yarn_config(),  # YaRN of the csa/hca rope (DeepSeek-V4: factor 16, attention_factor 1)
      # MLA / DSA (DeepSeek-V2/V3/V3.2)
      q_lora_rank=0,             # low-rank query (0: plain projection); dsa, swa, csa, hca need > 0
      kv_lora_rank=64,           # compressed kv latent width
      qk_nope_head_dim=32,       # per-head query/key channels without rope
      qk_rope_head_dim=16,       # decoupled rope channels (shared key part)
      v_head_dim=32,
      # Lightning indexer (dsa, csa)
      index_heads=4,
      index_head_dim=32,
      index_topk=64,             # keys (dsa) / compressed entries (csa) kept per query
      indexer_stage="sparse",    # warmup (dense attention, KL over all keys) | sparse | off (no loss)
      indexer_loss_weight=1.0,   # KL weight in the aux loss
      indexer_recall_queries=32,  # queries per layer and step for the recall metric (0: off)
      # DeepSeek-V4 compressed attention (swa, csa, hca)
      csa_ratio=4,               # tokens per compressed entry (csa, overlapping windows of 2x)
      hca_ratio=128,             # tokens per compressed entry (hca)
      o_groups=2,                # grouped low-rank output projection: head groups
      o_lora_rank=64,            # ... and each group's rank
  ))


def load_config(spec: str) -> ml_collections.ConfigDict:
  """Loads ``path/to/config.py[:arg]`` by calling its ``get_config(arg)``."""
  import importlib.util

  path, _, arg = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location("moejax_user_config", path)
  if module_spec is None or not os.path.exists(path):
    raise FileNotFoundError(f"config file {path!r} not found")
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  cfg = module.get_config(arg) if arg else module.get_config()
  cfg.lock()
  return cfg


def _check(errors: list[str], ok: bool, msg: str) -> None:
  if not ok:
    errors.append(msg)


def expand_schedule(entries: Any, num_layers: int) -> tuple[str, ...]:
  """A per-layer schedule: one entry per layer, or one entry for all."""
  entries = (entries,) if isinstance(entries, str) else tuple(entries)
  return entries * num_layers if len(entries) == 1 else entries


def mesh_shape(mesh_cfg: ml_collections.ConfigDict, num_devices: int) -> dict[str, int]:
  """Resolves the -1 axis; assumes :func:`validate` passed."""
  shape = {a: int(mesh_cfg[a]) for a in MESH_AXES}
  fixed = math.prod(v for v in shape.values() if v != -1)
  return {a: (num_devices // fixed if v == -1 else v) for a, v in shape.items()}


def validate(cfg: ml_collections.ConfigDict, num_devices: int | None = None) -> None:
  """Raises ConfigError naming every invalid field; silent when all is well."""
  # Imports here: the registries fill as their modules load.
  from moejax.data import SOURCES, tokenizer_vocab_size
  from moejax.distill.config import validate_distill
  from moejax.layers.attention import ATTENTION
  from moejax.layers.mlp import MLP
  from moejax.layers.moe import MoE
  from moejax.optim import OPTIMIZERS, SCHEDULES
  from moejax.sharding import validate_mesh_dcn

  e: list[str] = []
  m, d, t, o = cfg.model, cfg.data, cfg.train, cfg.optim
  dist = cfg.distributed

  for field in ("num_layers", "d_model", "num_heads", "num_kv_heads", "ffn_dim", "vocab_size"):
    _check(e, m[field] >= 1, f"model.{field}={m[field]} must be >= 1.")
  _check(e, m.head_dim >= 0, f"model.head_dim={m.head_dim} must be >= 0 (0 means d_model // num_heads).")
  if m.head_dim == 0 and m.num_heads >= 1:
    _check(e, m.d_model % m.num_heads == 0,
           f"model.num_heads={m.num_heads} does not divide model.d_model={m.d_model}; "
           "pick num_heads dividing d_model or set model.head_dim explicitly.")
  if m.num_kv_heads >= 1:
    _check(e, m.num_heads % m.num_kv_heads == 0,
           f"model.num_kv_heads={m.num_kv_heads} does not divide model.num_heads={m.num_heads}; "
           "grouped-query attention needs num_heads % num_kv_heads == 0.")
  for field, registry in (("attention_types", ATTENTION), ("mlp_types", MLP)):
    entries = expand_schedule(m[field], max(m.num_layers, 1))
    _check(e, len(entries) == m.num_layers,
           f"model.{field} has {len(entries)} entries but model.num_layers={m.num_layers}; "
           "give one entry per layer or a single entry for all layers.")
    for name in sorted(set(entries) - set(registry.names())):
      e.append(f"model.{field}: unknown {registry.kind} {name!r}; known: {', '.join(registry.names())}.")
  for field in ("dtype", "param_dtype"):
    _check(e, m[field] in DTYPES, f"model.{field}={m[field]!r} is not one of {DTYPES}.")
  remat = expand_schedule(m.remat, max(m.num_layers, 1))
  _check(e, len(remat) == m.num_layers,
         f"model.remat has {len(remat)} entries but model.num_layers={m.num_layers}; give one policy per layer "
         "or a single one for all layers.")
  for name in sorted(set(remat) - set(REMAT_POLICIES)):
    e.append(f"model.remat: {name!r} is not one of {REMAT_POLICIES}.")
  _check(e, m.rope_theta > 0, f"model.rope_theta={m.rope_theta} must be > 0.")
  _validate_hc_and_mtp(e, m, d.seq_len, ATTENTION, MLP)
  mlp_entries = _types_in_use(m, "mlp")
  if any(isinstance(MLP.get(name), type) and issubclass(MLP.get(name), MoE) for name in mlp_entries & set(MLP.names())):
    _validate_moe(m, cfg.mesh, e)
  _validate_attention(m, e)

  _check(e, d.source in SOURCES, f"data.source={d.source!r} is unknown; known: {', '.join(SOURCES.names())}.")
  _check(e, d.seq_len >= 2, f"data.seq_len={d.seq_len} must be >= 2.")
  _check(e, cfg.seed >= 0, f"seed={cfg.seed} must be >= 0.")
  _check(e, d.shards >= 1 and t.batch_size % d.shards == 0,
         f"data.shards={d.shards} must be >= 1 and divide train.batch_size={t.batch_size}.")
  processes = dist.num_processes if dist.coordinator_address else None
  if processes:
    _check(e, d.shards % processes == 0,
           f"data.shards={d.shards} must be a multiple of distributed.num_processes={processes} "
           f"(each process reads whole shards); set --config.data.shards={processes}.")
  if d.source in ("passkey", "mqar", "copy"):
    _check(e, 1 <= d.task_length <= d.seq_len + 1,
           f"data.task_length={d.task_length} must be in [1, data.seq_len + 1 = {d.seq_len + 1}] so an "
           f"example's answer stays in the same row as its context; raise data.seq_len or lower it.")
  _check(e, 0.0 <= d.val_fraction < 1.0, f"data.val_fraction={d.val_fraction} must be in [0, 1).")
  _check(e, d.source != "files" or bool(d.files.strip()),
         "data.source='files' needs data.files, e.g. --config.data.files='corpus/*.txt'.")
  if not e:
    try:
      vocab = tokenizer_vocab_size(d.tokenizer)
    except (OSError, ValueError, ImportError) as err:
      e.append(f"data.tokenizer={d.tokenizer!r} cannot be loaded: {err}")
    else:
      _check(e, m.vocab_size >= vocab,
             f"model.vocab_size={m.vocab_size} is smaller than the tokenizer's vocabulary ({vocab}); "
             f"set --config.model.vocab_size={vocab} or larger.")

  for field in ("steps", "batch_size", "grad_accum_steps", "loss_chunk", "log_every", "checkpoint_every",
                "keep_checkpoints", "eval_batches"):
    _check(e, t[field] >= 1, f"train.{field}={t[field]} must be >= 1.")
  _check(e, t.nonfinite in NONFINITE_POLICIES,
         f"train.nonfinite={t.nonfinite!r} is not one of {NONFINITE_POLICIES}.")
  _check(e, t.nonfinite_limit >= 1, f"train.nonfinite_limit={t.nonfinite_limit} must be >= 1.")
  _check(e, t.eval_every >= 0, f"train.eval_every={t.eval_every} must be >= 0 (0 disables eval).")
  if t.grad_accum_steps >= 1:
    _check(e, t.batch_size % t.grad_accum_steps == 0,
           f"train.grad_accum_steps={t.grad_accum_steps} does not divide train.batch_size={t.batch_size}.")

  _check(e, o.name in OPTIMIZERS, f"optim.name={o.name!r} is unknown; known: {', '.join(OPTIMIZERS.names())}.")
  _check(e, o.schedule in SCHEDULES,
         f"optim.schedule={o.schedule!r} is unknown; known: {', '.join(SCHEDULES.names())}.")
  _check(e, o.learning_rate > 0, f"optim.learning_rate={o.learning_rate} must be > 0.")
  _check(e, o.warmup_steps >= 0, f"optim.warmup_steps={o.warmup_steps} must be >= 0.")
  _check(e, 0.0 <= o.min_lr_ratio <= 1.0, f"optim.min_lr_ratio={o.min_lr_ratio} must be in [0, 1].")
  _check(e, 0.0 <= o.decay_fraction <= 1.0, f"optim.decay_fraction={o.decay_fraction} must be in [0, 1].")
  _check(e, o.grad_clip_norm >= 0, f"optim.grad_clip_norm={o.grad_clip_norm} must be >= 0 (0 disables).")
  _validate_muon(e, cfg)
  if "distill" in cfg:  # configs saved before the section existed lack it
    validate_distill(e, cfg)

  if dist.coordinator_address:
    _check(e, dist.num_processes >= 1, f"distributed.num_processes={dist.num_processes} must be >= 1.")
    _check(e, 0 <= dist.process_id < dist.num_processes,
           f"distributed.process_id={dist.process_id} must be in [0, distributed.num_processes="
           f"{dist.num_processes}); give each process its own id.")

  sizes = {a: cfg.mesh[a] for a in MESH_AXES}
  for a, v in sizes.items():
    _check(e, v == -1 or v >= 1, f"mesh.{a}={v} must be >= 1, or -1 for 'all remaining devices'.")
  _check(e, list(sizes.values()).count(-1) <= 1,
         f"mesh: at most one axis may be -1, got {[a for a, v in sizes.items() if v == -1]}.")
  if num_devices is not None and all(v == -1 or v >= 1 for v in sizes.values()):
    fixed = math.prod(v for v in sizes.values() if v != -1)
    if -1 in sizes.values():
      _check(e, num_devices % fixed == 0,
             f"mesh: fixed axes multiply to {fixed}, which does not divide the {num_devices} devices; "
             "change the mesh.* sizes.")
    else:
      _check(e, fixed == num_devices,
             f"mesh axes {sizes} multiply to {fixed} but there are {num_devices} devices; "
             "make them multiply to the device count, or set one axis to -1.")
    shape = mesh_shape(cfg.mesh, num_devices) if not e else None
    if shape:
      batch_shards = shape["data"] * shape["fsdp"] * shape["expert"]
      micro = t.batch_size // max(t.grad_accum_steps, 1)
      _check(e, micro % batch_shards == 0,
             f"train.batch_size={t.batch_size} / grad_accum_steps={t.grad_accum_steps} = {micro} "
             f"sequences per micro-batch must divide over mesh.data*mesh.fsdp*mesh.expert={batch_shards} devices.")
      _validate_context(e, cfg, shape["context"])

  validate_mesh_dcn(e, cfg.mesh, num_devices)
  if e:
    raise ConfigError("invalid config:\n  - " + "\n  - ".join(e))


WINDOWED_ATTENTION = ("sliding", "swa", "csa", "hca")  # types whose window arrives as a halo under context parallelism


def _validate_context(e: list[str], cfg: ml_collections.ConfigDict, context: int) -> None:
  """Context parallelism (moejax/layers/attention/context_parallel.py): 2C half-chunks, halos within a shard."""
  if context == 1:
    return
  seq_len, window = cfg.data.seq_len, cfg.model.attention.window
  _check(e, seq_len % (2 * context) == 0,
         f"data.seq_len={seq_len} must split into 2 * mesh.context = {2 * context} equal half-chunks (ring "
         f"attention's zigzag layout); use a multiple of {2 * context}.")
  types = set(expand_schedule(cfg.model.attention_types, cfg.model.num_layers))
  if types & set(WINDOWED_ATTENTION) and seq_len % context == 0:
    _check(e, window <= seq_len // context,
           f"model.attention.window={window} exceeds the {seq_len // context} tokens of one context shard "
           f"(data.seq_len={seq_len} / mesh.context={context}); the halo comes from the previous shard only. "
           "Lower mesh.context or the window.")


def _types_in_use(m: ml_collections.ConfigDict, kind: str) -> set[str]:
  """The ``kind`` ("attention" / "mlp") types the layer schedule and the MTP modules use."""
  schedule = set(expand_schedule(m[f"{kind}_types"], max(m.num_layers, 1)))
  return schedule | ({m.mtp[f"{kind}_type"]} if m.mtp.depth else set())


def _validate_hc_and_mtp(e: list[str], m: ml_collections.ConfigDict, seq_len: int, attention, mlp) -> None:
  """model.hc (hyper-connections) and model.mtp (multi-token prediction)."""
  hc, mtp = m.hc, m.mtp
  _check(e, hc.streams >= 1, f"model.hc.streams={hc.streams} must be >= 1 (1: the plain residual; "
                             "DeepSeek-V4 uses 4).")
  _check(e, hc.sinkhorn_iters >= 1, f"model.hc.sinkhorn_iters={hc.sinkhorn_iters} must be >= 1 (V4 uses 20).")
  _check(e, hc.eps > 0, f"model.hc.eps={hc.eps} must be > 0 (it keeps Sinkhorn's denominators non-zero; "
                        "V4 uses 1e-6).")
  _check(e, 0 <= mtp.depth < seq_len,
         f"model.mtp.depth={mtp.depth} must be in [0, data.seq_len={seq_len}) (0 turns MTP off).")
  _check(e, mtp.loss_weight >= 0, f"model.mtp.loss_weight={mtp.loss_weight} must be >= 0 (DeepSeek-V3: 0.3, "
                                  "then 0.1).")
  for field, registry in (("attention_type", attention), ("mlp_type", mlp)):
    _check(e, mtp[field] in registry, f"model.mtp.{field}: unknown {registry.kind} {mtp[field]!r}; "
                                      f"known: {', '.join(registry.names())}.")


def _validate_moe(m: ml_collections.ConfigDict, mesh: ml_collections.ConfigDict, e: list[str]) -> None:
  """Checks ``model.moe`` (called when a layer is an MoE type)."""
  from moejax.layers.moe_dispatch import BACKENDS
  from moejax.layers.routers import ROUTERS

  moe = m.moe
  for field in ("num_experts", "top_k", "expert_ffn_dim", "num_groups", "topk_groups"):
    _check(e, moe[field] >= 1, f"model.moe.{field}={moe[field]} must be >= 1.")
  _check(e, moe.num_shared >= 0, f"model.moe.num_shared={moe.num_shared} must be >= 0.")
  _check(e, moe.top_k <= moe.num_experts,
         f"model.moe.top_k={moe.top_k} exceeds model.moe.num_experts={moe.num_experts}; lower top_k or add experts.")
  _check(e, moe.score in SCORES, f"model.moe.score={moe.score!r} is not one of {SCORES}.")
  _check(e, moe.dispatch in DISPATCH_MODES, f"model.moe.dispatch={moe.dispatch!r} is not one of {DISPATCH_MODES}.")
  _check(e, moe.capacity_factor > 0, f"model.moe.capacity_factor={moe.capacity_factor} must be > 0.")
  _check(e, moe.routed_scale > 0, f"model.moe.routed_scale={moe.routed_scale} must be > 0.")
  _check(e, moe.swiglu_limit >= 0, f"model.moe.swiglu_limit={moe.swiglu_limit} must be >= 0 (0 disables).")
  _check(e, moe.collapse_steps >= 0, f"model.moe.collapse_steps={moe.collapse_steps} must be >= 0 (0 disables).")
  _check(e, moe.bias_update_rate >= 0, f"model.moe.bias_update_rate={moe.bias_update_rate} must be >= 0.")
  for field in ("load_balance_weight", "seq_balance_weight", "z_loss_weight"):
    _check(e, moe[field] >= 0, f"model.moe.{field}={moe[field]} must be >= 0 (0 disables).")

  router = ROUTERS.get(moe.router) if moe.router in ROUTERS else None
  _check(e, router is not None, f"model.moe.router={moe.router!r} is unknown; known: {', '.join(ROUTERS.names())} "
         "(register yours with @ROUTERS.register and import it from your config file).")
  if router is not None:
    _check(e, not moe.score_bias or getattr(router, "supports_bias", False),
           f"model.moe.score_bias=True but router {moe.router!r} has no selection bias; use router='topk' "
           "or set score_bias=False.")
    _check(e, moe.num_groups == 1 or getattr(router, "supports_groups", False),
           f"model.moe.num_groups={moe.num_groups} but router {moe.router!r} does not limit groups; use "
           "router='topk' or num_groups=1.")
  if moe.num_groups >= 1 and moe.num_experts % moe.num_groups == 0 and moe.num_groups > 1:
    per_group = moe.num_experts // moe.num_groups
    _check(e, moe.topk_groups <= moe.num_groups,
           f"model.moe.topk_groups={moe.topk_groups} exceeds model.moe.num_groups={moe.num_groups}.")
    _check(e, moe.top_k <= moe.topk_groups * per_group,
           f"model.moe.top_k={moe.top_k} exceeds the {moe.topk_groups * per_group} experts in topk_groups="
           f"{moe.topk_groups} groups of {per_group}; raise topk_groups or lower top_k.")
  elif moe.num_groups > 1:
    e.append(f"model.moe.num_groups={moe.num_groups} does not divide model.moe.num_experts={moe.num_experts}; "
             "pick a divisor.")

  if moe.backend != "auto" and moe.backend not in BACKENDS:
    e.append(f"model.moe.backend={moe.backend!r} is unknown; known: auto, {', '.join(BACKENDS.names())}.")
  elif moe.backend != "auto" and moe.dispatch in DISPATCH_MODES:
    backend = BACKENDS.get(moe.backend)
    _check(e, getattr(backend, moe.dispatch),
           f"model.moe.backend={moe.backend!r} does not support dispatch={moe.dispatch!r}; use backend='einsum' "
           "(supports both) or 'auto'.")
    _check(e, mesh.expert == 1 or backend.expert_parallel,
           f"model.moe.backend={moe.backend!r} does not support expert parallelism (mesh.expert={mesh.expert}); "
           "use backend='einsum' or 'auto'.")
  if mesh.expert != -1 and mesh.expert > 1:
    _check(e, moe.num_experts % mesh.expert == 0,
           f"mesh.expert={mesh.expert} does not divide model.moe.num_experts={moe.num_experts}; experts are split "
           "evenly over the expert axis.")
ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "chunked")
INDEXER_STAGES = ("warmup", "sparse", "off")
ROPE_LAYOUTS = ("half", "interleave")
_WINDOWED = {"sliding", "swa", "csa", "hca"}
V4_TYPES = {"swa", "csa", "hca"}  # DeepSeek-V4 attention types (compressed.py)
_MLA = {"mla", "dsa"}
_INDEXED = {"dsa", "csa"}
_QK_NORM = {"dense", "sliding"}


def _validate_yarn(e: list[str], y, where: str) -> None:
  _check(e, y.factor > 0, f"{where}.factor={y.factor} must be > 0 (<= 1 turns YaRN off).")
  if y.factor <= 1:
    return
  _check(e, y.original_max_len >= 1, f"{where}.original_max_len={y.original_max_len} must be >= 1.")
  _check(e, y.beta_fast > y.beta_slow > 0,
         f"{where}: beta_fast={y.beta_fast} must exceed beta_slow={y.beta_slow} > 0 (defaults 32 and 1).")
  for f in ("mscale", "mscale_all_dim", "attention_factor"):
    _check(e, y[f] >= 0, f"{where}.{f}={y[f]} must be >= 0 (0: unused / derived).")


def _validate_attention(m: ml_collections.ConfigDict, e: list[str]) -> None:
  """``model.attention``: only the fields the scheduled attention types read."""
  a, w = m.attention, "model.attention"
  types = _types_in_use(m, "attention")
  head = m.head_dim or (m.d_model // m.num_heads if m.num_heads >= 1 else 0)
  _check(e, a.implementation in ATTENTION_IMPLEMENTATIONS,
         f"{w}.implementation={a.implementation!r} is not one of {ATTENTION_IMPLEMENTATIONS}.")
  _check(e, a.chunk_size >= 1, f"{w}.chunk_size={a.chunk_size} must be >= 1 (e.g. 512).")
  _check(e, a.xla_max_len >= 0, f"{w}.xla_max_len={a.xla_max_len} must be >= 0.")
  _check(e, a.rope_layout in ROPE_LAYOUTS, f"{w}.rope_layout={a.rope_layout!r} is not one of {ROPE_LAYOUTS}.")
  _check(e, a.compress_rope_theta >= 0, f"{w}.compress_rope_theta={a.compress_rope_theta} must be >= 0 "
         "(0: model.rope_theta).")
  _validate_yarn(e, a.yarn, f"{w}.yarn")
  _validate_yarn(e, a.compress_yarn, f"{w}.compress_yarn")
  if types & _WINDOWED:
    _check(e, a.window >= 1, f"{w}.window={a.window} must be >= 1 for {sorted(types & _WINDOWED)} layers.")
  if types & (_QK_NORM | V4_TYPES):
    rotated = a.rope_dim or head
    _check(e, 0 <= a.rope_dim <= head and rotated % 2 == 0,
           f"{w}.rope_dim={a.rope_dim} must be even and in [0, head dim {head}] (0 rotates the whole head).")
  if a.qk_norm:
    _check(e, bool(types & _QK_NORM), f"{w}.qk_norm=True has no effect on {sorted(types)} layers (only dense "
           "and sliding use it; mla/dsa/V4 types have their own q/kv norms); set it to False.")
  if types & _MLA:
    for f in ("kv_lora_rank", "qk_nope_head_dim", "v_head_dim"):
      _check(e, a[f] >= 1, f"{w}.{f}={a[f]} must be >= 1 for mla/dsa layers.")
    _check(e, a.qk_rope_head_dim >= 2 and a.qk_rope_head_dim % 2 == 0,
           f"{w}.qk_rope_head_dim={a.qk_rope_head_dim} must be even and >= 2 for mla/dsa layers.")
  _check(e, a.q_lora_rank >= 0, f"{w}.q_lora_rank={a.q_lora_rank} must be >= 0 (0: plain query projection).")
  needs_q_lora = sorted(types & (V4_TYPES | {"dsa"}))
  if needs_q_lora:
    _check(e, a.q_lora_rank >= 1, f"{w}.q_lora_rank=0 but {needs_q_lora} layers need a low-rank query "
           "(their indexer reads it); set e.g. --config.model.attention.q_lora_rank=64.")
  if types & V4_TYPES:
    _check(e, a.o_groups >= 1 and m.num_heads % a.o_groups == 0,
           f"{w}.o_groups={a.o_groups} must divide model.num_heads={m.num_heads}.")
    _check(e, a.o_lora_rank >= 1, f"{w}.o_lora_rank={a.o_lora_rank} must be >= 1.")
  for f, t in (("csa_ratio", "csa"), ("hca_ratio", "hca")):
    if t in types:
      _check(e, a[f] >= 1, f"{w}.{f}={a[f]} must be >= 1 (tokens per compressed entry).")
  if types & _INDEXED:
    for f in ("index_heads", "index_head_dim", "index_topk"):
      _check(e, a[f] >= 1, f"{w}.{f}={a[f]} must be >= 1 for {sorted(types & _INDEXED)} layers.")
    _check(e, a.indexer_stage in INDEXER_STAGES,
           f"{w}.indexer_stage={a.indexer_stage!r} is not one of {INDEXER_STAGES}.")
    _check(e, a.indexer_loss_weight >= 0, f"{w}.indexer_loss_weight={a.indexer_loss_weight} must be >= 0.")
    _check(e, a.indexer_recall_queries >= 0,
           f"{w}.indexer_recall_queries={a.indexer_recall_queries} must be >= 0 (0: no recall metric).")
    index_rope = {"dsa": a.qk_rope_head_dim, "csa": a.rope_dim or a.index_head_dim}
    for t in sorted(types & _INDEXED):
      _check(e, index_rope[t] <= a.index_head_dim and index_rope[t] % 2 == 0,
             f"{w}.index_head_dim={a.index_head_dim} is smaller than the {index_rope[t]} rope channels the "
             f"{t} indexer rotates; raise index_head_dim.")
def _validate_muon(e: list[str], cfg: ml_collections.ConfigDict) -> None:
  """``optim.muon.*`` and QK-clip fields."""
  import re

  from moejax.optim.muon import SCALES
  from moejax.optim.newton_schulz import COEFFICIENTS

  o, mu = cfg.optim, cfg.optim.muon
  for field in ("b1", "b2"):
    _check(e, 0.0 <= o[field] < 1.0, f"optim.{field}={o[field]} must be in [0, 1).")
  _check(e, 0.0 <= mu.momentum < 1.0, f"optim.muon.momentum={mu.momentum} must be in [0, 1).")
  _check(e, mu.coefficients in COEFFICIENTS,
         f"optim.muon.coefficients={mu.coefficients!r} is unknown; known: {', '.join(sorted(COEFFICIENTS))}.")
  _check(e, mu.ns_steps >= 1, f"optim.muon.ns_steps={mu.ns_steps} must be >= 1 (5 is standard).")
  _check(e, mu.ns_dtype in ("bfloat16", "float32"),
         f"optim.muon.ns_dtype={mu.ns_dtype!r} must be 'bfloat16' or 'float32'.")
  _check(e, mu.scale in SCALES, f"optim.muon.scale={mu.scale!r} is not one of {SCALES}.")
  _check(e, mu.rms > 0, f"optim.muon.rms={mu.rms} must be > 0 (0.2 matches AdamW's update RMS).")
  _check(e, mu.adam_lr_ratio > 0, f"optim.muon.adam_lr_ratio={mu.adam_lr_ratio} must be > 0.")
  for pattern in mu.exclude:
    try:
      re.compile(pattern)
    except re.error as err:
      e.append(f"optim.muon.exclude: {pattern!r} is not a regular expression ({err}); fix or remove it.")
  _check(e, o.qk_clip_tau >= 0, f"optim.qk_clip_tau={o.qk_clip_tau} must be >= 0 (0 disables QK-clip).")
  _check(e, len(o.qk_clip_params) == 2,
         f"optim.qk_clip_params={tuple(o.qk_clip_params)} must name two parameters: (query, key).")
  if o.qk_clip_tau > 0:
    m = cfg.model
    types = _types_in_use(m, "attention")
    _check(e, types <= _QK_NORM, f"optim.qk_clip_tau={o.qk_clip_tau}: QK-clip rescales per-head (query, key) "
           f"projections {tuple(o.qk_clip_params)}, which only {sorted(_QK_NORM)} layers have; the schedule "
           f"also has {sorted(types - _QK_NORM)} (latent / shared-KV projections); set qk_clip_tau=0.")
  _check(e, o.qk_clip_tau == 0 or cfg.model.attention.track_max_logit,
         f"optim.qk_clip_tau={o.qk_clip_tau} needs the attention layers' max logits; set "
         "--config.model.attention.track_max_logit=True (or qk_clip_tau=0).")


def to_json(cfg: ml_collections.ConfigDict) -> str:
  return json.dumps(cfg.to_dict(), indent=2, sort_keys=True, default=list)
