"""The ``distill`` config section: multi-specialist distillation (docs/distill.md).

Part of the one schema (``moejax/config.py:distill_config`` holds its fields
and defaults, ``base_config`` adds it; plain ``moejax train`` ignores it);
its validation is :func:`validate_distill` here. A domain is a data source plus its teacher::

    c.distill.domains.email = domain(source="stdlib", stdlib_packages="email")
    c.distill.domains.copy = domain(source="copy", teacher_steps=100, weight=2.0)
    c.distill.domains.mine = domain(source="files", files="mine/*.txt", teacher_workdir="runs/mine")

The student (``model``/``train``/``optim`` of the config) trains on the union
of the domains with ``alpha * CE + (1 - alpha) * T^2 * KL`` where each row's KL
is to its own domain's teacher, over the full vocabulary.
"""

from __future__ import annotations

import copy
import json
import os

import ml_collections

from moejax.config import base_config, distill_config, load_config
from moejax.config_apply import apply_config
from moejax.data import SOURCES

KL_DIRECTIONS = ("forward", "reverse")   # forward: KL(p_teacher || p_student); reverse: KL(p_student || p_teacher)
MODES = ("off_policy", "on_policy")      # teacher-forced on data | on the student's own samples
TEACHER_SOURCES = ("cohost", "cache")    # teachers in the step | precomputed teacher hidden states


def domain(source: str, *, weight: float = 1.0, teacher_steps: int = 0, teacher_config: str = "",
           teacher_workdir: str = "", **data_fields) -> ml_collections.ConfigDict:
  """One domain: ``data.*`` overrides (``source`` and e.g. ``stdlib_packages``) and its teacher.

  ``weight``: its share of every batch's rows. ``teacher_steps`` /
  ``teacher_config`` override ``distill.teacher_steps`` / ``teacher_config``
  (0 / ""). ``teacher_workdir``: an existing run (its ``config.json`` and
  checkpoints; e.g. converted weights) used as is instead of training one.
  """
  return ml_collections.ConfigDict(dict(
      weight=float(weight), teacher_steps=teacher_steps, teacher_config=teacher_config,
      teacher_workdir=teacher_workdir, data=ml_collections.ConfigDict(dict(source=source, **data_fields))))


def rows_per_domain(cfg: ml_collections.ConfigDict) -> dict[str, int]:
  """Rows of each micro-batch given to each domain, proportional to ``weight``
  (largest remainder, at least 1 each); they sum to the micro-batch size."""
  names = list(cfg.distill.domains)
  micro = cfg.train.batch_size // cfg.train.grad_accum_steps
  weights = [cfg.distill.domains[n].weight for n in names]
  spare = micro - len(names)
  exact = [spare * w / sum(weights) for w in weights]
  rows = [1 + int(x) for x in exact]
  order = sorted(range(len(names)), key=lambda i: int(exact[i]) - exact[i])
  for i in order[:micro - sum(rows)]:
    rows[i] += 1
  return dict(zip(names, rows))


