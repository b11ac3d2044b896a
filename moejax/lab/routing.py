"""Where tokens go: specialisation by data domain / token class, and routing stability between checkpoints.

All counts come from the routed experts of real forward passes: ``route(batch) -> {layer: expert_BxTxK}``,
e.g. ``lambda b: routing_of(exp, state, b)`` (:func:`moejax.lab.replay.routing_of`) or, for a
converted checkpoint, ``lambda b: model_routing(model, variables, b)``.
"""

from __future__ import annotations

import itertools

import ml_collections
import numpy as np

from moejax.data import ShardedBatches
from moejax.data.tokenizers import get_tokenizer
from moejax.lab.replay import routing_of

TOKEN_CLASSES = ("whitespace", "letter", "digit", "punctuation", "other")


def token_class(text: str) -> int:
  """Index into TOKEN_CLASSES of a token's text (its first character; '' and non-ASCII: other)."""
  if not text or not text[0].isascii():
    return 4
  c = text[0]
  return 0 if c.isspace() else 1 if c.isalpha() else 2 if c.isdigit() else 3 if c.isprintable() else 4


def token_classes(ids: np.ndarray, tokenizer) -> np.ndarray:
  """int [...] class of each token id (decoded one id at a time)."""
  table = {int(i): token_class(tokenizer.decode([int(i)])) for i in np.unique(ids)}
  return np.vectorize(table.__getitem__, otypes=[np.int64])(ids)


def expert_counts(routing: dict[str, np.ndarray], groups_BxT: np.ndarray, num_groups: int, num_experts: int,
                  weights_BxT: np.ndarray | None = None) -> dict[str, np.ndarray]:
  """{layer: [G, E]} assignments of tokens in each group to each expert (empty slots, id E, dropped)."""
  out = {}
  for layer, expert_BxTxK in routing.items():
    counts = np.zeros((num_groups, num_experts + 1))
    g = np.broadcast_to(groups_BxT[..., None], expert_BxTxK.shape)
    w = np.ones(expert_BxTxK.shape) if weights_BxT is None else np.broadcast_to(weights_BxT[..., None],
                                                                               expert_BxTxK.shape)
    np.add.at(counts, (g.ravel(), np.minimum(expert_BxTxK, num_experts).ravel()), w.ravel())
    out[layer] = counts[:, :num_experts]
  return out


def domain_batches(cfg: ml_collections.ConfigDict, package: str, num_batches: int, split: str = "validation"):
  """Batches of ``cfg``'s shapes from one top-level package of the stdlib source (``data.stdlib_packages``)."""
  data = ml_collections.ConfigDict(cfg.data.to_dict())
  data.update(source="stdlib", stdlib_packages=package)
  it = ShardedBatches(data, split=split, global_batch=cfg.train.batch_size, seed=cfg.seed, num_shards=1)
  return [next(it) for _ in range(num_batches)]


def domain_specialisation(route, domains: dict[str, list[dict]], num_experts: int) -> dict[str, np.ndarray]:
  """{layer: [domains, E]} share of each domain's assignments per expert (rows sum to 1)."""
  total = None
  for g, batches in enumerate(domains.values()):
    for batch in batches:
      counts = expert_counts(route(batch), np.full(batch["inputs"].shape, g), len(domains), num_experts,
                             batch["weights"])
      total = counts if total is None else {k: total[k] + counts[k] for k in total}
  return {k: v / np.maximum(v.sum(1, keepdims=True), 1) for k, v in total.items()}


def token_class_specialisation(route, batches: list[dict], num_experts: int, tokenizer="byte"
                               ) -> dict[str, np.ndarray]:
  """{layer: [TOKEN_CLASSES, E]} share of each input-token class's assignments per expert (rows sum to 1)."""
  tokenizer = get_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer
  total = None
  for batch in batches:
    classes = token_classes(batch["inputs"], tokenizer)
    counts = expert_counts(route(batch), classes, len(TOKEN_CLASSES), num_experts, batch.get("weights"))
    total = counts if total is None else {k: total[k] + counts[k] for k in total}
  return {k: v / np.maximum(v.sum(1, keepdims=True), 1) for k, v in total.items()}


def topk_changed(a_BxTxK: np.ndarray, b_BxTxK: np.ndarray) -> float:
  """Share of tokens whose set of routed experts differs between two routings."""
  return float(np.mean(np.any(np.sort(a_BxTxK, -1) != np.sort(b_BxTxK, -1), -1)))


def routing_stability(cfg: ml_collections.ConfigDict, run_dir: str, batches: list[dict], devices=None) -> list[dict]:
  """For consecutive checkpoints of ``run_dir``: ``{"from", "to", layer: share of tokens of ``batches``
  whose top-k set changed}``."""
  from moejax.checkpoint import Checkpointer
  from moejax.train import Experiment

  exp = Experiment(cfg, devices)
  ckpt = Checkpointer(run_dir, keep=cfg.train.keep_checkpoints)
  routings = {}
  for step in ckpt.all_steps():
    state = ckpt.restore(step, exp.abstract_state)
    routings[step] = [routing_of(exp, state, b) for b in batches]
  ckpt.close()
  steps = sorted(routings)
  rows = []
  for a, b in itertools.pairwise(steps):
    layers = routings[a][0].keys()
    rows.append({"from": a, "to": b, **{layer: float(np.mean([topk_changed(ra[layer], rb[layer])
                                                              for ra, rb in zip(routings[a], routings[b])]))
                                        for layer in layers}})
  return rows
