"""Model FLOP accounting (moejax/flops.py) against hand counts, brute-force masks and XLA's cost analysis."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax import flops
from moejax.config import base_config
from moejax.models import build_model

T = 96


def _model(**fields):
  m = base_config().model
  attention = fields.pop("attention", {})
  moe = fields.pop("moe", {})
  m.update(fields)
  m.attention.update(attention)
  m.moe.update(moe)
  return m


def test_dense_gpt_matches_the_textbook_count():
  """6 N per token for training, N = the matrices (attention 4 D^2 with H Dh = D and no GQA, SwiGLU 3 D F,
  the head D V), plus causal attention 6 L D (T + 1): scores and values, 2 D each per visible key, x 3."""
  L, D, F, V = 3, 64, 160, 320
  m = _model(num_layers=L, d_model=D, num_heads=4, num_kv_heads=4, ffn_dim=F, vocab_size=V)
  n = L * (4 * D * D + 3 * D * F) + D * V
  want = 6 * n + 6 * L * D * (T + 1)
  got = flops.model_flops(m, T)
  assert got.train == pytest.approx(want, rel=1e-12)
  assert got.head == 2 * D * V and got.remat_recompute == 0


def test_moe_counts_the_routed_experts_a_token_visits_and_remat_separately():
  D, E, F, k, shared = 64, 8, 32, 2, 1
  m = _model(num_layers=2, d_model=D, num_heads=4, num_kv_heads=2, ffn_dim=96, mlp_types=("dense", "moe"),
             remat=("none", "full"), moe=dict(num_experts=E, top_k=k, expert_ffn_dim=F, num_shared=shared))
  dh = D // 4
  attention_weights = 2 * (D * 4 * dh + 2 * D * 2 * dh + 4 * dh * D)
  dense_mlp = 2 * 3 * D * 96
  moe_mlp = 2 * (D * E + 3 * D * F * shared + 3 * D * F * k)  # router + shared + the top-k experts
  got = flops.model_flops(m, T)
  assert got.weights == pytest.approx(2 * attention_weights + dense_mlp + moe_mlp, rel=1e-12)
  layer_1 = attention_weights + moe_mlp + flops.attention_flops(m, "dense", T)
  assert got.by_layer["layer_1 (dense, moe)"] == pytest.approx(layer_1, rel=1e-12)
  assert got.remat_recompute == pytest.approx(layer_1, rel=1e-12)


def _pairs(allowed) -> float:
  """Mean over queries of the keys a brute-force mask allows."""
  return sum(1 for t in range(T) for s in range(T) if allowed(t, s)) / T


@pytest.mark.parametrize("attention_type", ["dense", "sliding", "mla", "dsa", "swa", "csa", "hca"])
def test_attention_counts_equal_the_pairs_of_the_brute_force_masks(attention_type):
  a = dict(window=16, csa_ratio=4, hca_ratio=32, index_topk=8, q_lora_rank=32, index_heads=2, index_head_dim=8,
           qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16)
  m = _model(d_model=64, num_heads=4, num_kv_heads=2, attention=a)
  h, dh = 4, 16
  causal = lambda t, s: s <= t
  window = lambda t, s: t - a["window"] < s <= t
  entry_seen = lambda ratio: lambda t, j: (j + 1) * ratio - 1 <= t  # entry j pools tokens [j m, (j + 1) m)
  topk = lambda allowed: sum(min(a["index_topk"], sum(allowed(t, s) for s in range(T))) for t in range(T)) / T
  mla = 2 * h * (16 + 8 + 16)
  indexer = 2 * 2 * 8
  want = {
      "dense": 4 * h * dh * _pairs(causal),
      "sliding": 4 * h * dh * _pairs(window),
      "mla": mla * _pairs(causal),
      "dsa": indexer * _pairs(causal) + mla * topk(causal),
      "swa": 4 * h * dh * _pairs(window),
      "csa": 4 * h * dh * (_pairs(window) + topk(entry_seen(4))) + indexer * _pairs(entry_seen(4)),
      "hca": 4 * h * dh * (_pairs(window) + _pairs(entry_seen(32))),
  }[attention_type]
  assert flops.attention_flops(m, attention_type, T) == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("fields", [dict(num_layers=2, d_model=64, num_heads=4, num_kv_heads=2, ffn_dim=192),
                                    dict(num_layers=2, d_model=128, num_heads=4, num_kv_heads=4, ffn_dim=256,
                                         mlp_types=("dense",), tie_embeddings=False)])
def test_forward_agrees_with_xla_cost_analysis(fields):
  """XLA counts every operation of the compiled forward; its matmuls are ours except that the
  [T, T] kernel computes masked scores too (so compare with all T keys) and elementwise work is extra."""
  m = _model(attention=dict(implementation="xla"), **fields)
  model = build_model(m)
  tokens = jnp.zeros((1, T), jnp.int32)
  params = jax.eval_shape(model.init, jax.random.key(0), tokens)
  xla = jax.jit(model.apply).lower(params, tokens).compile().cost_analysis()
  xla = (xla[0] if isinstance(xla, list) else xla)["flops"]
  f = flops.model_flops(m, T)
  unmasked = 4 * m.num_heads * (m.d_model // m.num_heads) * T * m.num_layers  # every key, per token
  ours = (f.weights + f.head + unmasked) * T
  assert 0.95 * xla <= ours <= xla, (ours, xla)  # measured: 1.5-3% below (softmax, norms, rope)


def test_peak_flops_by_device_kind():
  assert flops.peak_flops("TPU v5 lite") == 197e12
  assert flops.peak_flops("TPU v5p") == 459e12
  assert flops.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
  assert flops.peak_flops("cpu") is None
  assert flops.mfu(6e9, 1e4, 2, 1e14) == pytest.approx(6e9 * 1e4 / 2e14)


def test_visible_keys_is_the_mean_of_the_causal_counts():
  assert flops.visible_keys(4) == np.mean([1, 2, 3, 4])
  assert flops.visible_keys(6, window=2) == np.mean([1, 2, 2, 2, 2, 2])
  assert flops.visible_keys(8, ratio=4, topk=1) == np.mean([0, 0, 0, 1, 1, 1, 1, 1])


def test_a_run_logs_model_tflops_mfu_and_writes_a_profile(tmp_path):
  """metrics.jsonl: model_tflops_per_s = train FLOPs per token x tokens/s per device, and MFU against
  train.peak_flops (no MFU where the peak is unknown, as on CPU); train.profile_steps writes a trace."""
  import glob
  import json

  from moejax.train import train
  from tests.test_train import small_train_cfg

  cfg = small_train_cfg(steps=3)
  cfg.train.update(log_every=1, peak_flops=1e12, profile_steps=(2, 2))
  cfg.mesh.update(data=1)
  train(cfg, str(tmp_path), devices=jax.devices()[:1])
  records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  per_token = flops.model_flops(cfg.model, cfg.data.seq_len).train
  for r in records[1:]:
    assert r["model_tflops_per_s"] == pytest.approx(per_token * r["tokens_per_s"] / 1e12, rel=1e-6)
    assert r["mfu"] == pytest.approx(per_token * r["tokens_per_s"] / 1e12, rel=1e-6)
  assert glob.glob(str(tmp_path / "profile" / "**" / "*.xplane.pb"), recursive=True)


def test_cpu_has_no_peak_so_no_mfu():
  from moejax.metrics import Throughput

  assert flops.peak_flops(jax.devices()[0].device_kind) is None
  assert Throughput(6e6, 1, None).metrics(1000.0) == {"model_tflops_per_s": 6e9 / 1e12}


def test_a_model_without_a_flop_count_logs_no_mfu_instead_of_failing(caplog, monkeypatch):
  """A user's layer type moejax has no count for: the run trains and logs no MFU (tests/test_extending.py)."""
  from moejax import train as train_lib
  from tests.test_train import small_train_cfg

  cfg = small_train_cfg()
  assert train_lib.throughput(cfg, 1).train_flops_per_token == flops.model_flops(cfg.model, cfg.data.seq_len).train
  with pytest.raises(KeyError, match="no FLOP count for attention type 'not_counted'"):
    flops.attention_flops(cfg.model, "not_counted", T)
  counted = flops.attention_flops
  monkeypatch.setattr(train_lib.flops, "attention_flops", lambda m, t, n: counted(m, "not_counted", n))
  assert train_lib.throughput(cfg, 1) is None
  assert "MFU and model TFLOP/s are not logged" in caplog.text
