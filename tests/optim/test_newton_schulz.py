"""Newton–Schulz against the SVD: the iteration is U p(S/|X|) V^T, in the promised band."""

import chex
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.optim.newton_schulz import (COEFFICIENTS, apply_polynomials, newton_schulz, orthogonality_error,
                                        promised_band)


def _matrices(shape, n=3, seed=0, smallest=0.02):
  """Random matrices with singular values spread from 1 to ``smallest`` (like gradients)."""
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    u, _ = np.linalg.qr(rng.normal(size=(shape[0], shape[0])))
    v, _ = np.linalg.qr(rng.normal(size=(shape[1], shape[1])))
    k = min(shape)
    s = np.geomspace(1.0, smallest, k)
    out.append((u[:, :k] * s) @ v[:k])
  return np.stack(out).astype(np.float32)


@pytest.mark.parametrize("coefficients,steps", [("quintic", 5), ("polar_express", 5), ("polar_express", 8)])
@pytest.mark.parametrize("shape", [(24, 40), (40, 24), (32, 32)])
def test_iteration_is_the_polynomial_of_the_singular_values(coefficients, steps, shape):
  x = _matrices(shape)
  got = np.asarray(newton_schulz(jnp.asarray(x), coefficients, steps, jnp.float32))
  chex.assert_shape(got, x.shape)
  for xi, oi in zip(x.astype(np.float64), got):
    u, s, vt = np.linalg.svd(xi, full_matrices=False)
    s_in = s / (np.linalg.norm(xi) * COEFFICIENTS[coefficients].norm_scale)
    expected = (u * apply_polynomials(s_in, coefficients, steps)) @ vt
    np.testing.assert_allclose(oi, expected, atol=2e-5)
    lo, hi = promised_band(coefficients, steps, lower=s_in.min() * COEFFICIENTS[coefficients].norm_scale)
    s_out = np.linalg.svd(oi.astype(np.float64), compute_uv=False)
    assert lo - 1e-4 <= s_out.min() and s_out.max() <= hi + 1e-4, (s_out.min(), s_out.max(), lo, hi)


def test_promised_bands():
  assert promised_band("quintic", 5) == pytest.approx((0.682, 1.134), abs=1e-3)
  assert promised_band("polar_express", 5) == pytest.approx((0.870, 1.124), abs=1e-3)
  assert promised_band("polar_express", 8, lower=1e-3) == pytest.approx((1.0, 1.0), abs=1e-6)


def test_polar_express_converges_to_the_svd_polar_factor():
  x = _matrices((24, 40), n=2)
  got = np.asarray(newton_schulz(jnp.asarray(x), "polar_express", 8, jnp.float32))
  for xi, oi in zip(x.astype(np.float64), got):
    u, _, vt = np.linalg.svd(xi, full_matrices=False)
    np.testing.assert_allclose(oi, u @ vt, atol=1e-4)


@pytest.mark.parametrize("coefficients", ["quintic", "polar_express"])
def test_bfloat16_iteration_stays_in_the_band(coefficients):
  """bfloat16 (unit roundoff u = 2^-8) perturbs singular values by ~u |X|, so the
  band holds (to 8u) for singular values well above u |X|."""
  x = _matrices((64, 96), n=2, seed=1, smallest=0.2)
  got = np.asarray(newton_schulz(jnp.asarray(x), coefficients, 5, jnp.bfloat16), np.float64)
  lower = min(np.linalg.svd(xi, compute_uv=False).min() / np.linalg.norm(xi) for xi in x.astype(np.float64))
  lo, hi = promised_band(coefficients, 5, lower=lower)
  for oi in got:
    s_out = np.linalg.svd(oi, compute_uv=False)
    assert lo - 8 * 2**-8 <= s_out.min() and s_out.max() <= hi + 8 * 2**-8, (s_out.min(), s_out.max(), lo, hi)


def test_batch_entries_never_mix():
  x = _matrices((16, 24), n=4)
  batched = np.asarray(newton_schulz(jnp.asarray(x), "quintic", 5, jnp.float32))
  x_changed = x.copy()
  x_changed[1:] *= np.float32(-3.0)
  x_changed[2] = _matrices((16, 24), n=1, seed=7)[0]
  changed = np.asarray(newton_schulz(jnp.asarray(x_changed), "quintic", 5, jnp.float32))
  np.testing.assert_array_equal(changed[0], batched[0])
  for i in range(4):
    single = np.asarray(newton_schulz(jnp.asarray(x[i:i + 1]), "quintic", 5, jnp.float32))[0]
    np.testing.assert_allclose(batched[i], single, atol=1e-6)


def test_orthogonality_error_is_rms_of_squared_singular_values_minus_one():
  x = _matrices((20, 36), n=2)
  o = np.asarray(newton_schulz(jnp.asarray(x), "quintic", 5, jnp.float32))
  err = np.asarray(orthogonality_error(jnp.asarray(o)))
  for oi, ei in zip(o.astype(np.float64), err):
    s = np.linalg.svd(oi, compute_uv=False)
    np.testing.assert_allclose(ei, np.sqrt(np.mean((s**2 - 1) ** 2)), rtol=1e-4)
  np.testing.assert_allclose(np.asarray(orthogonality_error(jnp.zeros((1, 4, 6)))), [1.0])
