"""Generation: chunked prefill, cached decoding and sampling (``moejax generate``).

Library API (jittable; the distillation trainer samples with it)::

    from moejax.generate import sample
    out = sample(model, variables, prompts_BxP, prompt_lengths_B, rng=key, max_new_tokens=64,
                 temperature=1.0, top_k=0, top_p=1.0, eos_id=None, prefill_chunk=256)
    out.tokens_BxN  # int32 [B, max_new_tokens]: the continuation; after a row's eos, 0s
    out.lengths_B   # int32 [B]: tokens generated per row (the eos included)

``prompts_BxP`` are left-aligned, padded after each row's ``prompt_lengths_B``
(>= 1) tokens. The prompt is fed ``prefill_chunk`` tokens at a time into the
per-layer caches (``moejax/layers/attention/cache.py``; each row at its own
positions, so a short prompt in a batch gives the same tokens as alone), then
one token per step inside a ``lax.while_loop`` that stops when every row has
emitted ``eos_id``. :func:`stream` is the host-loop variant the CLI uses to
print tokens as they come. Sampling (:func:`next_token`): greedy at
``temperature == 0``, else softmax(logits / temperature) restricted to the
``top_k`` most likely tokens (0: all) and to the smallest set whose
probability reaches ``top_p`` (Holtzman et al., 2020), seeded by ``rng``.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from moejax.config import ConfigError, expand_schedule
from moejax.layers.attention import ATTENTION
from moejax.layers.mlp import MLP
from moejax.layers.moe import MoE  # noqa: F401  (registers the MoE types)


class Sampled(NamedTuple):
  tokens_BxN: jax.Array  # int32 [B, max_new_tokens]
  lengths_B: jax.Array   # int32 [B]


# ----------------------------------------------------------------------------- sampling


def filter_logits(logits_BxV, top_k, top_p):
  """Logits outside the top-k / top-p (nucleus) set set to -inf; float32 [B, V].

  ``top_k`` <= 0 and ``top_p`` >= 1 disable each filter; both may be traced.
  The most likely token is always kept.
  """
  logits = logits_BxV.astype(jnp.float32)
  sorted_BxV = jnp.sort(logits, axis=-1)[:, ::-1]
  v = logits.shape[-1]
  k = jnp.clip(jnp.where(top_k > 0, top_k, v), 1, v)
  kth_Bx1 = jnp.take(sorted_BxV, k - 1, axis=-1)[:, None]
  probs = jax.nn.softmax(sorted_BxV, axis=-1)
  before = jnp.cumsum(probs, axis=-1) - probs  # probability mass strictly above each sorted token
  kept = (before < top_p) | (jnp.arange(v) == 0)
  nucleus_Bx1 = jnp.min(jnp.where(kept, sorted_BxV, jnp.inf), axis=-1, keepdims=True)
  return jnp.where((logits < kth_Bx1) | (logits < nucleus_Bx1), -jnp.inf, logits)


def next_token(logits_BxV, rng, temperature=1.0, top_k=0, top_p=1.0):
  """int32 [B]: argmax if ``temperature == 0``, else a sample from the filtered softmax."""
  t = jnp.asarray(temperature, jnp.float32)
  scaled = filter_logits(logits_BxV / jnp.where(t > 0, t, 1.0), top_k, top_p)
  sampled = jax.random.categorical(rng, scaled, axis=-1)
  return jnp.where(t > 0, sampled, jnp.argmax(logits_BxV, axis=-1)).astype(jnp.int32)


# ----------------------------------------------------------------------------- cached forward


def cache_shapes(model: nn.Module, variables, batch: int, max_len: int):
  """The decode caches' ``jax.ShapeDtypeStruct`` tree (nothing allocated; ``variables`` may be abstract)."""
  dummy = jnp.zeros((batch, 1), jnp.int32)
  return jax.eval_shape(lambda v: model.apply(v, dummy, dummy, dummy, decode_len=max_len,
                                              mutable=["cache"])[1]["cache"], variables)


def init_cache(model: nn.Module, variables, batch: int, max_len: int):
  """Empty (all zero) decode caches for ``batch`` rows of up to ``max_len`` tokens."""
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), cache_shapes(model, variables, batch, max_len))


def forward_chunk(model: nn.Module, variables, cache, max_len: int, tokens_BxC, start_B, count_B):
  """Feeds each row's first ``count_B`` tokens at positions ``start_B + 0..``; (logits_BxV, cache).

  ``max_len`` must be the one the cache was made for. ``logits_BxV``
  (float32) predict the token after each row's last fed token (undefined
  where ``count == 0``); the chunk's [B, C, V] logits are never formed.
  """
  c = tokens_BxC.shape[1]
  positions = start_B[:, None] + jnp.arange(c, dtype=jnp.int32)
  segments = (jnp.arange(c) < count_B[:, None]).astype(jnp.int32)
  hidden, new = model.apply({**variables, "cache": cache}, tokens_BxC, positions, segments, return_hidden=True,
                            decode_len=max_len, mutable=["cache"])
  last = jnp.clip(count_B - 1, 0, c - 1)
  x_BxD = jnp.take_along_axis(hidden.x_BxTxD, last[:, None, None], axis=1)[:, 0]
  logits = jnp.einsum("BD,DV->BV", x_BxD, hidden.head_DxV).astype(jnp.float32)
  return logits, new["cache"]


