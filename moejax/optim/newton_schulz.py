"""Orthogonalization by Newton–Schulz polynomial iterations (Muon's core).

``newton_schulz(x_NxMxK)`` maps each matrix ``X = U S V^T`` of a batch to
``U p(S / |X|_F) V^T`` where ``p = p_T o ... o p_1`` composes odd quintics
``p_i(s) = a_i s + b_i s^3 + c_i s^5``: each step is ``A = X X^T; X <- a X +
(b A + c A A) X``, i.e. only matrix products (``X`` is first transposed to be
wide, so ``A`` is the smaller Gram matrix). ``p`` pushes every normalised
singular value towards 1, so the output approximates the polar factor
``U V^T`` of the input:

* ``quintic`` — Keller Jordan's fixed ``(3.4445, -4.7750, 2.0315)`` (Muon,
  2024): fast but only to a band; after 5 steps singular values ``>= 0.01
  |X|_F`` land in about ``[0.68, 1.13]``.
* ``polar_express`` — the per-step minimax-optimal schedule of Amsel et al.,
  2025 ("The Polar Express", Algorithm 1, for ``l = 1e-3`` with their 1.01
  safety factor); ``[0.87, 1.12]`` after 5 steps, ``1 +- 1e-6`` after 8.

:func:`promised_band` computes that band from the coefficients (the scalar
composition), which is what the tests hold the matrix iteration to.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class Coefficients:
  """A schedule of quintic steps; steps past the list repeat its last entry.

  ``norm_scale``: the input is divided by ``norm_scale * |X|_F`` (> 1 leaves
  room for round-off so no singular value starts above 1).
  """

  steps: tuple[tuple[float, float, float], ...]
  norm_scale: float = 1.0

  def schedule(self, num_steps: int) -> list[tuple[float, float, float]]:
    return [self.steps[min(i, len(self.steps) - 1)] for i in range(num_steps)]


def _polar_express(safety: float = 1.01) -> Coefficients:
  raw = [
      (8.28721201814563, -23.595886519098837, 17.300387312530933),
      (4.107059111542203, -2.9478499167379106, 0.5448431082926601),
      (3.9486908534822946, -2.908902115962949, 0.5518191394370137),
      (3.3184196573706015, -2.488488024314874, 0.51004894012372),
      (2.300652019954817, -1.6689039845747493, 0.4188073119525673),
      (1.891301407787398, -1.2679958271945868, 0.37680408948524835),
      (1.8750014808534479, -1.2500016453999487, 0.3750001645474248),
      (1.875, -1.25, 0.375),  # the limit: classical degree-5 Newton-Schulz
  ]
  steps = [(a / safety, b / safety**3, c / safety**5) for a, b, c in raw[:-1]] + raw[-1:]
  return Coefficients(tuple(steps), norm_scale=safety)


COEFFICIENTS: dict[str, Coefficients] = {
    "quintic": Coefficients(((3.4445, -4.7750, 2.0315),)),
    "polar_express": _polar_express(),
}


def newton_schulz(x_NxMxK: jax.Array, coefficients: str = "quintic", steps: int = 5,
                  dtype=jnp.float32, eps: float = 1e-7) -> jax.Array:
  """Approximate polar factors of a batch of matrices.

  x_NxMxK -> o_NxMxK (float32), each matrix independently (never mixing
  batch entries). Matrix products take ``dtype`` operands (bfloat16 for
  speed, float32 for accuracy) and accumulate in float32; the normalisation,
  the polynomial's sums and the iterate are float32.
  """
  coeffs = COEFFICIENTS[coefficients]
  wide = x_NxMxK.shape[-2] <= x_NxMxK.shape[-1]
  x = x_NxMxK.astype(jnp.float32)
  x = x if wide else jnp.swapaxes(x, -1, -2)
  norm_Nx1x1 = jnp.sqrt(jnp.sum(x * x, axis=(-2, -1), keepdims=True))
  x = x / (norm_Nx1x1 * coeffs.norm_scale + eps)
  # Matmul operands in ``dtype``, products accumulated and combined in float32
  # (the cancellation in b A + c A^2 is what bfloat16 outputs would spoil).
  mm = functools.partial(jnp.einsum, preferred_element_type=jnp.float32,
                         precision=jax.lax.Precision.HIGHEST if dtype == jnp.float32 else None)
  for a, b, c in coeffs.schedule(steps):
    x_low = x.astype(dtype)
    gram_NxMxM = mm("nmk,nlk->nml", x_low, x_low)
    gram_low = gram_NxMxM.astype(dtype)
    poly_NxMxM = b * gram_NxMxM + c * mm("nml,nlj->nmj", gram_low, gram_low)
    x = a * x + mm("nml,nlk->nmk", poly_NxMxM.astype(dtype), x_low)
  return x if wide else jnp.swapaxes(x, -1, -2)


def orthogonality_error(o_NxMxK: jax.Array) -> jax.Array:
  """``|O O^T - I|_F / sqrt(m)`` per matrix (Gram of the smaller side), float32 [N].

  Equals the RMS over singular values of ``s^2 - 1``: 0 for an exact polar
  factor, about 0.3 for 5 quintic steps, 1 for a zero matrix.
  """
  o = o_NxMxK.astype(jnp.float32)
  if o.shape[-2] > o.shape[-1]:
    o = jnp.swapaxes(o, -1, -2)
  m = o.shape[-2]
  gram_NxMxM = jnp.einsum("nmk,nlk->nml", o, o)
  return jnp.sqrt(jnp.sum((gram_NxMxM - jnp.eye(m)) ** 2, axis=(-2, -1)) / m)


def apply_polynomials(s: np.ndarray, coefficients: str, steps: int) -> np.ndarray:
  """The scalar map the iteration applies to normalised singular values (float64)."""
  s = np.asarray(s, np.float64)
  for a, b, c in COEFFICIENTS[coefficients].schedule(steps):
    s = a * s + b * s**3 + c * s**5
  return s


def promised_band(coefficients: str, steps: int, lower: float = 1e-2) -> tuple[float, float]:
  """(min, max) output singular value for inputs ``s/|X|_F`` in ``[lower, 1]``."""
  grid = np.geomspace(lower, 1.0, 20_001) / COEFFICIENTS[coefficients].norm_scale
  out = apply_polynomials(grid, coefficients, steps)
  return float(out.min()), float(out.max())
