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


# The published coefficient tables, written out here (not read from moejax): Keller Jordan's quintic (Muon,
# 2024) and Amsel et al. 2025, "The Polar Express", Algorithm 1 for l = 1e-3, whose reference code divides
# every step but the last by (1.01, 1.01^3, 1.01^5) and the input by 1.01 |X|_F.
PUBLISHED_QUINTIC = (3.4445, -4.7750, 2.0315)
PUBLISHED_POLAR_EXPRESS = [
    (8.28721201814563, -23.595886519098837, 17.300387312530933),
    (4.107059111542203, -2.9478499167379106, 0.5448431082926601),
    (3.9486908534822946, -2.908902115962949, 0.5518191394370137),
    (3.3184196573706015, -2.488488024314874, 0.51004894012372),
    (2.300652019954817, -1.6689039845747493, 0.4188073119525673),
    (1.891301407787398, -1.2679958271945868, 0.37680408948524835),
    (1.8750014808534479, -1.2500016453999487, 0.3750001645474248),
    (1.875, -1.25, 0.375),
]
# Max |sigma - 1| of the output for inputs with sigma / |X|_F >= 0.01 (the docstring's bands), by step count.
STATED_BOUND = {
    "quintic": {5: 0.32, 6: 0.32, 7: 0.32, 8: 0.32},            # [0.68, 1.14]: a band, not convergence
    "polar_express": {5: 0.13, 6: 3e-3, 7: 1e-4, 8: 1e-4},    # 1e-4: float32 round-off of the iteration
}


def _published(name: str, steps: int) -> tuple[list[tuple[float, float, float]], float]:
  if name == "quintic":
    return [PUBLISHED_QUINTIC] * steps, 1.0
  safe = [(a / 1.01, b / 1.01**3, c / 1.01**5) for a, b, c in PUBLISHED_POLAR_EXPRESS[:-1]]
  rows = safe + PUBLISHED_POLAR_EXPRESS[-1:]
  return [rows[min(i, len(rows) - 1)] for i in range(steps)], 1.01


@pytest.mark.parametrize("coefficients", ["quintic", "polar_express"])
def test_coefficient_tables_are_the_published_ones(coefficients):
  for steps in range(1, 11):
    rows, norm_scale = _published(coefficients, steps)
    np.testing.assert_allclose(COEFFICIENTS[coefficients].schedule(steps), rows, rtol=1e-15)
    assert COEFFICIENTS[coefficients].norm_scale == norm_scale


@pytest.mark.parametrize("coefficients", ["quintic", "polar_express"])
@pytest.mark.parametrize("steps", range(1, 9))
def test_iterates_against_the_svd_polar_factor(coefficients, steps):
  """Every step count: the iterate is U p(S) V^T with p composed here from the published coefficients; its
  distance to the SVD polar factor U V^T is max |p(s) - 1|, within the stated bound from 5 steps on."""
  x = _matrices((24, 40), n=2, smallest=0.05)
  got = np.asarray(newton_schulz(jnp.asarray(x), coefficients, steps, jnp.float32), np.float64)
  rows, norm_scale = _published(coefficients, steps)
  for xi, oi in zip(x.astype(np.float64), got):
    u, s, vt = np.linalg.svd(xi, full_matrices=False)
    p = s / (np.linalg.norm(xi) * norm_scale)
    assert p.min() * norm_scale >= 0.01  # the range the stated bounds cover
    for a, b, c in rows:
      p = a * p + b * p**3 + c * p**5
    np.testing.assert_allclose(oi, (u * p) @ vt, atol=3e-5)
    distance = np.linalg.norm(oi - u @ vt, ord=2)  # spectral norm
    np.testing.assert_allclose(distance, np.max(np.abs(p - 1)), atol=3e-5)
    s_out = np.linalg.svd(oi, compute_uv=False)
    if steps in STATED_BOUND[coefficients]:
      assert np.max(np.abs(s_out - 1)) <= STATED_BOUND[coefficients][steps], (s_out.min(), s_out.max())
