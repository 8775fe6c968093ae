"""When to stop early: pre-emption (SIGTERM) and Ctrl-C (SIGINT), agreed by
every process.

Multi-process runs (jax.distributed initialised): JAX's preemption sync
manager, started by jax.distributed.initialize, owns SIGTERM. A notice on any
one process reaches all of them through the coordination service, and
`reached_preemption_sync_point(step)` (through orbax's
`CheckpointManager.reached_preemption`) returns True on every process at the
same step, so they all checkpoint that step together. This module never
replaces that SIGTERM handler; SIGINT is turned into a SIGTERM to this
process, so Ctrl-C takes the same agreed path.

One process without jax.distributed: JAX installs no notifier, so a Python
handler for SIGTERM and SIGINT sets a flag; the step at which the loop next
asks is the stop step.

Either way a second SIGINT restores Python's default handler first, so
Ctrl-C twice aborts at once (KeyboardInterrupt, no checkpoint). grain's
worker processes ignore both signals (data/pipeline.py), so a signal to the
whole process group (a terminal's Ctrl-C, some schedulers' SIGTERM) reaches
the main process only in effect. The handlers are installed for the
training loop alone: a signal while the run starts (restoring, compiling)
has its default effect and ends the process without a new checkpoint (the
previous ones stand).
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Callable


def distributed_initialized() -> bool:
  import jax  # pylint: disable=g-import-not-at-top
  return jax.distributed.is_initialized()


class StopRequest:
  """Asked once per step, on every process: stop (and checkpoint) now?

  `reached_sync_point(step)`: the collective decision of a multi-process
  run (orbax's CheckpointManager.reached_preemption); it must be called at
  every step by every process, with the same step numbers.
  """

  def __init__(self, reached_sync_point: Callable[[int], bool], *,
               distributed: bool | None = None):
    self._reached_sync_point = reached_sync_point
    self.distributed = (distributed_initialized() if distributed is None
                        else distributed)
    self.signal_name = None  # The signal this process received, if any.
    self._previous = {}

  def install(self) -> None:
    """Installs the handlers (main thread only; elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread():
      return
    signals = [signal.SIGINT]
    if not self.distributed:  # Else JAX's notifier owns SIGTERM.
      signals.append(signal.SIGTERM)
    for signum in signals:
      self._previous[signum] = signal.signal(signum, self._handle)

  def uninstall(self) -> None:
    """Puts back the handlers that were there before `install`."""
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
    self._previous = {}

  def _handle(self, signum, frame):
    del frame
    self.signal_name = signal.Signals(signum).name
    if signum == signal.SIGINT:
      # A second Ctrl-C aborts without waiting for the checkpoint.
      signal.signal(signal.SIGINT, signal.default_int_handler)
      if self.distributed:
        os.kill(os.getpid(), signal.SIGTERM)  # To JAX's notifier.

  def should_stop(self, step: int) -> bool:
    """True at the step where every process stops; call it every step."""
    if self.distributed:
      return bool(self._reached_sync_point(step))
    return self.signal_name is not None

  def __enter__(self):
    self.install()
    return self

  def __exit__(self, *exc):
    self.uninstall()
