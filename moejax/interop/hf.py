"""Hugging Face checkpoints <-> moejax models, with logits parity.

  from moejax.interop import hf
  model, variables = hf.load("path/to/hf_dir")            # dtype="float32", mesh=None
  logits_BxTxV = model.apply(variables, input_ids_BxT)
  hf.save(model, variables, "path/to/out")                 # transformers' from_pretrained reads it
  model, variables = hf.from_transformers(torch_model)     # an in-memory transformers model

Supported ``model_type``: ``deepseek_v3``, ``deepseek_v32``, ``deepseek_v4``,
``glm4_moe``, ``qwen3_moe``, ``mixtral``, ``qwen3``, ``llama``
(``moejax/interop/archs/``), each mapped onto moejax's own layers and config
fields. Loading streams tensor by tensor
(``safetensors_io.CheckpointReader``), casts to ``dtype`` and places every
array with the sharding its logical axes get on ``mesh``
(``moejax.sharding.LOGICAL_RULES``), so host memory holds about one tensor
beyond the placed result. Every checkpoint tensor is either mapped or
dropped with a logged reason (DeepSeek MTP layers); anything else is an error.

``convert_from_hf`` / ``convert_to_hf`` are ``moejax convert``: a workdir
that ``moejax train/eval`` resume from, and back.
"""

from __future__ import annotations

import json
import logging
import os
import shutil

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from flax import traverse_util

from moejax import config as config_lib
from moejax.config_apply import apply_config
from moejax.validation import validate
from moejax.interop.archs import ARCHS, HFFields
from moejax.layers import DTYPES
from moejax.interop.layout import LAYOUTS, Tensor
from moejax.interop.safetensors_io import CheckpointReader, write_checkpoint

log = logging.getLogger(__name__)

COLLECTIONS = ("params", "router_bias", "hash_table")  # what a checkpoint holds; the rest is sown
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "chat_template.jinja")
# Order in which hf.save (without model_type) tries the architectures; the first that can express the model wins.
SAVE_ORDER = ("deepseek_v4", "deepseek_v32", "deepseek_v3", "glm4_moe", "qwen3_moe", "mixtral", "qwen3", "llama")


def _arch(model_type: str):
  if model_type not in ARCHS:
    raise config_lib.ConfigError(f"Hugging Face model_type {model_type!r} is not supported; moejax converts "
                                 f"{', '.join(ARCHS.names())} (add one in moejax/interop/archs/).")
  return ARCHS.get(model_type)()


def config_from_hf(hf_config: dict, training: bool = False) -> ml_collections.ConfigDict:
  """A full moejax config (``base_config()`` with ``model`` from an HF ``config.json`` dict).

  Raises ConfigError for an unsupported ``model_type``, field or value, naming it.
  Training-only settings moejax does not implement (``attention_dropout``,
  ``router_jitter_noise``) do not change the forward pass: logged, or, with
  ``training=True`` (a workdir to fine-tune), refused.
  """
  arch = _arch(hf_config.get("model_type", "<missing>"))
  fields = HFFields(hf_config)
  cfg = config_lib.base_config()
  apply_config(cfg.model, arch.model_config(fields), "model")
  fields.finish(arch.ignored)
  settings = ", ".join(f"{k}={v!r}" for k, v in sorted(fields.training_settings.items()))
  if settings and training:
    raise config_lib.ConfigError(
        f"{arch.model_type} config.json: {settings} changes training, and moejax has no such option; fine-tuning "
        "would silently train without it. Set it to 0 in config.json to fine-tune without it (inference, hf.load, "
        "is unaffected).")
  if settings:
    log.info("ignoring %s: training-only (inference does not use it)", settings)
  return cfg


def _model_section(cfg) -> ml_collections.ConfigDict:
  """The ``model`` section, as an exportable copy: MTP modules are left out with a
  logged notice (transformers' architectures do not run them)."""
  cfg = cfg.as_configdict() if isinstance(cfg, ml_collections.FrozenConfigDict) else cfg
  m = ml_collections.ConfigDict((cfg.model if "model" in cfg else cfg).to_dict())
  if m.mtp.depth:
    log.warning("leaving out the %d multi-token-prediction module(s) (model.mtp.depth): the Hugging Face "
                "architectures do not run them; the main model is exported", m.mtp.depth)
    m.mtp.depth = 0
  return m


def infer_model_type(model_cfg) -> str:
  """The first HF architecture (``SAVE_ORDER``) that expresses a moejax model config exactly.

  Raises ConfigError listing, for each architecture, the field and value that rule it out."""
  reasons = []
  for model_type in SAVE_ORDER:
    try:
      ARCHS.get(model_type)().check_writable(model_cfg)
    except config_lib.ConfigError as err:
      reasons.append(f"  - {model_type}: {str(err).removeprefix(f'cannot write {model_type} config.json: ')}")
    else:
      return model_type
  raise config_lib.ConfigError("no Hugging Face architecture can express this model exactly; for each, the first "
                               "field that rules it out (change it to export as that architecture; --model-type of "
                               "moejax convert --to-hf, model_type= of hf.save, picks one):\n" + "\n".join(reasons))


