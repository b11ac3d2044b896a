"""Dense-attention kernels from libraries (``attention.implementation`` cudnn / tokamax) against ``xla``."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.layers.attention import ATTENTION
from moejax.layers.attention.options import attention_kernel, flash_block
from tests.helpers import tiny_model_cfg
from tests.layers.test_attention import POSITIONS, SEGMENTS, _init, _inputs
from tests.oracle import require

CASES = {  # name: (attention type, (H, K), model.attention options)
    "gqa": ("dense", (4, 2), {}),
    "mqa, partial rope, qk norm": ("dense", (4, 1), {"rope_dim": 4, "qk_norm": True}),
    "mha": ("dense", (4, 4), {}),
    "sliding window 3": ("sliding", (4, 2), {"window": 3}),
}


def _value_and_grads(kernel, case, dtype="float32", t=13):
  """Output, sown max logits and gradients (params, x) of one layer on packed documents with padding
  (the first ``t`` tokens of each row)."""
  attention_type, (h, k), options = CASES[case]
  cfg = tiny_model_cfg(num_heads=h, num_kv_heads=k, dtype=dtype,
                       attention=dict(options, implementation=kernel, track_max_logit=True))
  attn = ATTENTION.get(attention_type)(cfg=cfg)
  x, positions, segments = _inputs()[:, :t], POSITIONS[:, :t], SEGMENTS[:, :t]
  variables = _init(attn, x, positions, segments, scale=8.0)
  cot = np.random.default_rng(3).normal(size=x.shape).astype(np.float32)

  def loss(params, x):
    y, sown = attn.apply({"params": params}, x, positions, segments, mutable=["max_stats"])
    return jnp.sum(y.astype(jnp.float32) * cot), (y, sown["max_stats"])

  (_, (y, max_stats)), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(
      variables["params"], x)
  return y, max_stats, grads


@pytest.mark.parametrize("case", CASES)
def test_tokamax_equals_xla_in_value_and_gradient(case):
  """CPU runs tokamax's XLA implementation (its Pallas kernels need a GPU or TPU)."""
  require("tokamax", extra="kernels")
  y, max_stats, grads = _value_and_grads("tokamax", case)
  y_xla, max_stats_xla, grads_xla = _value_and_grads("xla", case)
  assert np.abs(np.asarray(y_xla)).max() > 1e-3  # far from trivial
  chex.assert_trees_all_close(y, y_xla, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(max_stats, max_stats_xla)
  chex.assert_trees_all_close(grads, grads_xla, rtol=1e-4, atol=1e-5)  # float32 sums in another order


@pytest.mark.parametrize("case", CASES)
def test_cudnn_equals_xla_in_value_and_gradient(case):
  """cuDNN in bfloat16 (it takes no float32) against float32 ``xla`` with the same float32 parameters; 12
  tokens per row (cuDNN with a mask needs an even T)."""
  if jax.default_backend() != "gpu":
    pytest.skip(f"cudnn attention needs a GPU (platform: {jax.default_backend()})")
  y, _, grads = _value_and_grads("cudnn", case, dtype="bfloat16", t=12)
  y_xla, _, grads_xla = _value_and_grads("xla", case, t=12)
  chex.assert_trees_all_close(jnp.asarray(y, jnp.float32), y_xla, rtol=5e-2, atol=5e-2)  # bfloat16 rounding
  chex.assert_trees_all_close(grads, grads_xla, rtol=1e-1, atol=1e-1)


@pytest.mark.parametrize("platform,fields,library,seq_len,expected", [
    ("gpu", {}, True, 64, "cudnn"),
    ("gpu", {}, True, 4096, "cudnn"),                 # no [T, T] scores: cuDNN up to cudnn_max_len (8192)
    ("gpu", {}, True, 8194, "chunked"),               # above cudnn_max_len and xla_max_len
    ("gpu", {"attention": {"cudnn_max_len": 0}}, True, 64, "xla"),
    ("gpu", {}, True, 63, "xla"),                     # cuDNN with a mask needs an even T
    ("gpu", {"dtype": "float32"}, True, 64, "xla"),
    ("gpu", {"attention": {"sinks": True}}, True, 64, "xla"),
    ("gpu", {"head_dim": 256}, True, 64, "xla"),      # auto keeps to head dims every cuDNN GPU runs
    ("gpu", {}, False, 64, "xla"),                    # a type without library kernels (mla, swa)
    ("tpu", {}, True, 64, "xla"),
    ("tpu", {}, True, 2048, "xla"),
    ("tpu", {}, True, 2050, "chunked"),
    ("cpu", {}, True, 64, "xla"),
    ("cpu", {}, True, 256, "xla"),
    ("cpu", {}, True, 258, "chunked"),              # XLA:CPU writes every pass over [T, T] to memory
    ("cpu", {}, False, 1024, "chunked"),
    ("cpu", {"attention": {"xla_max_len": 4096}}, True, 1024, "chunked"),  # CPU: at most 256 on xla
    ("cpu", {"attention": {"xla_max_len": 128}}, True, 200, "chunked"),
    ("tpu", {"attention": {"xla_max_len": 4096}}, True, 4096, "xla"),
    ("gpu", {"attention": {"xla_max_len": 0}}, False, 64, "chunked"),
])
def test_auto_picks_the_kernel_per_platform(platform, fields, library, seq_len, expected):
  cfg = tiny_model_cfg(**{"dtype": "bfloat16", **fields})
  assert attention_kernel(cfg, seq_len, library, platform) == expected


@pytest.mark.parametrize("platform,fields,expected", [
    ("cpu", {}, 256),                                               # auto on CPU: 256-token blocks
    ("cpu", {"attention": {"chunk_size": 128}}, 128),
    ("cpu", {"attention": {"implementation": "chunked"}}, 512),     # an explicit kernel keeps chunk_size
    ("gpu", {}, 512),
    ("tpu", {}, 512),
])
def test_flash_block_per_platform(platform, fields, expected):
  assert flash_block(tiny_model_cfg(**fields), platform) == expected


@pytest.mark.parametrize("fields,platform,seq_len,message", [
    ({}, "cpu", 64, "model.attention.implementation='cudnn' needs a GPU (this platform: cpu)"),
    ({"dtype": "float32"}, "gpu", 64, "needs model.dtype bfloat16 or float16 (got 'float32')"),
    ({}, "gpu", 13, "needs an even sequence length with a mask (got T=13)"),
])
def test_cudnn_that_cannot_run_is_refused_naming_the_field(fields, platform, seq_len, message):
  cfg = tiny_model_cfg(**{"dtype": "bfloat16", **fields, "attention": {"implementation": "cudnn"}})
  with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
    attention_kernel(cfg, seq_len, True, platform)


def test_cudnn_layer_on_cpu_fails_before_compiling():
  if jax.default_backend() == "gpu":
    pytest.skip("a GPU runs cudnn")
  cfg = tiny_model_cfg(dtype="bfloat16", attention={"implementation": "cudnn"})
  attn = ATTENTION.get("dense")(cfg=cfg)
  with pytest.raises(ValueError, match="implementation='cudnn' needs a GPU"):
    jax.eval_shape(attn.init, jax.random.key(0), _inputs(t=16), POSITIONS[:, :1].repeat(16, 1), SEGMENTS[:, :16])


def test_library_kernels_on_other_types_are_refused():
  cfg = tiny_model_cfg(attention={"implementation": "tokamax"})
  with pytest.raises(ValueError, match="runs only on types with library kernels"):
    attention_kernel(cfg, 64, library=False, platform="cpu")
