"""Search sweeps: random or TPE search over continuous ranges through Optuna, on the sweep runner.

A sweep file's `get_sweep()` returns, instead of 'trials',
  'search': {'sampler': 'tpe' | 'random', 'num_trials': 16, 'seed': 0,
             'space': {'train.learning_rate': ('log_uniform', 1e-4, 1e-2),
                       'train.warmup_steps': ('int', 0, 50),
                       'train.weight_decay': ('uniform', 0.0, 0.3),
                       'model.num_kv_heads': ('choice', [1, 2, 4])},
             'pruner': 'median' | 'asha'}     # optional
The objective is the trial's final eval loss (minimised). With a pruner, each evaluation is
reported to the study as it appears in the trial's metrics.jsonl; a trial the pruner stops gets
SIGTERM (train.py checkpoints and exits) and status 'pruned', and the report counts the train
steps every trial ran. 'median': Optuna's MedianPruner (after 4 complete trials, a trial whose
eval loss is worse than the median of earlier trials at the same step stops); 'asha':
SuccessiveHalvingPruner (asynchronous successive halving, rungs at train.eval_every x 3^k steps,
the best third of the trials at a rung go on). The study lives in
WORKDIR/optuna_journal.log (Optuna's file journal, no server); each trial trains in a folder
named by its config hash through `sweeps.runner.run_trial`, so a rerun resumes interrupted trials
from their checkpoints, never repeats finished ones, and asks only for the trials still missing.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import shlex
from typing import Any, Mapping

import ml_collections

from configs import schema
from sweeps import runner, spec
from sweeps.spec import Sweep, SweepError, Trial, describe, load_base_config, trial_name
from training.metrics import read_metrics

SEARCH_KEYS = ('sampler', 'num_trials', 'seed', 'space', 'pruner')
SAMPLERS = ('random', 'tpe')
PRUNERS = ('median', 'asha')
KINDS = ('log_uniform', 'uniform', 'int', 'log_int', 'choice')
OBJECTIVE = 'eval_loss'
JOURNAL = 'optuna_journal.log'


@dataclasses.dataclass(frozen=True)
class Search:
  source: str
  config_file: str
  base: dict
  base_config: ml_collections.ConfigDict
  sampler: str
  num_trials: int
  seed: int
  space: dict                 # config path -> (kind, *args), as the sweep file gives it
  pruner: str | None = None   # None | 'median' | 'asha'

  def fingerprint(self) -> str:
    """What must not change between runs sharing one journal."""
    return json.dumps({'config': schema.config_hash(self.base_config),
                       'space': {k: list(v) for k, v in self.space.items()},
                       **({'pruner': self.pruner} if self.pruner else {})}, sort_keys=True,
                      default=list)


def distribution(key: str, value: Any, where: str):
  """An Optuna distribution from ('log_uniform', low, high) and the like."""
  import optuna

  if not isinstance(value, (tuple, list)) or not value or value[0] not in KINDS:
    raise SweepError(f"{where}: 'space' entry {key!r}={value!r} must be (kind, ...) with kind one "
                     f'of {", ".join(KINDS)}.')
  kind, *args = value
  if kind == 'choice':
    if len(args) != 1 or not isinstance(args[0], (list, tuple)) or not args[0]:
      raise SweepError(f"{where}: 'space' entry {key!r}: ('choice', [values...]) needs a "
                       'non-empty list.')
    return optuna.distributions.CategoricalDistribution(list(args[0]))
  if len(args) != 2 or not all(isinstance(a, (int, float)) and not isinstance(a, bool)
                               for a in args) or not args[0] < args[1]:
    raise SweepError(f"{where}: 'space' entry {key!r}: ({kind!r}, low, high) needs numbers "
                     f'low < high; got {tuple(args)!r}.')
  low, high = args
  log = kind.startswith('log')
  if log and low <= 0:
    raise SweepError(f"{where}: 'space' entry {key!r}: {kind} needs low > 0; got {low!r}.")
  if kind in ('int', 'log_int'):
    if not all(isinstance(a, int) for a in args):
      raise SweepError(f"{where}: 'space' entry {key!r}: {kind} bounds must be integers.")
    return optuna.distributions.IntDistribution(low, high, log=log)
  return optuna.distributions.FloatDistribution(float(low), float(high), log=log)


def _extremes(dist) -> list:
  return list(dist.choices) if hasattr(dist, 'choices') else [dist.low, dist.high]


def build(raw: Mapping[str, Any], source: str = '<sweep>') -> Search:
  """Validates a search sweep (every range's ends against the schema) before anything runs."""
  unknown = sorted(set(raw) - {'config', 'base', 'search'})
  if unknown:
    raise SweepError(f"{source}: unknown field(s) {unknown} in a search sweep; allowed: config, "
                     'base, search.')
  if not isinstance(raw.get('config'), str):
    raise SweepError(f"{source}: 'config' must name a config file, e.g. 'configs/default.py:tiny'.")
  s = raw['search']
  if not isinstance(s, Mapping) or sorted(set(s) - set(SEARCH_KEYS)):
    raise SweepError(f"{source}: 'search' must be a dict with keys {', '.join(SEARCH_KEYS)}; "
                     f'got {s!r}.')
  sampler, seed, n = s.get('sampler', 'tpe'), s.get('seed', 0), s.get('num_trials')
  if sampler not in SAMPLERS:
    raise SweepError(f"{source}: search 'sampler'={sampler!r}; choose one of {', '.join(SAMPLERS)}.")
  pruner = s.get('pruner')
  if pruner is not None and pruner not in PRUNERS:
    raise SweepError(f"{source}: search 'pruner'={pruner!r}; choose one of {', '.join(PRUNERS)} "
                     '(or leave it out: no pruning).')
  for name, value in (('num_trials', n), ('seed', seed)):
    if not isinstance(value, int) or isinstance(value, bool) or value < (name == 'num_trials'):
      raise SweepError(f"{source}: search {name!r}={value!r} must be a "
                       f"{'positive' if name == 'num_trials' else 'non-negative'} integer.")
  space = s.get('space')
  if not isinstance(space, Mapping) or not space:
    raise SweepError(f"{source}: search 'space' must be a non-empty dict of config paths to ranges.")
  base = dict(raw.get('base', {}))
  base_config = schema.apply_overrides(load_base_config(raw['config']), base,
                                       where=f"{source}: 'base'")
  schema.check_keys(space, where=f"{source}: search 'space'")
  for key, value in space.items():
    for v in _extremes(distribution(key, value, source)):
      where = f"{source}: search 'space' {key}={v!r}"
      try:
        schema.validate(schema.apply_overrides(base_config, {key: v}, where=where))
      except schema.ConfigError as e:
        raise SweepError(str(e) if str(e).startswith(where) else f'{where}: {e}') from None
  cap = spec.max_trials()   # LMX_MAX_TRIALS (smoke tests of documented commands)
  return Search(source, raw['config'], base, base_config, sampler, min(n, cap or n), seed,
                {k: tuple(v) for k, v in space.items()}, pruner)


def trial_seed(seed: int, number: int) -> int:
  """The sampler seed for trial `number`: well mixed (consecutive integer seeds give correlated
  first draws), and the same whether or not the search was interrupted before this trial."""
  import numpy as np
  return int(np.random.SeedSequence([seed, number]).generate_state(1)[0])


def make_sampler(kind: str, seed: int):
  import optuna
  if kind == 'random':
    return optuna.samplers.RandomSampler(seed=seed)
  return optuna.samplers.TPESampler(seed=seed, n_startup_trials=4)


def make_pruner(kind: str | None, eval_every: int):
  """The Optuna pruner a search names; steps are train steps (evaluations every `eval_every`)."""
  import optuna
  if kind == 'median':
    return optuna.pruners.MedianPruner(n_startup_trials=4, n_warmup_steps=0)
  if kind == 'asha':
    return optuna.pruners.SuccessiveHalvingPruner(min_resource=eval_every, reduction_factor=3)
  return optuna.pruners.NopPruner()


def open_study(workdir: str, search: Search):
  """The study in WORKDIR's journal (created on first use); refuses a different search."""
  import optuna

  os.makedirs(workdir, exist_ok=True)
  optuna.logging.set_verbosity(optuna.logging.WARNING)
  storage = optuna.storages.JournalStorage(
      optuna.storages.journal.JournalFileBackend(os.path.join(workdir, JOURNAL)))
  study = optuna.create_study(study_name='search', storage=storage, direction='minimize',
                              load_if_exists=True,
                              pruner=make_pruner(search.pruner, search.base_config.train.eval_every))
  saved = study.user_attrs.get('fingerprint')
  if saved is None:
    study.set_user_attr('fingerprint', search.fingerprint())
  elif saved != search.fingerprint():
    raise SweepError(f'--workdir={workdir} holds a search over a different base config or space; '
                     'use a new --workdir (or the same sweep file) to resume it.')
  return study


def _trial(search: Search, number: int, params: dict) -> Trial:
  overrides = {k: params[k] for k in search.space}
  config = schema.validate(schema.apply_overrides(search.base_config, overrides,
                                                  where=f'search trial {number}'))
  h = schema.config_hash(config)
  return Trial(number, trial_name(overrides, h), overrides, config, h)


def objective(directory: str, steps: int) -> float | None:
  """The final evaluation's loss, or None when the trial did not finish."""
  evals = [m[OBJECTIVE] for m in read_metrics(directory) if m.get('step') == steps
           and OBJECTIVE in m]
  return evals[-1] if evals else None


def command_line(config_file: str, overrides: Mapping[str, Any], workdir: str) -> str:
  """A train.py command that trains `config_file` with `overrides`."""
  flags = [f'--config.{k}={v!r}' if isinstance(v, float) else f'--config.{k}={v}'
           for k, v in overrides.items()]
  return shlex.join(['python', 'train.py', f'--config={config_file}', f'--workdir={workdir}',
                     *flags])


def _record(workdir: str, search: Search, trials: list[Trial]) -> None:
  """sweep.json (through the runner: every trial's folder) plus the search description."""
  unique = list({t.name: t for t in trials}.values())
  runner.prepare(workdir, Sweep(search.source, search.config_file, search.base, unique))
  path = os.path.join(workdir, 'sweep.json')
  info = runner.read_json(path)
  info.update(search={'sampler': search.sampler, 'num_trials': search.num_trials,
                      'seed': search.seed, 'space': search.space, 'objective': OBJECTIVE},
              sort_by=OBJECTIVE)
  runner.write_json(path, info)


def run(workdir: str, search: Search, parallel: int = 1) -> list[dict]:
  """Runs the search until `num_trials` trials are complete or failed. Interrupted trials (left
  'running' in the journal) resume first, with their own parameters and folder."""
  import optuna

  study = open_study(workdir, search)
  dists = {k: distribution(k, v, search.source) for k, v in search.space.items()}
  known = [_trial(search, t.number, t.params) for t in study.trials if t.params]
  results = []
  while True:
    batch = [(t.number, optuna.Trial(study, t._trial_id), _trial(search, t.number, t.params))
             for t in study.trials
             if t.state == optuna.trial.TrialState.RUNNING][:max(1, parallel)]
    while len(batch) < max(1, parallel) and len(study.trials) < search.num_trials:
      study.sampler = make_sampler(search.sampler, trial_seed(search.seed, len(study.trials)))
      asked = study.ask(dists)
      batch.append((asked.number, asked, _trial(search, asked.number, asked.params)))
    if not batch:
      break
    known += [t for *_, t in batch]
    _record(workdir, search, known)
    jobs = [(runner.trial_dir(workdir, t), t.config.train.steps,
             reporter(live) if search.pruner else None) for _, live, t in batch]
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
      outcomes = list(pool.map(lambda job: runner.run_trial(*job), jobs))
    for (number, _, trial), job, outcome in zip(batch, jobs, outcomes):
      value = objective(*job[:2]) if outcome['status'] == 'done' else None
      if outcome['status'] == 'pruned':
        study.tell(number, state=optuna.trial.TrialState.PRUNED)
        state = f'pruned after step {outcome["pruned_at"]} ({outcome["steps_trained"]} steps run)'
      elif value is None:
        study.tell(number, state=optuna.trial.TrialState.FAIL)
        state = f'FAILED: {outcome["error"]}'
      else:
        study.tell(number, value)
        state = 'finished earlier, skipped' if outcome['skipped'] else f'{OBJECTIVE} {value:.4f}'
      print(f'[trial {number + 1}/{search.num_trials}] {trial.name} ({describe(trial.overrides)}): '
            f'{state}', flush=True)
      results.append({**outcome, 'number': number, OBJECTIVE: value})
  if known:
    _record(workdir, search, known)
  return results


def reporter(trial):
  """on_eval for runner.run_trial: reports (step, eval loss) to the Optuna trial and answers
  whether its pruner stops it. A step already reported (a resumed trial) is not re-reported."""
  def on_eval(step: int, value: float) -> bool:
    if step not in trial.storage.get_trial(trial._trial_id).intermediate_values:
      trial.report(value, step)
    return trial.should_prune()
  return on_eval


def best(workdir: str) -> dict | None:
  """The finished trial with the lowest objective in a search WORKDIR: {'trial', 'overrides',
  'eval_loss', 'command'}; None when none finished."""
  sweep = runner.read_json(os.path.join(workdir, 'sweep.json')) or {}
  if 'search' not in sweep:
    return None
  scored = []
  for entry in sweep['trials']:
    directory = os.path.join(workdir, entry['name'])
    info = runner.read_json(os.path.join(directory, 'trial.json'), {})
    value = objective(directory, info.get('steps', -1)) if info.get('status') == 'done' else None
    if value is not None:
      scored.append((value, entry))
  if not scored:
    return None
  value, entry = min(scored, key=lambda pair: pair[0])
  overrides = {**sweep['base'], **entry['overrides']}
  return {'trial': entry['name'], 'overrides': entry['overrides'], OBJECTIVE: value,
          'command': command_line(sweep['config'], overrides, f'runs/best-{entry["hash"]}')}