def config_to_hf(cfg, model_type: str | None = None) -> dict:
  """The HF ``config.json`` dict of a moejax config (or its ``model`` section)."""
  m = _model_section(cfg)
  return _arch(model_type or infer_model_type(m)).hf_config(m)


def _abstract_variables(model, seq_len: int = 8):
  """Logically boxed ShapeDtypeStructs of the checkpointed collections."""
  dummy = jax.numpy.zeros((1, seq_len), jax.numpy.int32)
  boxed = jax.eval_shape(model.init, jax.random.key(0), dummy)
  return {k: v for k, v in boxed.items() if k in COLLECTIONS}


def _entries(arch, m) -> dict[tuple[str, ...], Tensor]:
  return {e.path: e for e in arch.tensors(m)}


def _check_cover(entries: dict, leaves: dict, what: str) -> None:
  missing, extra = sorted(set(leaves) - set(entries)), sorted(set(entries) - set(leaves))
  if missing or extra:
    raise RuntimeError(f"{what}: the mapping does not match the model (unmapped moejax variables {missing[:5]}, "
                       f"mapped but absent {extra[:5]}); this is a moejax bug, please report it.")


def load(directory: str, dtype: str = "float32", mesh: jax.sharding.Mesh | None = None):
  """(model, variables) from a Hugging Face checkpoint directory.

  ``dtype``: parameter and compute dtype (``float32``, ``bfloat16``, ``float16``);
  ``mesh``: place each array with its logical sharding on this mesh (default:
  the default device). ``model.apply(variables, input_ids_BxT)`` gives float32
  logits ``[B, T, V]``.
  """
  from moejax.models.transformer import build_model

  with open(os.path.join(directory, "config.json")) as f:
    hf_config = json.load(f)
  cfg = config_from_hf(hf_config)
  cfg.model.dtype = cfg.model.param_dtype = dtype
  validate(cfg, check_tokenizer=False)  # the checkpoint's embedding, not data.tokenizer, sets the vocabulary
  model = build_model(cfg.model)
  variables = load_variables(directory, model, hf_config, mesh)
  return model, variables


def load_variables(directory: str, model, hf_config: dict, mesh=None, shardings=None) -> dict:
  """The checkpointed collections of ``model`` read from ``directory`` (see :func:`load`).

  ``shardings`` (a tree like the variables) overrides the placement derived from ``mesh``.
  """
  reader = CheckpointReader(directory, hf_config.get("quantization_config"))
  return _place(reader, model, hf_config["model_type"], mesh, shardings)


def _place(reader, model, model_type: str, mesh=None, shardings=None) -> dict:
  """Assembles every variable of ``model`` from ``reader`` (``names()``, ``reader(name) -> numpy``),
  one at a time, cast to the variable's dtype and put with its sharding. Under ``model.scan_layers``
  the layers are read unrolled, then stacked (``moejax/models/scan.py``)."""
  from moejax.models.scan import plan_of, stack_collections, unrolled
  from moejax.models.transformer import build_model
  from moejax.sharding import logical_sharding

  if plan := plan_of(model.cfg):
    if shardings is None and mesh is not None:
      shardings = logical_sharding(mesh, _abstract_variables(model))
    variables = stack_collections(_place(reader, build_model(unrolled(model.cfg)), model_type), plan)
    return variables if shardings is None else jax.tree.map(jax.device_put, variables, shardings)
  m = model.cfg
  arch = _arch(model_type)
  boxed = _abstract_variables(model)
  if shardings is None and mesh is not None:
    shardings = logical_sharding(mesh, boxed)
  abstract = traverse_util.flatten_dict(nn.meta.unbox(boxed))
  placement = traverse_util.flatten_dict(shardings) if shardings is not None else {}
  entries = _entries(arch, m)
  _check_cover(entries, abstract, "load")
  wanted = {name for e in entries.values() for name in e.hf}
  spelled = {arch.canonical(name): name for name in reader.names()}
  read = lambda name: reader(spelled.get(name, name))
  for name in spelled:
    if name in wanted:
      continue
    reason = arch.dropped(name, m)
    if reason is None:
      raise config_lib.ConfigError(f"checkpoint tensor {name!r} has no place in moejax's {arch.model_type} model "
                                   "(an unsupported feature, or a config.json that does not match the weights).")
    log.warning("dropping %s: %s", name, reason)
  flat = {}
  for path, leaf in abstract.items():
    entry = entries[path]
    array = LAYOUTS.get(entry.layout).assemble(read, entry, leaf.shape, np.dtype(leaf.dtype))
    if array.shape != leaf.shape:
      raise config_lib.ConfigError(f"checkpoint tensor(s) {entry.hf[:2]} give shape {array.shape}, but moejax "
                                   f"{'/'.join(path)} needs {leaf.shape}; config.json does not match the weights.")
    sharding = placement.get(path)
    if sharding is None:
      flat[path] = jax.device_put(array)
    else:  # each device gets its slice; works across processes (every host reads the same files)
      flat[path] = jax.make_array_from_callback(array.shape, sharding, lambda index, a=array: a[index])
    del array
  return traverse_util.unflatten_dict(flat)


