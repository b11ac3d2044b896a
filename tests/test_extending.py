"""Components plug in from outside the framework: a registered MLP with sown metrics and
non-trainable state; and the one-file extensions of configs/extend (an attention type that
decodes, an optimizer with validated options, a data source), each run end to end."""

from pathlib import Path
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax.linen import meta

from moejax.config import ConfigError, base_config, load_config
from moejax.data import SOURCES, get_tokenizer
from moejax.generate import check_decodable, generate_text
from moejax.layers.attention.registry import ATTENTION
from moejax.layers.mlp import MLP, SwiGLU
from moejax.layers.state import STATE_UPDATES
from moejax.optim import OPTIMIZERS, build_optimizer
from moejax.train import Experiment, load_checkpoint, train
from moejax.validation import validate
from tests.test_config import set_fields
from tests.test_train import small_train_cfg

pytestmark = pytest.mark.slow  # scheduled first (tests/conftest.py)


@MLP.register("counting_swiglu")
class CountingSwiGLU(nn.Module):
  """SwiGLU that counts the tokens it has seen in a ``token_count`` collection."""

  cfg: object

  @nn.compact
  def __call__(self, x_BxTxD, token_ids_BxT):
    count = self.variable("token_count", "seen", lambda: jnp.zeros((), jnp.float32))
    self.sow("stats", "tokens", jnp.asarray(x_BxTxD.shape[0] * x_BxTxD.shape[1], jnp.float32))
    self.sow("metrics", "count_before", count.value)
    return SwiGLU(self.cfg, name="inner")(x_BxTxD, token_ids_BxT)


@STATE_UPDATES.register("token_count")
def _add_tokens(tree, stats, model_cfg, step):
  return {layer: {"mlp": {"seen": sub["mlp"]["seen"] + stats[layer]["mlp"]["tokens"][0]}}
          for layer, sub in tree.items()}


def test_registered_mlp_state_update_and_metrics(devices):
  cfg = small_train_cfg()
  cfg.model.mlp_types = ("dense", "counting_swiglu")
  cfg.train.grad_accum_steps = 2
  exp = Experiment(cfg, devices[:1])
  state, data = exp.init_state(), exp.data_iterator("train")
  tokens_per_step = cfg.train.batch_size * cfg.data.seq_len
  for step in range(3):
    state, metrics = exp.train_step(state, next(data))
    assert float(metrics["layer_1/mlp/count_before"]) == step * tokens_per_step
  seen = state.model_state["token_count"]["layer_1"]["mlp"]["seen"]
  np.testing.assert_equal(float(seen), 3 * tokens_per_step)
  assert "layer_0" not in state.model_state["token_count"]


# ----------------------------------------------------------------------------- one-file extensions (configs/extend)

EXTEND = Path(__file__).parents[1] / "configs" / "extend"


@pytest.fixture
def isolated_registries(monkeypatch):
  """User entries registered by a test (loading a configs/extend file) vanish after it, so the
  built-in lists other tests' messages name stay as they are."""
  for registry in (ATTENTION, OPTIMIZERS, SOURCES):
    monkeypatch.setattr(registry, "_entries", dict(registry._entries))
    monkeypatch.setattr(registry, "_declared", dict(registry._declared))


def _load(name: str, **fields):
  return set_fields(load_config(str(EXTEND / name)), **fields)


