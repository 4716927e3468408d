"""A sweep's report from its trial folders: results.csv, results.md and loss_curves.png.

Per trial: its overrides, status, final train loss (last logged), final eval loss, parameter
count, mean tokens/s over the logged intervals, wall time and error. Trials repeated over seeds
are also summarised per override group as mean ± sample standard deviation (ddof=1).
"""
from __future__ import annotations

import csv
import io
import os

import numpy as np

from configs import schema
from sweeps import samples, search
from sweeps.runner import read_json
from sweeps.spec import SEED_KEY, describe
from training.metrics import read_metrics

COLUMNS = ('trial', 'status', 'train_loss', 'eval_loss', 'params', 'tokens_per_sec',
           'wall_time_s', 'steps', 'error')


def param_count(config) -> int:
  """Number of parameters of the model `config` describes (shapes only; nothing is computed)."""
  import jax
  from flax import nnx

  from models import build_model

  model = nnx.eval_shape(lambda: build_model(config, nnx.Rngs(0)))
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param))))


def collect(workdir: str) -> tuple[list[str], list[dict]]:
  """(override keys in order of appearance, one row per trial of WORKDIR/sweep.json)."""
  sweep = read_json(os.path.join(workdir, 'sweep.json'))
  if sweep is None:
    raise FileNotFoundError(f'--workdir={workdir}: no sweep.json there (not a sweep workdir).')
  keys, rows, counts = [], [], {}
  for entry in sweep['trials']:
    keys += [k for k in entry['overrides'] if k not in keys]
    directory = os.path.join(workdir, entry['name'])
    info = read_json(os.path.join(directory, 'trial.json'), {})
    metrics = read_metrics(directory)
    losses = [m['loss'] for m in metrics if 'loss' in m]
    evals = [m['eval_loss'] for m in metrics if 'eval_loss' in m]
    speeds = [m['tokens_per_sec'] for m in metrics if 'tokens_per_sec' in m]
    with open(os.path.join(directory, 'sweep_config.json')) as f:
      config_text = f.read()
    if config_text not in counts:
      counts[config_text] = param_count(schema.from_json(config_text))
    rows.append({
        'trial': entry['name'], 'overrides': entry['overrides'],
        'status': info.get('status', 'pending'),
        'train_loss': losses[-1] if losses else None, 'eval_loss': evals[-1] if evals else None,
        'params': counts[config_text], 'tokens_per_sec': float(np.mean(speeds)) if speeds else None,
        'wall_time_s': info.get('wall_time'), 'steps': max((m['step'] for m in metrics), default=0),
        'error': info.get('error') or '',
        'curve': [(m['step'], m['eval_loss']) for m in metrics if 'eval_loss' in m]})
  if sweep.get('sort_by'):  # search sweeps: best first, unfinished last
    rows.sort(key=lambda r: (r[sweep['sort_by']] is None, r[sweep['sort_by']] or 0.0))
  return keys, rows


def groups(rows: list[dict]) -> list[dict]:
  """Finished trials grouped by their overrides without the seed: n, mean and std of losses."""
  by_group: dict = {}
  for row in rows:
    key = tuple((k, v) for k, v in row['overrides'].items() if k != SEED_KEY)
    by_group.setdefault(key, []).append(row)
  out = []
  for key, members in by_group.items():
    done = [r for r in members if r['status'] == 'done' and r['eval_loss'] is not None]
    stats = {'overrides': dict(key), 'n': len(done)}
    for field in ('train_loss', 'eval_loss', 'tokens_per_sec'):
      values = np.array([r[field] for r in done], dtype=float)
      stats[field] = (float(values.mean()) if len(values) else None,
                      float(values.std(ddof=1)) if len(values) > 1 else None)
    out.append(stats)
  return out


def _cell(value, digits: int = 4) -> str:
  if value is None:
    return ''
  if isinstance(value, float):
    return f'{value:.{digits}f}'
  return str(value)


def _mean_std(pair, digits: int = 4) -> str:
  mean, std = pair
  if mean is None:
    return ''
  return f'{mean:.{digits}f}' + ('' if std is None else f' ± {std:.{digits}f}')


def write_csv(path: str, keys: list[str], rows: list[dict]) -> None:
  with open(path, 'w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(['trial', *keys, *COLUMNS[1:]])
    for row in rows:
      writer.writerow([row['trial'], *(row['overrides'].get(k, '') for k in keys),
                       *(_cell(row[c], 6) for c in COLUMNS[1:])])


def markdown(keys: list[str], rows: list[dict]) -> str:
  out = io.StringIO()
  header = [*keys, 'status', 'train loss', 'eval loss', 'params', 'tokens/s', 'wall time (s)']
  out.write('| ' + ' | '.join(header) + ' |\n|' + '---|' * len(header) + '\n')
  for row in rows:
    cells = [*(_cell(row['overrides'].get(k, '')) for k in keys), row['status'],
             _cell(row['train_loss']), _cell(row['eval_loss']), f'{row["params"]:,}',
             _cell(row['tokens_per_sec'], 0), _cell(row['wall_time_s'], 0)]
    out.write('| ' + ' | '.join(cells) + ' |\n')
  summary = groups(rows)
  if any(g['n'] > 1 for g in summary):
    group_keys = [k for k in keys if k != SEED_KEY]
    header = [*group_keys, 'seeds', 'train loss', 'eval loss', 'tokens/s']
    out.write('\nMean ± standard deviation over seeds:\n\n')
    out.write('| ' + ' | '.join(header) + ' |\n|' + '---|' * len(header) + '\n')
    for g in summary:
      cells = [*(_cell(g['overrides'].get(k, '')) for k in group_keys), str(g['n']),
               _mean_std(g['train_loss']), _mean_std(g['eval_loss']),
               _mean_std(g['tokens_per_sec'], 0)]
      out.write('| ' + ' | '.join(cells) + ' |\n')
  failed = [r for r in rows if r['status'] == 'failed']
  if failed:
    out.write('\nFailed trials:\n\n')
    for r in failed:
      out.write(f'- `{r["trial"]}`: {r["error"]}\n')
  return out.getvalue()


def plot(path: str, rows: list[dict]) -> None:
  """Eval loss vs step, one curve per trial, labelled by its overrides."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
  for row in rows:
    if row['curve']:
      steps, losses = zip(*row['curve'])
      ax.plot(steps, losses, marker='o', markersize=3, label=describe(row['overrides']))
  ax.set_xlabel('step')
  ax.set_ylabel('eval loss')
  ax.grid(alpha=0.3)
  if ax.lines:
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def write_report(workdir: str) -> list[dict]:
  """Writes results.csv, results.md and loss_curves.png into `workdir`; returns the rows."""
  keys, rows = collect(workdir)
  write_csv(os.path.join(workdir, 'results.csv'), keys, rows)
  text = markdown(keys, rows)
  top = search.best(workdir)  # search sweeps: the best trial as a ready command line
  if top:
    text += (f'\nBest trial: `{top["trial"]}` ({describe(top["overrides"])}), eval loss '
             f'{top["eval_loss"]:.4f}:\n\n```\n{top["command"]}\n```\n')
  text += samples.markdown(workdir, rows)  # after `sweep.py --samples`
  with open(os.path.join(workdir, 'results.md'), 'w') as f:
    f.write(text)
  plot(os.path.join(workdir, 'loss_curves.png'), rows)
  return rows
