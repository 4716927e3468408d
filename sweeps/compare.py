"""`sweep.py --compare DIR [DIR...] --workdir=OUT`: the sweep report over any finished workdirs.

Each DIR is a sweep workdir (its trials are taken) or a train.py workdir (config.json,
metrics.jsonl). Runs are grouped by the resolved-config fields that differ between them, the seed
aside, so repeated seeds of one setting form a group; the baseline is the first DIR's group.
Writes OUT/results.csv, results.md, summary.csv and loss_curves.png.
"""
from __future__ import annotations

import json
import os

from configs import schema
from sweeps import report
from sweeps.runner import is_finished, read_json
from sweeps.spec import SEED_KEY, SweepError


def _runs(directory: str) -> list[tuple[str, str, dict]]:
  """(label, folder, trial.json) of each run in `directory` (a sweep's trials, or the run)."""
  sweep = read_json(os.path.join(directory, 'sweep.json'))
  name = os.path.basename(os.path.normpath(directory))
  if sweep is not None:
    return [(f'{name}/{t["name"]}', os.path.join(directory, t['name']),
             read_json(os.path.join(directory, t['name'], 'trial.json'), {}))
            for t in sweep['trials']]
  if not os.path.isfile(os.path.join(directory, 'config.json')):
    raise SweepError(f'--compare: {directory} holds neither sweep.json (a sweep) nor config.json '
                     '(a train.py run).')
  return [(name, directory, {})]


def _config(folder: str):
  for file in ('config.json', 'sweep_config.json'):
    path = os.path.join(folder, file)
    if os.path.isfile(path):
      with open(path) as f:
        return schema.from_json(f.read())
  raise SweepError(f'--compare: {folder} has no config.json.')


def collect(directories: list[str]) -> tuple[list[str], list[dict]]:
  """(differing config keys, one report row per run) over `directories`, in the order given."""
  if not directories:
    raise SweepError('--compare needs at least one workdir: sweep.py --compare DIR [DIR...] '
                     '--workdir=OUT.')
  runs = []
  for directory in directories:
    if not os.path.isdir(directory):
      raise SweepError(f'--compare: no such directory {directory!r}.')
    for label, folder, info in _runs(directory):
      config = _config(folder)
      if not info.get('status'):
        info = {**info, 'status': 'done' if is_finished(folder, config.train.steps) else
                'unfinished'}
      runs.append((label, folder, info, config))
  flat = [schema.flatten(json.loads(schema.to_json(c))) for *_, c in runs]
  keys = [k for k in flat[0] if k != SEED_KEY
          and any(json.dumps(f.get(k)) != json.dumps(flat[0].get(k)) for f in flat)]
  keys += sorted({k for f in flat for k in f} - set(flat[0]))
  keys.append(SEED_KEY)
  rows, counts = [], {}
  for (label, folder, info, config), values in zip(runs, flat):
    overrides = {k: values.get(k) for k in keys}
    rows.append(report.trial_row(label, folder, overrides, config, info,
                                 report.cached_param_count(config, counts)))
  return keys, rows


def run(directories: list[str], out: str) -> dict:
  """Writes the report of `directories` into `out`; returns write_outputs' result."""
  keys, rows = collect(directories)
  os.makedirs(out, exist_ok=True)
  result = report.write_outputs(out, keys, rows, always_summary=True, where='--compare')
  sources = ''.join(f'- `{d}`\n' for d in directories)
  with open(os.path.join(out, 'results.md'), 'w') as f:
    f.write(f'Comparison of:\n\n{sources}\n' + result['markdown'])
  return result
