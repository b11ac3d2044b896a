"""Optimizers and learning-rate schedules, by name from ``config.optim``.

``OPTIMIZERS[name](optim_cfg, schedule) -> optax.GradientTransformation`` and
``SCHEDULES[name](optim_cfg, total_steps) -> optax.Schedule``; add an entry
with ``@OPTIMIZERS.register("name")`` in a module imported here.
"""

from moejax.optim.registry import OPTIMIZERS, SCHEDULES, build_optimizer

__all__ = ["OPTIMIZERS", "SCHEDULES", "build_optimizer"]
