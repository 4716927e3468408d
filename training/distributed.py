"""Multi-process start-up: `jax.distributed` from flags, the environment, or SLURM.

One process per host (or per GPU); every process runs the same command. Sources, first wins:
flags (--coordinator_address, --num_processes, --process_id), the environment variables
JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID, or a SLURM job step with more
than one task (JAX reads SLURM_* itself). Without any of them the run is single-process.
Must run before anything touches a JAX device.
"""
from __future__ import annotations

import os

import jax

from configs.schema import ConfigError


def _from_env(name: str) -> int | None:
  value = os.environ.get(name)
  if value in (None, ''):
    return None
  if not value.isdigit():
    raise ConfigError(f'environment variable {name}={value!r}: must be a non-negative integer.')
  return int(value)


def settings(coordinator_address: str | None = None, num_processes: int | None = None,
             process_id: int | None = None) -> dict | None:
  """The `jax.distributed.initialize` arguments these sources give; {} = SLURM auto-detection;
  None = single process. Raises ConfigError for incomplete or inconsistent settings."""
  address = coordinator_address or os.environ.get('JAX_COORDINATOR_ADDRESS') or None
  n = num_processes if num_processes is not None else _from_env('JAX_NUM_PROCESSES')
  i = process_id if process_id is not None else _from_env('JAX_PROCESS_ID')
  if address is None and n is None and i is None:
    slurm_tasks = _from_env('SLURM_NTASKS') if 'SLURM_JOB_ID' in os.environ else None
    return {} if slurm_tasks and slurm_tasks > 1 else None
  if address is None or n is None or i is None:
    missing = [f for f, v in (('--coordinator_address', address), ('--num_processes', n),
                              ('--process_id', i)) if v is None]
    raise ConfigError(f'multi-process run: {", ".join(missing)} missing; give all three (flags '
                      'or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID).')
  if ':' not in address:
    raise ConfigError(f'--coordinator_address={address!r}: must be host:port, e.g. '
                      '10.0.0.1:1234 (process 0 listens there).')
  if n < 1 or not 0 <= i < n:
    raise ConfigError(f'--process_id={i} with --num_processes={n}: need 0 <= process_id < '
                      'num_processes.')
  return {'coordinator_address': address, 'num_processes': n, 'process_id': i}


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> bool:
  """Starts `jax.distributed` when the sources above ask for it; returns whether it did.

  CPU processes exchange data through gloo (XLA:CPU has no collectives across processes
  otherwise); the setting only concerns the CPU backend, so it is harmless on GPU/TPU hosts.
  """
  args = settings(coordinator_address, num_processes, process_id)
  if args is None:
    return False
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(**args)
  return True
