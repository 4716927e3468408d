"""Search sweeps (Optuna journal, random/TPE) on the sweep runner; idempotent trials by hash."""
import csv
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optuna
import pytest

from configs import default, schema
from workdir.load import load_workdir
from sampling.reference import generate_reference
from sweeps import runner, search, spec
from tests.conftest import ROOT

# One layer: each trial compiles its own step (the learning rate is a constant of it), and a
# 1-layer step compiles faster; what is searched does not depend on the depth.
BASE = {'train.steps': 12, 'train.log_every': 4, 'train.eval_every': 6,
        'train.checkpoint_every': 6, 'train.warmup_steps': 2, 'model.num_layers': 1}
SPACE = {'train.learning_rate': ('log_uniform', 1e-4, 1e-2),
         'train.weight_decay': ('uniform', 0.0, 0.3)}


def write_search(tmp_path, space=SPACE, sampler='random', num_trials=4, base=BASE):
  path = tmp_path / 'search.py'
  body = {'config': 'configs/default.py:tiny', 'base': base,
          'search': {'sampler': sampler, 'num_trials': num_trials, 'seed': 0, 'space': space}}
  path.write_text(f'def get_sweep():\n  return {body!r}\n')
  return str(path)


def build(tmp_path, **kw):
  path = write_search(tmp_path, **kw)
  return search.build(spec.load_raw(path), path)


@pytest.mark.parametrize('space, message', [
    ({'train.learning_rat': ('log_uniform', 1e-4, 1e-2)},
     'unknown key `train.learning_rat` (did you mean `train.learning_rate`?)'),
    ({'train.learning_rate': ('loguniform', 1e-4, 1e-2)}, 'kind one of log_uniform, uniform'),
    ({'train.learning_rate': ('log_uniform', 0.0, 1e-2)}, 'log_uniform needs low > 0'),
    ({'train.learning_rate': ('uniform', 1e-2, 1e-4)}, 'needs numbers low < high'),
    ({'data.seq_len': ('int', 32, 512)},
     "search 'space' data.seq_len=512: data.seq_len=512 exceeds model.max_len=256"),
    ({'model.num_kv_heads': ('choice', [1, 3])}, 'model.num_kv_heads=3'),
])
def test_bad_search_space_fails_before_anything_runs(tmp_path, space, message):
  with pytest.raises((spec.SweepError, schema.ConfigError)) as e:
    build(tmp_path, space=space)
  assert message in str(e.value)
  assert not os.path.exists(tmp_path / 'run')


def test_sampler_draws_are_optuna_distributions(tmp_path):
  s = build(tmp_path, space={**SPACE, 'train.warmup_steps': ('int', 0, 8),
                             'model.num_kv_heads': ('choice', [1, 2, 4])})
  dists = {k: search.distribution(k, v, 'x') for k, v in s.space.items()}
  assert dists['train.learning_rate'] == optuna.distributions.FloatDistribution(1e-4, 1e-2,
                                                                                log=True)
  assert dists['train.warmup_steps'] == optuna.distributions.IntDistribution(0, 8)
  assert dists['model.num_kv_heads'] == optuna.distributions.CategoricalDistribution([1, 2, 4])
  line = search.command_line('configs/default.py:tiny', {'train.learning_rate': 0.00123,
                                                         'model.num_kv_heads': 2}, 'runs/x')
  assert line == ('python train.py --config=configs/default.py:tiny --workdir=runs/x '
                  '--config.train.learning_rate=0.00123 --config.model.num_kv_heads=2')


def read_rows(workdir):
  with open(os.path.join(workdir, 'results.csv')) as f:
    return list(csv.DictReader(f))


