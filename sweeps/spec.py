"""Sweep files: loading, grid/zip helpers, seeds, trial naming and up-front validation.

A sweep file defines `get_sweep(arg=None)` returning
  {'config': 'configs/default.py[:variant]',   # the base config file
   'base': {'train.steps': 200},                # overrides shared by every trial (optional)
   'trials': [{'model.num_kv_heads': 1}, ...],  # one override dict per trial; keys are config paths
   'seeds': [0, 1, 2] or 'repeats': 3,          # optional: every trial once per train.seed
   'baseline': {'model.num_kv_heads': 8},       # optional: the group the others are tested
                                                # against (summary.csv); default the first
   'scaling': {'x': 'params'}}                  # optional: fit L = E + A x^-alpha over the
                                                # groups ('params' | 'flops' | 'tokens')
Every trial is resolved and validated before any trial runs, and so are 'baseline' (it must
match exactly one group) and 'scaling' (the groups must span at least 3 sizes).
"""
from __future__ import annotations

import dataclasses
import importlib.util
import itertools
import os
import re
from typing import Any, Mapping, Sequence

import ml_collections

from configs import schema

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SWEEP_KEYS = ('config', 'base', 'trials', 'seeds', 'repeats', 'baseline', 'scaling')
SEED_KEY = 'train.seed'
# LMX_MAX_TRIALS=N runs at most N trials of any sweep (smoke tests of documented commands).
MAX_TRIALS_ENV = 'LMX_MAX_TRIALS'


class SweepError(ValueError):
  """A sweep file or one of its trials is not usable."""


@dataclasses.dataclass(frozen=True)
class Trial:
  """One resolved trial. `overrides` are the trial's own (not the base's); `name` is its folder."""
  index: int
  name: str
  overrides: dict
  config: ml_collections.ConfigDict
  hash: str

  @property
  def group(self) -> tuple:
    """Overrides without the seed: repeats over seeds share a group."""
    return tuple((k, v) for k, v in self.overrides.items() if k != SEED_KEY)


@dataclasses.dataclass(frozen=True)
class Sweep:
  source: str                # the sweep file[:arg] as given
  config_file: str           # the base config file[:variant], as the sweep file names it
  base: dict
  trials: list
  baseline: dict | None = None   # overrides naming the baseline group (None: the first group)
  scaling: dict | None = None    # {'x': 'params' | 'flops' | 'tokens'} or None


def grid(axes: Mapping[str, Sequence[Any]]) -> list[dict]:
  """All combinations: grid({'a': [1, 2], 'b': ['x', 'y']}) -> 4 trials, the last key fastest."""
  keys = list(axes)
  return [dict(zip(keys, values)) for values in itertools.product(*(axes[k] for k in keys))]


def zipped(axes: Mapping[str, Sequence[Any]]) -> list[dict]:
  """Values taken together: zipped({'a': [1, 2], 'b': [3, 4]}) -> [{a: 1, b: 3}, {a: 2, b: 4}]."""
  lengths = {k: len(v) for k, v in axes.items()}
  if len(set(lengths.values())) > 1:
    raise SweepError(f'zipped: every axis needs the same number of values; got {lengths}.')
  keys = list(axes)
  return [dict(zip(keys, values)) for values in zip(*(axes[k] for k in keys))]


def _format(value: Any) -> str:
  if isinstance(value, float):
    return f'{value:g}'
  return str(value)


def describe(overrides: Mapping[str, Any]) -> str:
  """'num_kv_heads=1, seed=0': leaf names and values, for labels and tables."""
  return ', '.join(f'{k.rsplit(".", 1)[-1]}={_format(v)}' for k, v in overrides.items()) or 'base'


def trial_name(overrides: Mapping[str, Any], config_hash: str, max_slug: int = 80) -> str:
  """Folder name: a readable slug of the overrides, then the resolved config's hash.

  {'model.num_kv_heads': 1, 'train.seed': 0} -> 'num_kv_heads=1,seed=0-<12 hex>'.
  """
  slug = ','.join(f'{k.rsplit(".", 1)[-1]}={_format(v)}' for k, v in overrides.items())
  slug = re.sub(r'[^A-Za-z0-9._=,+-]', '_', slug)[:max_slug] or 'base'
  return f'{slug}-{config_hash}'


