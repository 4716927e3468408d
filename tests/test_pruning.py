"""Pruned searches: the pruners' decisions on synthetic curves, and the runner stopping pruned
trials of a search (a stand-in trainer writes synthetic metrics.jsonl files; no training)."""
import os
import sys

import numpy as np
import optuna
import pytest

from sweeps import report, runner, search, spec
from tests.test_search import write_search

BASE = {'train.steps': 150, 'train.eval_every': 25, 'train.log_every': 25,
        'train.checkpoint_every': 150, 'train.warmup_steps': 0}
SPACE = {'train.learning_rate': ('log_uniform', 1e-4, 1e-1)}


def curve(lr: float, step: int) -> float:
  """A synthetic eval loss: best at lr = 10^-2.5, falling with the step."""
  return 2.0 + abs(np.log10(lr) + 2.5) + 20.0 / step


# A stand-in for train.py: synthetic evaluations every eval_every steps from its resolved config;
# on SIGTERM it "checkpoints" its last step and exits 143, as train.py does.
FAKE_TRAINER = r'''
import json, math, os, signal, sys, time
d = sys.argv[1]
c = json.load(open(os.path.join(d, 'sweep_config.json')))['train']
step = 0
def stop(*_):
  os.makedirs(os.path.join(d, 'checkpoints', str(step)), exist_ok=True)
  sys.exit(143)
signal.signal(signal.SIGTERM, stop)
with open(os.path.join(d, 'metrics.jsonl'), 'w') as f:
  for step in range(c['eval_every'], c['steps'] + 1, c['eval_every']):
    loss = 2.0 + abs(math.log10(c['learning_rate']) + 2.5) + 20.0 / step
    f.write(json.dumps({'step': step, 'loss': loss, 'tokens_per_sec': 1.0}) + '\n')
    f.write(json.dumps({'step': step, 'eval_loss': loss}) + '\n')
    f.flush()
    time.sleep(0.25)
os.makedirs(os.path.join(d, 'checkpoints', str(step)), exist_ok=True)
'''


def decisions(pruner, curves: list[list[float]], steps: list[int]) -> list[int | None]:
  """The step at which `pruner` stops each curve (None: it runs to the end), trials in order,
  through search.reporter as the runner calls it."""
  study = optuna.create_study(direction='minimize', pruner=pruner)
  out = []
  for values in curves:
    trial = study.ask()
    on_eval = search.reporter(trial)
    stopped = next((s for s, v in zip(steps[:-1], values) if on_eval(s, v)), None)
    if stopped is None:
      study.tell(trial, values[-1])
    else:
      study.tell(trial, state=optuna.trial.TrialState.PRUNED)
    out.append(stopped)
  return out


def test_median_pruner_decisions_on_synthetic_curves():
  steps = [25, 50, 75, 100]
  rng = np.random.default_rng(0)
  curves = [list(3.0 + 5.0 / np.array(steps) + rng.normal(0, 0.2)) for _ in range(12)]
  got = decisions(search.make_pruner('median', 25), curves, steps)
  # By hand: after 4 complete trials, a trial stops at the first step where its value is worse
  # than the median of the earlier complete trials' values at that step.
  expected, complete = [], []
  for i, values in enumerate(curves):
    stop = None
    if len(complete) >= 4:
      for j, s in enumerate(steps[:-1]):
        if values[j] > np.median([c[j] for c in complete]):
          stop = s
          break
    expected.append(stop)
    if stop is None:
      complete.append(values)
  assert got == expected
  assert got[:4] == [None] * 4 and any(got[4:]) and None in got[4:]


