"""Build the token cache: python prepare.py --config=configs/X.py[:variant] [--config.a.b=v].

Tokenizes the configured data (`data.corpus`/`data.files`, `data.tokenizer`, ...) once, in
`data.prepare_workers` processes, into `data.cache_dir` (training/token_cache.py) and prints the
cache's path on its last line (for `data.corpus='mixture'` every source's cache, one path a
line, in the order of `data.mixture`). Rerunning after a kill continues from the finished
shards; `train.py` with the same data config uses the cache (and builds it when it is missing).
"""

from absl import app, flags
from ml_collections import config_flags

from configs import schema
from training import sources, token_cache
from training.documents import DataError

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file[:variant].',
                                          lock_config=True)
flags.mark_flag_as_required('config')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}')
  config = _CONFIG.value
  try:
    schema.validate(config)
    if config.data.task in ('addition', 'reversal'):
      raise DataError(f'data.task={config.data.task} generates its examples; it has no token '
                      'cache to build.')
    if config.data.corpus == 'mixture':
      paths = list(sources.ensure(config.data).values())
    else:
      paths = [token_cache.ensure(config.data)]
  except (schema.ConfigError, DataError, FileNotFoundError) as e:
    raise SystemExit(f'error: {e}') from None
  print('\n'.join(paths))


def parse_flags(argv: list[str]) -> list[str]:
  """absl's parser, after checking `--config.KEY` overrides against the schema."""
  try:
    schema.check_override_flags(argv[1:])
  except schema.ConfigError as e:
    raise SystemExit(f'error: {e}') from None
  try:
    return app.parse_flags_with_usage(argv)
  except KeyError as e:   # an override naming a data.mixture source the config lacks
    raise SystemExit(f'error: {sources.missing_source_error(argv[1:], e)}') from None


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
