"""Orbax checkpoints of the train state *and* the data iterator.

A checkpoint at step s holds everything needed to continue the run exactly:
parameters, optimizer state, step counter, and the Grain iterator position.
Orbax writes each step into a temporary directory and renames it only when
complete, so an interrupted save never replaces the last good checkpoint.
"""

from __future__ import annotations

import os

import grain
import jax
import orbax.checkpoint as ocp


class Checkpointer:
  """Save/restore ``(state, data_iterator)`` under ``workdir/checkpoints``."""

  def __init__(self, workdir: str, keep: int, async_save: bool = True):
    self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=async_save)
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state, data_iterator=None) -> None:
    items = {"state": ocp.args.StandardSave(state)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    self._manager.save(step, args=ocp.args.Composite(**items))

  def restore(self, step: int, abstract_state, data_iterator=None):
    """Restores onto the shardings carried by ``abstract_state``'s leaves.

    ``abstract_state``: a pytree of ``jax.ShapeDtypeStruct`` with ``sharding``
    set, so the same checkpoint restores onto any mesh. The data iterator, if
    given, is moved to its saved position in place.
    """
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    return self._manager.restore(step, args=ocp.args.Composite(**items)).state

  def wait(self) -> None:
    """Blocks until an asynchronous save is on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()


def abstract_like(tree, shardings):
  """ShapeDtypeStructs with shardings: the restore target for ``tree``."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
