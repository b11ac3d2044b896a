"""Generation: cached decoding of whole models equals the full forward; sampling; the CLI."""

import functools
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.linen import meta

from moejax.config import ConfigError, base_config
from moejax.generate import check_decodable, init_cache, next_token, sample
from moejax.models.transformer import build_model
from tests.layers.test_attention_decode import DECODE

V = 64
# Mixed schedules: DeepSeek-V4-like (swa/hca/csa + 2 mHC streams + hash-MoE and MoE), 5 sliding : 1 dense, MLA/DSA.
SCHEDULES = {
    "v4": dict(attention_types=("swa", "hca", "csa"), mlp_types=("hash_moe", "moe", "moe"), hc={"streams": 2}),
    "mla_dsa": dict(attention_types=("mla", "dsa"), mlp_types=("dense", "moe")),
    "sliding5_dense1": dict(attention_types=("sliding",) * 5 + ("dense",)),
    "sliding_dense": dict(attention_types=("sliding", "dense")),  # the sampling tests' model
}


@functools.cache  # one init compile per schedule for the whole module
def _model(schedule: str):
  cfg = base_config().model
  overrides = dict(SCHEDULES[schedule])
  cfg.update(dict(num_layers=len(overrides["attention_types"]), d_model=32, num_heads=4, num_kv_heads=2,
                  ffn_dim=64, vocab_size=V))
  cfg.hc.update(overrides.pop("hc", {}))
  cfg.update(overrides)
  cfg.moe.update(num_experts=4, top_k=2, expert_ffn_dim=16, num_shared=1)
  cfg.attention.update(DECODE)
  model = build_model(cfg)
  return model, meta.unbox(jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))


@pytest.mark.parametrize("schedule", ["v4", "mla_dsa", pytest.param("sliding5_dense1", marks=pytest.mark.slow)])
def test_decoding_token_by_token_gives_the_full_forward_logits(schedule):
  """Every position; 24 tokens: rings (window 8) wrap, 3 hca / 12 csa entries vs top-k 4.
  Prefill chunking per attention type: tests/layers/test_attention_decode.py; per model: below."""
  model, variables = _model(schedule)
  t = 24
  tokens = np.random.default_rng(1).integers(0, V, (2, t)).astype(np.int32)
  want = jax.jit(model.apply)(variables, tokens)
  step = jax.jit(lambda v, x, pos, seg: model.apply(v, x, pos, seg, decode_len=t, mutable=["cache"]))
  cache = {"cache": init_cache(model, variables, 2, t)}
  got = []
  for i in range(t):
    logits, cache = step({**variables, **cache}, tokens[:, i:i + 1], np.full((2, 1), i, np.int32),
                         np.ones((2, 1), np.int32))
    got.append(logits)
  chex.assert_trees_all_close(jnp.concatenate(got, axis=1), want, atol=1e-5, rtol=1e-5)


def _greedy_reference(model, variables, prompt, n):
  """Argmax continuation by full forwards over a fixed-length buffer (causal: the tail is ignored)."""
  forward = jax.jit(model.apply)
  seq = np.zeros((1, len(prompt) + n), np.int32)
  seq[0, :len(prompt)] = prompt
  for i in range(n):
    seq[0, len(prompt) + i] = int(np.argmax(forward(variables, seq)[0, len(prompt) + i - 1]))
  return seq[0, len(prompt):]


def test_batch_of_prompts_of_different_lengths_equals_each_prompt_alone():
  """Chunked prefill (chunk 8 < the longest prompt) of rows at different fill levels."""
  model, variables = _model("sliding_dense")
  lengths = np.array([19, 4, 11], np.int32)
  prompts = np.random.default_rng(2).integers(3, V, (3, 19)).astype(np.int32)
  prompts[np.arange(19)[None, :] >= lengths[:, None]] = 0
  kw = dict(rng=jax.random.key(0), max_new_tokens=6, temperature=0.0, prefill_chunk=8)
  batch = sample(model, variables, prompts, lengths, **kw)
  np.testing.assert_array_equal(batch.lengths_B, [6, 6, 6])
  for b in range(3):
    alone = sample(model, variables, prompts[b:b + 1], lengths[b:b + 1], **kw)
    np.testing.assert_array_equal(batch.tokens_BxN[b], alone.tokens_BxN[0])
  np.testing.assert_array_equal(batch.tokens_BxN[1], _greedy_reference(model, variables, prompts[1, :4], 6))


