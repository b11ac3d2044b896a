"""What a run tells its user: where it starts, how its routers do, how it ended, what to run next.

The train loop calls :func:`check_workdir` before it builds anything,
:func:`report_start` once the newest checkpoint is restored (a console line
``resumed from step N of M (checkpoint PATH)`` / ``starting fresh`` /
``already finished at step M``, and one record per start in
``WORKDIR/runs.jsonl`` with its ``restored_step``), :func:`router_summary` at
eval steps, and :func:`closing_summary` at the end (final and best eval loss
with units, where the files are, ``loss_curve.png``, the next commands).
Everything goes to stderr; stdout stays for results (``eval``'s JSON, generated text).
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import time

import ml_collections
import numpy as np

from moejax import config as config_lib

RUNS = "runs.jsonl"
LOSS_CURVE = "loss_curve.png"


def say(message: str) -> None:
  print(message, file=sys.stderr, flush=True)


def check_workdir(workdir: str) -> None:
  """Raises ConfigError (one line) unless ``workdir`` is, or can be created as, a writable directory.

  Creates nothing: the nearest existing ancestor must be a directory this
  process can write in (tested by creating and removing a temporary file,
  which also catches read-only mounts and immutable directories).
  """
  path = os.path.abspath(workdir)
  existing = path
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    where = "is a file" if existing == path else f"is under {existing}, which is a file"
    raise config_lib.ConfigError(f"--workdir {workdir} {where}, not a directory; choose another --workdir.")
  try:
    with tempfile.TemporaryFile(dir=existing, prefix=".moejax-write-test-"):
      pass
  except OSError as err:
    what = "is" if existing == path else f"would be created in {existing}, which is"
    raise config_lib.ConfigError(
        f"--workdir {workdir} {what} not writable ({err.strerror}); choose a writable --workdir "
        "or fix its permissions.") from None


def read_saved_config(workdir: str) -> dict | None:
  """``WORKDIR/config.json`` of an earlier run (a dict), or None."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def report_start(workdir: str, cfg: ml_collections.ConfigDict, restored_step: int | None, checkpoint_dir: str,
                 saved_config: dict | None, skipped: list[str], primary: bool = True) -> str:
  """Prints where the run starts and appends it to ``WORKDIR/runs.jsonl``; returns the line.

  ``restored_step``: the step of the checkpoint restored (None: none). Warns
  when ``train.steps`` changed since the run that wrote the checkpoint: the
  learning-rate schedule spans ``train.steps``, so it is stretched (or shrunk)
  from the restored step on.
  """
  total = cfg.train.steps
  checkpoint = None if restored_step is None else os.path.join(checkpoint_dir, str(restored_step))
  if restored_step is None:
    line, status = f"starting fresh: step 0 of {total}", "fresh"
  elif restored_step >= total:
    line, status = f"already finished at step {restored_step} (train.steps={total}; checkpoint {checkpoint})", \
        "finished"
  else:
    line, status = f"resumed from step {restored_step} of {total} (checkpoint {checkpoint})", "resumed"
  if not primary:
    return line
  say(f"moejax train: {line}" + (f", after setting aside {len(skipped)} (see the warnings above)" if skipped else ""))
  old_steps = (saved_config or {}).get("train", {}).get("steps")
  if restored_step and old_steps is not None and old_steps != total:
    say(f"moejax train: warning: train.steps changed from {old_steps} to {total} since the checkpoint of step "
        f"{restored_step} was written. The learning-rate schedule (warm-up and decay) spans train.steps, so it is "
        f"recomputed for {total} steps: from step {restored_step} on the learning rate follows the new schedule "
        "(after a finished decay it rises again). See docs/cli.md, 'Extending a run'.")
  record = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "status": status, "restored_step": restored_step or 0,
            "checkpoint": checkpoint, "steps": total, "set_aside": skipped, "argv": sys.argv}
  with open(os.path.join(workdir, RUNS), "a") as f:
    f.write(json.dumps(record) + "\n")
  return line