def test_asha_pruner_decisions_on_synthetic_curves():
  steps = [25, 50, 75, 100, 125, 150]
  finals = [3.0, 2.5, 3.5, 2.0, 2.8, 1.9, 3.2, 2.6, 3.1]
  curves = [[f + 10.0 / s for s in steps] for f in finals]
  got = decisions(search.make_pruner('asha', 25), curves, steps)
  # By hand, successive halving with rungs at 25 and 75 steps (reduction factor 3): a trial goes
  # past a rung only if its value there ranks within the best max(1, n // 3) of the n trials
  # that reached the rung so far (itself included).
  rungs = {25: [], 75: []}
  expected = []
  for values in curves:
    stop = None
    for rung in (25, 75):
      value = values[steps.index(rung)]
      rungs[rung].append(value)
      if value > sorted(rungs[rung])[max(1, len(rungs[rung]) // 3) - 1]:
        stop = rung
        break
    expected.append(stop)
  assert got == expected
  assert expected.count(None) >= 2 and expected.count(25) >= 3


def test_pruner_on_a_grid_sweep_or_unknown_fails_before_anything(tmp_path):
  path = tmp_path / 'grid.py'
  path.write_text("def get_sweep():\n  return {'config': 'configs/default.py:tiny', "
                  "'trials': [{}], 'pruner': 'asha'}\n")
  with pytest.raises(spec.SweepError, match="'pruner' needs a search sweep"):
    spec.load(str(path))
  raw = spec.load_raw(write_search(tmp_path, base=BASE, space=SPACE))
  raw['search']['pruner'] = 'hyperband'
  with pytest.raises(spec.SweepError, match=r"search 'pruner'='hyperband'; choose one of median, "
                                            'asha'):
    search.build(raw, 's.py')


@pytest.mark.parametrize('pruner', ['median', 'asha'])
def test_search_stops_pruned_trials_and_counts_their_steps(tmp_path, monkeypatch, pruner):
  trainer = tmp_path / 'fake_train.py'
  trainer.write_text(FAKE_TRAINER)
  monkeypatch.setattr(runner, 'command', lambda d: [sys.executable, str(trainer), d])
  monkeypatch.setattr(runner, 'POLL_SECONDS', 0.02)
  path = write_search(tmp_path, base=BASE, space=SPACE, num_trials=8)
  raw = spec.load_raw(path)
  raw['search']['pruner'] = pruner
  s = search.build(raw, path)
  workdir = str(tmp_path / 'out')
  results = search.run(workdir, s)
  statuses = [r['status'] for r in results]
  assert set(statuses) == {'done', 'pruned'}
  study = search.open_study(workdir, s)
  for r, t in zip(results, study.trials):
    info = runner.read_json(os.path.join(workdir, r['name'], 'trial.json'))
    lr = t.params['train.learning_rate']
    # The journal holds every evaluation reported, each equal to the synthetic curve.
    assert t.intermediate_values and all(v == pytest.approx(curve(lr, k))
                                         for k, v in t.intermediate_values.items())
    if r['status'] == 'pruned':
      assert t.state == optuna.trial.TrialState.PRUNED
      assert info['pruned_at'] < 150 and info['steps_trained'] < 150
      assert max(t.intermediate_values) == info['pruned_at']
    else:
      assert t.state == optuna.trial.TrialState.COMPLETE and info['steps_trained'] == 150
      assert t.value == pytest.approx(curve(lr, 150))
  rows = report.write_report(workdir)
  run = sum(r['steps'] for r in rows)
  assert run < 8 * 150
  md = open(os.path.join(workdir, 'results.md')).read()
  pruned = statuses.count('pruned')
  assert (f'Compute: {run:,} train steps of the 1,200 that running every trial to the end would '
          f'take ({100 * run / 1200:.0f}%); {pruned} of 8 trials pruned.') in md
  best = min((r for r in results if r['status'] == 'done'), key=lambda r: r['eval_loss'])
  assert search.best(workdir)['eval_loss'] == pytest.approx(best['eval_loss'])
  assert [r['status'] for r in rows][:statuses.count('done')] == ['done'] * statuses.count('done')
  # A rerun asks for nothing more: pruned trials are not resumed.
  assert search.run(workdir, s) == []
  # A new study over the finished trials' folders reruns none of them but learns their curves.
  import shutil
  copy = str(tmp_path / 'copy')
  shutil.copytree(workdir, copy, ignore=shutil.ignore_patterns(search.JOURNAL))
  assert [r['skipped'] for r in search.run(copy, s) if r['status'] == 'done'] == [True] * (
      statuses.count('done'))
  again = search.open_study(copy, s)
  for t, first in zip(again.trials, study.trials):
    if first.state == optuna.trial.TrialState.COMPLETE and t.state == first.state:
      assert t.intermediate_values == {k: v for k, v in first.intermediate_values.items()}
