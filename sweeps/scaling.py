"""Scaling-law fits of a sweep's groups: L(x) = E + A · x^(-alpha), x = params, FLOPs or tokens.

A sweep file with `'scaling': {'x': 'params' | 'flops' | 'tokens'}` fits the groups' final eval
losses (the mean over seeds) with scipy's `curve_fit`, and gives 95% intervals for E, A and alpha
by bootstrap: seeds resampled within each size when every size has two or more seeds, else the
fit's residuals resampled onto its curve. x per group:
  params: the model's parameter count (embeddings included);
  tokens: train.steps · train.batch_size · data.seq_len;
  flops:  6 · params · tokens (forward and backward matmuls, the usual approximation).
"""
from __future__ import annotations

import csv
import dataclasses
import json
import os
import warnings

import numpy as np
from scipy import optimize

X_KINDS = ('params', 'flops', 'tokens')
BOOTSTRAP = 1000
MIN_SIZES = 3


def param_count(config) -> int:
  """Number of parameters of the model `config` describes (shapes only; nothing is computed)."""
  import jax
  from flax import nnx

  from models import build_model

  model = nnx.eval_shape(lambda: build_model(config, nnx.Rngs(0)))
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param))))


def x_value(kind: str, config, params: int | None = None) -> float:
  """The scaling variable of one resolved config."""
  tokens = config.train.steps * config.train.batch_size * config.data.seq_len
  if kind == 'tokens':
    return float(tokens)
  params = param_count(config) if params is None else params
  return float(params) if kind == 'params' else 6.0 * params * tokens


def check(raw, configs_by_group: dict, where: str) -> dict:
  """Validates a sweep file's 'scaling' entry against its groups' configs; returns it.

  configs_by_group: {group label: a resolved config of that group}. Raises ValueError naming
  the field when 'x' is unknown or the groups span fewer than MIN_SIZES distinct x values.
  """
  if not isinstance(raw, dict) or set(raw) != {'x'} or raw['x'] not in X_KINDS:
    raise ValueError(f"{where}: 'scaling' must be {{'x': one of {', '.join(X_KINDS)}}}; "
                     f'got {raw!r}.')
  xs = {label: x_value(raw['x'], c) for label, c in configs_by_group.items()}
  if len(set(xs.values())) < MIN_SIZES:
    raise ValueError(f"{where}: 'scaling' with x={raw['x']!r} needs groups of at least "
                     f'{MIN_SIZES} different sizes; these trials give {len(set(xs.values()))} '
                     f'({", ".join(f"{k}: {v:.3g}" for k, v in xs.items())}).')
  return dict(raw)


def law(x, e, a, alpha):
  return e + a * np.power(x, -alpha)


@dataclasses.dataclass
class Fit:
  kind: str
  e: float
  a: float                  # for x in its own units
  alpha: float
  intervals: dict           # name -> (low, high): 95% bootstrap percentile intervals
  bootstrap: str            # 'seeds' | 'residuals'
  successful: int           # bootstrap refits that converged

  def describe(self) -> str:
    ci = lambda k: f'[{self.intervals[k][0]:.3g}, {self.intervals[k][1]:.3g}]'
    return (f'L({self.kind}) = {self.e:.4f} + {self.a:.4g} * {self.kind}^(-{self.alpha:.4f}); '
            f'alpha {self.alpha:.3f} (95% CI {ci("alpha")}), E {self.e:.3f} '
            f'(95% CI {ci("e")}), bootstrap over {self.bootstrap}, {self.successful} refits')


def _fit_once(x, y, x0, start=None):
  """(E, A in units of x/x0, alpha) by least squares; None if it fails. Without `start`: from a
  generic start within bounds (0 <= E <= min y, A >= 0, 0 < alpha <= 5); with it (bootstrap
  refits from the full fit): unbounded Levenberg-Marquardt, checked afterwards."""
  try:
    with warnings.catch_warnings():
      warnings.simplefilter('ignore', optimize.OptimizeWarning)
      if start is None:
        span = max(float(y.max() - y.min()), 1e-3)
        start = (max(float(y.min()) - span, 0.0), 2 * span, 0.5)
        bounds = ([0.0, 0.0, 1e-3], [float(y.min()), np.inf, 5.0])
        p, _ = optimize.curve_fit(law, x / x0, y, p0=start, bounds=bounds, max_nfev=5000)
      else:
        p, _ = optimize.curve_fit(law, x / x0, y, p0=start, method='lm', maxfev=2000)
  except (RuntimeError, ValueError):
    return None
  return p if np.all(np.isfinite(p)) and p[1] > 0 and p[2] > 0 else None


