"""Optimizers and learning-rate schedules, by name from ``config.optim``.

``OPTIMIZERS[name](optim_cfg, schedule, layout) -> optax.GradientTransformation``
and ``SCHEDULES[name](optim_cfg, total_steps) -> optax.Schedule``; add an
entry with ``@OPTIMIZERS.register("name")`` in a module imported here.

Registered: ``adamw``, ``lion``, ``sgd``, ``adafactor``, ``sophia``
(optax.contrib, second-order), ``muon`` (ours, :func:`muon`) and
``optax_muon`` (optax.contrib's, a peer baseline). Schedules: ``constant``,
``cosine``, ``wsd``. See docs/optimizers.md.
"""

from moejax.optim.registry import OPTIMIZERS, SCHEDULES, ParamLayout, build_optimizer
from moejax.optim.muon import matrix_specs, muon, optimizer_metrics, scale_by_muon  # noqa: E402 (registers)
from moejax.optim.qk_clip import qk_clip  # noqa: E402

__all__ = ["OPTIMIZERS", "SCHEDULES", "ParamLayout", "build_optimizer", "matrix_specs", "muon",
           "optimizer_metrics", "qk_clip", "scale_by_muon"]
