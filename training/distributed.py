"""Multi-process start-up: `jax.distributed` from flags, the environment, or a cluster.

One process per host (or per GPU); every process runs the same command. Sources, first wins:
flags (--coordinator_address, --num_processes, --process_id), the environment variables
JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID, then a multi-process cluster
environment that `jax.distributed.initialize()` detects by itself: a SLURM job step with more
than one task, Open MPI (mpirun) with more than one rank, a Kubernetes indexed Job, or a
multi-host Cloud TPU slice. Inside a cluster, flags given still override what JAX detects.
Without any of them the run is single-process. Must run before anything touches a JAX device.
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


def cluster_environment() -> str | None:
  """The multi-process cluster this process runs in, as JAX's own detection would find it
  (jax/_src/clusters), or None; only the environment is read (no network)."""
  env = os.environ
  if 'SLURM_JOB_ID' in env and (_from_env('SLURM_NTASKS') or 0) > 1:
    return 'SLURM'
  if 'OMPI_MCA_orte_hnp_uri' in env and (_from_env('OMPI_COMM_WORLD_SIZE') or 0) > 1:
    return 'Open MPI'
  if 'KUBERNETES_SERVICE_HOST' in env and 'JOB_COMPLETION_INDEX' in env:
    return 'Kubernetes'
  hosts = env.get('TPU_PROCESS_ADDRESSES') or env.get('TPU_WORKER_HOSTNAMES') or ''
  if len([h for h in hosts.split(',') if h.strip()]) > 1:
    return 'Cloud TPU'
  return None


def settings(coordinator_address: str | None = None, num_processes: int | None = None,
             process_id: int | None = None) -> dict | None:
  """The `jax.distributed.initialize` arguments these sources give; in a cluster environment
  only those given explicitly (JAX detects the rest; {} = all detected); None = single
  process. Raises ConfigError for incomplete or inconsistent settings outside a cluster."""
  address = coordinator_address or os.environ.get('JAX_COORDINATOR_ADDRESS') or None
  n = num_processes if num_processes is not None else _from_env('JAX_NUM_PROCESSES')
  i = process_id if process_id is not None else _from_env('JAX_PROCESS_ID')
  given = {k: v for k, v in (('coordinator_address', address), ('num_processes', n),
                             ('process_id', i)) if v is not None}
  if cluster_environment() is not None and len(given) < 3:
    return given
  if not given:
    return None
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
  return given


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