def test_sampling_is_seeded_and_stops_at_eos():
  model, variables = _model("sliding_dense")
  prompts = np.random.default_rng(3).integers(3, V, (2, 5)).astype(np.int32)
  lengths = np.array([5, 3], np.int32)
  kw = dict(max_new_tokens=8, temperature=1.0, top_k=20, top_p=0.95)
  first = sample(model, variables, prompts, lengths, rng=jax.random.key(1), **kw)
  again = sample(model, variables, prompts, lengths, rng=jax.random.key(1), **kw)
  other = sample(model, variables, prompts, lengths, rng=jax.random.key(2), **kw)
  np.testing.assert_array_equal(first.tokens_BxN, again.tokens_BxN)
  assert not np.array_equal(first.tokens_BxN, other.tokens_BxN)
  eos = int(first.tokens_BxN[0, 2])  # same seed: the same tokens up to row 0's first eos
  stop = int(np.argmax(np.asarray(first.tokens_BxN[0]) == eos))
  stopped = sample(model, variables, prompts, lengths, rng=jax.random.key(1), eos_id=eos, **kw)
  np.testing.assert_array_equal(stopped.tokens_BxN[0, :stop + 1], first.tokens_BxN[0, :stop + 1])
  np.testing.assert_array_equal(stopped.tokens_BxN[0, stop + 1:], 0)
  assert int(stopped.lengths_B[0]) == stop + 1


def test_greedy_is_argmax_and_filters_keep_only_the_allowed_tokens():
  logits = jnp.asarray(np.random.default_rng(4).normal(size=(4, 50)) * 3, jnp.float32)
  np.testing.assert_array_equal(next_token(logits, jax.random.key(0), temperature=0.0), jnp.argmax(logits, -1))
  draw = jax.jit(jax.vmap(lambda key, k, p: next_token(logits, key, 1.0, k, p), in_axes=(0, None, None)))
  keys = jax.random.split(jax.random.key(5), 2000)
  probs = np.asarray(jax.nn.softmax(logits, -1))
  order = np.argsort(-probs, axis=-1)
  for top_k, top_p in ((5, 1.0), (0, 0.6), (8, 0.5), (1, 1.0)):
    tokens = np.asarray(draw(keys, top_k, top_p))  # [draws, B]
    for b in range(logits.shape[0]):
      mass_before = np.cumsum(probs[b, order[b]]) - probs[b, order[b]]
      allowed = order[b][(mass_before < top_p) & (np.arange(50) < (top_k or 50))]
      assert set(tokens[:, b]) <= set(allowed), (top_k, top_p, b)
      if len(allowed) > 1:
        assert len(set(tokens[:, b])) > 1  # it samples, not argmax


def test_non_causal_routing_is_rejected():
  cfg = base_config().model
  cfg.update(mlp_types=("moe",))
  cfg.moe.router = "expert_choice"
  with pytest.raises(ConfigError, match="model.moe.router='expert_choice'"):
    check_decodable(cfg)


@pytest.mark.slow
def test_cli_streams_a_continuation_of_a_trained_checkpoint(tmp_path):
  from tests.test_cli import SMALL, moejax

  wd = str(tmp_path / "run")
  assert moejax("train", *SMALL, "--config.train.steps=3", "--workdir", wd).returncode == 0
  prompt_file = tmp_path / "prompts.txt"
  prompt_file.write_text("import os\n")
  out = moejax("generate", *SMALL, "--workdir", wd, "--prompt", "def main(", "--prompt_file", str(prompt_file),
               "--max_new_tokens", "12", "--temperature", "0", "--prefill_chunk", "4")
  assert out.returncode == 0, out.stderr
  assert out.stdout.count("def main(") == 1 and out.stdout.count("import os") == 1
  # Each prompt's continuation is printed under its label, in order.
  first, second = out.stdout.split("=== prompt 2 of 2 ===\n")
  assert first.startswith("=== prompt 1 of 2 ===\ndef main(") and second.startswith("import os\n")
  assert os.path.isdir(wd)
  # Without --config, generate reads the run's config.json and says so.
  out = moejax("generate", "--workdir", wd, "--prompt", "x", "--max_new_tokens", "2", "--temperature", "0")
  assert out.returncode == 0, out.stderr
  assert f"using config {os.path.join(wd, 'config.json')}" in out.stderr
