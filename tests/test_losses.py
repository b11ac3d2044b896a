"""Chunked token losses against the full-logits computation."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from moejax.losses import chunked_token_stats


@pytest.mark.parametrize("chunk", [1, 5, 16, 64])
def test_chunked_cross_entropy_matches_full_logits(chunk):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 16, 8)).astype(np.float32))
  head = jnp.asarray(rng.normal(size=(8, 37)).astype(np.float32))
  y = jnp.asarray(rng.integers(0, 37, size=(2, 16)))
  w = jnp.asarray(rng.random((2, 16)).astype(np.float32))

  def full(x, head):
    logits = x @ head
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
    return jnp.sum(ce * w), (jnp.argmax(logits, -1) == y).astype(jnp.float32)

  def chunked(x, head):
    ce, correct = chunked_token_stats(x, head, y, chunk)
    return jnp.sum(ce * w), correct

  (loss_full, correct_full), grads_full = jax.value_and_grad(full, argnums=(0, 1), has_aux=True)(x, head)
  (loss_chunk, correct_chunk), grads_chunk = jax.value_and_grad(chunked, argnums=(0, 1), has_aux=True)(x, head)
  np.testing.assert_allclose(loss_chunk, loss_full, rtol=1e-6)
  chex.assert_trees_all_equal(correct_chunk, correct_full)
  chex.assert_trees_all_close(grads_chunk, grads_full, rtol=1e-5, atol=1e-6)


def test_chunked_loss_never_materializes_full_logits():
  """The compiled backward holds no [B, T, V] array when chunk << T."""
  b, t, d, v, chunk = 1, 4096, 16, 512, 256
  x = jnp.zeros((b, t, d))
  head = jnp.zeros((d, v))
  y = jnp.zeros((b, t), jnp.int32)
  grad = jax.jit(jax.grad(lambda x, h: jnp.sum(chunked_token_stats(x, h, y, chunk)[0]), argnums=(0, 1)))
  hlo = grad.lower(x, head).compile().as_text()
  assert f"f32[{b},{t},{v}]" not in hlo and f"f32[{t},{v}]" not in hlo
  assert f"{chunk},{v}]" in hlo