def fit(kind: str, xs, values: list, seed: int = 0, n_boot: int = BOOTSTRAP) -> Fit:
  """Fits L = E + A x^-alpha to points x_i with per-seed losses values[i] (a list per size)."""
  xs = np.asarray(xs, dtype=float)
  order = np.argsort(xs)
  xs, values = xs[order], [np.asarray(values[i], dtype=float) for i in order]
  if len(set(xs)) < MIN_SIZES:
    raise ValueError(f'a scaling fit needs at least {MIN_SIZES} sizes; got {len(set(xs))}.')
  x0 = xs[0]
  means = np.array([v.mean() for v in values])
  p = _fit_once(xs, means, x0)
  if p is None:
    raise ValueError('the scaling fit did not converge.')
  rng = np.random.default_rng(seed)
  by_seeds = all(len(v) >= 2 for v in values)
  fitted = law(xs / x0, *p)
  residuals = means - fitted
  samples = []
  for _ in range(n_boot):
    if by_seeds:
      y = np.array([rng.choice(v, len(v)).mean() for v in values])
    else:
      y = fitted + rng.choice(residuals, len(residuals))
    q = _fit_once(xs, y, x0, start=p)
    if q is not None:
      samples.append(q)
  samples = np.array(samples)
  a_raw = lambda a, alpha: a * x0 ** alpha
  intervals = {}
  if len(samples):
    columns = {'e': samples[:, 0], 'a': a_raw(samples[:, 1], samples[:, 2]),
               'alpha': samples[:, 2]}
    intervals = {k: tuple(float(q) for q in np.percentile(v, [2.5, 97.5]))
                 for k, v in columns.items()}
  return Fit(kind, float(p[0]), float(a_raw(p[1], p[2])), float(p[2]), intervals,
             'seeds' if by_seeds else 'residuals', len(samples))


def predict(f: Fit, x):
  return f.e + f.a * np.power(np.asarray(x, dtype=float), -f.alpha)


def write(workdir: str, f: Fit, points: list[dict]) -> None:
  """scaling.csv (one row per size), scaling.json (the fit) and scaling.png (log axes)."""
  with open(os.path.join(workdir, 'scaling.csv'), 'w', newline='') as out:
    writer = csv.writer(out)
    writer.writerow(['group', f.kind, 'n', 'eval_loss_mean', 'eval_loss_std', 'eval_loss_fit'])
    for p in points:
      writer.writerow([p['group'], f'{p["x"]:.6g}', p['n'], f'{p["mean"]:.6f}',
                       '' if p['std'] is None else f'{p["std"]:.6f}',
                       f'{float(predict(f, p["x"])):.6f}'])
  with open(os.path.join(workdir, 'scaling.json'), 'w') as out:
    json.dump({**dataclasses.asdict(f), 'law': 'L = e + a * x^(-alpha)'}, out, indent=2)
  plot(os.path.join(workdir, 'scaling.png'), f, points)


def plot(path: str, f: Fit, points: list[dict]) -> None:
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  x = np.array([p['x'] for p in points])
  fig, ax = plt.subplots(figsize=(6, 4.2), dpi=100)
  ax.errorbar(x, [p['mean'] for p in points], yerr=[p['std'] or 0.0 for p in points],
              fmt='o', capsize=3, label='groups (mean ± 1 std over seeds)')
  grid = np.geomspace(x.min() / 1.5, x.max() * 1.5, 100)
  ax.plot(grid, predict(f, grid), label=f'{f.e:.3f} + {f.a:.3g}·x^(-{f.alpha:.3f})')
  ax.axhline(f.e, color='gray', linestyle=':', linewidth=1, label=f'E = {f.e:.3f}')
  ax.set_xscale('log')
  ax.set_yscale('log')
  plain = matplotlib.ticker.FormatStrFormatter('%.2f')  # losses span well under a decade
  ax.yaxis.set_major_formatter(plain)
  ax.yaxis.set_minor_formatter(plain)
  ax.set_xlabel(f.kind)
  ax.set_ylabel('final eval loss')
  ax.grid(alpha=0.3, which='both')
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
