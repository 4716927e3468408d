"""A resolved config saved as JSON (what `configs.schema.to_json` writes).

  python train.py --config=configs/resolved.py:PATH --workdir=DIR

PATH is a JSON file, or a workdir whose config.json is used. Sweep trials run this way, so a
trial trains exactly the config its name hashes, including values flags cannot spell (None).
"""
import os

from configs import schema


def get_config(arg: str | None = None):
  if not arg:
    raise ValueError('configs/resolved.py needs a JSON file as its variant: '
                     '--config=configs/resolved.py:PATH.')
  path = os.path.join(arg, 'config.json') if os.path.isdir(arg) else arg
  if not os.path.isfile(path):
    raise ValueError(f'configs/resolved.py:{arg}: no such JSON config file.')
  with open(path) as f:
    return schema.from_json(f.read())