def validate_distill(e: list[str], cfg: ml_collections.ConfigDict) -> None:
  """Appends an error per invalid ``distill.*`` field (called by ``moejax.validation.validate``)."""
  dc, w = cfg.distill, "distill"
  _need = lambda ok, msg: ok or e.append(msg)
  _need(0.0 <= dc.alpha <= 1.0, f"{w}.alpha={dc.alpha} must be in [0, 1] (1: labels only, 0: KL only).")
  _need(dc.temperature > 0, f"{w}.temperature={dc.temperature} must be > 0 (1: the plain distributions).")
  _need(dc.kl in KL_DIRECTIONS, f"{w}.kl={dc.kl!r} is not one of {KL_DIRECTIONS}.")
  _need(dc.mode in MODES, f"{w}.mode={dc.mode!r} is not one of {MODES}.")
  _need(dc.teacher_source in TEACHER_SOURCES, f"{w}.teacher_source={dc.teacher_source!r} is not one of "
        f"{TEACHER_SOURCES}.")
  _need(dc.cache_batches >= 0, f"{w}.cache_batches={dc.cache_batches} must be >= 0 (0: train.steps).")
  _need(dc.teacher_steps >= 1, f"{w}.teacher_steps={dc.teacher_steps} must be >= 1.")
  _need(dc.sample_temperature >= 0, f"{w}.sample_temperature={dc.sample_temperature} must be >= 0 (0: greedy).")
  for f in ("prompt_len", "continuation_len"):
    _need(dc[f] >= 1, f"{w}.{f}={dc[f]} must be >= 1.")
  if dc.mode == "on_policy":
    _need(dc.prompt_len + dc.continuation_len <= cfg.data.seq_len,
          f"{w}.prompt_len + continuation_len = {dc.prompt_len + dc.continuation_len} exceeds data.seq_len="
          f"{cfg.data.seq_len}; shorten them or raise data.seq_len.")
    _need(dc.teacher_source == "cohost", f"{w}.mode='on_policy' scores fresh samples, so it needs "
          f"teacher_source='cohost' (got {dc.teacher_source!r}).")
  if not dc.domains:
    return
  micro = cfg.train.batch_size // max(cfg.train.grad_accum_steps, 1)
  _need(len(dc.domains) <= micro, f"{w}.domains has {len(dc.domains)} domains but a micro-batch has {micro} rows "
        "(train.batch_size / grad_accum_steps); every domain needs a row: raise train.batch_size.")
  _need(cfg.data.shards == 1, f"data.shards={cfg.data.shards}: distillation lays out each batch by domain and "
        "reads one shard per domain; set --config.data.shards=1.")
  data_fields = set(cfg.data)
  for name, d in dc.domains.items():
    where = f"{w}.domains.{name}"
    unknown = sorted(set(d) - {"weight", "teacher_steps", "teacher_config", "teacher_workdir", "data"})
    _need(not unknown, f"{where} has unknown fields {unknown}; build it with moejax.distill.config.domain(...).")
    if unknown:
      continue
    _need(d.weight > 0, f"{where}.weight={d.weight} must be > 0.")
    _need(d.teacher_steps >= 0, f"{where}.teacher_steps={d.teacher_steps} must be >= 0 (0: distill.teacher_steps).")
    bad = sorted(set(d.data) - data_fields)
    _need(not bad, f"{where}.data has fields {bad} that data.* does not; known: {', '.join(sorted(data_fields))}.")
    _need(d.data.get("source", cfg.data.source) in SOURCES,
          f"{where}.data.source={d.data.get('source')!r} is unknown; known: {', '.join(SOURCES.names())}.")
    _need(not (d.teacher_workdir and d.teacher_config),
          f"{where}: teacher_workdir and teacher_config are both set; give one (a workdir is reused as trained).")
    if d.teacher_workdir:
      _need(os.path.exists(os.path.join(d.teacher_workdir, "config.json")),
            f"{where}.teacher_workdir={d.teacher_workdir!r} has no config.json; point it at a `moejax train` "
            "workdir (or a converted checkpoint with its config.json).")


def domain_data(cfg: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
  """``cfg.data`` with domain ``name``'s overrides."""
  data = copy.deepcopy(cfg.data)
  data.unlock()
  data.update(cfg.distill.domains[name].data.to_dict())
  return data


def teacher_config(cfg: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
  """The full config of domain ``name``'s specialist.

  From its ``teacher_workdir``'s ``config.json`` as saved; else from
  ``teacher_config`` (the domain's, else ``distill.teacher_config``) with the
  domain's data, ``teacher_steps``, the student's seed, mesh and tokenizer;
  by default the student's own config with every MLP dense (a dense
  specialist of the student's shape).
  """
  d = cfg.distill.domains[name]
  if d.teacher_workdir:
    with open(os.path.join(d.teacher_workdir, "config.json")) as f:
      saved = json.load(f)
    return apply_config(base_config(), saved, source=os.path.join(d.teacher_workdir, "config.json"))
  spec = d.teacher_config or cfg.distill.teacher_config
  out = copy.deepcopy(load_config(spec)) if spec else copy.deepcopy(cfg)
  out.unlock()
  if not spec:
    out.model.mlp_types = ("dense",)
    out.model.mtp.depth = 0
  out.data = domain_data(cfg, name)
  out.mesh = copy.deepcopy(cfg.mesh)
  out.seed = cfg.seed
  out.train.steps = d.teacher_steps or cfg.distill.teacher_steps
  out.distill = distill_config()
  return out

