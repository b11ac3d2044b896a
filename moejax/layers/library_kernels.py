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


def installed(name: str) -> bool:
  """Whether the optional package ``name`` is importable (without importing it)."""
  return importlib.util.find_spec(name) is not None


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
