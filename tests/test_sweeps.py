"""Sweeps: sweep files, naming, validation before any trial, local/Ray runners, resume, reports."""
import csv
import hashlib
import itertools
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time

import pytest

from configs import default, schema
from sweeps import report, runner, spec
from tests.conftest import ROOT

TINY = {'train.steps': 200, 'train.log_every': 10, 'train.eval_every': 50,
        'train.checkpoint_every': 50}
TRIALS = [{'model.num_kv_heads': 1}, {'model.num_kv_heads': 2}]


def write_sweep(tmp_path, name, trials, base=TINY, **extra):
  path = tmp_path / f'{name}.py'
  body = {'config': 'configs/default.py:tiny', 'base': base, 'trials': trials, **extra}
  path.write_text(f'def get_sweep():\n  return {body!r}\n')
  return str(path)


def sweep_cli(*args, **popen):
  cmd = [sys.executable, 'sweep.py', *args]
  if popen:
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, **popen)
  return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)


def losses(workdir):
  with open(os.path.join(workdir, 'results.csv')) as f:
    return {r['trial']: (r['status'], r['train_loss'], r['eval_loss']) for r in csv.DictReader(f)}


# --- sweep files, names, validation (fast) ---

def test_grid_and_zipped_match_itertools():
  axes = {'model.num_kv_heads': [1, 2, 4], 'model.positional': ['rope', 'learned']}
  assert spec.grid(axes) == [{'model.num_kv_heads': k, 'model.positional': p}
                             for k, p in itertools.product(*axes.values())]
  assert spec.zipped({'a': [1, 2], 'b': [3, 4]}) == [{'a': 1, 'b': 3}, {'a': 2, 'b': 4}]
  with pytest.raises(spec.SweepError, match='same number of values'):
    spec.zipped({'a': [1, 2], 'b': [3]})


def test_trial_names_are_slug_plus_config_hash(tmp_path):
  sweep = spec.load(write_sweep(tmp_path, 's', TRIALS + [{'model.sliding_window': 32}]))
  config = schema.apply_overrides(default.get_config('tiny'), {**TINY, 'model.num_kv_heads': 1})
  expected_hash = hashlib.sha256(schema.to_json(config).encode()).hexdigest()[:12]
  assert schema.config_hash(config) == expected_hash
  assert sweep.trials[0].name == f'num_kv_heads=1-{expected_hash}'
  assert sweep.trials[2].name.startswith('sliding_window=32-')
  assert len({t.hash for t in sweep.trials}) == 3
  # train.py runs from the repository root: trial folders are absolute whatever --workdir is.
  assert runner.trial_dir('out', sweep.trials[0]) == os.path.abspath(f'out/{sweep.trials[0].name}')
  # The hash survives the JSON round trip train.py's config.json goes through.
  assert schema.config_hash(schema.from_json(schema.to_json(config))) == expected_hash


def test_repeats_expand_over_seeds(tmp_path):
  sweep = spec.load(write_sweep(tmp_path, 's', TRIALS, repeats=2))
  assert [t.overrides for t in sweep.trials] == [
      {'model.num_kv_heads': k, 'train.seed': s} for k in (1, 2) for s in (0, 1)]
  assert sweep.trials[0].group == sweep.trials[1].group != sweep.trials[2].group
  seeded = spec.load(write_sweep(tmp_path, 't', TRIALS, seeds=[3, 7]))
  assert [t.config.train.seed for t in seeded.trials] == [3, 7, 3, 7]


@pytest.mark.parametrize('raw, message', [
    ({'config': 'configs/default.py:tiny', 'trials': []}, "'trials' must be a non-empty list"),
    ({'config': 'configs/default.py:tiny', 'trials': [{}], 'seed': 1}, 'unknown sweep field'),
    ({'config': 'configs/nope.py', 'trials': [{}]}, 'no config file'),
    ({'config': 'configs/default.py:tiny', 'trials': [{}], 'repeats': 0}, "'repeats'=0"),
    ({'config': 'configs/default.py:tiny', 'trials': [{}, {}]}, 'trials 0 and 1 resolve to'),
    ({'config': 'configs/default.py:tiny', 'trials': [{'model.positional': 'alibi'}]},
     r'trial 0 \(positional=alibi\): model.positional=.alibi. is not allowed'),
])
def test_bad_sweep_files_are_named(raw, message):
  with pytest.raises(spec.SweepError, match=message):
    spec.build(raw, source='s.py')