def prefill(model: nn.Module, variables, cache, max_len: int, prompts_BxP, lengths_B, chunk: int):
  """Feeds the prompts ``chunk`` tokens at a time (a ``lax.scan``): (next-token logits_BxV, cache)."""
  b, p = prompts_BxP.shape
  chunk = int(min(chunk, p))
  n = -(-p // chunk)
  chunks_NxBxC = jnp.moveaxis(jnp.pad(prompts_BxP, [(0, 0), (0, n * chunk - p)]).reshape(b, n, chunk), 1, 0)

  def step(carry, xs):
    logits, cache = carry
    start, tokens_BxC = xs
    count = jnp.clip(lengths_B - start, 0, chunk).astype(jnp.int32)
    new_logits, cache = forward_chunk(model, variables, cache, max_len, tokens_BxC,
                                      jnp.full((b,), start, jnp.int32), count)
    return (jnp.where((count > 0)[:, None], new_logits, logits), cache), None

  init = (jnp.zeros((b, model.cfg.vocab_size), jnp.float32), cache)
  (logits, cache), _ = jax.lax.scan(step, init, (jnp.arange(n, dtype=jnp.int32) * chunk, chunks_NxBxC))
  return logits, cache


class _Loop(NamedTuple):
  step: jax.Array
  logits_BxV: jax.Array
  cache: dict
  tokens_BxN: jax.Array
  lengths_B: jax.Array
  done_B: jax.Array
  rng: jax.Array


def _emit(loop: _Loop, temperature, top_k, top_p, eos_id):
  """Chooses the next token of every unfinished row; (token_B, loop with it recorded)."""
  rng, key = jax.random.split(loop.rng)
  token = jnp.where(loop.done_B, 0, next_token(loop.logits_BxV, key, temperature, top_k, top_p))
  tokens = jax.lax.dynamic_update_slice_in_dim(loop.tokens_BxN, token[:, None], loop.step, axis=1)
  lengths = loop.lengths_B + (~loop.done_B).astype(jnp.int32)
  done = loop.done_B | (token == eos_id)
  return token, loop._replace(tokens_BxN=tokens, lengths_B=lengths, done_B=done, rng=rng)


def sample(model: nn.Module, variables, prompts_BxP, prompt_lengths_B, *, rng, max_new_tokens: int,
           temperature=1.0, top_k=0, top_p=1.0, eos_id: int | None = None, prefill_chunk: int = 256) -> Sampled:
  """Samples ``max_new_tokens`` continuations of each prompt (see the module doc).

  Jitted; ``temperature``, ``top_k``, ``top_p`` and ``eos_id`` are traced
  (changing them does not recompile). The cache holds ``P + max_new_tokens``
  positions per row.
  """
  return _sample(model, variables, prompts_BxP, prompt_lengths_B, rng, max_new_tokens, temperature, top_k, top_p,
                 -1 if eos_id is None else eos_id, prefill_chunk)


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "prefill_chunk"))
def _sample(model, variables, prompts_BxP, prompt_lengths_B, rng, max_new_tokens, temperature, top_k, top_p, eos_id,
            prefill_chunk) -> Sampled:
  b, p = prompts_BxP.shape
  max_len = p + max_new_tokens
  lengths_B = jnp.asarray(prompt_lengths_B, jnp.int32)
  cache = init_cache(model, variables, b, max_len)
  logits, cache = prefill(model, variables, cache, max_len, jnp.asarray(prompts_BxP, jnp.int32), lengths_B,
                          prefill_chunk)
  loop = _Loop(jnp.int32(0), logits, cache, jnp.zeros((b, max_new_tokens), jnp.int32), jnp.zeros((b,), jnp.int32),
               jnp.zeros((b,), bool), rng)

  def body(loop: _Loop) -> _Loop:
    token, loop = _emit(loop, temperature, top_k, top_p, eos_id)
    logits, cache = forward_chunk(model, variables, loop.cache, max_len, token[:, None],
                                  lengths_B + loop.step, jnp.ones((b,), jnp.int32))
    return loop._replace(step=loop.step + 1, logits_BxV=logits, cache=cache)

  def more(loop: _Loop):
    return (loop.step < max_new_tokens - 1) & ~jnp.all(loop.done_B)

  loop = jax.lax.while_loop(more, body, loop)
  last = jax.lax.cond(loop.step < max_new_tokens,
                      lambda l: _emit(l, temperature, top_k, top_p, eos_id)[1], lambda l: l, loop)
  return Sampled(last.tokens_BxN, last.lengths_B)


# ----------------------------------------------------------------------------- checks, streaming, CLI