def resolve_config_file(spec: str) -> str:
  """'configs/x.py[:arg]' relative to the working directory or the repository root -> absolute."""
  path, sep, arg = spec.partition(':')
  for candidate in (path, os.path.join(ROOT, path)):
    if os.path.isfile(candidate):
      return os.path.abspath(candidate) + sep + arg
  raise SweepError(f"sweep 'config': no config file {path!r} (relative to the working directory "
                   f'or {ROOT}).')


def load_module(path: str, what: str):
  if not os.path.isfile(path):
    raise SweepError(f'{what}: no such file {path!r}.')
  name = 'lmx_' + re.sub(r'\W', '_', os.path.abspath(path))
  module_spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module


def load_base_config(config_file: str) -> ml_collections.ConfigDict:
  """The config a 'configs/x.py[:arg]' file defines (as train.py's --config flag would)."""
  path, _, arg = resolve_config_file(config_file).partition(':')
  module = load_module(path, 'config file')
  return module.get_config(arg or None) if arg else module.get_config()


def max_trials() -> int | None:
  """N from LMX_MAX_TRIALS=N in the environment, else None."""
  value = os.environ.get(MAX_TRIALS_ENV, '')
  if not value:
    return None
  if not value.isdigit() or int(value) < 1:
    raise SweepError(f'environment variable {MAX_TRIALS_ENV}={value!r}: must be a positive '
                     'integer.')
  return int(value)


def cap_trials(trials: Sequence[Any], seeds: list | None, baseline: Any, keep: int
               ) -> tuple[list, list | None]:
  """With LMX_MAX_TRIALS=N: the first max(N, keep) trials (the baseline's kept in their place)
  and the first seed; else both unchanged. The README test runs every documented sweep this
  way, with LMX_MAX_STEPS."""
  n = max_trials()
  if n is None:
    return list(trials), seeds
  baseline = baseline if isinstance(baseline, Mapping) else {}
  is_base = [bool(baseline) and isinstance(t, Mapping)
             and all(k in t and t[k] == v for k, v in baseline.items()) for t in trials]
  room, chosen = max(n, keep) - sum(is_base), []
  for t, base in zip(trials, is_base):
    if base or room > 0:
      chosen.append(t)
      room -= not base
  return chosen, seeds[:1] if seeds else seeds


def _check_overrides(overrides: Any, where: str) -> dict:
  if not isinstance(overrides, Mapping) or not all(isinstance(k, str) for k in overrides):
    raise SweepError(f'{where}: must be a dict of config paths to values, got {overrides!r}.')
  return dict(overrides)


def _seeds(raw: Mapping[str, Any], where: str, default_seed: int) -> list | None:
  if 'seeds' in raw and 'repeats' in raw:
    raise SweepError(f"{where}: give 'seeds' or 'repeats', not both.")
  if 'repeats' in raw:
    n = raw['repeats']
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
      raise SweepError(f"{where}: 'repeats'={n!r} must be a positive integer.")
    return [default_seed + i for i in range(n)]
  if 'seeds' in raw:
    seeds = raw['seeds']
    if (not isinstance(seeds, (list, tuple)) or not seeds or len(set(seeds)) != len(seeds)
        or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)):
      raise SweepError(f"{where}: 'seeds'={seeds!r} must be a non-empty list of distinct ints.")
    return list(seeds)
  return None


