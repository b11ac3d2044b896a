"""The one config schema: every field, its default and its allowed values.

Every config file in ``configs/`` starts from :func:`base_config` and changes
fields; no field exists anywhere else. ``moejax/validation.py:validate`` runs
before anything is built or compiled and raises :class:`ConfigError` listing
every problem, each naming the field, the value and the fix.

Layering: this module imports nothing from moejax, so every module may import
it. Sections that a component owns (``optim.muon`` of the Muon optimizers,
``distill`` of ``moejax distill``) are written here as plain data
(:func:`muon_config`, :func:`distill_config`) so that :func:`base_config` is
whole; their validation lives with the component (``moejax/optim/muon.py``,
``moejax/distill/config.py``), whose registry entry points back at the
section. A section of a user's component is added by the user's config file
(docs/extending.md).
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
ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "chunked", "cudnn", "tokamax")
INDEXER_STAGES = ("warmup", "sparse", "off")
ROPE_LAYOUTS = ("half", "interleave")
# Path patterns (``re.search`` on "layer_0/mlp/router/w_gate") Muon sends to AdamW:
# router gates, hyper-connection parameters (modules ``*_hc`` / ``hc_*``), and
# embeddings / LM heads by name (for plain pytrees without axis names).
MUON_EXCLUDE = (r"(^|/)router/", r"(^|/)(\w+_hc|hc_\w+)/", r"(^|/)\w*(embed|lm_head)\w*$")


class ConfigError(ValueError):
  """An invalid config; the message names each bad field and its fix."""


def base_config() -> ml_collections.ConfigDict:
  """All fields with their defaults (a small dense byte-level LM on stdlib)."""
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
      scan_layers=False,       # run the repeated layers as one nn.scan (moejax/models/scan.py): compile time
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
      bias_update_schedule="constant",  # constant | step | linear | cosine (moejax/layers/balancing.py)
      bias_update_steps=0,     # step/linear/cosine: the step where the rate reaches 0
      balance_stats="global",  # bias update from loads of the global batch | mean sign per micro-batch
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
      source="stdlib",         # stdlib | passkey | mqar | copy | files | array_record
      path="",                 # source=array_record: a directory written by `moejax data prepare --out`
      mixture="",              # source=array_record: "NAME=WEIGHT[:DIR],..." (DIR default: path/NAME)
      workers=0,               # grain worker processes per data shard for training batches (0: in this thread)
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
      peak_flops=0.0,          # peak FLOP/s of one device for MFU; 0: bf16 peak of the device kind (moejax/flops.py)
      profile_steps=(0, 0),    # (start, stop): a jax.profiler trace of steps start..stop in WORKDIR/profile; (0, 0): off
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
  c.optim.muon = muon_config()

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
  # Multi-slice (TPU) / multi-node (GPU) meshes: slices or nodes along each axis, which
  # then spans DCN between them and ICI/NVLink within (moejax/sharding.py:device_array).
  # mesh.<axis> stays the whole axis; the product of dcn_* is the number of slices/nodes.
  c.mesh.update({f"dcn_{a}": 1 for a in MESH_AXES})
  c.mesh.data = -1
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
      # jax.nn.dot_product_attention with a [T, T] mask, "chunked" the flash-style kernel
      # (O(T * chunk_size) memory); dense/sliding only: "cudnn" (GPU, bf16/fp16, no sinks),
      # "tokamax" (the kernels extra, no sinks). "auto": cudnn on a GPU where it applies up to
      # cudnn_max_len, else chunked above xla_max_len, else xla (docs/attention.md#kernels);
      # on CPU auto switches at min(xla_max_len, 256) and runs chunked in blocks of at most 256.
      implementation="auto",     # auto | xla | chunked | cudnn | tokamax
      xla_max_len=2048,
      cudnn_max_len=8192,        # auto on GPU: longest T on cuDNN (its [B, T, T] bool mask: 256 MiB at B=4, T=8192)
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


def muon_config() -> ml_collections.ConfigDict:
  """``optim.muon``: options of the ``muon`` / ``optax_muon`` optimizers (checked in moejax/optim/muon.py)."""
  return ml_collections.ConfigDict(dict(
      momentum=0.95,
      nesterov=True,
      coefficients="quintic",  # quintic (Keller Jordan) | polar_express (Amsel et al., 2025)
      ns_steps=5,
      ns_dtype="bfloat16",     # bfloat16 | float32: precision of the Newton-Schulz iteration
      scale="moonlight",       # moonlight: rms * sqrt(max(in, out)) | keller: sqrt(max(1, out / in))
      rms=0.2,                 # moonlight's target update RMS (AdamW's), so lr / wd transfer
      normuon=False,           # NorMuon: per-neuron second moment (decay b2) after orthogonalization
      adam_lr_ratio=1.0,       # AdamW branch learning rate = this * learning_rate
      exclude=MUON_EXCLUDE,    # path regexes sent to AdamW (besides vocab-axis and 1-D leaves):
                               # routers, hyper-connections, embeddings/heads by name
  ))


def distill_config() -> ml_collections.ConfigDict:
  """``config.distill`` with its defaults (no domains: nothing to distill); checked in moejax/distill/config.py."""
  return ml_collections.ConfigDict(dict(
      alpha=0.5,               # weight of the label CE; 1 - alpha weighs T^2 * KL
      temperature=1.0,         # T: both distributions are softmax(logits / T)
      kl="forward",            # forward | reverse
      mode="off_policy",       # off_policy (teacher-forced on data) | on_policy (student samples)
      teacher_source="cohost", # cohost (teachers run in the jitted step) | cache (precomputed, read back)
      cache_dir="",            # teacher_source=cache: where the cache lives ("" = WORKDIR/teacher_cache)
      cache_batches=0,         # teacher_source=cache: batches cached then cycled (0: train.steps)
      teacher_config="",       # every teacher's config file[:arg] ("" = the student's config, all MLPs dense)
      teacher_steps=300,       # training steps of each specialist (a domain may override)
      prompt_len=32,           # on_policy: prompt tokens taken from each domain's data
      continuation_len=32,     # on_policy: tokens the student samples after each prompt
      sample_temperature=1.0,  # on_policy: the student's sampling temperature
      domains=ml_collections.ConfigDict(),  # name -> domain(...) (moejax/distill/config.py)
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


def expand_schedule(entries: Any, num_layers: int) -> tuple[str, ...]:
  """A per-layer schedule: one entry per layer, or one entry for all."""
  entries = (entries,) if isinstance(entries, str) else tuple(entries)
  return entries * num_layers if len(entries) == 1 else entries


def mesh_shape(mesh_cfg: ml_collections.ConfigDict, num_devices: int) -> dict[str, int]:
  """Resolves the -1 axis; assumes ``moejax.validation.validate`` passed."""
  shape = {a: int(mesh_cfg[a]) for a in MESH_AXES}
  fixed = math.prod(v for v in shape.values() if v != -1)
  return {a: (num_devices // fixed if v == -1 else v) for a, v in shape.items()}


def to_json(cfg: ml_collections.ConfigDict) -> str:
  return json.dumps(cfg.to_dict(), indent=2, sort_keys=True, default=list)