class _StateDictReader:
  """A torch state dict in checkpoint naming, read like a :class:`CheckpointReader`."""

  def __init__(self, state_dict):
    self.state_dict = state_dict

  def names(self) -> list[str]:
    return sorted(self.state_dict)

  def __call__(self, name: str) -> np.ndarray:
    t = self.state_dict[name].detach()
    return (t.float() if t.is_floating_point() else t).cpu().numpy()


def from_transformers(torch_model, dtype: str = "float32", mesh: jax.sharding.Mesh | None = None):
  """(model, variables) from an in-memory ``transformers`` causal LM (no files written).

  The state dict is first put in checkpoint naming with transformers' own
  ``revert_weight_conversion`` (what ``save_pretrained`` writes), then mapped
  exactly as :func:`load` maps a checkpoint.
  """
  from moejax.models.transformer import build_model
  from transformers.core_model_loading import revert_weight_conversion

  hf_config = torch_model.config.to_dict()
  cfg = config_from_hf(hf_config)
  cfg.model.dtype = cfg.model.param_dtype = dtype
  validate(cfg, check_tokenizer=False)
  model = build_model(cfg.model)
  state_dict = revert_weight_conversion(torch_model, dict(torch_model.state_dict()))
  return model, _place(_StateDictReader(state_dict), model, hf_config["model_type"], mesh)


def hf_tensors(model, variables, model_type: str | None = None, dtype: str | None = None):
  """(HF config dict, iterator of (HF tensor name, numpy array)) for a moejax model.

  Variables in ``model.param_dtype`` are cast to ``dtype`` (default: kept); those
  kept in another dtype on purpose (float32 routers, mHC weights, biases) keep it,
  so a round trip is exact.
  """
  from moejax.models.scan import plan_of, unrolled, unstack_collections
  from moejax.models.transformer import build_model

  if plan := plan_of(model.cfg):  # model.scan_layers: export the unrolled layout
    model, variables = build_model(unrolled(model.cfg)), unstack_collections(variables, plan)
  m = _model_section(model.cfg)
  model_type = model_type or infer_model_type(m)
  arch = _arch(model_type)
  hf_config = arch.hf_config(m)
  flat = traverse_util.flatten_dict({k: v for k, v in nn.meta.unbox(variables).items() if k in COLLECTIONS})
  flat = {path: v for path, v in flat.items() if not path[1].startswith("mtp_")}  # see _model_section
  entries = _entries(arch, m)
  _check_cover(entries, flat, "save")

  param_dtype = np.dtype(DTYPES[m.param_dtype])
  target = np.dtype(DTYPES[dtype or m.param_dtype])

  def tensors():
    for path, entry in entries.items():
      array = np.array(jax.device_get(flat[path]))
      array = array.astype(target) if array.dtype == param_dtype else array
      yield from zip(entry.hf, LAYOUTS.get(entry.layout).split(array, entry))
    yield from arch.constant_tensors(m).items()

  return hf_config, tensors()


def save(model, variables, directory: str, model_type: str | None = None, dtype: str | None = None,
         max_shard_bytes: int = 5 * 2**30) -> list[str]:
  """Writes ``config.json`` and safetensors (sharded past ``max_shard_bytes``) that
  ``transformers``' ``from_pretrained`` loads; returns the weight files written.

  ``model_type``: the HF architecture (inferred from the config when None);
  ``dtype``: the stored floating dtype (default: ``model.param_dtype``).
  """
  hf_config, tensors = hf_tensors(model, variables, model_type, dtype)
  hf_config["dtype"] = dtype or model.cfg.param_dtype
  files = write_checkpoint(directory, tensors, max_shard_bytes)
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump(hf_config, f, indent=2, sort_keys=True)
  return files


# ------------------------------------------------------------- workdirs (CLI)

WORKDIR_CONFIG = '''"""Written by `moejax convert`: the config of a converted checkpoint (config.json here).

  moejax train --config {workdir}/config.py --workdir {workdir}
  moejax eval  --config {workdir}/config.py --workdir {workdir}
"""

import os

from moejax.interop.hf import workdir_config


def get_config(arg=None):
  return workdir_config(os.path.dirname(os.path.abspath(__file__)))
'''


