"""Long-context evaluations, generated offline at any length and depth.

Retrieval tasks (``EVAL_TASKS``) build examples ``bos + context + answer``
with weight 1 on the answer tokens; an example counts as correct when every
answer token is the model's argmax given everything before it (teacher
forcing, i.e. what greedy decoding would produce). ``depth`` places the
needle at that fraction of the context (0 = start, 1 = end).

* ``passkey``: filler sentences hiding a 5-digit key (moejax.data.synthetic).
* ``needle``: one "magic number" sentence in real text (the standard
  library's held-out source), asked back at the end (Kamradt's
  needle-in-a-haystack).
* ``needle_multi``: four needles with different keys; one is asked (the one
  at ``depth``), the others distract.
* ``mqar``: multi-query associative recall; depth does not apply.

:func:`perplexity_by_position` measures the loss at each position of long
windows of held-out text, in log-spaced buckets.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable

import numpy as np

from moejax.data import SOURCES, get_tokenizer
from moejax.data.source import Document, document
from moejax.data.synthetic import MQAR, Passkey
from moejax.registry import Registry

# (tokenizer, length, depth, rng) -> one example (tokens, answer weights)
EvalTask = Callable[..., Document]
EVAL_TASKS: Registry[EvalTask] = Registry("long-context eval task")

NEEDLE_KEYS = ("amber", "cobalt", "crimson", "indigo", "jade", "ochre", "scarlet", "violet")


@EVAL_TASKS.register("passkey")
def passkey(tokenizer, length: int, depth: float, rng: np.random.Generator) -> Document:
  return document(*Passkey(tokenizer, length)(rng, depth=depth))


@EVAL_TASKS.register("mqar")
def mqar(tokenizer, length: int, depth: float, rng: np.random.Generator) -> Document:
  del depth
  return document(*MQAR(tokenizer, length)(rng))


_HAYSTACKS: dict[int, tuple[object, np.ndarray]] = {}  # id(tokenizer) -> (tokenizer, tokens)


def haystack(tokenizer, at_least: int) -> np.ndarray:
  """Held-out stdlib text as one token stream of at least ``at_least`` tokens
  (files joined in order, repeated if the split is shorter)."""
  cached = _HAYSTACKS.get(id(tokenizer))
  if cached is None or len(cached[1]) < at_least:
    from moejax.config import base_config

    docs = SOURCES.get("stdlib")(base_config().data, "validation", tokenizer)
    parts, total = [], 0
    for i in range(len(docs)):
      parts.append(docs[i]["tokens"][1:-1])  # without bos/eos
      total += len(parts[-1])
      if total >= at_least:
        break
    stream = np.concatenate(parts)
    _HAYSTACKS[id(tokenizer)] = (tokenizer, np.tile(stream, -(-at_least // len(stream))))
  return _HAYSTACKS[id(tokenizer)][1]


def _needles(tokenizer, length: int, depth: float, rng: np.random.Generator, count: int) -> Document:
  keys = rng.choice(NEEDLE_KEYS, size=count, replace=False)
  numbers = ["".join(map(str, rng.integers(0, 10, 7))) for _ in keys]
  needles = [tokenizer.encode(f"\nThe special magic number for {k} is {n}.\n") for k, n in zip(keys, numbers)]
  question = tokenizer.encode(f"\nWhat is the special magic number for {keys[0]}? "
                              f"The special magic number for {keys[0]} is ")
  answer = tokenizer.encode(numbers[0])
  budget = length - 1 - len(question) - len(answer) - sum(len(n) for n in needles)
  if budget < 1:
    raise ValueError(f"length {length} is too short for {count} needle(s); use at least "
                     f"{length - budget + 1}.")
  hay = haystack(tokenizer, budget + 1)
  start = int(rng.integers(0, len(hay) - budget + 1))
  hay = hay[start:start + budget]
  # The asked needle sits at ``depth``; distractors at random places.
  spots = [int(round(depth * budget))] + sorted(rng.integers(0, budget + 1, size=count - 1).tolist())
  order = np.argsort(spots, kind="stable")
  pieces, cursor = [], 0
  for i in order:
    pieces.append((hay[cursor:spots[i]], 0.0))
    pieces.append((needles[i], 0.0))
    cursor = spots[i]
  pieces += [(hay[cursor:], 0.0), (question, 0.0), (answer, 1.0)]
  tokens = np.concatenate([[tokenizer.bos_id], *(p for p, _ in pieces)])
  weights = np.repeat([0.0, *(w for _, w in pieces)], [1, *(len(p) for p, _ in pieces)])
  return document(tokens, weights)


@EVAL_TASKS.register("needle")
def needle(tokenizer, length: int, depth: float, rng: np.random.Generator) -> Document:
  return _needles(tokenizer, length, depth, rng, count=1)


@EVAL_TASKS.register("needle_multi")
def needle_multi(tokenizer, length: int, depth: float, rng: np.random.Generator) -> Document:
  return _needles(tokenizer, length, depth, rng, count=4)


def _pad(docs: list[Document], length: int, pad_id: int) -> dict[str, np.ndarray]:
  """Examples -> a next-token batch [S, length] (one segment per row)."""
  n = len(docs)
  batch = {"inputs": np.full((n, length), pad_id, np.int32), "targets": np.full((n, length), pad_id, np.int32),
           "weights": np.zeros((n, length), np.float32), "segment_ids": np.zeros((n, length), np.int32),
           "positions": np.zeros((n, length), np.int32)}
  for i, doc in enumerate(docs):
    t = len(doc["tokens"]) - 1
    batch["inputs"][i, :t] = doc["tokens"][:-1]
    batch["targets"][i, :t] = doc["tokens"][1:]
    batch["weights"][i, :t] = doc["weights"][1:]
    batch["segment_ids"][i, :t] = 1
    batch["positions"][i, :t] = np.arange(t)
  return batch


def exact_match(correct_SxT: np.ndarray, weights_SxT: np.ndarray) -> np.ndarray:
  """bool[S]: every answer token (weight > 0) of the example was predicted."""
  return np.all((correct_SxT > 0.5) | (weights_SxT <= 0), axis=1)


def retrieval_grid(exp, state, task: str, lengths: list[int], depths: list[float], samples: int,
                   seed: int = 0) -> list[dict]:
  """Accuracy of ``task`` for every (length, depth): rows of a table."""
  tokenizer = get_tokenizer(exp.cfg.data.tokenizer)
  make = EVAL_TASKS.get(task)
  depths = [0.0] if task == "mqar" else depths
  rows = []
  for length in lengths:
    for depth in depths:
      rng = np.random.default_rng([seed, length, int(depth * 1000)])
      docs = [make(tokenizer, length, depth, rng) for _ in range(samples)]
      batch = _pad(docs, max(len(d["tokens"]) for d in docs) - 1, tokenizer.pad_id)
      _, correct = exp.token_stats(state, batch)
      hits = exact_match(correct, batch["weights"])
      token_acc = float((correct * batch["weights"]).sum() / batch["weights"].sum())
      rows.append({"task": task, "length": length, "depth": depth, "accuracy": float(hits.mean()),
                   "token_accuracy": token_acc, "samples": samples})
  return rows


def perplexity_by_position(exp, state, length: int, windows: int) -> list[dict]:
  """Mean loss per log2 position bucket over ``windows`` windows of held-out text."""
  tokenizer = get_tokenizer(exp.cfg.data.tokenizer)
  stream = haystack(tokenizer, windows * (length + 1))
  docs = [document(stream[i * (length + 1):(i + 1) * (length + 1)], np.ones(length + 1)) for i in range(windows)]
  batch = _pad(docs, length, tokenizer.pad_id)
  ce, _ = exp.token_stats(state, batch)
  mean_ce = ce.mean(axis=0)
  rows, start = [], 0
  while start < length:
    stop = min(max(2 * start, 1), length)
    rows.append({"positions": f"{start}-{stop - 1}", "loss": float(mean_ce[start:stop].mean()),
                 "perplexity": float(np.exp(mean_ce[start:stop].mean()))})
    start = stop
  return rows


def write_report(rows: list[dict], out_dir: str, name: str) -> dict[str, str]:
  """``name``.json, a Markdown table and (for retrieval grids) a depth x length heatmap PNG."""
  os.makedirs(out_dir, exist_ok=True)
  paths = {"json": os.path.join(out_dir, f"{name}.json"), "markdown": os.path.join(out_dir, f"{name}.md")}
  with open(paths["json"], "w") as f:
    json.dump(rows, f, indent=2)
  keys = list(rows[0])
  lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
  lines += ["| " + " | ".join(f"{r[k]:.3f}" if isinstance(r[k], float) else str(r[k]) for k in keys) + " |"
            for r in rows]
  with open(paths["markdown"], "w") as f:
    f.write("\n".join(lines) + "\n")
  if "depth" in rows[0]:
    paths["heatmap"] = os.path.join(out_dir, f"{name}.png")
    _heatmap(rows, paths["heatmap"], title=name)
  return paths


def heatmap_panel(ax, rows: list[dict], fontsize: int = 8):
  """Draws the depth x length accuracy grid of retrieval ``rows`` on ``ax``; returns the image."""
  lengths = sorted({r["length"] for r in rows})
  depths = sorted({r["depth"] for r in rows})
  grid = np.full((len(depths), len(lengths)), np.nan)
  for r in rows:
    grid[depths.index(r["depth"]), lengths.index(r["length"])] = r["accuracy"]
  im = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
  ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
  ax.set_yticks(range(len(depths)), [f"{d:.2f}" for d in depths])
  for i in range(len(depths)):
    for j in range(len(lengths)):
      if np.isfinite(grid[i, j]):
        ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=fontsize)
  return im


def _heatmap(rows: list[dict], path: str, title: str) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  lengths, depths = {r["length"] for r in rows}, {r["depth"] for r in rows}
  fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(lengths), 1.0 + 0.5 * len(depths)))
  im = heatmap_panel(ax, rows)
  ax.set_xlabel("context length (tokens)")
  ax.set_ylabel("needle depth")
  ax.set_title(title)
  fig.colorbar(im, ax=ax, label="accuracy")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def run(cfg, workdir: str, task: str, lengths: list[int], depths: list[float], samples: int,
        devices=None) -> dict:
  """Evaluates the newest checkpoint of ``workdir`` on ``task`` (an
  ``EVAL_TASKS`` name, or ``perplexity``); writes ``workdir/evals/<task>.*``."""
  from moejax.train import load_checkpoint

  if task != "perplexity" and task not in EVAL_TASKS:
    raise KeyError(f"unknown eval task {task!r}; known: perplexity, {', '.join(EVAL_TASKS.names())}")
  exp, step, state = load_checkpoint(cfg, workdir, devices)
  if task == "perplexity":
    rows = [dict(r, length=n) for n in lengths for r in perplexity_by_position(exp, state, n, samples)]
  else:
    rows = retrieval_grid(exp, state, task, lengths, depths, samples, seed=cfg.seed)
  return {"step": step, "rows": rows, "files": write_report(rows, os.path.join(workdir, "evals"), task)}
