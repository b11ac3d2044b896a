"""Multi-specialist distillation into one sparse student (docs/distill.md).

* ``config.py``: the ``distill`` config section, domains and teacher configs.
* ``data.py``: batches laid out by domain (``domain_BxT``), and the teacher cache.
* ``objective.py``: ``alpha * CE + (1 - alpha) * T^2 * KL`` with per-domain teachers,
  plugged into ``moejax.train``'s step and loop.
* ``run.py``: ``run_distill``: specialists, then the student, then the report.
"""
