"""The batch layout on the device mesh (workdir/mesh.py builds the mesh): batches are split
over data x fsdp; each process feeds its own rows.
"""
from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from configs.schema import ConfigError
from workdir.mesh import AXES


def check_batch(config, sizes: tuple[int, ...], process_count: int = 1) -> None:
  """Each (micro-)batch splits evenly over the data x fsdp devices and over the processes."""
  t, rows = config.train, sizes[AXES.index('data')] * sizes[AXES.index('fsdp')]
  micro = t.batch_size // t.grad_accum_steps
  if micro % rows:
    raise ConfigError(f'train.batch_size={t.batch_size} (micro-batches of {micro} rows with '
                      f'train.grad_accum_steps={t.grad_accum_steps}) must be divisible by mesh '
                      f'data*fsdp={rows} (data={sizes[0]}, fsdp={sizes[1]}).')
  if t.batch_size % process_count:
    raise ConfigError(f'train.batch_size={t.batch_size} must be divisible by the number of '
                      f'processes ({process_count}).')


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Rows over data x fsdp, the rest replicated."""
  return NamedSharding(mesh, P(('data', 'fsdp')))


def put_batch(batch: dict, mesh: Mesh) -> dict:
  """Assembles a global batch from this process's rows (equal to the whole batch on one host)."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in batch.items()}


def process_rows(batch: dict) -> dict:
  """This process's contiguous block of the rows of a global batch."""
  n, i = jax.process_count(), jax.process_index()
  return {k: v[len(v) // n * i:len(v) // n * (i + 1)] for k, v in batch.items()}

