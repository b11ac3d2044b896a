"""moejax.lab: prototype, compare and understand router variants (docs/lab.md).

* :func:`compare` — base config + named variants x seeds through the sweep runner; a table;
* :mod:`moejax.lab.plots` — loss curves, expert-load heatmaps, balance, specialisation, stability;
* :mod:`moejax.lab.routing` — token -> expert counts by domain / token class, routing stability;
* :mod:`moejax.lab.replay` — record a run's routing and replay it in another;
* :mod:`moejax.lab.upcycle` — initialise an MoE model from a dense checkpoint;
* :mod:`moejax.lab.attention_maps` — which tokens / compressed blocks each query attends to;
* :mod:`moejax.layers.balancing` (a layer module) — bias-update schedules and balance statistics (``model.moe`` fields).
"""

from moejax.lab import attention_maps, plots, replay, routing, upcycle
from moejax.lab.compare import LabResult, compare, load_run, run_row, variant_overrides

__all__ = ["LabResult", "attention_maps", "compare", "load_run", "plots", "replay", "routing", "run_row", "upcycle",
           "variant_overrides"]