def build(raw: Mapping[str, Any], source: str = '<sweep>') -> Sweep:
  """Resolves and validates every trial of a `get_sweep()` dict; raises before anything runs."""
  if not isinstance(raw, Mapping):
    raise SweepError(f'{source}: get_sweep() must return a dict, got {type(raw).__name__}.')
  if 'pruner' in raw:
    raise SweepError(f"{source}: 'pruner' needs a search sweep (put it in 'search', e.g. "
                     "'search': {..., 'pruner': 'median'}); a grid sweep ('trials') runs every "
                     'trial to the end.')
  unknown = sorted(set(raw) - set(SWEEP_KEYS))
  if unknown:
    raise SweepError(f'{source}: unknown sweep field(s) {unknown}; allowed: {", ".join(SWEEP_KEYS)}.')
  if not isinstance(raw.get('config'), str):
    raise SweepError(f"{source}: 'config' must name a config file, e.g. 'configs/default.py:tiny'.")
  base = _check_overrides(raw.get('base', {}), f"{source}: 'base'")
  trials_raw = raw.get('trials')
  if not isinstance(trials_raw, (list, tuple)) or not trials_raw:
    raise SweepError(f"{source}: 'trials' must be a non-empty list of override dicts.")
  base_config = schema.apply_overrides(load_base_config(raw['config']), base,
                                       where=f"{source}: 'base'")
  seeds = _seeds(raw, source, base_config.train.seed)
  keep = 1
  if raw.get('scaling') is not None:
    from sweeps import scaling as scaling_lib  # imports scipy: only for scaling sweeps
    keep = scaling_lib.MIN_SIZES   # the fewest sizes its fit takes
  trials_raw, seeds = cap_trials(trials_raw, seeds, raw.get('baseline'), keep)
  expanded = []
  for i, overrides in enumerate(trials_raw):
    overrides = _check_overrides(overrides, f'{source}: trial {i}')
    if seeds is None:
      expanded.append((i, overrides))
      continue
    if SEED_KEY in overrides:
      raise SweepError(f"{source}: trial {i} ({describe(overrides)}) sets {SEED_KEY} and the "
                       "sweep has 'seeds'/'repeats'; use one of them.")
    expanded += [(i, {**overrides, SEED_KEY: s}) for s in seeds]
  trials, names = [], {}
  for index, (i, overrides) in enumerate(expanded):
    where = f'{source}: trial {i} ({describe(overrides)})'
    try:
      config = schema.validate(schema.apply_overrides(base_config, overrides, where=where))
    except schema.ConfigError as e:
      message = str(e)
      raise SweepError(message if message.startswith(where) else f'{where}: {message}') from None
    h = schema.config_hash(config)
    if h in names:
      raise SweepError(f'{source}: trials {names[h]} and {i} resolve to the same config '
                       f'({describe(overrides)}).')
    names[h] = i
    trials.append(Trial(index, trial_name(overrides, h), overrides, config, h))
  baseline = _baseline(raw.get('baseline'), trials, source)
  scaling = None
  if raw.get('scaling') is not None:
    try:
      scaling = scaling_lib.check(raw['scaling'], {describe(dict(t.group)): t.config
                                                   for t in trials}, source)
    except ValueError as e:
      raise SweepError(str(e)) from None
  return Sweep(source, raw['config'], base, trials, baseline, scaling)


def find_baseline(baseline: Mapping[str, Any] | None, groups: Sequence[Mapping[str, Any]],
                  where: str) -> int:
  """The index of the group (overrides without the seed) that includes every item of
  `baseline`; 0 when `baseline` is None. Raises SweepError unless exactly one group matches."""
  if baseline is None:
    return 0
  matches = [i for i, g in enumerate(groups)
             if all(k in g and g[k] == v for k, v in baseline.items())]
  if len(matches) != 1:
    labels = '; '.join(describe(g) for g in groups)
    raise SweepError(f"{where}: 'baseline' {dict(baseline)!r} matches "
                     f"{'no group' if not matches else f'{len(matches)} groups'} of trials; "
                     f'the groups are: {labels}.')
  return matches[0]


def _baseline(raw: Any, trials: list, source: str) -> dict | None:
  """The 'baseline' overrides, checked to match exactly one group of `trials`."""
  if raw is None:
    return None
  raw = _check_overrides(raw, f"{source}: 'baseline'")
  find_baseline(raw, [dict(g) for g in dict.fromkeys(t.group for t in trials)], source)
  return raw


def load_raw(spec: str) -> dict:
  """What 'path/to/sweep.py[:arg]' defines: get_sweep(arg)'s dict, not yet validated."""
  path, _, arg = spec.partition(':')
  module = load_module(path, '--sweep')
  if not hasattr(module, 'get_sweep'):
    raise SweepError(f'--sweep={spec}: the file defines no get_sweep().')
  return module.get_sweep(arg) if arg else module.get_sweep()


def load(spec: str) -> Sweep:
  """Loads 'path/to/sweep.py[:arg]' (calls get_sweep(arg)) and validates every trial."""
  return build(load_raw(spec), source=spec)