def check_decodable(model_cfg) -> None:
  """Raises ConfigError if cached decoding cannot reproduce the model's forward pass.

  Asks the registry entries in use: every attention type needs a ``decode``
  method, and no MLP type may depend on the other tokens of the batch
  (``batch_dependence``: e.g. expert-choice routing and capacity dispatch;
  token-choice routing is per token, so decoding it is exact).
  """
  errors = []
  for name in sorted(set(expand_schedule(model_cfg.attention_types, model_cfg.num_layers))):
    if name in ATTENTION and not callable(getattr(ATTENTION.get(name), "decode", None)):
      errors.append(f"attention type {name!r} has no decode method, so it cannot generate; give its class a "
                    "decode(x_BxCxD, positions_BxC, segment_ids_BxC, max_len) (docs/extending.md).")
  for name in sorted(set(expand_schedule(model_cfg.mlp_types, model_cfg.num_layers))):
    reasons = MLP.capability(name, "batch_dependence") if name in MLP else None
    errors.extend(r for r in (reasons(model_cfg) if reasons else []) if r not in errors)
  if errors:
    raise ConfigError(" ".join(errors))


def stream(model: nn.Module, variables, prompts_BxP, prompt_lengths_B, *, rng, max_new_tokens: int,
           temperature=1.0, top_k=0, top_p=1.0, eos_id: int | None = None, prefill_chunk: int = 256
           ) -> Iterator[jax.Array]:
  """:func:`sample` as a host loop: yields int32 [B] tokens step by step (0 for finished rows).

  Same tokens as :func:`sample` for the same arguments; one jitted prefill
  and one jitted decode step.
  """
  b, p = prompts_BxP.shape
  max_len = p + max_new_tokens
  lengths_B = jnp.asarray(prompt_lengths_B, jnp.int32)

  @jax.jit
  def start(variables, prompts, lengths, rng):
    cache = init_cache(model, variables, b, max_len)
    logits, cache = prefill(model, variables, cache, max_len, prompts, lengths, prefill_chunk)
    return _Loop(jnp.int32(0), logits, cache, jnp.zeros((b, max_new_tokens), jnp.int32),
                 jnp.zeros((b,), jnp.int32), jnp.zeros((b,), bool), rng)

  emit = jax.jit(_emit)

  @jax.jit
  def advance(variables, loop, token):
    logits, cache = forward_chunk(model, variables, loop.cache, max_len, token[:, None], lengths_B + loop.step,
                                  jnp.ones((b,), jnp.int32))
    return loop._replace(step=loop.step + 1, logits_BxV=logits, cache=cache)

  loop = start(variables, jnp.asarray(prompts_BxP, jnp.int32), lengths_B, rng)
  for i in range(max_new_tokens):
    token, loop = emit(loop, temperature, top_k, top_p, -1 if eos_id is None else eos_id)
    yield token
    if bool(jnp.all(loop.done_B)) or i == max_new_tokens - 1:
      return
    loop = advance(variables, loop, token)


def generate_text(cfg, workdir: str, prompts: list[str], *, out=None, max_new_tokens: int = 128,
                  temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                  prefill_chunk: int = 256) -> list[str]:
  """``moejax generate``: continues each prompt with the newest checkpoint of ``workdir``.

  Tokenizes with ``cfg.data.tokenizer`` (bos first, stops at its eos) and
  writes to ``out`` (a text stream, e.g. stdout) as tokens come: a single
  prompt streams token by token, several prompts (one batch) each print when
  done, under a ``=== prompt i of n ===`` label. Returns the continuations.
  """
  import numpy as np

  from moejax.data import get_tokenizer
  from moejax.train import load_checkpoint

  check_decodable(cfg.model)
  exp, step, state = load_checkpoint(cfg, workdir)
  tok = get_tokenizer(cfg.data.tokenizer)
  ids = [np.concatenate([[tok.bos_id], tok.encode(p)]).astype(np.int32) for p in prompts]
  lengths = np.array([len(i) for i in ids], np.int32)
  batch = np.zeros((len(ids), lengths.max()), np.int32)
  for b, row in enumerate(ids):
    batch[b, :len(row)] = row
  variables = {"params": state.params, **state.model_state}
  tokens = stream(exp.model, variables, batch, lengths, rng=jax.random.key(seed), max_new_tokens=max_new_tokens,
                  temperature=temperature, top_k=top_k, top_p=top_p, eos_id=tok.eos_id, prefill_chunk=prefill_chunk)
  new: list[list[int]] = [[] for _ in prompts]
  done = [False] * len(prompts)
  shown = ""
  if out and len(prompts) == 1:
    out.write(prompts[0])
  for token_B in tokens:
    for b, t in enumerate(np.asarray(token_B).tolist()):
      done[b] = done[b] or t == tok.eos_id
      if not done[b]:
        new[b].append(t)
    if out and len(prompts) == 1:  # decode the whole continuation: multi-byte characters print once complete
      text = tok.decode(new[0])
      out.write(text[len(shown):] if text.startswith(shown) else text)
      out.flush()
      shown = text
  texts = [tok.decode(n) for n in new]
  if out and len(prompts) > 1:
    for i, (prompt, text) in enumerate(zip(prompts, texts), 1):
      out.write(f"=== prompt {i} of {len(prompts)} ===\n{prompt}{text}\n\n")
  elif out:
    out.write("\n")
  return texts
