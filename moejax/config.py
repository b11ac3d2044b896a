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
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
NONFINITE_POLICIES = ("skip", "stop", "rollback")
MESH_AXES = ("data", "fsdp", "tensor", "expert", "context")


class ConfigError(ValueError):
  """An invalid config; the message names each bad field and its fix."""


def base_config() -> ml_collections.ConfigDict:
  """All fields with their defaults (a small dense byte-level LM on stdlib)."""
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
      remat="none",            # none | full | dots | dots_no_batch
  ))
  c.model.attention = ml_collections.ConfigDict(dict(
      track_max_logit=False,   # sow each head's max pre-softmax logit ("max_stats"; QK-clip, metrics)
  ))

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

  # Device mesh; -1 on at most one axis means "all remaining devices".
  c.mesh = ml_collections.ConfigDict({a: 1 for a in MESH_AXES})
  c.mesh.data = -1
  return c


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
  from moejax.layers.attention import ATTENTION
  from moejax.layers.mlp import MLP
  from moejax.optim import OPTIMIZERS, SCHEDULES

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
  _check(e, m.remat in REMAT_POLICIES, f"model.remat={m.remat!r} is not one of {REMAT_POLICIES}.")
  _check(e, m.rope_theta > 0, f"model.rope_theta={m.rope_theta} must be > 0.")

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
      batch_shards = shape["data"] * shape["fsdp"]
      micro = t.batch_size // max(t.grad_accum_steps, 1)
      _check(e, micro % batch_shards == 0,
             f"train.batch_size={t.batch_size} / grad_accum_steps={t.grad_accum_steps} = {micro} "
             f"sequences per micro-batch must divide over mesh.data*mesh.fsdp={batch_shards} devices.")
      _check(e, d.seq_len % shape["context"] == 0,
             f"data.seq_len={d.seq_len} must divide over mesh.context={shape['context']}.")

  if e:
    raise ConfigError("invalid config:\n  - " + "\n  - ".join(e))


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
  _check(e, o.qk_clip_tau == 0 or cfg.model.attention.track_max_logit,
         f"optim.qk_clip_tau={o.qk_clip_tau} needs the attention layers' max logits; set "
         "--config.model.attention.track_max_logit=True (or qk_clip_tau=0).")


def to_json(cfg: ml_collections.ConfigDict) -> str:
  return json.dumps(cfg.to_dict(), indent=2, sort_keys=True, default=list)