def read_runs(workdir: str) -> list[dict]:
  """The records :func:`report_start` appended, oldest first."""
  path = os.path.join(workdir, RUNS)
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def router_summary(step: int, metrics: dict, dead_below: float = 0.01) -> list[str]:
  """One line per MoE layer: load max/min over mean, dead experts, dropped fraction.

  ``metrics``: the train step's metrics (``layer_i/mlp/expert_load`` [E] and
  scalars beside it, see ``moejax/layers/moe.py``). An expert is dead when its
  load is under ``dead_below`` of the mean.
  """
  lines = []
  for name in sorted(k for k in metrics if k.endswith("/expert_load")):
    layer = name.rsplit("/", 1)[0]
    load_E = np.asarray(metrics[name], np.float64)
    dead = np.flatnonzero(load_E < dead_below)
    get = lambda key: float(np.asarray(metrics.get(f"{layer}/{key}", math.nan)))
    lines.append(f"step {step} router {layer}: load max/mean {load_E.max():.2f}, min/mean {load_E.min():.2f}, "
                 f"dead experts {len(dead)}/{load_E.size}{' ' + str(dead.tolist()) if len(dead) else ''}, "
                 f"dropped {get('dropped_fraction'):.1%}")
  for line in lines:
    say(line)
  return lines


def _records(workdir: str) -> list[dict]:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  out = []
  with open(path) as f:
    for line in f:
      try:
        out.append(json.loads(line))
      except json.JSONDecodeError:
        continue
  return out


def loss_units(loss: float, tokenizer: str) -> str:
  """``2.1 nats/token`` (plus ``= 3.0 bits/byte`` for the byte tokenizer: one token per byte)."""
  text = f"{loss:.4f} nats/token"
  return text + (f" = {loss / math.log(2):.4f} bits/byte" if tokenizer == "byte" else "")


def write_loss_curve(workdir: str, records: list[dict]) -> str | None:
  """``WORKDIR/loss_curve.png``: train loss (and eval loss) against step; None without records."""
  train = [(r["step"], r["loss"]) for r in records if "loss" in r]
  evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
  if not train:
    return None
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(6, 4))
  ax.plot(*zip(*train), label="train loss")
  if evals:
    ax.plot(*zip(*evals), "o-", label="eval loss")
  ax.set(xlabel="step", ylabel="loss (nats/token)", title=os.path.basename(os.path.abspath(workdir)))
  ax.grid(alpha=0.3)
  ax.legend()
  path = os.path.join(workdir, LOSS_CURVE)
  fig.savefig(path, dpi=100, bbox_inches="tight")
  plt.close(fig)
  return path


def closing_summary(workdir: str, cfg: ml_collections.ConfigDict) -> str:
  """Prints (and returns) how the run ended and what to run next; writes ``loss_curve.png``."""
  records = _records(workdir)
  lines = [f"moejax train: done, {workdir}"]
  if records:
    last = records[-1]
    lines.append(f"  final train loss (step {last['step']}): {loss_units(last['loss'], cfg.data.tokenizer)}")
  evals = [r for r in records if "eval_loss" in r]
  if evals:
    best = min(evals, key=lambda r: r["eval_loss"])
    lines.append(f"  final eval loss (step {evals[-1]['step']}): "
                 f"{loss_units(evals[-1]['eval_loss'], cfg.data.tokenizer)}")
    lines.append(f"  best eval loss (step {best['step']}): {loss_units(best['eval_loss'], cfg.data.tokenizer)}")
  curve = write_loss_curve(workdir, records)
  lines += [f"  checkpoints: {os.path.join(workdir, 'checkpoints')}",
            f"  metrics:     {os.path.join(workdir, 'metrics.jsonl')}",
            f"  tensorboard: tensorboard --logdir {os.path.join(workdir, 'tensorboard')}"
            " (pip install -e '.[tensorboard]')"]
  if curve:
    lines.append(f"  loss curve:  {curve}")
  wd = f"--workdir {workdir}"
  lines += ["next:", f"  moejax eval {wd}", f'  moejax generate {wd} --prompt "def main("',
            f"  moejax convert --to-hf {workdir} --out {workdir}-hf",
            f"  (they read {os.path.join(workdir, 'config.json')} when --config is not given)"]
  text = "\n".join(lines)
  say(text)
  return text