def _softcap_reference(x, w_q, w_k, w_v, w_o, segment_ids, cap):
  """NumPy: GQA with soft-capped logits over same-document previous keys (rope off: positions 0)."""
  b, t, _ = x.shape
  h, kv = w_q.shape[1], w_k.shape[1]
  q, k, v = (np.einsum("btd,dhk->bthk", x, w) for w in (w_q, w_k, w_v))
  k, v = np.repeat(k, h // kv, axis=2), np.repeat(v, h // kv, axis=2)
  logits = np.einsum("bthk,bshk->bhts", q, k) / np.sqrt(q.shape[-1])
  seen = np.tril(np.ones((t, t), bool))[None] & (segment_ids[:, :, None] == segment_ids[:, None, :])
  seen |= np.eye(t, dtype=bool)[None]  # padding sees itself
  max_logit = np.where(seen[:, None], logits, -np.inf).max(axis=(0, 2, 3))
  capped = np.where(seen[:, None], cap * np.tanh(logits / cap), -np.inf)
  probs = np.exp(capped - capped.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  return np.einsum("bthk,hkd->btd", np.einsum("bhts,bshk->bthk", probs, v), w_o), max_logit


def test_user_attention_layer_matches_numpy_and_sows_max_logits(isolated_registries):
  cfg = _load("my_attention.py", model__attention__track_max_logit=True, model__attention__softcap=2.0)
  layer = ATTENTION.get("softcap")(cfg=ml_collections.FrozenConfigDict(cfg.model))
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 6, cfg.model.d_model)).astype(np.float32)
  segment_ids = np.array([[1, 1, 1, 2, 2, 0], [1, 1, 1, 1, 1, 1]], np.int32)
  positions = np.zeros((2, 6), np.int32)
  params = meta.unbox(layer.init(jax.random.key(0), x, positions, segment_ids))["params"]
  params = jax.tree.map(lambda p: 8 * p, params)  # logits of a few units, above the cap
  y, stats = layer.apply({"params": params}, x, positions, segment_ids, mutable=["max_stats"])
  want_y, want_max = _softcap_reference(x, *(np.asarray(params[n]) for n in ("w_q", "w_k", "w_v", "w_o")),
                                        segment_ids, cfg.model.attention.softcap)
  assert want_max.max() > 2.0  # the tanh is far from linear there
  np.testing.assert_allclose(np.asarray(y), want_y, rtol=2e-4, atol=2e-4)
  np.testing.assert_allclose(np.asarray(stats["max_stats"]["max_logit"][0]), want_max, rtol=1e-4)


def test_user_attention_trains_and_generates_like_full_forwards(tmp_path, isolated_registries):
  """`moejax train` then `moejax generate` with configs/extend/my_attention.py: the cached
  continuation equals argmax decoding by full forward passes."""
  from tests.test_generate import _greedy_reference

  cfg = _load("my_attention.py", train__steps=2, train__checkpoint_every=2, train__log_every=1)
  validate(cfg, num_devices=1)
  workdir = str(tmp_path / "softcap")
  train(cfg, workdir, devices=jax.devices()[:1])
  text = generate_text(cfg, workdir, ["def "], max_new_tokens=6, temperature=0.0)[0]
  exp, _, state = load_checkpoint(cfg, workdir, devices=jax.devices()[:1])
  tok = get_tokenizer(cfg.data.tokenizer)
  prompt = np.array([tok.bos_id, *tok.encode("def ")], np.int32)
  want = list(_greedy_reference(exp.model, {"params": state.params, **state.model_state}, prompt, 6))
  want = want[:want.index(tok.eos_id)] if tok.eos_id in want else want
  assert text == tok.decode(want)


def test_user_attention_is_checked_like_a_built_in(isolated_registries):
  cfg = _load("my_attention.py", optim__qk_clip_tau=50.0, model__attention__track_max_logit=True)
  validate(cfg, num_devices=1)  # QK-clip: softcap declares its (query, key) projections
  cfg.model.attention_types = ("softcap", "mla")
  with pytest.raises(ConfigError, match=r"which only \['dense', 'sliding', 'softcap'\] layers have"):
    validate(cfg, num_devices=1)
  cfg = _load("my_attention.py", model__attention__softcap=0.0)
  with pytest.raises(ConfigError, match=r"model.attention.softcap=0.0 must be > 0"):
    validate(cfg, num_devices=1)


