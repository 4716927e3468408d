"""A sweep's report from its trial folders: results.csv, results.md, loss_curves.png, and for
seeded sweeps summary.csv (sweeps/stats.py), for scaling sweeps scaling.csv/.json/.png.

Per trial: its overrides, status, final train loss (last logged), final eval loss, parameter
count, mean tokens/s over the logged intervals, steps trained, wall time and error. Trials that
differ only in seed form a group: mean ± sample standard deviation (ddof=1), t-intervals and
Welch tests against the baseline group; the plot draws each group's mean eval loss with a
±1 std band across seeds.
"""
from __future__ import annotations

import csv
import io
import json
import os

import numpy as np

from configs import schema
from sweeps import samples, scaling, search, stats
from sweeps.runner import read_json
from sweeps.spec import SEED_KEY, describe, find_baseline
from training.metrics import read_metrics

COLUMNS = ('trial', 'status', 'train_loss', 'eval_loss', 'params', 'tokens_per_sec',
           'wall_time_s', 'steps', 'error')
FINISHED = 'done'

param_count = scaling.param_count


def cached_param_count(config, cache: dict) -> int:
  """param_count, computed once per distinct `config.model` (seeds and the like share it)."""
  key = json.dumps(config.model.to_dict(), sort_keys=True, default=list)
  if key not in cache:
    cache[key] = param_count(config)
  return cache[key]


def trial_row(name: str, directory: str, overrides: dict, config, info: dict,
              params: int) -> dict:
  """One report row from a trial (or any train.py) folder's metrics.jsonl and trial.json."""
  metrics = read_metrics(directory)
  losses = [m['loss'] for m in metrics if 'loss' in m]
  evals = [m['eval_loss'] for m in metrics if 'eval_loss' in m]
  speeds = [m['tokens_per_sec'] for m in metrics if 'tokens_per_sec' in m]
  steps = max((m['step'] for m in metrics), default=0)
  return {
      'trial': name, 'overrides': overrides, 'config': config,
      'status': info.get('status', 'pending'),
      'train_loss': losses[-1] if losses else None, 'eval_loss': evals[-1] if evals else None,
      'params': params, 'tokens_per_sec': float(np.mean(speeds)) if speeds else None,
      'wall_time_s': info.get('wall_time'), 'steps': max(steps, info.get('steps_trained') or 0),
      'planned_steps': config.train.steps, 'error': info.get('error') or '',
      'curve': [(m['step'], m['eval_loss']) for m in metrics if 'eval_loss' in m]}


def collect(workdir: str) -> tuple[list[str], list[dict]]:
  """(override keys in order of appearance, one row per trial of WORKDIR/sweep.json)."""
  sweep = read_json(os.path.join(workdir, 'sweep.json'))
  if sweep is None:
    raise FileNotFoundError(f'--workdir={workdir}: no sweep.json there (not a sweep workdir).')
  keys, rows, counts = [], [], {}
  for entry in sweep['trials']:
    keys += [k for k in entry['overrides'] if k not in keys]
    directory = os.path.join(workdir, entry['name'])
    with open(os.path.join(directory, 'sweep_config.json')) as f:
      config_text = f.read()
    config = schema.from_json(config_text)
    info = read_json(os.path.join(directory, 'trial.json'), {})
    rows.append(trial_row(entry['name'], directory, entry['overrides'], config, info,
                          cached_param_count(config, counts)))
  if sweep.get('sort_by'):  # search sweeps: best first, unfinished last
    key = sweep['sort_by']
    rows.sort(key=lambda r: (r['status'] != FINISHED, r[key] is None, r[key] or 0.0))
  return keys, rows


def groups(rows: list[dict]) -> list[dict]:
  """Trials grouped by their overrides without the seed, in order of first appearance:
  'overrides', 'label', 'members' (rows), 'n' (finished), 'values' {metric: per-seed values}
  and (mean, std) pairs per metric over the finished trials."""
  by_group: dict = {}
  for row in rows:
    key = tuple((k, v) for k, v in row['overrides'].items() if k != SEED_KEY)
    by_group.setdefault(key, []).append(row)
  out = []
  for key, members in by_group.items():
    done = [r for r in members if r['status'] == FINISHED and r['eval_loss'] is not None]
    g = {'overrides': dict(key), 'label': describe(dict(key)), 'members': members,
         'n': len(done), 'values': {}}
    for field in stats.METRICS:
      values = [r[field] for r in done if r[field] is not None]
      g['values'][field] = values
      g[field] = (float(np.mean(values)) if values else None,
                  float(np.std(values, ddof=1)) if len(values) > 1 else None)
    out.append(g)
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


def _p(value) -> str:
  return '' if value is None else f'{value:.3g}'


