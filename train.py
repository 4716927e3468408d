"""Train a model: python train.py --config=configs/default.py[:variant] --workdir=DIR [--config.a.b=v].

The same command on an existing DIR resumes from its latest checkpoint; so does
`python train.py --workdir=DIR` alone (the config is the one DIR was trained with).
`--dry_run` compiles the train step for the configured mesh and prints what the run will cost
(parameters, FLOPs, memory per device, sharding, estimated step time) without training or
writing anything; it exits non-zero when the step does not fit in device memory.
"""
import shlex
import signal
import sys

from training import hostenv

hostenv.ensure_fast_malloc()

from absl import app, flags, logging
from ml_collections import config_flags

from configs import schema
from training import checkpoint, data, distributed, guards, loop, preflight

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file[:variant]. Optional when '
                                          '--workdir holds a run (it then resumes that config).',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and logs.')
_DRY_RUN = flags.DEFINE_bool('dry_run', False, 'Compile and report the train step; train nothing.')
_DEVICE_MEMORY_GB = flags.DEFINE_float(
    'device_memory_gb', None, 'Memory per device the dry run checks against (default: the '
    "accelerator's limit; on CPU, host RAM / local devices).")

_COORDINATOR = flags.DEFINE_string('coordinator_address', None,
                                   'Multi-process runs: host:port of process 0 (see '
                                   'training/distributed.py; SLURM is detected).')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Multi-process runs: process count.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'Multi-process runs: this process, 0-based.')


def resolve_config():
  """The --config, else the config saved in --workdir; raises SystemExit naming what is missing."""
  if _CONFIG.value is not None:
    return _CONFIG.value
  if _WORKDIR.value is None:
    raise SystemExit('error: give --config=FILE[:variant], or --workdir=DIR of an existing run.')
  return checkpoint.load_config(_WORKDIR.value)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}')
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # orbax is chatty at INFO
  if _DEVICE_MEMORY_GB.value is not None and _DEVICE_MEMORY_GB.value <= 0:
    raise SystemExit(f'error: --device_memory_gb={_DEVICE_MEMORY_GB.value} must be > 0.')
  try:
    distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    config = resolve_config()
    if _DRY_RUN.value:
      report = preflight.run(config, device_memory_gb=_DEVICE_MEMORY_GB.value)
      print(preflight.format_report(report))
      preflight.check_fits(report)
      return
    if _WORKDIR.value is None:
      raise SystemExit('error: --workdir is required (except with --dry_run).')
    result = loop.train(config, _WORKDIR.value)
  except (schema.ConfigError, data.DataError, checkpoint.WorkdirError, preflight.PreflightError,
          guards.NonfiniteError, FileNotFoundError) as e:
    raise SystemExit(f'error: {e}') from None
  if result['stopped']:  # SIGTERM/SIGINT: checkpointed; exit as the signal would (143, 130)
    print(f'To resume, run the same command again: {shlex.join(sys.orig_argv)}')
    sys.exit(128 + signal.Signals[result['stopped']])


def parse_flags(argv: list[str]) -> list[str]:
  """absl's parser, after checking `--config.KEY` overrides against the schema."""
  try:
    schema.check_override_flags(argv[1:])
  except schema.ConfigError as e:
    raise SystemExit(f'error: {e}') from None
  has_config = any(a == '--config' or a.startswith('--config=') for a in argv[1:])
  if not has_config and any(a.startswith('--config.') for a in argv[1:]):
    raise SystemExit('error: --config.KEY overrides need --config; to change a saved run use '
                     '--config=configs/resolved.py:WORKDIR (its saved config) with the overrides.')
  return app.parse_flags_with_usage(argv)


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
