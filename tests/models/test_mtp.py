"""Multi-token prediction: shifted targets, the module against a direct
reference, causality and document isolation with mHC on, and the training
objective against a dense whole-batch reference."""

import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.linen import meta
from ml_collections import FrozenConfigDict

from moejax.layers.hyper import HyperHead, expand_streams
from moejax.models import Block, Transformer
from moejax.models.mtp import mtp_targets
from moejax.train import Experiment, train
from tests.helpers import tiny_model_cfg
from tests.test_train import small_train_cfg


def _cfg(streams=1, depth=2, **overrides):
  cfg = tiny_model_cfg(**overrides).as_configdict()
  cfg.hc.streams = streams
  cfg.mtp.depth = depth
  return FrozenConfigDict(cfg)


def _rms(x, scale, eps=1e-6):
  return x / np.sqrt(np.mean(x ** 2, axis=-1, keepdims=True) + eps) * scale


def test_shifted_targets_match_a_per_position_loop():
  rng = np.random.default_rng(0)
  b, t, depth = 3, 13, 3
  targets = rng.integers(0, 50, size=(b, t))
  weights = rng.choice([0.0, 1.0, 0.5], size=(b, t)).astype(np.float32)
  segments = np.array([[1] * 4 + [2] * 6 + [3] * 3,
                       [1] * 13,
                       [1] * 2 + [2] * 8 + [0] * 3])
  weights[2, 10:] = 0.0  # padding carries no weight
  got_y, got_w = mtp_targets(jnp.asarray(targets), jnp.asarray(weights), jnp.asarray(segments), depth)
  chex.assert_shape((got_y, got_w), [(b, depth, t)] * 2)
  for i in range(b):
    for k in range(1, depth + 1):
      for p in range(t):
        valid = p + k < t and segments[i, p + k] == segments[i, p]
        assert float(got_w[i, k - 1, p]) == (weights[i, p + k] if valid else 0.0), (i, k, p)
        if valid:
          assert int(got_y[i, k - 1, p]) == targets[i, p + k]
  empty_y, empty_w = mtp_targets(jnp.asarray(targets), jnp.asarray(weights), jnp.asarray(segments), 0)
  chex.assert_shape((empty_y, empty_w), [(b, 0, t)] * 2)


@pytest.mark.parametrize("streams", [1, 2])
def test_mtp_modules_match_a_direct_reference(streams):
  cfg = _cfg(streams, depth=2, tie_embeddings=True, attention_types=("linear_test",), mlp_types=("linear_test",))
  cfg = FrozenConfigDict({**cfg.as_configdict().to_dict(), "mtp": {**cfg.mtp, "attention_type": "linear_test",
                                                                    "mlp_type": "linear_test"}})
  model = Transformer(cfg)
  tokens = np.random.default_rng(1).integers(0, 64, size=(2, 9))
  positions = np.broadcast_to(np.arange(9), (2, 9))
  segments = np.ones((2, 9), np.int32)
  params = meta.unbox(jax.jit(model.init)(jax.random.key(0), tokens))["params"]
  logits, hidden = jax.jit(lambda p, x: (model.apply({"params": p}, x), model.apply({"params": p}, x,
                                                                                     return_hidden=True)))(params, tokens)
  chex.assert_shape(hidden.mtp, [(2, 9, 32)] * 2)
  np.testing.assert_allclose(logits, np.einsum("btd,dv->btv", hidden.x_BxTxD, hidden.head_DxV), atol=1e-5)

  embed = np.asarray(params["embed"])
  h_prev = np.asarray(hidden.x_BxTxD)
  for k in (1, 2):
    p = params[f"mtp_{k}"]
    ids = np.concatenate([tokens[:, k:], np.zeros((2, k), tokens.dtype)], axis=1)  # t_{i+k}
    e = _rms(embed[ids], p["embed_norm"]["scale"])
    h = _rms(h_prev, p["hidden_norm"]["scale"])
    x = np.concatenate([e, h], axis=-1) @ np.asarray(p["eh_proj"])
    block_out = Block(cfg, "linear_test", "linear_test").apply({"params": p["block"]}, expand_streams(jnp.asarray(x), streams),
                                                   positions, segments, ids)
    if streams > 1:
      block_out = HyperHead(cfg).apply({"params": p["hc_head"]}, block_out)
    want = _rms(np.asarray(block_out), p["final_norm"]["scale"])
    np.testing.assert_allclose(hidden.mtp[k - 1], want, atol=2e-5, rtol=2e-5)
    h_prev = want


