"""Safetensors helpers that need neither torch nor transformers (kept outside the oracle-guarded files)."""

import numpy as np

from moejax.interop.safetensors_io import dequantize_fp8


def test_fp8_block_dequantization_matches_a_loop():
  rng = np.random.default_rng(0)
  w = rng.normal(size=(5, 7)).astype(np.float32)
  scale = rng.uniform(0.5, 2, size=(3, 4)).astype(np.float32)
  expected = np.array([[w[o, i] * scale[o // 2, i // 2] for i in range(7)] for o in range(5)])
  np.testing.assert_array_equal(dequantize_fp8(w, scale, (2, 2)), expected)
