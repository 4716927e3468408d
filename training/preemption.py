"""SIGTERM / SIGINT: finish the current step, checkpoint, leave cleanly.

orbax's own preemption check only works under `jax.distributed`, so a single-process run would
die with nothing saved on a scheduler's SIGTERM. `StopSignal` turns the first SIGTERM or SIGINT
into a flag the training loop reads after each step; a second one of the same signal gets the
default behaviour (Ctrl-C twice aborts at once, without saving). In multi-process runs the
signal may reach one process only: `agree` shares it after every step, so that all processes
stop after the same step and save one checkpoint together.
"""
from __future__ import annotations

import signal
import sys
import threading

import jax
import numpy as np
from jax.experimental import multihost_utils

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopSignal:
  """Context manager: while active, SIGTERM/SIGINT set `self.signal` instead of killing.

  Outside the main thread (where Python cannot install handlers) it never triggers.
  """

  def __init__(self):
    self.signal: int | None = None
    self._previous: dict = {}

  def agree(self) -> bool:
    """Whether to stop after this step, the same answer on every process: a signal received by
    any process counts for all (one tiny allgather per call when there are several). The answer
    is the gathered value only: a signal landing during the gather counts at the next step."""
    if jax.process_count() > 1:
      local = self.signal or 0   # a signal arriving after this counts at the next step
      received = int(np.max(multihost_utils.process_allgather(np.int32(local))))
      if received and self.signal is None:
        self.signal = received
      return bool(received)
    return self.requested

  @property
  def requested(self) -> bool:
    return self.signal is not None

  @property
  def name(self) -> str:
    return signal.Signals(self.signal).name if self.signal else ''

  @property
  def exit_code(self) -> int:
    """The shell convention for death by a signal: 128 + its number (143 SIGTERM, 130 SIGINT)."""
    return 128 + self.signal if self.signal else 0

  def _handle(self, signum, frame) -> None:
    del frame
    self.signal = signum
    signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))  # a second one is fatal
    again = ' (press Ctrl-C again to abort without saving)' if signum == signal.SIGINT else ''
    sys.stderr.write(f'\n{signal.Signals(signum).name} received: finishing the current step and '
                     f'saving a checkpoint{again}.\n')
    sys.stderr.flush()

  def __enter__(self) -> 'StopSignal':
    if threading.current_thread() is threading.main_thread():
      self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
      for s in SIGNALS:   # restart interrupted system calls (gloo, tensorstore): no EINTR
        signal.siginterrupt(s, False)
    return self

  def __exit__(self, *exc) -> None:
    for s, handler in self._previous.items():
      signal.signal(s, handler)
    self._previous = {}
