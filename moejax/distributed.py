"""Multi-process start-up through JAX's own runtime (``jax.distributed``).

Call :func:`initialize` before anything touches a device. With
``distributed.coordinator_address`` set in the config the processes are
described explicitly (e.g. several processes on localhost); otherwise, when
``distributed.auto`` is on, JAX detects a managed cluster (TPU pods, SLURM,
Open MPI, …) from the environment; a plain single process needs nothing.
"""

from __future__ import annotations

import jax
import ml_collections


def initialize(dist: ml_collections.ConfigDict) -> None:
  """Starts ``jax.distributed`` as ``config.distributed`` says (idempotent)."""
  if jax.distributed.is_initialized():
    return
  if dist.coordinator_address:
    jax.distributed.initialize(coordinator_address=dist.coordinator_address,
                               num_processes=dist.num_processes, process_id=dist.process_id)
  elif dist.auto:
    jax.distributed.initialize()
