"""What the attention types read from ``model.attention``: ropes, kernel, parameters.

Kept in one place so every type resolves a config field the same way.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from moejax.layers import DTYPES
from moejax.layers.rope import Rope, Yarn


def head_dim(cfg) -> int:
  return cfg.head_dim or cfg.d_model // cfg.num_heads


def main_rope(cfg, dim: int = 0, part: str = "leading", layout: str | None = None) -> Rope:
  """The "main" rope: ``model.rope_theta`` with ``attention.yarn``."""
  a = cfg.attention
  return Rope(theta=float(cfg.rope_theta), dim=dim, layout=layout or a.rope_layout, part=part,
              yarn=Yarn.from_config(a.yarn))


def compress_rope(cfg, dim: int = 0, part: str = "trailing") -> Rope:
  """The rope of compressed layers (csa, hca): its own theta and YaRN (DeepSeek-V4 "compress")."""
  a = cfg.attention
  return Rope(theta=float(a.compress_rope_theta or cfg.rope_theta), dim=dim, layout=a.rope_layout, part=part,
              yarn=Yarn.from_config(a.compress_yarn))


LIBRARY_KERNELS = ("cudnn", "tokamax")  # implementations only types with ``library_kernels`` run


def cudnn_problems(cfg, seq_len: int | None = None, platform: str | None = None, max_head: int = 256) -> list[str]:
  """Why ``implementation="cudnn"`` cannot run this config (empty: it can).

  cuDNN's fused attention through ``jax.nn.dot_product_attention`` needs a GPU,
  bf16/fp16 inputs, a head dim that is a multiple of 8 and at most 256 (128
  before Hopper), and, with a mask (moejax always passes one), an even T in
  training; sinks would add an odd extra key, so they are not offered.
  """
  field = "model.attention.implementation='cudnn'"
  problems = []
  if platform is not None and platform != "gpu":
    problems.append(f"{field} needs a GPU (this platform: {platform}); use implementation='auto', 'xla' or "
                    "'chunked'.")
  if cfg.dtype not in ("bfloat16", "float16"):
    problems.append(f"{field} needs model.dtype bfloat16 or float16 (got {cfg.dtype!r}); set "
                    "model.dtype='bfloat16' or implementation='xla'.")
  head = head_dim(cfg)
  if head % 8 or head > max_head:
    problems.append(f"{field} needs a head dim that is a multiple of 8 and at most {max_head} (got {head}); use "
                    "implementation='xla' or 'chunked'.")
  if cfg.attention.sinks:
    problems.append(f"{field} has no attention sinks (model.attention.sinks=True); set sinks=False or "
                    "implementation='xla' / 'chunked'.")
  if seq_len is not None and seq_len % 2:
    problems.append(f"{field} needs an even sequence length with a mask (got T={seq_len}); use an even "
                    "data.seq_len or implementation='xla'.")
  return problems


# ``auto`` on CPU (docs/benchmarks.md § Attention kernels, benchmarks/attention_kernels.py): XLA:CPU
# writes every elementwise pass over the [B, H, T, T] scores to memory, so the fused ``xla`` kernel
# loses to ``chunked`` from 512 tokens on (the chunked forward takes 0.50x its time at 512 tokens,
# 0.38x at 1024, 0.30x at 2048; forward+backward 0.63x, 0.42x, 0.40x), and the chunked kernel is
# fastest in 256-token blocks there (512-token blocks: 1.5-2.5x slower). At 256 tokens ``xla`` is
# faster. On other platforms ``xla`` holds up to 2048 tokens and ``chunk_size`` is the block.
CPU_XLA_MAX_LEN = 256
CPU_BLOCK = 256


def xla_max_len(cfg, platform: str | None = None) -> int:
  """The longest T ``auto`` runs on ``xla``: ``attention.xla_max_len``, at most 256 on CPU."""
  if (platform or jax.default_backend()) == "cpu":
    return min(cfg.attention.xla_max_len, CPU_XLA_MAX_LEN)
  return cfg.attention.xla_max_len


def flash_block(cfg, platform: str | None = None) -> int:
  """The block of the ``chunked`` kernel: ``attention.chunk_size``, at most 256 when ``auto`` runs on CPU."""
  a = cfg.attention
  if a.implementation == "auto" and (platform or jax.default_backend()) == "cpu":
    return min(a.chunk_size, CPU_BLOCK)
  return a.chunk_size


def attention_kernel(cfg, seq_len: int, library: bool = False, platform: str | None = None) -> str:
  """The kernel of a dense-type core: ``xla``, ``chunked``, ``cudnn`` or ``tokamax``.

  ``auto``: ``cudnn`` on a GPU for types with ``library`` kernels when it
  applies (head dim <= 128, so any cuDNN-capable GPU runs it) up to
  ``cudnn_max_len`` tokens (cuDNN forms no [T, T] scores, only the [B, 1, T, T]
  bool mask moejax passes); else ``chunked`` above :func:`xla_max_len`
  (``attention.xla_max_len``, at most 256 on CPU); else ``xla``. On an H100 at
  T = 4096, cuDNN ran the ~0.9B dense train step 2.6x faster than ``chunked``
  (232 vs 615 ms, docs/benchmarks.md). An explicit ``cudnn`` that cannot run
  here raises a ``ValueError`` naming the field and the fix.
  """
  impl = cfg.attention.implementation
  platform = platform or jax.default_backend()
  if impl in LIBRARY_KERNELS and not library:
    raise ValueError(f"model.attention.implementation={impl!r} runs only on types with library kernels (dense, "
                     "sliding); use 'auto', 'xla' or 'chunked'.")
  if impl == "cudnn" and (problems := cudnn_problems(cfg, seq_len, platform)):
    raise ValueError(" ".join(problems))
  if impl != "auto":
    return impl
  if (library and seq_len <= cfg.attention.cudnn_max_len
      and not cudnn_problems(cfg, seq_len, platform, max_head=128)):
    return "cudnn"
  if seq_len > xla_max_len(cfg, platform):
    return "chunked"
  return "xla"


def dtypes(cfg):
  return DTYPES[cfg.dtype], DTYPES[cfg.param_dtype]


def weight(module: nn.Module, name: str, shape, axes, init=None):
  """A parameter with logical axes (normal(init_std) unless ``init``), in the compute dtype."""
  dtype, pdtype = dtypes(module.cfg)
  init = init or nn.initializers.normal(module.cfg.init_std)
  return module.param(name, nn.with_logical_partitioning(init, axes), tuple(shape), pdtype).astype(dtype)


def sinks(module: nn.Module, num_heads: int):
  """Per-head sink logits, float32 [H], initialised to 0 (as DeepSeek-V4)."""
  return module.param("sinks", nn.with_logical_partitioning(nn.initializers.zeros, ("heads",)),
                      (num_heads,), jnp.float32)
