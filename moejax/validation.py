"""Config validation: :func:`validate` checks a whole config before anything is built.

It checks the fields every run reads (model shape, schedule, data, train,
optim, distributed, mesh), then loops over the components the config uses
and runs what each declares (``moejax/registry.py``): the attention types'
and MLP types' ``validate_config`` and capabilities, the data source's,
the optimizer's (and every optimizer whose options section is present),
the distill section's. No type is named here, so a component registered
from a user's file is checked on equal terms with the built-in ones.

Layering: ``moejax.config`` (the schema, imports nothing from moejax) <-
the registries and components (they import the schema) <- this module.
"""

from __future__ import annotations

import math

import ml_collections

from moejax.config import (DTYPES, MESH_AXES, NONFINITE_POLICIES, REMAT_POLICIES, ConfigError, expand_schedule,
                           mesh_shape)
from moejax.data import SOURCES, tokenizer_vocab_size
from moejax.data.array_record import validate_pipeline
from moejax.sharding import validate_mesh_dcn
from moejax.distill.config import validate_distill
from moejax.layers.attention import ATTENTION
from moejax.layers.attention.checks import validate_attention, validate_qk_clip
from moejax.models.scan import MAX_PERIOD, scan_plan
from moejax.layers.mlp import MLP
from moejax.layers.moe import MoE  # noqa: F401  (registers the MoE types)
from moejax.optim import OPTIMIZERS, SCHEDULES


def _check(errors: list[str], ok: bool, msg: str) -> None:
  if not ok:
    errors.append(msg)


def types_in_use(m: ml_collections.ConfigDict, kind: str) -> set[str]:
  """The ``kind`` ("attention" / "mlp") types the layer schedule and the MTP modules use."""
  schedule = set(expand_schedule(m[f"{kind}_types"], max(m.num_layers, 1)))
  return schedule | ({m.mtp[f"{kind}_type"]} if m.mtp.depth else set())


def validate(cfg: ml_collections.ConfigDict, num_devices: int | None = None, check_tokenizer: bool = True) -> None:
  """Raises ConfigError naming every invalid field; silent when all is well.

  ``check_tokenizer=False`` skips the training tokenizer's vocabulary check (a
  checkpoint load: the embedding has the rows the checkpoint gives it)."""
  e: list[str] = []
  _validate_model(e, cfg)
  _validate_data(e, cfg, check_tokenizer)
  _validate_train(e, cfg.train)
  _validate_optim(e, cfg)
  if "distill" in cfg:  # configs saved before the section existed lack it
    validate_distill(e, cfg)
  _validate_distributed_and_mesh(e, cfg, num_devices)
  if e:
    raise ConfigError("invalid config:\n  - " + "\n  - ".join(e))


def _validate_model(e: list[str], cfg: ml_collections.ConfigDict) -> None:
  m = cfg.model
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
  if m.scan_layers and len(remat) == m.num_layers and not e:
    _check(e, scan_plan(m) is not None,
           "model.scan_layers=True but no run of layers repeats (a period of up to "
           f"{MAX_PERIOD} layers of the same attention, MLP and remat kinds, at least twice); set "
           "model.scan_layers=False.")
    _check(e, cfg.optim.qk_clip_tau <= 0,
           "optim.qk_clip_tau > 0 with model.scan_layers=True: QK-clip rescales per-layer projections and does "
           "not read the stacked layout yet; set model.scan_layers=False or optim.qk_clip_tau=0.")
  _validate_hc_and_mtp(e, m, cfg.data.seq_len)
  for check in MLP.checks(types_in_use(m, "mlp")):
    e.extend(check(cfg))
  e.extend(validate_attention(cfg, types_in_use(m, "attention")))


def _validate_hc_and_mtp(e: list[str], m: ml_collections.ConfigDict, seq_len: int) -> None:
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
  for field, registry in (("attention_type", ATTENTION), ("mlp_type", MLP)):
    _check(e, mtp[field] in registry, f"model.mtp.{field}: unknown {registry.kind} {mtp[field]!r}; "
                                      f"known: {', '.join(registry.names())}.")


