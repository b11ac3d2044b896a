"""Runs real ``moejax train`` processes and injects faults into them.

Also a script: ``python -m tests.reliability.harness --trials 20`` runs that
many seeded kill -9 trials (half of them aimed at asynchronous saves) and
prints the counts.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STEPS, EVERY = 24, 4
ARGS = ["--config", "configs/tiny.py", "--config.model.num_layers=2", "--config.model.d_model=64",
        "--config.data.seq_len=64", "--config.train.batch_size=8", "--config.train.log_every=1",
        "--config.train.eval_every=0", f"--config.train.steps={STEPS}",
        f"--config.train.checkpoint_every={EVERY}", "--config.train.keep_checkpoints=2"]


def env(devices: int = 1, **extra: str) -> dict[str, str]:
  e = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  e.update(JAX_PLATFORMS="cpu", XLA_FLAGS=f"{os.environ.get('MOEJAX_TEST_XLA_FLAGS', '')} "
           f"--xla_force_host_platform_device_count={devices}".strip(), **extra)
  return e


def command(workdir: str, *extra: str) -> list[str]:
  return [sys.executable, "-m", "moejax.cli", "train", *ARGS, *extra, "--workdir", workdir]


def run(workdir: str, *extra: str, **env_extra) -> subprocess.CompletedProcess:
  return subprocess.run(command(workdir, *extra), cwd=REPO, env=env(**env_extra), capture_output=True,
                        text=True, timeout=600)


def start(workdir: str, *extra: str) -> subprocess.Popen:
  return subprocess.Popen(command(workdir, *extra), cwd=REPO, env=env(), stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)


def records(workdir: str) -> list[dict]:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.endswith("\n")]


def runs(workdir: str) -> list[dict]:
  """One record per start of ``moejax train`` (``restored_step``, ``status``, ...; see moejax/console.py)."""
  from moejax.console import read_runs

  return read_runs(workdir)


def losses(workdir: str) -> list[tuple[int, float]]:
  return [(r["step"], r["loss"]) for r in records(workdir)]


def finished_steps(workdir: str) -> list[int]:
  d = os.path.join(workdir, "checkpoints")
  return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def saving_now(workdir: str) -> bool:
  d = os.path.join(workdir, "checkpoints")
  return os.path.isdir(d) and any(not n.isdigit() for n in os.listdir(d))


def final_params(workdir: str):
  """The parameters of the newest checkpoint, restored onto one device."""
  import jax
  import ml_collections

  from moejax.checkpoint import Checkpointer
  from moejax.train import Experiment

  with open(os.path.join(workdir, "config.json")) as f:
    cfg = ml_collections.ConfigDict(json.load(f))
  cfg.mesh.update(data=1, fsdp=1, tensor=1, expert=1, context=1)
  cfg.distributed.coordinator_address = ""
  _, state = Checkpointer(workdir, keep=100).restore_latest(Experiment(cfg, jax.devices()[:1]).abstract_state)
  return jax.device_get(state.params)


def kill_trial(reference: str, workdir: str, seed: int, during_save: bool, async_save: bool = True) -> dict:
  """Kills a run with SIGKILL (at a seeded step, or while a save is being
  written), reruns it, and compares with the uninterrupted ``reference``.

  ``finished_before_kill``: the newest complete checkpoint on disk just
  before the kill; the rerun must report (``resumed_from``, from its
  ``runs.jsonl`` record) that it restored exactly that one.
  """
  extra = () if async_save else ("--config.train.async_checkpoint=False",)
  target = random.Random(seed).randrange(2, STEPS - 2)
  proc = start(workdir, *extra)
  deadline, killed_at, finished_before_kill = time.time() + 300, None, 0
  while time.time() < deadline and proc.poll() is None:
    done = len(records(workdir))
    if done >= target and (saving_now(workdir) or not during_save):
      finished_before_kill = (finished_steps(workdir) or [0])[-1]
      proc.send_signal(signal.SIGKILL)
      killed_at = done
      break
    time.sleep(0.002)
  proc.wait()
  rerun = run(workdir, *extra)
  # What the rerun itself says it restored (its runs.jsonl record), not what the directory shows.
  resumed_from = runs(workdir)[-1]["restored_step"] if rerun.returncode == 0 else None
  exact = rerun.returncode == 0 and losses(workdir) == losses(reference)
  if exact:
    ref, got = final_params(reference), final_params(workdir)
    exact = all(np.array_equal(a, b) for a, b in zip(_leaves(ref), _leaves(got), strict=True))
  return {"seed": seed, "async_save": async_save, "during_save": during_save, "killed_at": killed_at, "resumed_from": resumed_from,
          "finished_before_kill": finished_before_kill,
          "lost_steps": None if killed_at is None or resumed_from is None else killed_at - resumed_from, "exact": exact,
          "set_aside": os.path.isdir(os.path.join(workdir, "checkpoints_set_aside")),
          "stderr": rerun.stderr[-2000:]}


def _leaves(tree):
  import jax

  return jax.tree.leaves(tree)


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--trials", type=int, default=20)
  args = parser.parse_args()
  with tempfile.TemporaryDirectory() as tmp:
    reference = os.path.join(tmp, "reference")
    assert run(reference).returncode == 0
    results = [kill_trial(reference, os.path.join(tmp, f"t{i}"), seed=i, during_save=i % 3 == 1,
                          async_save=i % 3 != 2) for i in range(args.trials)]
  for r in results:
    print({k: v for k, v in r.items() if k != "stderr"})
  killed = [r for r in results if r["killed_at"] is not None]
  sync = [r for r in killed if not r["async_save"]]
  print(f"trials {len(results)}, killed {len(killed)} (aimed at a save: {sum(r['during_save'] for r in killed)}), "
        f"exact resumes {sum(r['exact'] for r in results)}, resumed from the newest finished checkpoint "
        f"{sum(r['resumed_from'] == r['finished_before_kill'] for r in killed)}, partial saves set aside "
        f"{sum(r['set_aside'] for r in results)}; steps lost: max {max((r['lost_steps'] for r in killed), default=0)} "
        f"(async), max {max((r['lost_steps'] for r in sync), default=0)} with synchronous saves "
        f"(checkpoint interval {EVERY})")


if __name__ == "__main__":
  main()