def test_user_optimizer_owns_its_validated_options(isolated_registries):
  cfg = _load("my_optimizer.py")
  validate(cfg, num_devices=1)
  bad = _load("my_optimizer.py", optim__signum__momentum=1.5)
  with pytest.raises(ConfigError, match=r"optim.signum.momentum=1.5 must be in \[0, 1\)"):
    validate(bad, num_devices=1)
  missing = base_config()
  missing.optim.name = "signum"
  with pytest.raises(ConfigError, match=r"optim.name='signum' reads optim.signum, which this config lacks"):
    validate(missing, num_devices=1)


def test_user_optimizer_updates_follow_the_signum_formula(isolated_registries):
  """Three steps against sign(EMA of the gradients) written out in NumPy (weight decay on matrices)."""
  cfg = _load("my_optimizer.py", optim__weight_decay=0.5, optim__grad_clip_norm=0.0)
  tx, schedule = build_optimizer(cfg.optim, total_steps=20)
  rng = np.random.default_rng(1)
  params = {"w": rng.normal(size=(3, 4)).astype(np.float32), "b": rng.normal(size=(4,)).astype(np.float32)}
  state = tx.init(params)
  beta, m = cfg.optim.signum.momentum, {k: np.zeros_like(v) for k, v in params.items()}
  for step in range(3):
    grads = {k: rng.normal(size=v.shape).astype(np.float32) for k, v in params.items()}
    updates, state = tx.update(grads, state, params)
    lr = float(schedule(step))
    for k in params:
      m[k] = beta * m[k] + (1 - beta) * grads[k]
      decay = 0.5 * params[k] if params[k].ndim >= 2 else 0.0
      np.testing.assert_allclose(np.asarray(updates[k]), -lr * (np.sign(m[k]) + decay), rtol=1e-6, atol=1e-7)
    params = {k: params[k] + np.asarray(updates[k]) for k in params}


def test_user_data_source_documents_options_and_training(isolated_registries, devices):
  cfg = _load("my_source.py")
  validate(cfg, num_devices=1)
  tok = get_tokenizer(cfg.data.tokenizer)
  docs = SOURCES.get("addition")(cfg.data, "train", tok)
  for i in range(20):
    tokens, weights = docs[i]["tokens"], docs[i]["weights"]
    assert tokens[0] == tok.bos_id and tokens[-1] == tok.eos_id
    question, answer = tok.decode(tokens[1:-1]).split("=")
    a, b = (int(n) for n in question.split("+"))
    assert max(a, b) < 10 ** cfg.data.addition_digits and int(answer) == a + b
    np.testing.assert_array_equal(weights, [0.0] * (len(question) + 2) + [1.0] * (len(answer) + 1))
  with pytest.raises(ConfigError, match=r"data.addition_digits=0 must be in \[1, 18\]"):
    validate(_load("my_source.py", data__addition_digits=0), num_devices=1)
  cfg.train.update(steps=2, eval_every=0)
  exp = Experiment(cfg, devices[:1])
  state, data = exp.init_state(), exp.data_iterator("train")
  batch = next(data)
  assert set(np.asarray(batch["weights"]).ravel()) <= {0.0, 1.0}
  _, metrics = exp.train_step(state, batch)
  assert np.isfinite(float(metrics["loss"]))


def test_generation_and_context_parallelism_ask_the_entries(isolated_registries):
  """A user type without ``decode`` cannot generate; one declaring ``windowed`` gets the halo check."""

  @ATTENTION.register("windowed_no_decode")
  class WindowedNoDecode(nn.Module):
    windowed: ClassVar[bool] = True
    cfg: object

    def __call__(self, x_BxTxD, positions_BxT, segment_ids_BxT):
      return x_BxTxD

  cfg = base_config()
  cfg.mesh.update(data=1, context=8)  # 256 / 8 = 32 tokens per context shard < window 128
  validate(cfg, num_devices=8)  # dense layers: no window, no halo
  cfg.model.attention_types = ("windowed_no_decode",)
  with pytest.raises(ConfigError, match="model.attention.window=128 exceeds the 32 tokens of one context shard"):
    validate(cfg, num_devices=8)
  with pytest.raises(ConfigError, match="attention type 'windowed_no_decode' has no decode method"):
    check_decodable(cfg.model)
