"""Graceful stops: SIGTERM/SIGINT become "checkpoint at the next step, exit 0".

The handler only records the signal; the train loop asks :meth:`should_stop`
at each step boundary, so a stop never lands in the middle of a step or a
save. With several processes the decision is shared (any process signalled,
or JAX's preemption sync point reached), so all of them checkpoint the same
step. A second SIGINT (Ctrl-C twice) interrupts at once.
"""

from __future__ import annotations

import logging
import signal
import threading

import jax
import numpy as np
from jax.experimental import multihost_utils

log = logging.getLogger(__name__)


class StopRequests:
  """Context manager installing the SIGTERM/SIGINT handlers for a run."""

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self, checkpointer=None):
    self._checkpointer = checkpointer
    self.received: int | None = None
    self._previous: dict[int, object] = {}

  def _handle(self, signum, frame) -> None:
    if self.received == signal.SIGINT and signum == signal.SIGINT:
      raise KeyboardInterrupt
    self.received = signum
    log.warning("received %s: stopping after the current step with a checkpoint",
                signal.Signals(signum).name)

  def __enter__(self) -> "StopRequests":
    if threading.current_thread() is threading.main_thread():
      for sig in self.SIGNALS:
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)

  def should_stop(self, step: int) -> bool:
    """True on every process once any process was asked to stop."""
    local = self.received is not None
    if jax.process_count() == 1:
      return local
    anywhere = bool(np.any(multihost_utils.process_allgather(np.int32(local))))
    preempted = self._checkpointer is not None and self._checkpointer.reached_preemption(step)
    return anywhere or preempted