def test_unknown_key_fails_before_any_trial(tmp_path):
  trials = TRIALS + [{'model.num_kv_head': 4}]
  workdir = tmp_path / 'out'
  with pytest.raises(spec.SweepError) as e:
    spec.load(write_sweep(tmp_path, 's', trials))
  assert 'trial 2 (num_kv_head=4)' in str(e.value) and '`model.num_kv_head`' in str(e.value)
  assert 'did you mean `model.num_kv_heads`' in str(e.value)
  result = sweep_cli(f'--sweep={tmp_path}/s.py', f'--workdir={workdir}')
  assert result.returncode != 0 and 'trial 2' in result.stderr and 'model.num_kv_head`' in result.stderr
  assert not workdir.exists()  # nothing ran, nothing was written


SHIPPED = [('kv_heads.py', 4), ('kv_heads.py:short', 8), ('kv_heads.py:quick', 2),
           ('positional.py', 3), ('window.py', 3), ('scaling.py', 10), ('scaling.py:quick', 6)]


@pytest.mark.parametrize('sweep_file, count', SHIPPED)
def test_shipped_sweeps_validate(sweep_file, count):
  """Every trial of every shipped grid sweep (and variant) resolves to a valid config; the
  search (lr_search.py) is built in test_max_trials_env_caps_every_sweep_kind."""
  sweep = spec.load(os.path.join(ROOT, 'configs', 'sweeps', sweep_file))
  assert len(sweep.trials) == count


def test_every_shipped_sweep_file_is_validated():
  files = {f for f in os.listdir(os.path.join(ROOT, 'configs', 'sweeps')) if f.endswith('.py')}
  assert files == {f.partition(':')[0] for f, _ in SHIPPED} | {'lr_search.py'}


def test_max_trials_env_caps_every_sweep_kind(monkeypatch):
  """LMX_MAX_TRIALS=N (the README test's smoke runs): the first N trials with the first seed,
  the baseline group kept, a scaling sweep keeps the 3 sizes its fit needs, a search asks N."""
  from sweeps import search
  sweeps = os.path.join(ROOT, 'configs', 'sweeps')
  full = spec.load(os.path.join(sweeps, 'kv_heads.py:short'))
  monkeypatch.setenv(spec.MAX_TRIALS_ENV, '2')
  short = spec.load(os.path.join(sweeps, 'kv_heads.py:short'))   # baseline: kv 8, the last
  assert [t.overrides for t in short.trials] == [
      {'model.num_kv_heads': k, 'train.seed': 0} for k in (1, 8)]
  assert [t.name for t in short.trials] == [full.trials[i].name for i in (0, 6)]
  assert [t.overrides for t in spec.load(os.path.join(sweeps, 'kv_heads.py')).trials] == [
      {'model.num_kv_heads': 1}, {'model.num_kv_heads': 2}]
  scaling = spec.load(os.path.join(sweeps, 'scaling.py'))
  assert [t.overrides['model.d_model'] for t in scaling.trials] == [32, 48, 64]
  assert {t.overrides['train.seed'] for t in scaling.trials} == {0}
  path = os.path.join(sweeps, 'lr_search.py')
  assert search.build(spec.load_raw(path), path).num_trials == 2
  monkeypatch.setenv(spec.MAX_TRIALS_ENV, '0')
  with pytest.raises(spec.SweepError, match='LMX_MAX_TRIALS=.0.: must be a positive integer'):
    spec.load(os.path.join(sweeps, 'kv_heads.py'))


def test_renamed_trial_keeps_its_folder(tmp_path):
  """Adding seeds renames the seed-0 trials: their folders (same config hash) are reused."""
  workdir = str(tmp_path / 'out')
  before = spec.load(write_sweep(tmp_path, 'a', TRIALS))
  runner.prepare(workdir, before)
  marker = os.path.join(runner.trial_dir(workdir, before.trials[1]), 'marker')
  open(marker, 'w').close()
  after = spec.load(write_sweep(tmp_path, 'b', TRIALS, seeds=[0, 1]))
  runner.prepare(workdir, after)
  assert after.trials[2].hash == before.trials[1].hash
  assert os.path.isfile(os.path.join(runner.trial_dir(workdir, after.trials[2]), 'marker'))
  assert sorted(os.listdir(workdir)) == sorted([t.name for t in after.trials] + ['sweep.json'])


