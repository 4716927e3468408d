"""Statistics of seeded sweeps: per-group t-intervals, Welch's t-test against a baseline group,
and the seeds per group that would detect the observed difference.

A group is the trials that differ only in `train.seed`. For each metric (final eval loss, final
train loss, mean tokens/s) and group with values x_1..x_n:
  mean ± t_{0.975, n-1} · s / sqrt(n)                      (95% t-interval; s: ddof=1)
and against the baseline group b, Welch's unequal-variance test (scipy.stats.ttest_ind with
equal_var=False): the difference of means with its 95% interval and two-sided p-value.
`seeds_needed` is the smallest n seeds per group for which a two-sided Welch test at α = 0.05
has 80% power against the observed difference, the two groups' sample standard deviations
taken as the true ones (power from the noncentral t distribution).
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from scipy import stats as sps

ALPHA = 0.05
POWER = 0.8
MAX_SEEDS = 100_000          # beyond this, seeds_needed is reported as None ("more than")
METRICS = ('eval_loss', 'train_loss', 'tokens_per_sec')
STAT_FIELDS = ('mean', 'ci95_low', 'ci95_high', 'diff_vs_baseline', 'diff_ci95_low',
               'diff_ci95_high', 'p_value', 'seeds_needed')
# summary.csv: the eval-loss columns as DESIGN.md names them, then the same for the other metrics.
SUMMARY_COLUMNS = (
    'group', 'n', 'eval_loss_mean', 'eval_loss_ci95_low', 'eval_loss_ci95_high',
    'diff_vs_baseline', 'diff_ci95_low', 'diff_ci95_high', 'p_value', 'seeds_needed',
    *(f'{m}_{f}' for m in METRICS[1:] for f in STAT_FIELDS))


def column(metric: str, field: str) -> str:
  """summary.csv's column of `field` for `metric`: the eval loss's test columns are unprefixed."""
  if metric == 'eval_loss' and field not in ('mean', 'ci95_low', 'ci95_high'):
    return field
  return f'{metric}_{field}'


def t_interval(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float] | None:
  """The t-interval of the mean; None for fewer than 2 values."""
  x = np.asarray(values, dtype=float)
  if len(x) < 2:
    return None
  half = sps.t.ppf(0.5 + confidence / 2, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x))
  return float(x.mean() - half), float(x.mean() + half)


def welch(values: Sequence[float], baseline: Sequence[float]) -> dict | None:
  """{'diff', 'ci95_low', 'ci95_high', 'p_value'} of mean(values) - mean(baseline) by Welch's
  t-test; None when either side has fewer than 2 values or both have no spread."""
  x, b = np.asarray(values, dtype=float), np.asarray(baseline, dtype=float)
  if len(x) < 2 or len(b) < 2 or (x.std(ddof=1) == 0 and b.std(ddof=1) == 0):
    return None
  result = sps.ttest_ind(x, b, equal_var=False)
  low, high = result.confidence_interval(1 - ALPHA)
  return {'diff': float(x.mean() - b.mean()), 'ci95_low': float(low), 'ci95_high': float(high),
          'p_value': float(result.pvalue)}


def welch_power(diff: float, sd1: float, sd2: float, n: int, alpha: float = ALPHA) -> float:
  """Power of the two-sided Welch test with n seeds per group when the true difference is
  `diff` and the true standard deviations sd1, sd2 (noncentral t, Welch-Satterthwaite df)."""
  v1, v2 = sd1 ** 2 / n, sd2 ** 2 / n
  se = math.sqrt(v1 + v2)
  df = (v1 + v2) ** 2 / (v1 ** 2 / (n - 1) + v2 ** 2 / (n - 1))
  crit = sps.t.ppf(1 - alpha / 2, df)
  nc = abs(diff) / se
  return float(sps.nct.sf(crit, df, nc) + sps.nct.cdf(-crit, df, nc))


def seeds_needed(diff: float, sd1: float, sd2: float, power: float = POWER,
                 alpha: float = ALPHA) -> int | None:
  """Smallest n >= 2 seeds per group with welch_power >= `power`; None when the difference is
  zero or more than MAX_SEEDS would be needed. With no spread at all, 2 seeds suffice."""
  if diff == 0:
    return None
  if sd1 == 0 and sd2 == 0:
    return 2
  ok = lambda n: welch_power(diff, sd1, sd2, n, alpha) >= power
  if ok(2):
    return 2
  low, high = 2, 4
  while not ok(high):            # power grows with n: bracket, then bisect
    low, high = high, high * 2
    if high > MAX_SEEDS:
      return None
  while high - low > 1:
    mid = (low + high) // 2
    low, high = (low, mid) if ok(mid) else (mid, high)
  return high


def metric_stats(values: Sequence[float], baseline: Sequence[float] | None) -> dict:
  """STAT_FIELDS for one metric of one group; `baseline` None for the baseline group itself
  (its difference is 0 and its test fields are empty)."""
  x = np.asarray(values, dtype=float)
  out = dict.fromkeys(STAT_FIELDS)
  if not len(x):
    return out
  out['mean'] = float(x.mean())
  interval = t_interval(x)
  if interval:
    out['ci95_low'], out['ci95_high'] = interval
  if baseline is None:
    out['diff_vs_baseline'] = 0.0
    return out
  b = np.asarray(baseline, dtype=float)
  if len(b):
    out['diff_vs_baseline'] = float(x.mean() - b.mean())
  test = welch(x, b)
  if test:
    out.update(diff_ci95_low=test['ci95_low'], diff_ci95_high=test['ci95_high'],
               p_value=test['p_value'],
               seeds_needed=seeds_needed(test['diff'], x.std(ddof=1), b.std(ddof=1)))
  return out


def summarize(groups: list[dict], baseline: int = 0) -> list[dict]:
  """One summary row per group. `groups`: [{'group': label, 'values': {metric: [per-seed
  values]}}]; `baseline`: the index of the baseline group. Keys of each row: SUMMARY_COLUMNS."""
  rows = []
  base = groups[baseline]['values']
  for i, g in enumerate(groups):
    row = {'group': g['group'], 'n': len(g['values'].get('eval_loss', []))}
    for metric in METRICS:
      values = g['values'].get(metric, [])
      s = metric_stats(values, None if i == baseline else base.get(metric, []))
      row.update({column(metric, f): v for f, v in s.items()})
    rows.append(row)
  return rows


def _num(x: float) -> str:
  return f'{x:.4f}' if abs(x) < 100 else f'{x:,.0f}'


def verdicts(rows: list[dict], baseline: int = 0, metric: str = 'eval_loss') -> list[str]:
  """In words, for each group against the baseline: the difference, its interval, whether it is
  significant at α = 0.05, and the seeds that would settle it."""
  name = metric.replace('_', ' ')
  base = rows[baseline]['group']
  lines = []
  for i, row in enumerate(rows):
    if i == baseline:
      continue
    diff, p = row[column(metric, 'diff_vs_baseline')], row[column(metric, 'p_value')]
    if diff is None:
      lines.append(f'- {row["group"]}: no finished trials to compare with {base}.')
      continue
    if p is None:
      lines.append(f'- {row["group"]}: {name} {_num(diff):s} vs {base} '
                   f'(n={row["n"]} vs {rows[baseline]["n"]}: at least 2 seeds each are needed '
                   'for a test).')
      continue
    low, high = row[column(metric, 'diff_ci95_low')], row[column(metric, 'diff_ci95_high')]
    direction = 'lower' if diff < 0 else 'higher'
    text = (f'- {row["group"]}: {name} {direction} than {base} by {_num(abs(diff))} '
            f'(95% CI {_num(low)} to {_num(high)}, Welch p = {p:.3g}): ')
    needed = row[column(metric, 'seeds_needed')]
    if p < ALPHA:
      text += 'significant at α = 0.05.'
    else:
      text += 'not significant at α = 0.05'
      text += (f'; about {needed} seeds per group would detect a difference this size with 80% '
               'power.' if needed else
               f'; more than {MAX_SEEDS:,} seeds per group would be needed to detect it.')
    lines.append(text)
  return lines
