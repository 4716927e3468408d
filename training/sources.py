"""The sources of a data mixture (`data.corpus='mixture'`) as data configs of their own.

`data.mixture = {NAME: {'files': 'globs', 'weight': w, 'text_field': optional}}`. A source with
w > 0 is a corpus of its own: the mixture's data config with `corpus='files'`, the source's
files and text field (default `data.text_field`), so it has its own token cache (named by the
hash of its own files, training/token_cache.py) and its own held-out split; the tokenizer,
`data.eval_percent`, `data.skip_bad_records` and `data.cache_dir` are the mixture's. A source
with w = 0 is left out: its files are not read. Errors name the source's fields
(`data.mixture.NAME.files`). training/mixture.py mixes the sources' rows.
"""
from __future__ import annotations

from typing import Iterable

import ml_collections

from configs import schema
from training import token_cache
from training.documents import DataError, corpus_files


def weights(data_cfg) -> dict[str, float]:
  """name -> weight of the sources with weight > 0, in the config's order."""
  return {name: float(src.weight) for name, src in data_cfg.mixture.items() if src.weight > 0}


def source_config(data_cfg, name: str) -> ml_collections.ConfigDict:
  """The data config of source `name` alone (corpus='files', its files and text field)."""
  src = data_cfg.mixture[name]
  cfg = ml_collections.ConfigDict(data_cfg.to_dict())
  cfg.corpus, cfg.files, cfg.mixture = 'files', src.files, {}
  cfg.text_field = src.get('text_field', data_cfg.text_field)
  return cfg


def source_configs(data_cfg) -> dict[str, ml_collections.ConfigDict]:
  """name -> data config of every source with weight > 0."""
  return {name: source_config(data_cfg, name) for name in weights(data_cfg)}


def renamed(error: DataError, data_cfg, name: str) -> DataError:
  """A source's DataError naming the source's fields: data.files -> data.mixture.NAME.files
  (and data.text_field -> data.mixture.NAME.text_field when the source sets its own); other
  messages get the prefix `data.mixture.NAME: `."""
  text = str(error)
  if 'data.files' not in text:
    return DataError(f'data.mixture.{name}: {text}')
  text = text.replace('data.files', f'data.mixture.{name}.files')
  if 'text_field' in data_cfg.mixture[name]:
    text = text.replace('data.text_field', f'data.mixture.{name}.text_field')
  return DataError(text)


def check_files(data_cfg) -> None:
  """Every source's globs match files; else one DataError naming data.mixture.NAME.files and the
  glob. Runs before any source is tokenized."""
  for name, cfg in source_configs(data_cfg).items():
    try:
      corpus_files(cfg)
    except DataError as e:
      raise renamed(e, data_cfg, name) from None


def ensure(data_cfg, *, progress: bool = True) -> dict[str, str]:
  """name -> token cache directory of every source, each built first when missing."""
  check_files(data_cfg)
  paths = {}
  for name, cfg in source_configs(data_cfg).items():
    try:
      paths[name] = token_cache.ensure(cfg, progress=progress)
    except DataError as e:
      raise renamed(e, data_cfg, name) from None
  return paths


def missing_source_error(argv: Iterable[str], error: KeyError,
                         flag: str = 'config') -> schema.ConfigError:
  """The error for a `--config.data.mixture.NAME.FIELD` override naming a source the config does
  not have (absl's parser raises a bare KeyError: command-line overrides cannot add keys).
  Re-raises `error` when no such override explains it."""
  for arg in argv:
    if arg.startswith(f'--{flag}.{schema.MIXTURE}.'):
      key = arg[len(flag) + 3:].split('=', 1)[0]
      name = key.split('.')[2]
      if f"'{name}'" in str(error):
        return schema.ConfigError(
            f"--{flag}.{key}: the config has no data.mixture source '{name}'. Sources are added "
            "in a config file (data.mixture = {NAME: {'files': 'globs', 'weight': w}}, as in "
            'configs/mixture.py); the command line changes the fields of the sources it has.')
  raise error