def workdir_config(workdir: str) -> ml_collections.ConfigDict:
  """The config saved in ``workdir/config.json`` (what ``moejax convert`` wrote)."""
  with open(os.path.join(workdir, "config.json")) as f:
    saved = json.load(f)
  cfg = config_lib.base_config()
  apply_config(cfg, saved, source=os.path.join(workdir, "config.json"))
  return cfg


def _copy_tokenizer(src: str, dst: str) -> list[str]:
  copied = [n for n in TOKENIZER_FILES if os.path.exists(os.path.join(src, n))]
  if copied:
    os.makedirs(dst, exist_ok=True)
    for n in copied:
      shutil.copy2(os.path.join(src, n), os.path.join(dst, n))
  return copied


def convert_from_hf(hf_dir: str, workdir: str, dtype: str = "float32", config_overrides=None, devices=None) -> str:
  """HF checkpoint -> a moejax workdir (config.json, config.py, tokenizer/, checkpoints/0).

  ``moejax train --config WORKDIR/config.py --workdir WORKDIR`` fine-tunes from it.
  Returns the workdir's config.py path.
  """
  from moejax.checkpoint import Checkpointer
  from moejax.train import Experiment, TrainState

  with open(os.path.join(hf_dir, "config.json")) as f:
    hf_config = json.load(f)
  cfg = config_from_hf(hf_config, training=True)
  cfg.model.dtype = cfg.model.param_dtype = dtype
  if config_overrides:
    config_overrides(cfg)
  copied = _copy_tokenizer(hf_dir, os.path.join(workdir, "tokenizer"))
  tokenizer = next((n for n in ("tokenizer.json", "tokenizer.model") if n in copied), None)
  if tokenizer:
    cfg.data.tokenizer = os.path.abspath(os.path.join(workdir, "tokenizer", tokenizer))
    log.info("copied tokenizer files %s to %s/tokenizer", copied, workdir)
  else:
    log.warning("no tokenizer files in %s (nothing is downloaded): data.tokenizer stays %r; set "
                "--config.data.tokenizer=PATH to the model's tokenizer.json before training.", hf_dir, cfg.data.tokenizer)
    from moejax.data import tokenizer_vocab_size

    vocab = tokenizer_vocab_size(cfg.data.tokenizer)
    if cfg.model.vocab_size < vocab:  # the embedding's rows are fixed by the checkpoint: only the tokenizer can change
      raise config_lib.ConfigError(
          f"{hf_dir}: the checkpoint's vocabulary (vocab_size={cfg.model.vocab_size}) is smaller than the "
          f"{cfg.data.tokenizer!r} tokenizer's {vocab} ids, so the workdir could not train; put the model's own "
          f"tokenizer.json (or tokenizer.model) next to its config.json. hf.load reads it without a tokenizer.")
  exp = Experiment(cfg, devices)
  shardings = exp.state_shardings
  variables = load_variables(hf_dir, exp.model, hf_config, shardings={"params": shardings.params,
                                                                     **shardings.model_state})
  params = variables.pop("params")
  with exp._context():
    opt_state = jax.jit(exp.tx.init, out_shardings=shardings.opt_state)(params)
  zero = jax.numpy.zeros((), jax.numpy.int32)
  state = TrainState(step=zero, params=params, opt_state=opt_state, model_state=variables, nonfinite_steps=zero)
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config_lib.to_json(cfg))
  config_py = os.path.join(workdir, "config.py")
  with open(config_py, "w") as f:
    f.write(WORKDIR_CONFIG.format(workdir=workdir))
  ckpt = Checkpointer(workdir, keep=cfg.train.keep_checkpoints, async_save=False)
  ckpt.save(0, state, exp.data_iterator("train"))
  ckpt.wait()
  ckpt.close()
  return config_py


def convert_to_hf(workdir: str, out_dir: str, model_type: str | None = None, dtype: str | None = None,
                  devices=None) -> list[str]:
  """The newest checkpoint of a moejax workdir -> an HF checkpoint directory."""
  from moejax.train import load_checkpoint

  cfg = workdir_config(workdir)
  config_to_hf(cfg, model_type)  # a model HF cannot express fails here, before the checkpoint is read
  exp, step, state = load_checkpoint(cfg, workdir, devices)
  files = save(exp.model, {"params": state.params, **state.model_state}, out_dir, model_type, dtype)
  copied = _copy_tokenizer(os.path.join(workdir, "tokenizer"), out_dir)
  if not copied:
    log.warning("no tokenizer files in %s/tokenizer: %s has weights and config only", workdir, out_dir)
  log.info("wrote step %d of %s to %s (%s)", step, workdir, out_dir, ", ".join(files))
  return files
