"""Orbax checkpoints of the train state *and* the data iterator, kept safe.

A checkpoint at step s holds everything needed to continue the run exactly:
parameters, optimizer state, step counter, and the data position (one file
per data shard, see ``moejax.data.ShardedBatches``).

Safety: Orbax writes each step into a temporary directory and renames it only
when complete, so an interrupted save never replaces the last good
checkpoint. What an interruption leaves behind (a temporary directory), and a
finished checkpoint that no longer restores (e.g. a corrupted file), is
reported and moved to ``workdir/checkpoints_set_aside/`` — never deleted and
never picked — once an older checkpoint has restored in its place. When *no*
checkpoint restores, nothing is moved: :class:`UnreadableCheckpointsError`
names them, and only an explicit ``start_fresh`` (``moejax train
--start_fresh``) sets them aside and lets the run begin again at step 0.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import sys
import time
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from moejax.tree_paths import flatten

log = logging.getLogger(__name__)

SET_ASIDE = "checkpoints_set_aside"


class _DropUnretrievedFutures(logging.Filter):
  """Drops asyncio's "Future exception was never retrieved" records.

  A checkpoint whose files fail to read makes every pending Orbax/TensorStore
  read fail; the first error is reported (see :func:`describe_error`) and
  asyncio logs each of the others with a traceback (thousands of lines).
  """

  def filter(self, record: logging.LogRecord) -> bool:
    return "exception was never retrieved" not in record.getMessage()


_ASYNCIO_FILTER = _DropUnretrievedFutures()
logging.getLogger("asyncio").addFilter(_ASYNCIO_FILTER)


def _late_read_of_failed_restore(unraisable) -> bool:
  """True for a TensorStore read that finished after its Orbax restore had failed.

  Orbax runs a restore on a fresh event loop and closes it when the first read
  fails; reads still in flight then complete, call ``loop.call_soon_threadsafe``
  on the closed loop, and TensorStore reports the ``RuntimeError('Event loop is
  closed')`` through ``sys.unraisablehook`` (one traceback per read, printed at
  whatever moment they finish). The restore's own error has already been
  reported (``restore_latest``); these carry nothing more.
  """
  exc, tb = unraisable.exc_value, unraisable.exc_traceback
  if not (isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed"):
    return False
  while tb is not None:
    if tb.tb_frame.f_code.co_name == "call_soon_threadsafe":
      return True
    tb = tb.tb_next
  return False


def _install_unraisable_filter() -> None:
  previous = sys.unraisablehook

  def hook(unraisable):
    if not _late_read_of_failed_restore(unraisable):
      previous(unraisable)

  hook.moejax_late_reads = True
  if not getattr(previous, "moejax_late_reads", False):
    sys.unraisablehook = hook


_install_unraisable_filter()


def describe_error(err: BaseException, limit: int = 300) -> str:
  """``Type: message`` of the first exception in ``err``'s chain whose text is readable.

  Some TensorStore/pybind11 errors print as ``<bound method
  pybind11_detail_function_record...>``; the cause or context behind them says what failed.
  """
  seen, chain = set(), []
  while err is not None and id(err) not in seen:
    seen.add(id(err))
    chain.append(err)
    err = err.__cause__ or err.__context__
  for e in chain:
    text = " ".join(str(e).split())
    if text and "pybind11" not in text and not text.startswith("<bound method"):
      return f"{type(e).__name__}: {text[:limit]}"
  return f"{type(chain[0]).__name__} (no readable message)"


class DataStateHandler(ocp.CheckpointHandler):
  """Saves a data position as one JSON file per data shard.

  The iterator gives ``shard_states() -> {name: state}`` for the shards this
  process owns and takes them back with ``set_shard_states``. Every process
  writes and reads only its own shards' files, so a run can restart on a
  different number of processes.
  """

  def save(self, directory: epath.Path, args: "DataStateSave") -> None:
    for name, state in args.item.shard_states().items():
      (directory / f"{name}.json").write_text(json.dumps(state))

  def restore(self, directory: epath.Path, args: "DataStateRestore"):
    files = {name: directory / f"{name}.json" for name in args.item.shard_states()}
    missing = [str(f) for f in files.values() if not f.exists()]
    if missing:
      raise FileNotFoundError(f"data position files missing: {missing}")
    args.item.set_shard_states({shard: json.loads(f.read_text()) for shard, f in files.items()})
    return args.item


@ocp.args.register_with_handler(DataStateHandler, for_save=True)
@dataclasses.dataclass
class DataStateSave(ocp.args.CheckpointArgs):
  item: Any


@ocp.args.register_with_handler(DataStateHandler, for_restore=True)
@dataclasses.dataclass
class DataStateRestore(ocp.args.CheckpointArgs):
  item: Any


class Checkpointer:
  """Save/restore ``(state, data_iterator)`` under ``workdir/checkpoints``."""

  def __init__(self, workdir: str, keep: int, async_save: bool = True):
    self.workdir = os.path.abspath(workdir)
    self.directory = os.path.join(self.workdir, "checkpoints")
    self.skipped: list[str] = []  # what was set aside, for the console
    if os.path.isdir(self.directory):
      for name in sorted(os.listdir(self.directory)):
        if not name.isdigit() and os.path.isdir(os.path.join(self.directory, name)):
          self._set_aside(name, "an unfinished save (the run was interrupted while writing it)")
    self._options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                                 enable_async_checkpointing=async_save)
    self._manager = ocp.CheckpointManager(self.directory, options=self._options)

  def _set_aside(self, name: str, reason: str) -> None:
    """Moves ``checkpoints/name`` to ``checkpoints_set_aside/`` (process 0) and syncs."""
    message = f"checkpoint {os.path.join(self.directory, name)} is {reason}; moved to {SET_ASIDE}/"
    log.warning(message)
    self.skipped.append(message)
    if jax.process_index() == 0:
      target_dir = os.path.join(self.workdir, SET_ASIDE)
      os.makedirs(target_dir, exist_ok=True)
      target = os.path.join(target_dir, name)
      if os.path.exists(target):
        target += f".{time.time_ns()}"
      shutil.move(os.path.join(self.directory, name), target)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"moejax set aside {name}")

  def reached_preemption(self, step: int) -> bool:
    """True at JAX's multi-host preemption sync point (False when it is off)."""
    return self._manager.reached_preemption(step)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def save(self, step: int, state, data_iterator=None) -> None:
    items = {"state": ocp.args.StandardSave(state)}
    if data_iterator is not None:
      items["data"] = DataStateSave(data_iterator)
    self._manager.save(step, args=ocp.args.Composite(**items), force=True)

  def restore(self, step: int, abstract_state, data_iterator=None):
    """Restores onto the shardings carried by ``abstract_state``'s leaves.

    ``abstract_state``: a pytree of ``jax.ShapeDtypeStruct`` with ``sharding``
    set, so the same checkpoint restores onto any mesh. The data iterator, if
    given, is moved to its saved position in place.
    """
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iterator is not None:
      items["data"] = DataStateRestore(data_iterator)
    return self._manager.restore(step, args=ocp.args.Composite(**items)).state

  def saved_paths(self, step: int) -> set[str]:
    """The leaf paths of the state saved at ``step`` (from its metadata)."""
    path = epath.Path(self.directory) / str(step) / "state"
    tree = ocp.StandardCheckpointHandler().metadata(path)
    return leaf_paths(getattr(tree, "tree", tree))

  def restore_latest(self, abstract_state, data_iterator=None, start_fresh: bool = False):
    """(step, state) of the newest checkpoint that restores, or (None, None).

    A checkpoint of another structure (another model, or an older moejax) is
    an error, and nothing is moved. Checkpoints newer than the one restored
    that fail to read are reported and set aside. If checkpoints exist but
    none restores, :class:`UnreadableCheckpointsError` is raised and nothing
    is moved, unless ``start_fresh``: then they are all set aside and
    ``(None, None)`` is returned. ``self.skipped`` lists the set-aside messages.
    """
    expected = leaf_paths(abstract_state)
    failed: list[tuple[int, str]] = []
    for step in reversed(self.all_steps()):
      try:
        saved = self.saved_paths(step)
      except Exception as err:  # noqa: BLE001 — unreadable metadata: a damaged checkpoint
        failed.append((step, describe_error(err)))
        continue
      if saved != expected:
        extra, missing = sorted(saved - expected)[:3], sorted(expected - saved)[:3]
        raise CheckpointMismatchError(
            f"the checkpoint of step {step} in {self.directory} has a different structure from this "
            f"model's state (only in the checkpoint: {extra}; only in the model: {missing}). It was "
            "written by another model or moejax version; use a new --workdir.")
      try:
        state = self.restore(step, abstract_state, data_iterator)
      except Exception as err:  # noqa: BLE001 — any failure means this step is unusable
        failed.append((step, describe_error(err)))
        continue
      self._set_aside_failed(failed)
      return step, state
    if failed and not start_fresh:
      listing = "; ".join(f"{os.path.join(self.directory, str(s))} ({why})" for s, why in failed)
      raise UnreadableCheckpointsError(
          f"none of the {len(failed)} checkpoints in {self.directory} can be read: {listing}. Nothing was "
          "changed (metrics.jsonl and tensorboard/ are as they were). Either restore the checkpoints from a "
          "backup and run again, or start this run over from step 0 with `moejax train ... --start_fresh` "
          f"(the unreadable checkpoints are then moved to {SET_ASIDE}/ and the metrics past step 0 dropped).")
    self._set_aside_failed(failed)
    return None, None

  def _set_aside_failed(self, failed: list[tuple[int, str]]) -> None:
    for step, why in failed:
      self._set_aside(str(step), f"unreadable ({why})")
    if failed:
      self._manager.reload()

  def wait(self) -> None:
    """Blocks until an asynchronous save is on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()


class CheckpointMismatchError(ValueError):
  """A checkpoint whose structure does not match the model being restored."""


class UnreadableCheckpointsError(RuntimeError):
  """A workdir holds checkpoints and none of them restores (nothing was moved)."""


def leaf_paths(tree) -> set[str]:
  """Leaf paths as "a/b/0/c", the same for a state object and its saved form."""
  return set(flatten(tree, fields=True))


def abstract_like(tree, shardings):
  """ShapeDtypeStructs with shardings: the restore target for ``tree``."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