# --- reports from trial folders (fast: no training) ---

def fake_trial(workdir, trial, status, eval_losses, train_loss, speed):
  d = runner.trial_dir(workdir, trial)
  with open(os.path.join(d, 'metrics.jsonl'), 'w') as f:
    for step, loss in eval_losses:
      f.write(json.dumps({'step': step, 'loss': train_loss, 'tokens_per_sec': speed}) + '\n')
      f.write(json.dumps({'step': step, 'eval_loss': loss}) + '\n')
  info = runner.read_json(os.path.join(d, 'trial.json'))
  info.update(status=status, wall_time=12.5, error='boom' if status == 'failed' else None)
  runner.write_json(os.path.join(d, 'trial.json'), info)


def test_report_tables_groups_and_plot(tmp_path):
  from matplotlib import pyplot as plt
  sweep = spec.load(write_sweep(tmp_path, 's', TRIALS, seeds=[0, 1, 2]))
  workdir = str(tmp_path / 'out')
  runner.prepare(workdir, sweep)
  evals = {0: 3.0, 1: 3.5, 2: 4.25, 3: 2.0, 4: 2.5, 5: 9.0}
  for i, t in enumerate(sweep.trials):
    status = 'failed' if i == 5 else 'done'
    fake_trial(workdir, t, status, [(10, evals[i] + 1), (20, evals[i])], 1.0 + i, 100.0 * (i + 1))
  rows = report.write_report(workdir)
  with open(os.path.join(workdir, 'results.csv')) as f:
    table = list(csv.DictReader(f))
  assert [r['trial'] for r in table] == [t.name for t in sweep.trials]
  assert [float(r['eval_loss']) for r in table] == [evals[i] for i in range(6)]
  assert table[5]['status'] == 'failed' and table[5]['error'] == 'boom'
  # Parameter counts against an initialised model.
  import jax
  from flax import nnx
  from models import build_model
  for t, row in [(sweep.trials[0], rows[0]), (sweep.trials[3], rows[3])]:
    model = build_model(t.config, nnx.Rngs(0))
    assert row['params'] == sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  md = open(os.path.join(workdir, 'results.md')).read()
  first = [evals[i] for i in range(3)]
  assert f'| 1 | 3 | 2.0000 ± 1.0000 | {statistics.mean(first):.4f} ± {statistics.stdev(first):.4f}' in md
  assert f'| 2 | 2 | 4.5000 ± 0.7071 | {statistics.mean([2.0, 2.5]):.4f} ± {statistics.stdev([2.0, 2.5]):.4f}' in md
  assert '- `' + sweep.trials[5].name + '`: boom' in md
  image = plt.imread(os.path.join(workdir, 'loss_curves.png'))
  assert image.ndim == 3 and image.shape[0] > 100


# --- end to end through the CLI (slow: each trial is a train.py process) ---

@pytest.fixture(scope='module')
def local_sweep(tmp_path_factory):
  tmp = tmp_path_factory.mktemp('sweep')
  path = write_sweep(tmp, 'two', TRIALS)
  workdir = str(tmp / 'local')
  result = sweep_cli(f'--sweep={path}', f'--workdir={workdir}', '--parallel=2')
  assert result.returncode == 0, result.stdout + result.stderr
  return tmp, path, workdir