def _validate_data(e: list[str], cfg: ml_collections.ConfigDict, check_tokenizer: bool = True) -> None:
  d, m, t, dist = cfg.data, cfg.model, cfg.train, cfg.distributed
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
  _check(e, 0.0 <= d.val_fraction < 1.0, f"data.val_fraction={d.val_fraction} must be in [0, 1).")
  e.extend(validate_pipeline(cfg))
  for check in SOURCES.checks({d.source}):
    e.extend(check(cfg))
  if not e and check_tokenizer:
    try:
      vocab = tokenizer_vocab_size(d.tokenizer)
    except (OSError, ValueError, ImportError) as err:
      e.append(f"data.tokenizer={d.tokenizer!r} cannot be loaded: {err}")
    else:
      _check(e, m.vocab_size >= vocab,
             f"model.vocab_size={m.vocab_size} is smaller than the tokenizer's vocabulary ({vocab}); "
             f"set --config.model.vocab_size={vocab} or larger.")


def _validate_train(e: list[str], t: ml_collections.ConfigDict) -> None:
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
  _check(e, t.peak_flops >= 0, f"train.peak_flops={t.peak_flops} must be >= 0 (0: the device kind's bf16 peak).")
  start, stop = (tuple(t.profile_steps) + (0, 0))[:2]
  _check(e, len(t.profile_steps) == 2 and (start, stop) == (0, 0) or 1 <= start <= stop,
         f"train.profile_steps={tuple(t.profile_steps)} must be (start, stop) with 1 <= start <= stop, or (0, 0) "
         "for no profile; e.g. --config.train.profile_steps='(5, 7)'.")


def _validate_optim(e: list[str], cfg: ml_collections.ConfigDict) -> None:
  o = cfg.optim
  _check(e, o.name in OPTIMIZERS, f"optim.name={o.name!r} is unknown; known: {', '.join(OPTIMIZERS.names())}.")
  _check(e, o.schedule in SCHEDULES,
         f"optim.schedule={o.schedule!r} is unknown; known: {', '.join(SCHEDULES.names())}.")
  _check(e, o.learning_rate > 0, f"optim.learning_rate={o.learning_rate} must be > 0.")
  _check(e, o.warmup_steps >= 0, f"optim.warmup_steps={o.warmup_steps} must be >= 0.")
  _check(e, 0.0 <= o.min_lr_ratio <= 1.0, f"optim.min_lr_ratio={o.min_lr_ratio} must be in [0, 1].")
  _check(e, 0.0 <= o.decay_fraction <= 1.0, f"optim.decay_fraction={o.decay_fraction} must be in [0, 1].")
  _check(e, o.grad_clip_norm >= 0, f"optim.grad_clip_norm={o.grad_clip_norm} must be >= 0 (0 disables).")
  for field in ("b1", "b2"):
    _check(e, 0.0 <= o[field] < 1.0, f"optim.{field}={o[field]} must be in [0, 1).")
  # The selected optimizer, and every optimizer whose options section the config carries.
  in_use = {n for n in OPTIMIZERS.names() if OPTIMIZERS.capability(n, "section") in o}
  if o.name in OPTIMIZERS:
    section = OPTIMIZERS.capability(o.name, "section")
    if section and section not in o:
      e.append(f"optim.name={o.name!r} reads optim.{section}, which this config lacks; add it in get_config with "
               f"moejax.optim.registry.use_optimizer(c, {o.name!r}).")
    else:
      in_use.add(o.name)
  for check in OPTIMIZERS.checks(in_use):
    e.extend(check(cfg))
  e.extend(validate_qk_clip(cfg, types_in_use(cfg.model, "attention")))


def _validate_distributed_and_mesh(e: list[str], cfg: ml_collections.ConfigDict, num_devices: int | None) -> None:
  dist, t = cfg.distributed, cfg.train
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


def _validate_context(e: list[str], cfg: ml_collections.ConfigDict, context: int) -> None:
  """Context parallelism (moejax/layers/attention/context_parallel.py): 2C half-chunks; windowed
  types (``windowed`` capability) take a halo of ``window`` keys from the previous shard."""
  if context == 1:
    return
  seq_len, window = cfg.data.seq_len, cfg.model.attention.window
  _check(e, seq_len % (2 * context) == 0,
         f"data.seq_len={seq_len} must split into 2 * mesh.context = {2 * context} equal half-chunks (ring "
         f"attention's zigzag layout); use a multiple of {2 * context}.")
  types = set(expand_schedule(cfg.model.attention_types, cfg.model.num_layers))
  if ATTENTION.having(types, "windowed") and seq_len % context == 0:
    _check(e, window <= seq_len // context,
           f"model.attention.window={window} exceeds the {seq_len // context} tokens of one context shard "
           f"(data.seq_len={seq_len} / mesh.context={context}); the halo comes from the previous shard only. "
           "Lower mesh.context or the window.")
