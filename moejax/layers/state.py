"""Non-trainable model state, updated outside the gradient after each step.

A layer that keeps such state (e.g. the auxiliary-loss-free router bias of
DeepSeek-V3) stores it in its own variable collection and sows the per-step
statistics its update needs into the ``stats`` collection (at the same module
path). After the optimizer update, the trainer calls, for each collection
with a registered update::

    new_tree = STATE_UPDATES.get(collection)(tree, stats, model_cfg, step)

where ``stats`` are summed over micro-batches and ``step`` is the 0-based
step just taken (for schedules). Collections without an entry are left
unchanged.
"""

from moejax.registry import Registry

STATE_UPDATES = Registry("model-state update")


def update_model_state(model_state: dict, stats: dict, model_cfg, step=0) -> dict:
  """Applies the registered update of every collection in ``model_state``. Updates see per-layer trees
  (``layer_i``); under ``model.scan_layers`` the train step unstacks the state around this call
  (``moejax/step.py``; ``stats`` come unstacked from ``moejax.objective.forward``)."""
  return {name: STATE_UPDATES.get(name)(tree, stats, model_cfg, step) if name in STATE_UPDATES else tree
          for name, tree in model_state.items()}
