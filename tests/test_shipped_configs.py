"""Every file in configs/ and every variant it documents: loads, validates at its shipped size, and trains
one step at a tiny override (small seq_len and batch; ``configs/small.py`` also narrower and shallower).

Variants that differ only in their data share the model they train: each distinct model is compiled once
and steps once per data variant. ``configs/distill_tiny.py``'s variants change the distillation recipe, not
the student: they are validated, and the student takes one plain step (tests/distill runs the recipe).
"""

import json
import pathlib

import jax
import numpy as np
import pytest

from moejax.config import INDEXER_STAGES, load_config
from moejax.validation import validate
from moejax.data import ShardedBatches
from moejax.layers.routers import ROUTER_RECIPES
from moejax.train import Experiment

pytestmark = pytest.mark.slow(minutes=10)  # on 2 cores; the longest modules start first (tests/conftest.py)

CONFIGS = pathlib.Path(__file__).resolve().parent.parent / "configs"
DATA = ("copy", "passkey", "mqar", "stdlib")

# file -> every argument its docstring / get_config accepts ("" = no argument); each token of a
# comma-separated grammar appears at least once.
VARIANTS = {
  "tiny.py": ["", "copy", "passkey", "mqar"],
  "tiny_mhc_mtp.py": ["", "copy", "passkey", "mqar"],
  "tiny_moe.py": ["", *ROUTER_RECIPES],
  "tiny_hybrid.py": ["", "sliding", "v4", "mla", "dsa", "mixed", "v4,passkey", "sliding,copy", "sliding,mqar",
                     "sliding,stdlib", *(f"dsa,{stage},passkey" for stage in INDEXER_STAGES)],
  "v4_tiny.py": ["", *DATA],
  "v4_1m.py": ["", "t=262144"],
  "distill_tiny.py": ["", "reverse", "cache", "on_policy", "labels", "cache,reverse"],
  "small.py": [""],
  "v4_flash.py": ["", "t=65536"],
}
# Not stepped on CPU, with the reason (still loaded and validated above).
NOT_STEPPED = {"v4_flash.py": "284B parameters: compiled for TPU slices by `moejax compile` (tests/test_aot.py); "
                              "its shape is v4_tiny's, which steps here"}
CASES = [(name, arg) for name, args in VARIANTS.items() for arg in args]
# The step runs at these sizes; v4_1m's length must stay a multiple of its 2048-token HCA ratio.
SEQ_LEN = {"v4_1m.py": 4096}
SMALL = dict(num_layers=2, d_model=96, ffn_dim=128)  # small.py keeps its 12 heads / 4 kv heads (head dim 8)


def _load(name: str, arg: str):
  return load_config(f"{CONFIGS / name}:{arg}" if arg else str(CONFIGS / name))


def test_every_config_file_is_listed():
  assert sorted(p.name for p in CONFIGS.glob("*.py")) == sorted(VARIANTS)


def test_listed_variants_cover_each_files_own_tables():
  """The variant tables the config files define (schedules, data, recipes) are all exercised above."""
  import importlib.util

  def module(name):
    spec = importlib.util.spec_from_file_location(f"shipped_{name[:-3]}", CONFIGS / name)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod

  tokens = lambda name: {t for arg in VARIANTS[name] for t in arg.split(",") if t}
  hybrid = module("tiny_hybrid.py")
  assert set(hybrid.SCHEDULES) | set(INDEXER_STAGES) | set(hybrid.DATA) <= tokens("tiny_hybrid.py")
  assert set(module("v4_tiny.py").DATA) <= tokens("v4_tiny.py")
  assert set(module("distill_tiny.py").VARIANTS) <= tokens("distill_tiny.py")
  assert set(ROUTER_RECIPES) <= tokens("tiny_moe.py")
  with pytest.raises(ValueError, match="'not_a_variant' is neither an option value nor a flag; known: schedule"):
    _load("tiny_hybrid.py", "not_a_variant")


@pytest.mark.parametrize("name,arg", CASES, ids=[f"{n}:{a}" if a else n for n, a in CASES])
def test_config_loads_and_validates_as_shipped(name, arg):
  cfg = _load(name, arg)
  validate(cfg, num_devices=1)
  assert cfg.train.steps > 0 and cfg.data.seq_len > 0


def _tiny(name: str, arg: str):
  cfg = _load(name, arg)
  with cfg.unlocked():
    if name == "small.py":
      cfg.model.update(SMALL)
    seq_len = SEQ_LEN.get(name, min(cfg.data.seq_len, 128))
    cfg.data.seq_len = seq_len
    if "task_length" in cfg.data and cfg.data.source != "stdlib":
      cfg.data.task_length = seq_len
    rows = max(2, len(cfg.distill.domains))  # distillation: one row per domain at least
    cfg.train.update(steps=1, batch_size=rows, grad_accum_steps=1, loss_chunk=min(cfg.train.loss_chunk, seq_len))
    cfg.mesh.update(data=1, fsdp=1)
  return cfg


def _model_key(cfg) -> str:
  """What the compiled step depends on: the same key, the same Experiment."""
  return json.dumps([cfg.model.to_dict(), cfg.optim.to_dict(), cfg.train.to_dict(), cfg.data.seq_len],
                    sort_keys=True, default=str)


@pytest.fixture(scope="module")
def experiments():
  """model key -> (Experiment on one device, its current state); states advance one step per use."""
  return {}


@pytest.mark.parametrize("name,arg", CASES, ids=[f"{n}:{a}" if a else n for n, a in CASES])
def test_config_trains_one_step_at_a_tiny_size(name, arg, experiments):
  if name in NOT_STEPPED:
    pytest.skip(NOT_STEPPED[name])
  cfg = _tiny(name, arg)
  validate(cfg, num_devices=1)
  key = _model_key(cfg)
  if key not in experiments:
    exp = Experiment(cfg, devices=jax.devices()[:1])
    experiments[key] = [exp, exp.init_state()]
  exp, state = experiments[key]
  data = ShardedBatches(cfg.data, split="train", global_batch=cfg.train.batch_size, seed=cfg.seed,
                        num_shards=cfg.data.shards)
  batch = next(data)
  step = int(state.step)
  state, metrics = exp.train_step(state, batch)
  experiments[key][1] = state
  assert int(state.step) == step + 1
  loss = float(metrics["loss"])
  # A first step from a fresh init: the loss is near the uniform-prediction loss ln(V) (no NaN, no blow-up).
  assert np.isfinite(loss) and 0 < loss < 2 * np.log(cfg.model.vocab_size), loss


def test_tiny_override_keeps_the_shipped_schedules():
  """The step test shrinks lengths and batches, never the per-layer schedules it is meant to cover."""
  for name, arg in CASES:
    if name in NOT_STEPPED:
      continue
    shipped, tiny = _load(name, arg), _tiny(name, arg)
    for field in ("attention_types", "mlp_types"):
      assert tiny.model[field] == shipped.model[field], (name, arg, field)
    if name != "small.py":
      assert tiny.model.num_layers == shipped.model.num_layers and tiny.model.d_model == shipped.model.d_model
