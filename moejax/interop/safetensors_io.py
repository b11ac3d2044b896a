"""Streaming safetensors reading and sharded writing.

Reading opens each file with ``safetensors.safe_open`` (memory-mapped) and
materialises one tensor at a time, so host memory holds about one tensor
beyond the arrays already placed on devices. Sharded checkpoints are found
through ``model.safetensors.index.json``. Block-scaled FP8 weights (DeepSeek's
``weight_scale_inv`` releases) are dequantized on the fly; other quantization
schemes are refused with an error.

Writing goes tensor by tensor into files of at most ``max_shard_bytes``, with
an index json when there is more than one file (the layout of
``save_pretrained``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable

import numpy as np

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
SCALE_SUFFIX = "_scale_inv"


def _torch():
  try:
    import torch
  except ImportError as err:
    raise ImportError("reading Hugging Face checkpoints needs torch and safetensors (pip install "
                      "'moejax[interop]'): torch decodes bfloat16/fp8 tensors") from err
  return torch


class CheckpointReader:
  """Name -> numpy (float32 for floating tensors, int64 for integer ones), one tensor at a time."""

  def __init__(self, directory: str, quantization: dict | None = None):
    from safetensors import safe_open

    self._open = safe_open
    self.directory = directory
    index = os.path.join(directory, INDEX)
    if os.path.exists(index):
      with open(index) as f:
        self.files = dict(json.load(f)["weight_map"])
    elif os.path.exists(os.path.join(directory, SINGLE)):
      with safe_open(os.path.join(directory, SINGLE), "pt") as f:
        self.files = {k: SINGLE for k in f.keys()}
    else:
      raise FileNotFoundError(f"{directory} holds no {SINGLE} or {INDEX}; moejax reads safetensors checkpoints "
                              "(convert .bin files with transformers first).")
    self.block = self._quantization(quantization)

  def _quantization(self, q: dict | None):
    if not q:
      return None
    if q.get("quant_method") == "fp8" and q.get("fmt", "e4m3") == "e4m3" and q.get("weight_block_size"):
      return tuple(q["weight_block_size"])
    raise NotImplementedError(
        f"quantization_config {q} is not supported: moejax dequantizes block-scaled FP8 (quant_method='fp8', "
        "weight_block_size, *_scale_inv tensors) only. Dequantize the checkpoint to bf16 first.")

  def names(self) -> list[str]:
    """Tensor names, without the FP8 scales (they are folded into their weights)."""
    return sorted(k for k in self.files if not (self.block and k.endswith(SCALE_SUFFIX)))

  def _raw(self, name: str):
    # A file is opened (memory-mapped) per tensor and closed again, so its pages
    # leave this process's resident set once the tensor is copied out.
    with self._open(os.path.join(self.directory, self.files[name]), "pt") as f:
      return f.get_tensor(name).clone()

  def __call__(self, name: str) -> np.ndarray:
    torch = _torch()
    if name not in self.files:
      raise KeyError(f"tensor {name!r} is missing from the checkpoint in {self.directory}")
    t = self._raw(name)
    if self.block and name + SCALE_SUFFIX in self.files:
      return dequantize_fp8(t.to(torch.float32).numpy(), self._raw(name + SCALE_SUFFIX).to(torch.float32).numpy(),
                            self.block)
    if t.is_floating_point():
      return t.to(torch.float32).numpy()
    return t.numpy()


def dequantize_fp8(w_OxI: np.ndarray, scale_inv: np.ndarray, block: tuple[int, int]) -> np.ndarray:
  """``w[o, i] * scale_inv[o // bo, i // bi]`` (DeepSeek's block-scaled FP8), float32."""
  bo, bi = block
  o, i = w_OxI.shape
  scale = np.repeat(np.repeat(scale_inv, bo, axis=0), bi, axis=1)[:o, :i]
  return w_OxI * scale


def write_checkpoint(directory: str, tensors: Iterable[tuple[str, np.ndarray]],
                     max_shard_bytes: int = 5 * 2**30) -> list[str]:
  """Writes (name, array) pairs as safetensors shards, each in its own dtype; returns the file names.

  A shard is flushed when the next tensor would pass ``max_shard_bytes``;
  with several shards an index json maps each name to its file.
  """
  torch = _torch()
  from safetensors.torch import save_file

  os.makedirs(directory, exist_ok=True)
  shards, current, size, total = [], {}, 0, 0

  def flush():
    nonlocal current, size
    if current:
      name = f"shard-{len(shards):05d}.safetensors"
      save_file(current, os.path.join(directory, name), metadata={"format": "pt"})
      shards.append((name, list(current)))
    current, size = {}, 0

  for name, array in tensors:
    array = np.ascontiguousarray(array)
    if array.dtype.name == "bfloat16":  # ml_dtypes' bfloat16: numpy holds it, torch.from_numpy does not
      t = torch.from_numpy(array.view(np.uint16)).view(torch.bfloat16)
    else:
      t = torch.from_numpy(array)
    nbytes = t.numel() * t.element_size()
    if current and size + nbytes > max_shard_bytes:
      flush()
    current[name], size, total = t, size + nbytes, total + nbytes
  flush()
  for stale in (SINGLE, INDEX):
    if os.path.exists(os.path.join(directory, stale)):
      os.remove(os.path.join(directory, stale))
  if len(shards) == 1:
    os.replace(os.path.join(directory, shards[0][0]), os.path.join(directory, SINGLE))
    return [SINGLE]
  n = len(shards)
  files = []
  for k, (name, names) in enumerate(shards):
    final = f"model-{k + 1:05d}-of-{n:05d}.safetensors"
    os.replace(os.path.join(directory, name), os.path.join(directory, final))
    files.append((final, names))
  with open(os.path.join(directory, INDEX), "w") as f:
    json.dump({"metadata": {"total_size": total}, "weight_map": {t: fn for fn, names in files for t in names}}, f,
              indent=2, sort_keys=True)
  return [fn for fn, _ in files]
