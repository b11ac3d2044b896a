"""Attention selection maps against their definitions, written out here."""

import numpy as np
import pytest

from moejax.config import load_config
from moejax.lab.attention_maps import selections

pytestmark = pytest.mark.slow  # scheduled first (tests/conftest.py)

T, WINDOW, TOPK, CSA, HCA = 32, 6, 5, 4, 8


def test_maps_of_every_attention_type():
  c = load_config("configs/tiny_hybrid.py:mixed")  # swa, csa, hca, dsa, mla, sliding
  c.model.update(d_model=64)
  c.model.attention.update(window=WINDOW, index_topk=TOPK, csa_ratio=CSA, hca_ratio=HCA)
  tokens = np.random.default_rng(0).integers(3, 200, size=(1, T)).astype(np.int32)
  maps = selections(c, tokens)
  t, s = np.arange(T)[:, None], np.arange(T)[None, :]
  window = (s <= t) & (s > t - WINDOW)
  np.testing.assert_array_equal(maps["layer_0"], window)   # swa
  np.testing.assert_array_equal(maps["layer_5"], window)   # sliding
  np.testing.assert_array_equal(maps["layer_4"], s <= t)   # mla: all earlier tokens
  dsa = maps["layer_3"]
  assert not np.any(dsa & (s > t)) and np.array_equal(dsa.sum(1), np.minimum(np.arange(T) + 1, TOPK))
  hca_visible = (np.arange(T // HCA)[None, :] + 1) * HCA - 1 <= t  # block j ends at token (j + 1) * ratio - 1
  np.testing.assert_array_equal(maps["layer_2"], hca_visible)
  csa_visible = (np.arange(T // CSA)[None, :] + 1) * CSA - 1 <= t
  csa = maps["layer_1"]
  assert not np.any(csa & ~csa_visible)
  np.testing.assert_array_equal(csa.sum(1), np.minimum(csa_visible.sum(1), TOPK))
