"""Kernels from maintained libraries, imported on first use.

``tokamax`` (the optional ``kernels`` extra, ``pip install -e '.[kernels]'``)
is a Pallas kernel library for GPU and TPU; moejax uses its ``ragged_dot``
(MoE backend ``tokamax``) and ``dot_product_attention``
(``model.attention.implementation=tokamax``). Each call picks tokamax's
kernel for the platform (Mosaic on TPU and Hopper/Blackwell GPUs, Triton on
other GPUs) and falls back to tokamax's XLA implementation, which is what
runs on CPU.
"""

from __future__ import annotations

import importlib.util
import types

import jax


def installed(name: str) -> bool:
  """Whether the optional package ``name`` is importable (without importing it)."""
  return importlib.util.find_spec(name) is not None


def tokamax_problem(platform: str | None = None) -> str | None:
  """Why tokamax's kernels cannot run on ``platform`` with this JAX (None: they can).

  tokamax 0.0.12's GPU kernels (Pallas on Triton, for ``ragged_dot`` and
  ``dot_product_attention``) call ``pallas.dot``, which JAX 0.11 removed:
  measured on an H100 with JAX 0.11.2, every tokamax GPU call fails with
  "pl.dot was deprecated in JAX v0.11.0" (docs/benchmarks.md, accelerator
  suite). Its CPU path (XLA) and TPU path (Mosaic) do not use it.
  """
  if not installed("tokamax"):
    return "the tokamax package is not installed (pip install -e '.[kernels]')"
  if (platform or jax.default_backend()) == "gpu" and not pallas_has_dot():
    return (f"tokamax's GPU kernels call jax.experimental.pallas.dot, which JAX {jax.__version__} removed "
            "(a tokamax release newer than 0.0.12 may fix it)")
  return None


def pallas_has_dot() -> bool:
  """Whether ``jax.experimental.pallas.dot`` still exists (JAX < 0.11)."""
  from jax.experimental import pallas

  try:
    getattr(pallas, "dot")
  except AttributeError:
    return False
  return True


def tokamax() -> types.ModuleType:
  """The ``tokamax`` module, ready to call.

  tokamax reads absl flags on its first call and, when absl has parsed none,
  parses ``sys.argv``, which fails on any command line that is not absl's
  (pytest's, ``moejax train --config ...``). Marking the flags parsed first
  keeps every tokamax flag at its default, as the data pipeline does for Grain.
  """
  from absl import flags

  import tokamax as module

  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  return module
