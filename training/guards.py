"""Guards around training: non-finite steps, and a workdir that cannot hold the run.

Non-finite steps are caught inside the jitted step (`skip_nonfinite`): the parameters and the
optimizer state stay as they were, only the step counter moves on, and the step reports
`skipped_steps = 1`. (`optax.apply_if_finite` is not used: it applies the bad update once its
error budget is spent.) `NonfiniteGuard` reads those flags on the host one step late, so the
device is never left idle, and stops the run after `train.max_nonfinite_steps` in a row when
`train.nonfinite='stop'`.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from workdir.files import WorkdirError

POLICIES = ('skip', 'stop')


class NonfiniteError(RuntimeError):
  """Too many consecutive steps had a non-finite loss or gradient."""


def skip_nonfinite(train_step: Callable) -> Callable:
  """Wraps (state, batch) -> (state, metrics), state a TrainState (training/state.py), so that a
  step whose loss or gradient norm is NaN or Inf keeps every leaf of the old state except `step`.
  Needs metrics 'loss' and 'grad_norm'; adds metrics['skipped_steps'] (0. or 1.)."""

  def guarded(state, batch):
    new_state, metrics = train_step(state, batch)
    finite = jnp.isfinite(metrics['loss']) & jnp.isfinite(metrics['grad_norm'])
    # `frozen` (LoRA's base) passes through: never selected, so never copied.
    kept = jax.tree.map(lambda new, old: jnp.where(finite, new, old),
                        new_state.replace(frozen=None), state.replace(frozen=None))
    kept = kept.replace(step=new_state.step, frozen=new_state.frozen)
    return kept, {**metrics, 'skipped_steps': jnp.where(finite, 0.0, 1.0)}

  return guarded


class NonfiniteGuard:
  """Host-side count of skipped steps. `observe` each step's flag; `take_skipped` at log time."""

  def __init__(self, policy: str, max_in_a_row: int):
    self.policy, self.limit = policy, max_in_a_row
    self.in_a_row = 0
    self._pending: tuple[int, jax.Array] | None = None
    self._skipped = 0

  def observe(self, step: int, flag: jax.Array) -> None:
    """Records this step's flag; reads the previous step's (finished or nearly so)."""
    self.settle()
    self._pending = (step, flag)

  def settle(self) -> None:
    """Reads the pending flag; raises NonfiniteError when the policy says stop."""
    if self._pending is None:
      return
    step, flag = self._pending
    self._pending = None
    if not float(np.asarray(flag)):
      self.in_a_row = 0
      return
    self.in_a_row += 1
    self._skipped += 1
    if self.policy == 'stop' and self.in_a_row >= self.limit:
      raise NonfiniteError(
          f'the loss or gradients were NaN/Inf for {self.in_a_row} steps in a row (steps '
          f'{step - self.in_a_row + 1}-{step}, train.max_nonfinite_steps={self.limit}); those '
          'updates were not applied, so the latest checkpoint holds the last good parameters. '
          "Lower train.learning_rate, check the data, or set train.nonfinite='skip' to keep "
          'skipping such steps.')

  def take_skipped(self) -> int:
    """Steps skipped since the previous call (including the latest observed one)."""
    self.settle()
    n, self._skipped = self._skipped, 0
    return n


def state_bytes(abstract_state) -> int:
  """Bytes of one copy of the train state (what one checkpoint stores, uncompressed)."""
  return sum(int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize
             for a in jax.tree.leaves(abstract_state))


def check_workdir(workdir: str, checkpoint_bytes: int, keep: int, existing: int = 0) -> None:
  """Raises WorkdirError before training when `workdir` cannot be created or written, or its
  filesystem has less free space than the checkpoints still to come: `keep + 1` of them (the
  newest is written before the oldest is deleted) less the `existing` ones, at least one, plus
  10% and 16 MiB for logs."""
  try:
    os.makedirs(workdir, exist_ok=True)
    with tempfile.TemporaryFile(dir=workdir):
      pass
  except OSError as e:
    raise WorkdirError(f'--workdir={workdir} is not writable: {e.strerror or e}. Choose a '
                       'directory you can write to.') from None
  count = max(1, keep + 1 - existing)
  need = int(count * checkpoint_bytes * 1.1) + (16 << 20)
  free = shutil.disk_usage(workdir).free
  if free < need:
    raise WorkdirError(
        f'--workdir={workdir}: {free / 2**20:.0f} MiB free, but {count} more checkpoint(s) of '
        f'{checkpoint_bytes / 2**20:.1f} MiB (train.keep_checkpoints={keep}, plus the one being '
        f'written) need about {need / 2**20:.0f} MiB. Free space, choose another --workdir, or '
        'lower train.keep_checkpoints.')

