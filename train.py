"""Train a model: python train.py --config=configs/default.py[:variant] --workdir=DIR [--config.a.b=v].

The same command on an existing DIR resumes from its latest checkpoint; so does
`python train.py --workdir=DIR` alone (the config is the one DIR was trained with), and
`python train.py --workdir=DIR --config.train.steps=400` continues it with the overrides applied
to that saved config (fields that may not change on a resume are refused, naming them).
`--dry_run` compiles the train step for the configured mesh and prints what the run will cost
(parameters, FLOPs, memory per device, sharding, estimated step time) without training or
writing anything; it exits non-zero when the step does not fit in device memory.
"""
import os
import shlex
import signal
import sys

from workdir import hostenv

hostenv.ensure_fast_malloc('train')

from absl import app, flags, logging
from ml_collections import config_flags

from configs import schema
from sampling import encdec
from training import data, distributed, guards, loop, preflight, sources
from workdir import files

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
                                   'training/distributed.py: SLURM, Open MPI, Kubernetes and '
                                   'Cloud TPU are detected).')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Multi-process runs: process count.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'Multi-process runs: this process, 0-based.')


def resolve_config():
  """The --config, else the config saved in --workdir; raises SystemExit naming what is missing."""
  if _CONFIG.value is not None:
    return _CONFIG.value
  if _WORKDIR.value is None:
    raise SystemExit('error: give --config=FILE[:variant], or --workdir=DIR of an existing run.')
  return files.load_config(_WORKDIR.value)


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
    extra = [encdec.eval_exact_match] if config.data.task != 'lm' else []
    result = loop.train(config, _WORKDIR.value, extra_evals=extra)
  except (schema.ConfigError, data.DataError, files.WorkdirError, preflight.PreflightError,
          guards.NonfiniteError, FileNotFoundError) as e:
    raise SystemExit(f'error: {e}') from None
  if result['stopped']:  # SIGTERM/SIGINT: checkpointed; exit as the signal would (143, 130)
    print(f'To resume, run the same command again: {shlex.join(sys.orig_argv)}')
    sys.exit(128 + signal.Signals[result['stopped']])


def _flag_value(argv: list[str], name: str) -> str | None:
  """The value of --name=V or --name V in argv (the last one given), else None."""
  value = None
  for i, a in enumerate(argv):
    if a.startswith(f'--{name}='):
      value = a.split('=', 1)[1]
    elif a == f'--{name}' and i + 1 < len(argv):
      value = argv[i + 1]
  return value


def parse_flags(argv: list[str]) -> list[str]:
  """absl's parser, after checking `--config.KEY` overrides against the schema. Without
  --config, overrides apply to the config saved in --workdir (configs/resolved.py:WORKDIR)."""
  try:
    schema.check_override_flags(argv[1:])
  except schema.ConfigError as e:
    raise SystemExit(f'error: {e}') from None
  has_config = any(a == '--config' or a.startswith('--config=') for a in argv[1:])
  if not has_config and any(a.startswith('--config.') for a in argv[1:]):
    workdir = _flag_value(argv[1:], 'workdir')
    if workdir is None or not os.path.isfile(files.config_path(workdir)):
      where = 'no --workdir' if workdir is None else f'--workdir={workdir} holds no config.json'
      raise SystemExit(f'error: --config.KEY overrides need --config=FILE, or the --workdir of an '
                       f'existing run (they then apply to its saved config); {where}.')
    resolved = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configs', 'resolved.py')
    argv = [argv[0], f'--config={resolved}:{workdir}', *argv[1:]]
  try:
    return app.parse_flags_with_usage(argv)
  except KeyError as e:   # an override naming a data.mixture source the config lacks
    raise SystemExit(f'error: {sources.missing_source_error(argv[1:], e)}') from None


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