def test_mtp_modules_match_plain_numpy_math():
  """Trunk, MTP modules and logits written out in NumPy from the parameters (no moejax module applied):
  linear sublayers, plain residual; ``h_k = norm(block(concat(norm(E[t_{i+k}]), norm(h_{k-1})) W_eh))``."""
  cfg = _cfg(1, depth=2, tie_embeddings=False, attention_types=("linear_test",), mlp_types=("linear_test",))
  cfg = FrozenConfigDict({**cfg.as_configdict().to_dict(), "mtp": {**cfg.mtp, "attention_type": "linear_test",
                                                                    "mlp_type": "linear_test"}})
  model = Transformer(cfg)
  b, t = 2, 9
  tokens = np.random.default_rng(3).integers(0, 64, size=(b, t))
  params = meta.unbox(jax.jit(model.init)(jax.random.key(1), tokens))["params"]
  params = jax.tree.map(lambda x: x + 0.1 * np.random.default_rng(x.size).normal(size=x.shape), params)  # norms != 1
  logits, hidden = jax.jit(lambda p, x: (model.apply({"params": p}, x), model.apply({"params": p}, x,
                                                                                     return_hidden=True)))(params, tokens)
  p64 = jax.tree.map(lambda x: np.asarray(x, np.float64), params)

  def block(x_BxTxD, p):  # x + norm(x) W_attn, then h + norm(h) W_mlp
    h = x_BxTxD + _rms(x_BxTxD, p["attention_norm"]["scale"]) @ p["attention"]["w"]
    return h + _rms(h, p["mlp_norm"]["scale"]) @ p["mlp"]["w"]

  x = p64["embed"][tokens]
  for i in range(cfg.num_layers):
    x = block(x, p64[f"layer_{i}"])
  x = _rms(x, p64["final_norm"]["scale"])
  np.testing.assert_allclose(hidden.x_BxTxD, x, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(logits, x @ p64["lm_head"], atol=1e-4, rtol=1e-5)
  h_prev = x
  for k in (1, 2):
    p = p64[f"mtp_{k}"]
    ids = np.concatenate([tokens[:, k:], np.zeros((b, k), tokens.dtype)], axis=1)  # t_{i+k}, 0 past the end
    eh = np.concatenate([_rms(p64["embed"][ids], p["embed_norm"]["scale"]), _rms(h_prev, p["hidden_norm"]["scale"])],
                        axis=-1)
    h_prev = _rms(block(eh @ p["eh_proj"], p["block"]), p["final_norm"]["scale"])
    np.testing.assert_allclose(hidden.mtp[k - 1], h_prev, atol=2e-5, rtol=2e-5)


def test_mhc_and_mtp_are_causal_and_keep_packed_documents_apart():
  """Main logits at t never see tokens after t; MTP depth k at t sees tokens
  up to t+k only; a packed document gives what it gives alone."""
  cfg = _cfg(streams=2, depth=2, num_layers=1)
  model = Transformer(cfg)
  tokens = np.random.default_rng(2).integers(0, 64, size=(2, 12))
  params = meta.unbox(jax.jit(model.init)(jax.random.key(0), tokens))["params"]
  run = jax.jit(lambda x, pos, seg: model.apply({"params": params}, x, pos, seg, return_hidden=True))
  pos = np.broadcast_to(np.arange(12), (2, 12))
  seg = np.ones((2, 12), np.int32)
  base = run(tokens, pos, seg)
  for s in (0, 5, 11):
    changed = tokens.copy()
    changed[:, s] = (changed[:, s] + 1) % 64
    out = run(changed, pos, seg)
    np.testing.assert_array_equal(out.x_BxTxD[:, :s], base.x_BxTxD[:, :s])
    assert not np.allclose(out.x_BxTxD[:, s], base.x_BxTxD[:, s])
    for k in (1, 2):
      np.testing.assert_array_equal(out.mtp[k - 1][:, :max(s - k, 0)], base.mtp[k - 1][:, :max(s - k, 0)])
      if s - k >= 0:  # position s-k reads t_s through the MTP embedding
        assert not np.allclose(out.mtp[k - 1][:, s - k], base.mtp[k - 1][:, s - k])

  seg = np.array([[1] * 5 + [2] * 7] * 2)
  pos = np.array([list(range(5)) + list(range(7))] * 2)
  packed = run(tokens, pos, seg)
  for lo, hi in ((0, 5), (5, 12)):  # each document alone, at the start of a row padded with segment 0
    n = hi - lo
    alone_tokens = np.concatenate([tokens[:, lo:hi], np.zeros((2, 12 - n), tokens.dtype)], axis=1)
    alone_seg = np.concatenate([np.ones((2, n), np.int32), np.zeros((2, 12 - n), np.int32)], axis=1)
    alone = run(alone_tokens, np.broadcast_to(np.arange(12), (2, 12)), alone_seg)
    chex.assert_trees_all_close(packed.x_BxTxD[:, lo:hi], alone.x_BxTxD[:, :n], atol=1e-5)
    for k in (1, 2):  # positions whose depth-k target is still in the document
      chex.assert_trees_all_close(packed.mtp[k - 1][:, lo:hi - k], alone.mtp[k - 1][:, :n - k], atol=1e-5)


def _mtp_train_cfg(source, streams, **train_fields):
  cfg = small_train_cfg(source, **train_fields)
  cfg.model.update(num_layers=1, d_model=32, ffn_dim=64)
  cfg.model.hc.streams = streams
  cfg.model.mtp.update(depth=2, loss_weight=0.5)
  cfg.data.update(seq_len=32, task_length=12)  # copy: several documents per row
  return cfg


@pytest.mark.multidevice
def test_sharded_train_step_objective_matches_a_dense_whole_batch_reference(devices):
  """loss, mtp_loss_k, total_loss and the gradient norm of a sharded step with
  gradient accumulation equal a direct single-device full-logits computation
  on the whole batch."""
  cfg = _mtp_train_cfg("copy", 2, grad_accum_steps=2)
  cfg.mesh.update(data=2, fsdp=2, tensor=2)
  exp = Experiment(cfg, devices)
  state, batch = exp.init_state(), next(exp.data_iterator("train"))
  params = jax.device_get(state.params)
  _, metrics = exp.train_step(state, batch)
  b = {k: jnp.asarray(v) for k, v in batch.items()}

  def objective(params):
    hidden = exp.model.apply({"params": params}, b["inputs"], b["positions"], b["segment_ids"], return_hidden=True)

    def mean_ce(h_BxTxD, targets_BxT, weights_BxT):
      logp = jax.nn.log_softmax(jnp.einsum("BTD,DV->BTV", h_BxTxD, hidden.head_DxV), axis=-1)
      ce = -jnp.take_along_axis(logp, targets_BxT[..., None], axis=-1)[..., 0]
      return jnp.sum(ce * weights_BxT) / jnp.sum(weights_BxT)

    y, w = mtp_targets(b["targets"], b["weights"], b["segment_ids"], 2)
    main = mean_ce(hidden.x_BxTxD, b["targets"], b["weights"])
    mtp = [mean_ce(hidden.mtp[k], y[:, k], w[:, k]) for k in range(2)]
    return main + 0.5 / 2 * (mtp[0] + mtp[1]), (main, mtp)

  (total, (main, mtp)), grads = jax.jit(jax.value_and_grad(objective, has_aux=True))(params)
  np.testing.assert_allclose(metrics["loss"], main, rtol=1e-5)
  np.testing.assert_allclose([metrics["mtp_loss_1"], metrics["mtp_loss_2"]], mtp, rtol=1e-5)
  np.testing.assert_allclose(metrics["total_loss"], total, rtol=1e-5)
  np.testing.assert_allclose(metrics["grad_norm"], jnp.sqrt(sum(jnp.sum(g ** 2) for g in jax.tree.leaves(grads))),
                             rtol=1e-4)
  assert float(jnp.sum(jnp.abs(grads["mtp_2"]["eh_proj"]))) > 0


@pytest.mark.slow
def test_training_with_mhc_and_mtp_lowers_the_loss(tmp_path, devices):
  cfg = _mtp_train_cfg("stdlib", 2, steps=60, log_every=10, eval_every=60, eval_batches=1, checkpoint_every=60)
  cfg.optim.warmup_steps = 10
  train(cfg, str(tmp_path), devices[:1])
  with open(tmp_path / "metrics.jsonl") as f:
    records = [json.loads(line) for line in f]
  first, last = records[0], records[-1]
  for key in ("loss", "mtp_loss_1", "mtp_loss_2"):
    assert last[key] < 0.75 * first[key], (key, first[key], last[key])
  assert {"eval_loss", "eval_mtp_loss_1", "eval_mtp_loss_2"} <= last.keys()
