"""Rotary position embeddings (Su et al., 2021, RoFormer), partial and YaRN-scaled.

A :class:`Rope` says which channels rotate and how:

* ``dim``: how many channels of the last axis rotate (0: all of them) —
  partial rotary, e.g. 64 of DeepSeek-V4's 512-wide heads;
* ``part``: whether those are the ``"leading"`` channels (GPT-NeoX, Qwen3-Next,
  the DeepSeek-V3.2 indexer) or the ``"trailing"`` ones (the ``[nope | rope]``
  head layout of DeepSeek-V3 MLA and DeepSeek-V4);
* ``layout``: which channels form a rotated pair — ``"half"`` pairs ``(i, i +
  dim/2)`` (rotate-half: Llama, Qwen, Mixtral), ``"interleave"`` pairs ``(2i,
  2i+1)`` (DeepSeek-V3 with ``rope_interleave``, DeepSeek-V4, GLM);
* ``yarn``: YaRN frequency interpolation for context extension (Peng et al.,
  2023), with the exact rules of HF ``_compute_yarn_parameters``.

Pair ``i`` rotates by ``position * inv_freq[i]`` with ``inv_freq[i] =
theta^(-2i/dim)`` (before YaRN). ``cos`` and ``sin`` are multiplied by
``Rope.attention_factor`` (YaRN's ``mscale``; 1 without YaRN), as HF does.
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
import numpy as np

LAYOUTS = ("half", "interleave")
PARTS = ("leading", "trailing")


def rope_frequencies(dim: int, theta: float) -> jnp.ndarray:
  """Inverse frequencies ``theta^(-2i/dim)`` for i < dim/2, float32 [dim/2]."""
  return 1.0 / theta ** (jnp.arange(0, dim // 2, dtype=jnp.float32) * 2.0 / dim)


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
  """YaRN's attention temperature ``0.1 * mscale * ln(scale) + 1`` (1 for scale <= 1)."""
  return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


@dataclasses.dataclass(frozen=True)
class Yarn:
  """YaRN context extension (Peng et al., 2023): interpolate low frequencies by ``factor``.

  Frequencies whose wavelength fits ``beta_fast`` times into
  ``original_max_len`` keep their value, those fitting fewer than ``beta_slow``
  times are divided by ``factor``, with a linear ramp in between.
  ``attention_factor`` (0: derived) multiplies cos/sin; ``mscale_all_dim``
  (0: unused) additionally scales the softmax by ``yarn_mscale(factor,
  mscale_all_dim)**2`` (DeepSeek-V2/V3 MLA).
  """

  factor: float = 1.0
  original_max_len: int = 4096
  beta_fast: float = 32.0
  beta_slow: float = 1.0
  mscale: float = 0.0
  mscale_all_dim: float = 0.0
  attention_factor: float = 0.0

  @classmethod
  def from_config(cls, yarn_cfg) -> Yarn | None:
    """None when ``factor <= 1`` (YaRN off)."""
    if yarn_cfg.factor <= 1.0:
      return None
    return cls(**{f.name: type(f.default)(yarn_cfg[f.name]) for f in dataclasses.fields(cls)})

  def cos_sin_scale(self) -> float:
    if self.attention_factor:
      return self.attention_factor
    if self.mscale and self.mscale_all_dim:
      return yarn_mscale(self.factor, self.mscale) / yarn_mscale(self.factor, self.mscale_all_dim)
    return yarn_mscale(self.factor)

  def softmax_scale(self) -> float:
    return yarn_mscale(self.factor, self.mscale_all_dim) ** 2 if self.mscale_all_dim else 1.0

  def frequencies(self, dim: int, theta: float) -> np.ndarray:
    """float32 [dim/2] interpolated inverse frequencies (HF's truncated correction range)."""

    def correction_dim(rotations: float) -> float:
      return dim * math.log(self.original_max_len / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low = max(math.floor(correction_dim(self.beta_fast)), 0)
    high = min(math.ceil(correction_dim(self.beta_slow)), dim - 1)
    if low == high:
      high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    extrapolation = 1.0 - ramp
    base = theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim)
    inv_freq = (1.0 / (self.factor * base)) * (1 - extrapolation) + (1.0 / base) * extrapolation
    return inv_freq.astype(np.float32)


@dataclasses.dataclass(frozen=True)
class Rope:
  """Which channels rotate, in which pairing, at which frequencies (see module doc)."""

  theta: float = 10_000.0
  dim: int = 0
  layout: str = "half"
  part: str = "leading"
  yarn: Yarn | None = None

  def rotated_dim(self, head_dim: int) -> int:
    return self.dim or head_dim

  def inv_freq(self, head_dim: int) -> jnp.ndarray:
    dim = self.rotated_dim(head_dim)
    if self.yarn is None:
      return rope_frequencies(dim, self.theta)
    return jnp.asarray(self.yarn.frequencies(dim, self.theta))

  @property
  def attention_factor(self) -> float:
    return 1.0 if self.yarn is None else self.yarn.cos_sin_scale()

  @property
  def softmax_scale(self) -> float:
    """Multiplier of the softmax scale (YaRN ``mscale_all_dim``; 1 otherwise)."""
    return 1.0 if self.yarn is None else self.yarn.softmax_scale()


def apply_rope(x, positions_BxT, rope: Rope, inverse: bool = False):
  """Rotates the ``rope.dim`` channels of ``x``'s last axis by their position.

  x_BxTx...xDh (any axes between T and the channels, e.g. heads) ->
  same shape; positions_BxT int. ``inverse`` rotates by ``-angle`` (cos, -sin),
  which undoes a rotation when ``attention_factor`` is 1 (DeepSeek-V4 de-rotates
  its attention output this way). Computed in float32, returned in x's dtype.
  """
  head_dim = x.shape[-1]
  dim = rope.rotated_dim(head_dim)
  angles = positions_BxT[..., None].astype(jnp.float32) * rope.inv_freq(head_dim)
  angles = angles.reshape(angles.shape[:2] + (1,) * (x.ndim - 3) + angles.shape[-1:])
  cos = jnp.cos(angles) * rope.attention_factor
  sin = jnp.sin(angles) * rope.attention_factor * (-1.0 if inverse else 1.0)
  x32 = x.astype(jnp.float32)
  if rope.part == "leading":
    rot, rest = x32[..., :dim], x32[..., dim:]
  else:
    rest, rot = x32[..., :head_dim - dim], x32[..., head_dim - dim:]
  if rope.layout == "half":
    x1, x2 = jnp.split(rot, 2, axis=-1)
    rot = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  else:
    x1, x2 = rot[..., 0::2], rot[..., 1::2]
    rot = jnp.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).reshape(rot.shape)
  parts = (rot, rest) if rope.part == "leading" else (rest, rot)
  return jnp.concatenate(parts, axis=-1).astype(x.dtype)
