"""Optimizer (or any config) sweeps: grid, resumable runs, fair comparison, report.

  moejax sweep --config configs/tiny.py --sweep experiments/sweeps/optimizers.py [--workdir W] [--parallel N]
      [--quick] [--config.FIELD=VALUE ...]   (overrides apply to every run; see docs/cli.md)

From Python: ``run_sweep(load_config("configs/tiny.py"), "experiments/sweeps/optimizers.py",
"workdirs/sweep")``. See :mod:`moejax.sweep.spec` for the sweep file and
:mod:`moejax.sweep.analysis` for how arms are compared.
"""

from moejax.sweep.analysis import Comparison, PowerLaw, fit_power_law, steps_to_reach, summarize
from moejax.sweep.runner import run_sweep
from moejax.sweep.spec import Arm, Run, Sweep, load_sweep

__all__ = ["Arm", "Comparison", "PowerLaw", "Run", "Sweep", "fit_power_law", "load_sweep", "run_sweep",
           "steps_to_reach", "summarize"]
