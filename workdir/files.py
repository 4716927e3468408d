"""WORKDIR/config.json: the resolved config a workdir was trained (or imported) with."""
from __future__ import annotations

import os

from configs import schema


class WorkdirError(ValueError):
  """The workdir cannot be used as asked (different model, nothing to restore...)."""


def config_path(workdir: str) -> str:
  return os.path.join(workdir, 'config.json')


def load_config(workdir: str):
  """The resolved config a workdir was trained with."""
  path = config_path(workdir)
  if not os.path.isfile(path):
    raise WorkdirError(f'--workdir={workdir}: no config.json there (not a training workdir).')
  with open(path) as f:
    return schema.from_json(f.read())


def write_config(workdir: str, config) -> None:
  """Writes config.json atomically (creating the workdir)."""
  os.makedirs(workdir, exist_ok=True)
  tmp = config_path(workdir) + '.tmp'
  with open(tmp, 'w') as f:
    f.write(schema.to_json(config))
  os.replace(tmp, config_path(workdir))