def write_csv(path: str, keys: list[str], rows: list[dict]) -> None:
  with open(path, 'w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(['trial', *keys, *COLUMNS[1:]])
    for row in rows:
      writer.writerow([row['trial'], *(row['overrides'].get(k, '') for k in keys),
                       *(_cell(row[c], 6) for c in COLUMNS[1:])])


def write_summary(path: str, summary: list[dict]) -> None:
  """summary.csv: stats.SUMMARY_COLUMNS, one row per group (empty cells where undefined)."""
  with open(path, 'w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(stats.SUMMARY_COLUMNS)
    for row in summary:
      writer.writerow([f'{row[c]:.10g}' if isinstance(row[c], float) else _cell(row[c])
                       for c in stats.SUMMARY_COLUMNS])


def _table(out: io.StringIO, header: list[str], lines: list[list[str]]) -> None:
  out.write('| ' + ' | '.join(header) + ' |\n|' + '---|' * len(header) + '\n')
  for cells in lines:
    out.write('| ' + ' | '.join(cells) + ' |\n')


def statistics_markdown(summary: list[dict], base: int) -> str:
  """The summary table and, per metric, which differences from the baseline are significant."""
  out = io.StringIO()
  out.write(f'\nAgainst the baseline `{summary[base]["group"]}` (95% t-intervals; Welch\'s '
            't-test, two-sided; seeds needed: per group, to detect the observed difference at '
            'α = 0.05 with 80% power):\n\n')
  header = ['group', 'n', 'eval loss [95% CI]', 'difference [95% CI]', 'p', 'seeds needed']
  lines = []
  for row in summary:
    ci = ('' if row['eval_loss_ci95_low'] is None else
          f' [{row["eval_loss_ci95_low"]:.4f}, {row["eval_loss_ci95_high"]:.4f}]')
    diff = ('' if row['diff_vs_baseline'] is None else f'{row["diff_vs_baseline"]:+.4f}' + (
        '' if row['diff_ci95_low'] is None else
        f' [{row["diff_ci95_low"]:+.4f}, {row["diff_ci95_high"]:+.4f}]'))
    lines.append([row['group'], str(row['n']), _cell(row['eval_loss_mean']) + ci, diff,
                  _p(row['p_value']), _cell(row['seeds_needed'])])
  _table(out, header, lines)
  for metric in stats.METRICS:
    if all(row[stats.column(metric, 'p_value')] is None for row in summary):
      continue
    words = stats.verdicts(summary, base, metric)
    significant = [r for i, r in enumerate(summary) if i != base
                   and (r[stats.column(metric, 'p_value')] or 1.0) < stats.ALPHA]
    out.write(f'\n{metric.replace("_", " ").capitalize()}: '
              + (f'{len(significant)} of {len(summary) - 1} differences from the baseline are '
                 'significant at α = 0.05' if significant else
                 'no difference from the baseline is significant at α = 0.05')
              + ' (p-values per comparison, not corrected for multiple comparisons).\n\n')
    out.write('\n'.join(words) + '\n')
  return out.getvalue()


def markdown(keys: list[str], rows: list[dict], summary: list[dict] | None = None,
             base: int = 0) -> str:
  out = io.StringIO()
  header = [*keys, 'status', 'train loss', 'eval loss', 'params', 'tokens/s', 'wall time (s)']
  _table(out, header, [[*(_cell(row['overrides'].get(k, '')) for k in keys), row['status'],
                        _cell(row['train_loss']), _cell(row['eval_loss']), f'{row["params"]:,}',
                        _cell(row['tokens_per_sec'], 0), _cell(row['wall_time_s'], 0)]
                       for row in rows])
  group_list = groups(rows)
  if any(g['n'] > 1 for g in group_list):
    group_keys = [k for k in keys if k != SEED_KEY]
    out.write('\nMean ± standard deviation over seeds:\n\n')
    _table(out, [*group_keys, 'seeds', 'train loss', 'eval loss', 'tokens/s'],
           [[*(_cell(g['overrides'].get(k, '')) for k in group_keys), str(g['n']),
             _mean_std(g['train_loss']), _mean_std(g['eval_loss']),
             _mean_std(g['tokens_per_sec'], 0)] for g in group_list])
  if summary is not None:
    out.write(statistics_markdown(summary, base))
  pruned = [r for r in rows if r['status'] == 'pruned']
  if pruned:
    run, planned = sum(r['steps'] for r in rows), sum(r['planned_steps'] for r in rows)
    out.write(f'\nCompute: {run:,} train steps of the {planned:,} that running every trial to '
              f'the end would take ({100 * run / max(planned, 1):.0f}%); {len(pruned)} of '
              f'{len(rows)} trials pruned.\n')
  failed = [r for r in rows if r['status'] == 'failed']
  if failed:
    out.write('\nFailed trials:\n\n')
    for r in failed:
      out.write(f'- `{r["trial"]}`: {r["error"]}\n')
  return out.getvalue()


def plot(path: str, rows: list[dict]) -> None:
  """Eval loss vs step. Groups with several finished seeds: the mean over seeds with a ±1 std
  band (over the steps every seed logged); other trials: one curve each (pruned ones dashed)."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
  for g in groups(rows):
    done = [r for r in g['members'] if r['status'] == FINISHED and r['curve']]
    if len(done) > 1:
      curves = [dict(r['curve']) for r in done]
      steps = sorted(set.intersection(*(set(c) for c in curves)))
      values = np.array([[c[s] for s in steps] for c in curves])
      mean, std = values.mean(0), values.std(0, ddof=1)
      line, = ax.plot(steps, mean, marker='o', markersize=3, label=f'{g["label"]} (n={len(done)})')
      ax.fill_between(steps, mean - std, mean + std, color=line.get_color(), alpha=0.2)
      others = [r for r in g['members'] if r not in done and r['curve']]
    else:
      others = [r for r in g['members'] if r['curve']]
    for r in others:
      steps, losses = zip(*r['curve'])
      ax.plot(steps, losses, marker='o', markersize=3,
              linestyle='--' if r['status'] == 'pruned' else '-',
              label=describe(r['overrides']) + (' (pruned)' if r['status'] == 'pruned' else ''))
  ax.set_xlabel('step')
  ax.set_ylabel('eval loss')
  ax.grid(alpha=0.3)
  if ax.lines:
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def scaling_fit(workdir: str, kind: str, rows: list[dict]) -> tuple[scaling.Fit | None, str]:
  """Fits the finished groups' final eval losses against `kind`; writes scaling.csv/.json/.png;
  returns the fit and its markdown."""
  points = []
  for g in groups(rows):
    if g['n']:
      done = next(r for r in g['members'] if r['status'] == FINISHED)
      points.append({'group': g['label'], 'x': scaling.x_value(kind, done['config'],
                                                               done['params']),
                     'n': g['n'], 'mean': g['eval_loss'][0], 'std': g['eval_loss'][1],
                     'values': g['values']['eval_loss']})
  if len({p['x'] for p in points}) < scaling.MIN_SIZES:
    return None, (f'\nScaling fit: not made; {len(points)} sizes have finished trials and a fit '
                  f'needs {scaling.MIN_SIZES}.\n')
  f = scaling.fit(kind, [p['x'] for p in points], [p['values'] for p in points])
  scaling.write(workdir, f, points)
  text = (f'\nScaling fit over {len(points)} sizes (`scaling.csv`, `scaling.png`): '
          f'{f.describe()}.\n')
  return f, text


def write_outputs(workdir: str, keys: list[str], rows: list[dict], *, baseline: dict | None = None,
                  scaling_x: str | None = None, always_summary: bool = False,
                  where: str = 'sweep') -> dict:
  """results.csv, results.md, loss_curves.png (and summary.csv, scaling.*) into `workdir`.
  Returns {'rows', 'summary', 'fit', 'markdown'}."""
  write_csv(os.path.join(workdir, 'results.csv'), keys, rows)
  group_list = groups(rows)
  summary, base = None, find_baseline(baseline, [g['overrides'] for g in group_list], where)
  if always_summary or any(len(g['members']) > 1 for g in group_list):
    summary = stats.summarize([{'group': g['label'], 'values': g['values']} for g in group_list],
                              base)
    write_summary(os.path.join(workdir, 'summary.csv'), summary)
  text = markdown(keys, rows, summary, base)
  fit = None
  if scaling_x:
    fit, fit_text = scaling_fit(workdir, scaling_x, rows)
    text += fit_text
  plot(os.path.join(workdir, 'loss_curves.png'), rows)
  return {'rows': rows, 'summary': summary, 'fit': fit, 'markdown': text}


def write_report(workdir: str) -> list[dict]:
  """Writes the report files into a sweep `workdir`; returns the rows."""
  keys, rows = collect(workdir)
  sweep = read_json(os.path.join(workdir, 'sweep.json'))
  out = write_outputs(workdir, keys, rows, baseline=sweep.get('baseline'),
                      scaling_x=(sweep.get('scaling') or {}).get('x'),
                      where=sweep.get('sweep', workdir))
  text = out['markdown']
  top = search.best(workdir)  # search sweeps: the best trial as a ready command line
  if top:
    text += (f'\nBest trial: `{top["trial"]}` ({describe(top["overrides"])}), eval loss '
             f'{top["eval_loss"]:.4f}:\n\n```\n{top["command"]}\n```\n')
  text += samples.markdown(workdir, rows)  # after `sweep.py --samples`
  with open(os.path.join(workdir, 'results.md'), 'w') as f:
    f.write(text)
  if out['fit']:
    print(f'Scaling fit: {out["fit"].describe()}')
  return rows
