"""Tensor layouts: one moejax variable <-> one or more Hugging Face tensors.

A mapping is a list of :class:`Tensor` entries, each naming a moejax leaf
(``path``: collection, modules..., name), the HF tensors it is made of and
a layout from ``LAYOUTS`` that converts between the two:

* ``copy``    same array (norm scales, biases, sinks, compressor ``ape``);
* ``linear``  torch ``nn.Linear`` weight ``[out, in]`` <-> moejax ``W`` whose
  first ``n_in`` axes are the input (``x @ W``): ``W = w.T.reshape(shape)``,
  e.g. ``q_proj [H*Dh, D]`` -> ``w_q [D, H, Dh]``, ``o_proj [D, H*Dh]`` ->
  ``w_o [H, Dh, D]`` (``n_in=2``), mHC ``fn [M, N*D]`` -> ``[N, D, M]``;
* ``experts`` E per-expert linear weights -> one ``[E, in, out]`` stack,
  filled expert by expert (the stack is the only full-size buffer);
* ``grouped`` DeepSeek-V4's grouped output projection ``wo_a [G*R, H*Dh/G]``
  -> ``w_o_a [G, H*Dh/G, R]``;
* ``index``   integer tables (hash routing's ``tid2eid``): int64 <-> int32.

Every layout is exact both ways, so moejax -> HF -> moejax is bit-identical.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import numpy as np

from moejax.registry import Registry

LAYOUTS = Registry("tensor layout")


@dataclasses.dataclass(frozen=True)
class Tensor:
  """moejax leaf ``path`` made of HF tensors ``hf`` through layout ``layout``."""

  path: tuple[str, ...]
  hf: tuple[str, ...]
  layout: str = "copy"
  n_in: int = 1  # linear / experts: how many leading moejax axes are the input


def param(path: str, hf: str, layout: str = "copy", n_in: int = 1, collection: str = "params") -> Tensor:
  """A one-tensor entry; ``path`` is slash-separated inside ``collection``."""
  return Tensor((collection, *path.split("/")), (hf,), layout, n_in)


@LAYOUTS.register("copy")
class Copy:
  @staticmethod
  def assemble(read: Callable, entry: Tensor, shape, dtype) -> np.ndarray:
    return np.asarray(read(entry.hf[0]), dtype).reshape(shape)

  @staticmethod
  def split(w: np.ndarray, entry: Tensor) -> list[np.ndarray]:
    return [w]


@LAYOUTS.register("linear")
class Linear:
  @staticmethod
  def assemble(read, entry, shape, dtype):
    return np.asarray(read(entry.hf[0]).T, dtype).reshape(shape)

  @staticmethod
  def split(w, entry):
    return [w.reshape(math.prod(w.shape[:entry.n_in]), -1).T]


@LAYOUTS.register("experts")
class Experts:
  @staticmethod
  def assemble(read, entry, shape, dtype):
    out = np.empty(shape, dtype)
    for e, name in enumerate(entry.hf):
      out[e] = np.asarray(read(name).T, dtype).reshape(shape[1:])
    return out

  @staticmethod
  def split(w, entry):
    return [w_e.reshape(math.prod(w_e.shape[:entry.n_in]), -1).T for w_e in w]


@LAYOUTS.register("grouped")
class Grouped:
  @staticmethod
  def assemble(read, entry, shape, dtype):
    g, _, r = shape
    return np.asarray(read(entry.hf[0]).reshape(g, r, -1).transpose(0, 2, 1), dtype)

  @staticmethod
  def split(w, entry):
    return [w.transpose(0, 2, 1).reshape(-1, w.shape[1])]


@LAYOUTS.register("index")
class Index:
  @staticmethod
  def assemble(read, entry, shape, dtype):
    return np.asarray(read(entry.hf[0]), np.int32).reshape(shape)

  @staticmethod
  def split(w, entry):
    return [np.asarray(w, np.int64)]


# ------------------------------------------------------------ shared blocks

def swiglu(ours: str, theirs: str, names=("gate_proj", "up_proj", "down_proj")) -> list[Tensor]:
  """A SwiGLU (``w_gate``, ``w_up``, ``w_down``) from three torch linears."""
  return [param(f"{ours}/{w}", f"{theirs}.{n}.weight", "linear") for w, n in zip(("w_gate", "w_up", "w_down"), names)]


def experts(ours: str, theirs: str, num_experts: int, names=("gate_proj", "up_proj", "down_proj")) -> list[Tensor]:
  """Routed experts ``w_gate/w_up [E, D, F]``, ``w_down [E, F, D]`` from per-expert linears."""
  return [Tensor(("params", *ours.split("/"), w), tuple(f"{theirs}.{e}.{n}.weight" for e in range(num_experts)),
                 "experts") for w, n in zip(("w_gate", "w_up", "w_down"), names)]


def dense_attention(ours: str, theirs: str, qk_norm: bool) -> list[Tensor]:
  """GQA ``w_q [D,H,Dh]``, ``w_k``/``w_v [D,K,Dh]``, ``w_o [H,Dh,D]`` (+ q/k norms)."""
  out = [param(f"{ours}/w_{n}", f"{theirs}.{n}_proj.weight", "linear") for n in "qkv"]
  out.append(param(f"{ours}/w_o", f"{theirs}.o_proj.weight", "linear", n_in=2))
  if qk_norm:
    out += [param(f"{ours}/{n}_norm/scale", f"{theirs}.{n}_norm.weight") for n in "qk"]
  return out


def trunk(m, head: str = "lm_head.weight", prefix: str = "model.", norms=("input_layernorm", "post_attention_layernorm"),
          ) -> list[Tensor]:
  """Embedding, final norm, output head and the per-layer pre-norms."""
  out = [param("embed", f"{prefix}embed_tokens.weight"), param("final_norm/scale", f"{prefix}norm.weight")]
  if not m.tie_embeddings:
    out.append(param("lm_head", head, "linear"))
  for i in range(m.num_layers):
    out += [param(f"layer_{i}/{ours}_norm/scale", f"{prefix}layers.{i}.{theirs}.weight")
            for ours, theirs in zip(("attention", "mlp"), norms)]
  return out


def moe_state(ours: str, theirs: str, bias: str | None, table: str | None) -> list[Tensor]:
  """Non-trainable router state: the selection bias and the hash table."""
  out = []
  if bias:
    out.append(param(f"{ours}/router/bias", f"{theirs}.{bias}", collection="router_bias"))
  if table:
    out.append(param(f"{ours}/router/tid2eid", f"{theirs}.{table}", "index", collection="hash_table"))
  return out
