"""Train a model: python train.py --config=configs/default.py[:variant] --workdir=DIR [--config.a.b=v].

The same command on an existing DIR resumes from its latest checkpoint.
"""
from training import hostenv

hostenv.ensure_fast_malloc()

from absl import app, flags, logging
from ml_collections import config_flags

from configs import schema
from training import checkpoint, data, loop

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file[:variant].',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and logs.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}')
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # orbax is chatty at INFO
  try:
    loop.train(_CONFIG.value, _WORKDIR.value)
  except (schema.ConfigError, data.DataError, checkpoint.WorkdirError, FileNotFoundError) as e:
    raise SystemExit(f'error: {e}') from None


if __name__ == '__main__':
  app.run(main)