@pytest.mark.slow
def test_local_sweep_end_to_end(local_sweep):
  from matplotlib import pyplot as plt
  _, path, workdir = local_sweep
  names = [t.name for t in spec.load(path).trials]
  assert list(losses(workdir)) == names
  assert all(status == 'done' and float(ev) > 0 for status, _, ev in losses(workdir).values())
  md = open(os.path.join(workdir, 'results.md')).read()
  assert md.startswith('| model.num_kv_heads | status | train loss | eval loss |')
  assert md.count('| done |') == 2
  assert plt.imread(os.path.join(workdir, 'loss_curves.png')).ndim == 3
  for name in names:  # each trial trained the config its name hashes, to the last step
    saved = schema.from_json(open(os.path.join(workdir, name, 'config.json')).read())
    assert name.endswith(schema.config_hash(saved)) and saved.train.steps == 200
  mtimes = [os.path.getmtime(os.path.join(workdir, n, 'metrics.jsonl')) for n in names]
  os.remove(os.path.join(workdir, 'results.md'))
  again = sweep_cli(f'--sweep={path}', f'--workdir={workdir}')
  assert again.returncode == 0 and again.stdout.count('finished earlier, skipped') == 2
  assert mtimes == [os.path.getmtime(os.path.join(workdir, n, 'metrics.jsonl')) for n in names]
  os.remove(os.path.join(workdir, 'results.csv'))
  only = sweep_cli('--report_only', f'--workdir={workdir}')
  assert only.returncode == 0 and os.path.isfile(os.path.join(workdir, 'results.csv'))


@pytest.mark.slow
def test_killed_sweep_resumes_and_repeats_the_same_losses(local_sweep):
  """The local sweep's finished first trial (copied) is skipped; the second is killed after its
  step-50 checkpoint, the sweep rerun resumes it, and its losses are the uninterrupted ones."""
  tmp, path, reference = local_sweep
  first, second = [t.name for t in spec.load(path).trials]
  workdir = str(tmp / 'killed')
  shutil.copytree(os.path.join(reference, first), os.path.join(workdir, first))
  first_mtime = os.path.getmtime(os.path.join(workdir, first, 'metrics.jsonl'))
  proc = sweep_cli(f'--sweep={path}', f'--workdir={workdir}', start_new_session=True)
  checkpoint = os.path.join(workdir, second, 'checkpoints', '50')
  deadline = time.time() + 400
  while not os.path.isdir(checkpoint) and proc.poll() is None and time.time() < deadline:
    time.sleep(0.02)
  os.killpg(proc.pid, signal.SIGKILL)  # the sweep and its train.py child
  proc.wait()
  assert os.path.isdir(checkpoint), 'trial 2 never checkpointed'
  assert not runner.is_finished(os.path.join(workdir, second), 200), 'killed too late'
  rerun = sweep_cli(f'--sweep={path}', f'--workdir={workdir}')
  assert rerun.returncode == 0, rerun.stdout + rerun.stderr
  assert f'{first} (num_kv_heads=1): finished earlier, skipped' in rerun.stdout
  assert os.path.getmtime(os.path.join(workdir, first, 'metrics.jsonl')) == first_mtime
  log = open(os.path.join(workdir, second, 'train.log')).read()
  assert log.count('$ ') == 2 and 'Resuming' in log
  assert losses(workdir) == losses(reference)  # same sweep twice (once interrupted): same losses


@pytest.mark.slow
def test_ray_backend_matches_local_and_reports_a_failing_trial(local_sweep):
  tmp, _, reference = local_sweep
  """One of the local sweep's trials (its losses must match) and a failing one, both on Ray at
  once. The README's `--backend=ray` command is not run (tests/test_readme.py's SKIPS)."""
  bad = {'data.corpus': 'files', 'data.files': str(tmp / 'missing' / '*.txt')}
  path = write_sweep(tmp, 'with_failure', TRIALS[1:] + [bad])
  workdir = str(tmp / 'ray')
  result = sweep_cli(f'--sweep={path}', f'--workdir={workdir}', '--backend=ray',
                     '--ray_num_cpus=2', '--cpus_per_trial=1')
  assert result.returncode != 0 and '1 of 2 trials not done' in result.stderr, result.stdout
  rows = losses(workdir)
  failed = spec.load(path).trials[1].name
  assert rows.pop(failed)[0] == 'failed'
  reference_rows = losses(reference)
  assert list(rows) == [list(reference_rows)[1]]
  assert rows == {name: reference_rows[name] for name in rows}
  md = open(os.path.join(workdir, 'results.md')).read()
  assert f'- `{failed}`: train.py exited with 1' in md and 'data.files' in md