@pytest.mark.slow
def test_random_search_finishes_reports_best_and_resumes_from_journal(tmp_path):
  """2 random trials on the tiny model (each compiles anew: the learning rate is a constant of
  the compiled step). The journal already holds trial 0 'running' (a driver killed right after
  asking): the run trains it with those parameters rather than a new draw; trial 1 is drawn.
  A rerun asks nothing and trains nothing (and, with --samples, samples every trial); a finished
  trial relaunched by its hash is skipped."""
  path, workdir = write_search(tmp_path, num_trials=2), str(tmp_path / 'run')
  s = search.build(spec.load_raw(path), path)
  study = search.open_study(workdir, s)
  dists = {k: search.distribution(k, v, 'x') for k, v in s.space.items()}
  study.sampler = search.make_sampler('random', search.trial_seed(0, 0))
  interrupted = study.ask(dists).params

  cmd = [sys.executable, 'sweep.py', f'--sweep={path}', f'--workdir={workdir}']
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  study = search.open_study(workdir, s)
  trials = study.trials
  assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 2
  assert trials[0].params == interrupted
  assert len({tuple(t.params.values()) for t in trials}) == 2

  rows = read_rows(workdir)
  losses = [float(r['eval_loss']) for r in rows]
  assert len(rows) == 2 and losses == sorted(losses)   # sorted by the objective
  assert losses == pytest.approx(sorted(t.value for t in trials), abs=1e-6)
  best = min(trials, key=lambda t: t.value)
  lr = best.params['train.learning_rate']
  assert f'Best trial: {rows[0]["trial"]}' in proc.stdout
  assert f'--config.train.learning_rate={lr!r}' in proc.stdout
  assert "--config=configs/default.py:tiny" in proc.stdout and '--config.train.steps=12' in proc.stdout
  with open(os.path.join(workdir, 'results.md')) as f:
    assert f'--config.train.learning_rate={lr!r}' in f.read()

  # The best trial's folder is named by the hash of the config the command line describes.
  config = schema.apply_overrides(default.get_config('tiny'), {**BASE, **best.params})
  directory = os.path.join(workdir, spec.trial_name(best.params, schema.config_hash(config)))
  assert rows[0]['trial'] == os.path.basename(directory)
  before = {name: os.path.getmtime(os.path.join(directory, name))
            for name in ('metrics.jsonl', 'train.log', 'run.json')}
  assert runner.run_trial(directory, 12)['skipped']

  # The rerun (one launch checks both): asks nothing and trains nothing, and with --samples
  # samples every trial side by side.
  again = subprocess.run(cmd + ['--samples', '--prompt=def ', '--max_new_tokens=12',
                                '--temperature=0'],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert again.returncode == 0, again.stdout + again.stderr
  assert '[trial' not in again.stdout   # nothing asked, nothing trained
  assert len(search.open_study(workdir, s).trials) == 2
  assert before == {name: os.path.getmtime(os.path.join(directory, name)) for name in before}
  with open(os.path.join(directory, 'run.json')) as f:
    assert len(json.load(f)['launches']) == 1
  assert [r['eval_loss'] for r in read_rows(workdir)] == [r['eval_loss'] for r in rows]

  # Side-by-side samples: the same prompt and seed from every trial, checked against the
  # reference generator.
  with open(os.path.join(workdir, 'samples.json')) as f:
    data = json.load(f)
  assert sorted(data['trials']) == sorted(r['trial'] for r in rows)
  loaded = load_workdir(directory)  # the full-recompute reference generator, greedy
  prompt = loaded.tokenizer.encode('def ')
  out = generate_reference(loaded.graphdef, loaded.params, jnp.asarray(prompt[None]),
                           jax.random.key(0), max_new_tokens=12)
  text = data['trials'][rows[0]['trial']]['samples'][0]
  new = np.asarray(out)[0, prompt.size:]
  stop = np.flatnonzero(new == loaded.tokenizer.eos_id)
  assert text == 'def ' + loaded.tokenizer.decode(new[:stop[0]] if stop.size else new)
  with open(os.path.join(workdir, 'results.md')) as f:
    md = f.read()
  assert md.index('Samples (seed 0') > md.index('Best trial') and f'```\n{text}\n```' in md


def test_changed_search_space_refuses_the_journal(tmp_path):
  workdir = str(tmp_path / 'run')
  search.open_study(workdir, build(tmp_path))
  other = build(tmp_path, space={'train.learning_rate': ('log_uniform', 1e-5, 1e-2)})
  with pytest.raises(spec.SweepError, match='different base config or space'):
    search.open_study(workdir, other)
