"""Chunked token losses against the full-logits computation."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from moejax.losses import chunked_distill_kl, chunked_token_stats


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


def _np_kl(ls, lt, temperature, reverse):
  """Per-token KL in float64 NumPy, one position at a time."""
  out = np.zeros(ls.shape[:2])
  for i in range(ls.shape[0]):
    for j in range(ls.shape[1]):
      ps = np.exp(ls[i, j] / temperature - np.logaddexp.reduce(ls[i, j] / temperature))
      pt = np.exp(lt[i, j] / temperature - np.logaddexp.reduce(lt[i, j] / temperature))
      p, q = (ps, pt) if reverse else (pt, ps)
      out[i, j] = np.sum(p * (np.log(p) - np.log(q)))
  return out


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("temperature,chunk,vocab", [(1.0, 3, 50), (2.0, 8, 50), (1.5, 4, 32_768)])
def test_distill_kl_matches_numpy(reverse, temperature, chunk, vocab):
  rng = np.random.default_rng(1)
  xs, xt = (rng.normal(size=(2, 8, 6)).astype(np.float32) for _ in range(2))
  hs, ht = (rng.normal(size=(6, vocab)).astype(np.float32) for _ in range(2))
  got = chunked_distill_kl(xs, hs, xt, ht, temperature, reverse, chunk)
  expected = _np_kl(xs.astype(np.float64) @ hs, xt.astype(np.float64) @ ht, temperature, reverse)
  np.testing.assert_allclose(got, expected, rtol=2e-4, atol=1e-5)


def test_forward_kl_gradient_is_student_minus_teacher():
  """d KL(p_t || p_s) / d logits_s = (p_s - p_t) / T, via an identity hidden state."""
  rng = np.random.default_rng(2)
  v, temperature = 11, 2.0
  ls, lt = rng.normal(size=(1, 1, v)).astype(np.float32), rng.normal(size=(1, 1, v)).astype(np.float32)
  eye = jnp.eye(v)
  grad = jax.grad(lambda l: jnp.sum(chunked_distill_kl(l, eye, jnp.asarray(lt), eye, temperature, False, 1)))(
      jnp.asarray(ls))
  ps, pt = jax.nn.softmax(ls / temperature), jax.nn.softmax(lt / temperature)
  np.testing.assert_allclose(grad, (ps - pt) / temperature, atol=1e-6)
  # No gradient flows into the teacher.
  g_teacher = jax.grad(lambda l: jnp.sum(chunked_distill_kl(jnp.asarray(ls), eye, l, eye, 1.0, False, 1)))(
      jnp.asarray(lt))
  np.testing.assert_array_equal(g_teacher, 0.0)


def test_reverse_kl_gradient_is_analytic():
  """d KL(p_s || p_t) / d logits_s = p_s * (log p_s - log p_t - KL) / T (teacher: no gradient)."""
  rng = np.random.default_rng(3)
  v, temperature = 13, 1.5
  ls, lt = rng.normal(size=(1, 1, v)).astype(np.float32), rng.normal(size=(1, 1, v)).astype(np.float32)
  eye = jnp.eye(v)
  kl_of = lambda s, t: jnp.sum(chunked_distill_kl(s, eye, t, eye, temperature, True, 1))
  grad_s, grad_t = jax.grad(kl_of, argnums=(0, 1))(jnp.asarray(ls), jnp.asarray(lt))
  logp_s = np.log(np.asarray(jax.nn.softmax(ls.astype(np.float64) / temperature)))
  logp_t = np.log(np.asarray(jax.nn.softmax(lt.astype(np.float64) / temperature)))
  kl = np.sum(np.exp(logp_s) * (logp_s - logp_t))
  np.testing.assert_allclose(grad_s, np.exp(logp_s) * (logp_s - logp_t - kl) / temperature, atol=1e-6)
  np.testing.assert_array_equal(grad_t, 0.0)


@pytest.mark.parametrize("reverse", [False, True])
def test_distill_kl_never_materializes_full_logits(reverse):
  """Forward and backward of the chunked KL hold no [T, V] array at long T."""
  b, t, d, v, chunk = 1, 4096, 16, 512, 256
  xs, xt = jnp.zeros((b, t, d)), jnp.zeros((b, t, 2 * d))
  hs, ht = jnp.zeros((d, v)), jnp.zeros((2 * d, v))
  grad = jax.jit(jax.grad(lambda x, h: jnp.sum(chunked_distill_kl(x, h, xt, ht, 2.0, reverse, chunk)),
                          argnums=(0, 1)))
  hlo = grad.lower(xs, hs).compile().as_text()
  assert f"f32[{b},{t},{v}]" not in hlo and f"f32[{t},{v}]" not in hlo
  assert f"{chunk},{v}]" in hlo
