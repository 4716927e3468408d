"""Preemption, kill -9, corrupt checkpoints, NaN steps and unusable workdirs.

References: an uninterrupted run of the same command (bitwise), the train step applied to the
same batches with the poisoned ones left out, and pristine copies of damaged checkpoints.
"""
import gc
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from training import checkpoint as ckpt_lib
from training import data as data_lib
from training import guards, loop, mesh as mesh_lib, metrics, preemption
from workdir import integrity

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def _assert_trees_equal(a, b):
  for x, y in zip(_leaves(a), _leaves(b), strict=True):
    np.testing.assert_array_equal(x, y)


def _losses(workdir, key='loss'):
  return [(m['step'], m[key]) for m in metrics.read_metrics(str(workdir)) if key in m]


def _restore(cfg, workdir, step=None):
  s = loop.setup(cfg)
  return ckpt_lib.Checkpointer(str(workdir), read_only=True).restore(s.abstract_state, step=step)


# ---------------------------------------------------------------------------- NaN / Inf steps

def _batches(cfg, n):
  corpus = data_lib.load_corpus(cfg.data)
  it = iter(data_lib.train_dataset(corpus.train, cfg.data.seq_len, cfg.train.batch_size,
                                   cfg.train.seed))
  return [next(it) for _ in range(n)]


@pytest.mark.parametrize('bad', [np.nan, np.inf])
def test_nonfinite_step_is_skipped_exactly(tiny_config, bad):
  """[good, poisoned, good] == [good, good]: the poisoned step changes nothing but the step."""
  cfg = tiny_config()
  s = loop.setup(cfg)
  b1, b2 = _batches(cfg, 2)
  poisoned = {**b1, 'weights': np.full_like(b1['weights'], bad)}
  state, _ = s.train_step(s.init_state(), b1)
  state, m = s.train_step(state, poisoned)
  assert float(m['skipped_steps']) == 1.0 and not np.isfinite(float(m['loss']))
  assert int(state.step) == 2
  state, m = s.train_step(state, b2)
  assert float(m['skipped_steps']) == 0.0
  ref, _ = s.train_step(s.init_state(), b1)
  ref, _ = s.train_step(ref, b2)
  _assert_trees_equal(state.replace(step=None), ref.replace(step=None))


def _poison_steps(monkeypatch, steps):
  """Every batch put on the device for training step i in `steps` gets NaN weights."""
  calls = {'n': 0}
  put = mesh_lib.put_batch

  def poisoning_put(batch, mesh):
    calls['n'] += 1
    if calls['n'] in steps:
      batch = {**batch, 'weights': np.full_like(batch['weights'], np.nan)}
    return put(batch, mesh)
  monkeypatch.setattr(mesh_lib, 'put_batch', poisoning_put)


def test_skip_policy_counts_and_matches_run_without_the_bad_batches(tiny_config, tmp_path,
                                                                   monkeypatch):
  cfg = tiny_config({'train.log_every': 1, 'train.eval_every': 100,   # 20 steps: the program of
                     'train.nonfinite': 'skip', 'train.max_nonfinite_steps': 1})   # `trained`
  bad = {3, 4, 5}
  _poison_steps(monkeypatch, bad)
  loop.train(cfg, str(tmp_path))
  lines = [m for m in metrics.read_metrics(str(tmp_path)) if 'loss' in m]
  assert [m['skipped_steps'] for m in lines] == [float(i in bad) for i in range(1, 21)]
  assert all(np.isnan(m['loss']) == (m['step'] in bad) for m in lines)
  # Reference: the same jitted step over the same batches with the poisoned ones left out.
  s = loop.setup(cfg)
  state = s.init_state()
  for i, batch in enumerate(_batches(cfg, 20), start=1):
    if i not in bad:
      state, _ = s.train_step(state, batch)
  restored = _restore(cfg, tmp_path)
  assert int(restored.step) == 20
  _assert_trees_equal(restored.params, state.params)
  _assert_trees_equal(restored.opt_state, state.opt_state)


def test_stop_policy_stops_after_n_in_a_row_and_keeps_last_good(tiny_config, tmp_path,
                                                                 monkeypatch):
  cfg = tiny_config({'train.steps': 20, 'train.log_every': 1, 'train.checkpoint_every': 5,
                     'train.eval_every': 100, 'train.nonfinite': 'stop',
                     'train.max_nonfinite_steps': 3})
  _poison_steps(monkeypatch, {2, 6, 7, 8, 9})   # step 2 alone is skipped, 6-8 stop the run
  handler = signal.getsignal(signal.SIGTERM)
  with pytest.raises(guards.NonfiniteError, match=r'3 steps in a row \(steps 6-8'):
    loop.train(cfg, str(tmp_path))
  assert signal.getsignal(signal.SIGTERM) is handler
  assert ckpt_lib.Checkpointer.steps(str(tmp_path)) == [5]
  assert integrity.verify(os.path.join(tmp_path, 'checkpoints', '5')) is None
  assert integrity.has_manifest(os.path.join(tmp_path, 'checkpoints', '5'))
  assert max(s for s, _ in _losses(tmp_path)) <= 8
  assert all(np.isfinite(x).all() for x in _leaves(_restore(cfg, tmp_path).params))


# ---------------------------------------------------------------------------- signals

def test_stop_signal_flag_then_default():
  # Python's own Ctrl-C handler beforehand: libraries imported by earlier tests in this process
  # (seen in the full suite) may leave a SIGINT handler of theirs that swallows the signal.
  outer = signal.signal(signal.SIGINT, signal.default_int_handler)
  try:
    _stop_signal_flag_then_previous_handler()
  finally:
    signal.signal(signal.SIGINT, outer)


def _stop_signal_flag_then_previous_handler():
  before = signal.getsignal(signal.SIGINT)
  with preemption.StopSignal() as stop:
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.05)   # Python runs the handler between bytecodes
    assert stop.requested and stop.name == 'SIGINT' and stop.exit_code == 130
    with pytest.raises(KeyboardInterrupt):   # a second Ctrl-C aborts at once
      os.kill(os.getpid(), signal.SIGINT)
      time.sleep(0.05)
  assert signal.getsignal(signal.SIGINT) is before


def _train_cmd(workdir, *overrides):
  return [sys.executable, os.path.join(ROOT, 'train.py'),
          f'--config={os.path.join(ROOT, "configs/default.py")}:tiny', f'--workdir={workdir}',
          *overrides]


def _wait_for_step(workdir, step, proc, timeout=120):
  """Polls metrics.jsonl until a training line reaches `step` (a cut-short line is skipped)."""
  deadline = time.time() + timeout
  while time.time() < deadline:
    assert proc.poll() is None, proc.communicate()
    try:
      done = max((s for s, _ in _losses(workdir)), default=0)
    except (json.JSONDecodeError, OSError):
      done = 0
    if done >= step:
      return done
    time.sleep(0.02)
  raise AssertionError(f'step {step} not reached in {timeout} s')


def test_sigterm_saves_and_rerun_completes(tmp_path):
  """20 steps: the train step `trained` compiled (and cached) already."""
  workdir = str(tmp_path / 'run')
  cmd = _train_cmd(workdir, '--config.train.log_every=1', '--config.train.checkpoint_every=1000',
                   '--config.train.eval_every=1000')
  proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  _wait_for_step(workdir, 2, proc)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 128 + signal.SIGTERM, err
  step = ckpt_lib.Checkpointer.steps(workdir)[-1]
  assert 2 <= step < 20
  assert f'Stopped by SIGTERM after step {step}; checkpoint saved in {workdir}' in out + err
  assert 'To resume, run the same command again:' in out and '--workdir=' in out
  assert integrity.has_manifest(os.path.join(workdir, 'checkpoints', str(step)))
  done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr
  assert f'Resuming {workdir} from step {step}' in done.stdout + done.stderr
  assert [s for s, _ in _losses(workdir)] == list(range(1, 21))


@pytest.mark.slow
def test_kill_9_at_random_moments_resumes_exactly(tiny_config, tmp_path):
  """3 SIGKILLs at seeded random moments, the same command rerun each time: the logged losses
  and the final train state are bitwise those of an uninterrupted run (in-process: the same
  config and XLA flags as the CLI, see conftest; one jax start fewer). 20 steps: the programs
  `trained` compiled (and cached) already."""
  over = {'train.log_every': 1, 'train.checkpoint_every': 2, 'train.eval_every': 9}
  args = [f'--config.{k}={v}' for k, v in over.items()]
  ref, run = str(tmp_path / 'ref'), str(tmp_path / 'run')
  loop.train(tiny_config(over), ref)
  rng = np.random.default_rng(0)
  for target in sorted(rng.choice(np.arange(2, 18), size=3, replace=False)):
    proc = subprocess.Popen(_train_cmd(run, *args), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    _wait_for_step(run, int(target), proc)
    time.sleep(rng.uniform(0.0, 0.15))   # land between writes, saves and manifests
    assert proc.poll() is None, 'the run finished before it could be killed'
    proc.kill()
    proc.wait()
  done = subprocess.run(_train_cmd(run, *args), capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr
  assert _losses(run) == _losses(ref) and len(_losses(ref)) == 20
  assert _losses(run, 'eval_loss') == _losses(ref, 'eval_loss')
  cfg = ckpt_lib.load_config(ref)
  _assert_trees_equal(_restore(cfg, run, step=20), _restore(cfg, ref, step=20))


# ---------------------------------------------------------------------------- damaged checkpoints

def _largest_file(step_dir):
  files = [os.path.join(r, f) for r, _, fs in os.walk(step_dir) for f in fs
           if f != integrity.MANIFEST]
  return max(files, key=os.path.getsize)


def _damage(step_dir, how):
  path = _largest_file(step_dir)
  if how == 'delete':
    os.remove(path)
  elif how == 'flip':
    with open(path, 'r+b') as f:
      f.seek(os.path.getsize(path) // 2)
      byte = f.read(1)
      f.seek(-1, os.SEEK_CUR)
      f.write(bytes([byte[0] ^ 0x01]))
  else:
    with open(path, 'r+b') as f:
      f.truncate(os.path.getsize(path) // 2)
  if how == 'truncate_unsealed':   # killed after orbax's commit, before the manifest
    os.remove(os.path.join(step_dir, integrity.MANIFEST))


@pytest.mark.parametrize('how', ['truncate', 'delete', 'flip', 'truncate_unsealed'])
def test_damaged_newest_falls_back_to_previous(trained, tmp_path, capsys, monkeypatch, how):
  """The newest step damaged: the previous good one is restored and the bad one moved aside,
  with one line on stderr. (An unsealed step's restore fails inside orbax, whose abandoned reads
  of its other arrays then report on their own: ~1,700 lines of tracebacks unless silenced.)"""
  cfg, pristine = trained
  workdir = str(tmp_path / 'w')
  shutil.copytree(pristine, workdir)
  assert ckpt_lib.Checkpointer.steps(workdir) == [10, 15, 20]
  _damage(os.path.join(workdir, 'checkpoints', '20'), how)
  s = loop.setup(cfg)
  unraisable = []
  monkeypatch.setattr(sys, 'unraisablehook', unraisable.append)
  checkpointer = ckpt_lib.Checkpointer(workdir)
  state = checkpointer.restore(s.abstract_state)
  checkpointer.close()
  time.sleep(0.2)   # the abandoned reads finish, and are collected below
  gc.collect()
  assert unraisable == []
  err = capsys.readouterr().err
  assert len(err.strip().splitlines()) == 1, err[:3000]
  assert checkpointer.restored_step == 15
  assert 'checkpoint 20 is unusable' in err and 'restored the previous good checkpoint, step 15' in err
  if how != 'truncate_unsealed':   # the manifest names the file and what is wrong with it
    assert {'truncate': 'truncated', 'delete': 'is missing', 'flip': 'sha256'}[how] in err
  assert ckpt_lib.Checkpointer.steps(workdir) == [10, 15]
  assert os.path.isdir(os.path.join(workdir, 'unusable_checkpoints', '20'))   # kept, not deleted
  _assert_trees_equal(state, _restore(cfg, pristine, step=15))


def test_sampling_uses_the_previous_good_checkpoint_and_moves_nothing(trained, tmp_path,
                                                                      capsys):
  from workdir.load import load_workdir
  cfg, pristine = trained
  workdir = str(tmp_path / 'w')
  shutil.copytree(pristine, workdir)
  _damage(os.path.join(workdir, 'checkpoints', '20', 'params'), 'flip')  # what sampling reads
  loaded = load_workdir(workdir)
  assert loaded.step == 15 and 'checkpoint 20 is unusable' in capsys.readouterr().err
  assert ckpt_lib.Checkpointer.steps(workdir) == [10, 15, 20]   # read-only: nothing moved
  _assert_trees_equal(loaded.params, _restore(cfg, pristine, step=15).params)


def test_sampling_and_export_never_read_the_optimizer_state(trained, tmp_path):
  """Inference restores the `params` item alone: with every step's optimizer state (and data
  position) deleted, sampling still loads the newest step's parameters and export works."""
  from interop.convert import export_hf
  from workdir.load import load_workdir
  cfg, pristine = trained
  workdir = str(tmp_path / 'w')
  shutil.copytree(pristine, workdir)
  for step in (10, 15, 20):
    for item in ('train', 'data'):
      shutil.rmtree(os.path.join(workdir, 'checkpoints', str(step), item))
  loaded = load_workdir(workdir)
  assert loaded.step == 20
  _assert_trees_equal(loaded.params, _restore(cfg, pristine, step=20).params)
  export_hf(workdir, str(tmp_path / 'hf'))
  assert os.path.isfile(os.path.join(tmp_path, 'hf', 'model.safetensors'))


def test_training_resumes_past_a_damaged_checkpoint(trained, tmp_path):
  cfg, pristine = trained
  workdir = str(tmp_path / 'w')
  shutil.copytree(pristine, workdir)
  _damage(os.path.join(workdir, 'checkpoints', '20'), 'truncate')
  loop.train(cfg, workdir)
  assert _losses(workdir) == _losses(pristine)
  _assert_trees_equal(_restore(cfg, workdir), _restore(cfg, pristine))


def test_no_restorable_checkpoint_is_an_error_and_changes_nothing(trained, tmp_path):
  cfg, pristine = trained
  workdir = str(tmp_path / 'w')
  shutil.copytree(pristine, workdir)
  for step in (10, 15, 20):
    _damage(os.path.join(workdir, 'checkpoints', str(step)), 'delete')
  with pytest.raises(ckpt_lib.WorkdirError, match='no checkpoint could be restored.*step 20: '):
    ckpt_lib.Checkpointer(workdir).restore(loop.setup(cfg).abstract_state)
  assert ckpt_lib.Checkpointer.steps(workdir) == [10, 15, 20]
  assert not os.path.exists(os.path.join(workdir, 'unusable_checkpoints'))


def test_old_steps_are_pruned_only_after_a_newer_one_is_sealed(tiny_config, tmp_path):
  """keep=1, and the newest step was committed but never sealed (a kill): the sealed step
  before it survives, and is what a restore falls back to when the newest is damaged."""
  cfg = tiny_config()
  s = loop.setup(cfg)
  state = s.init_state()
  saver = ckpt_lib.Checkpointer(str(tmp_path), keep=1)
  saver.save(1, state)
  saver.save(2, state)   # seals 1
  saver.manager.wait_until_finished()   # 2 is committed; the process "dies" before sealing it
  assert ckpt_lib.Checkpointer.steps(str(tmp_path)) == [1, 2]
  _damage(saver.step_dir(2), 'truncate')
  restarted = ckpt_lib.Checkpointer(str(tmp_path), keep=1)
  restarted.restore(s.abstract_state)
  assert restarted.restored_step == 1
  restarted.save(2, s.init_state())
  restarted.save(3, s.init_state())   # seals 2: now 1 may go
  restarted.close()
  assert ckpt_lib.Checkpointer.steps(str(tmp_path)) == [3]


# ---------------------------------------------------------------------------- the workdir

def test_unwritable_workdir_fails_before_training(tiny_config, tmp_path):
  blocker = tmp_path / 'file'
  blocker.write_text('not a directory')
  with pytest.raises(ckpt_lib.WorkdirError, match=r'--workdir=.*file/run is not writable'):
    loop.train(tiny_config(), str(blocker / 'run'))


@pytest.mark.skipif(os.geteuid() == 0, reason='root writes into read-only directories')
def test_read_only_workdir_fails_before_training(tiny_config, tmp_path):
  os.chmod(tmp_path, 0o555)
  try:
    with pytest.raises(ckpt_lib.WorkdirError, match='is not writable'):
      loop.train(tiny_config(), str(tmp_path / 'run'))
  finally:
    os.chmod(tmp_path, 0o755)


def test_too_little_space_fails_before_training(tiny_config, tmp_path, monkeypatch):
  real = shutil.disk_usage
  monkeypatch.setattr(guards.shutil, 'disk_usage',
                      lambda p: real(p)._replace(free=4 << 20))
  with pytest.raises(ckpt_lib.WorkdirError, match=r'4 MiB free.*train.keep_checkpoints=3'):
    loop.train(tiny_config(), str(tmp_path / 'run'))
  assert not os.path.exists(tmp_path / 'run' / 'config.json')


def test_space_estimate_is_the_state_size(tiny_config):
  s = loop.setup(tiny_config())
  state = s.init_state()
  assert guards.state_bytes(s.abstract_state) == sum(x.nbytes for x in _leaves(state))


def test_checkpoints_without_config_are_not_overwritten(tiny_config, tmp_path):
  os.makedirs(tmp_path / 'checkpoints' / '5')
  with pytest.raises(ckpt_lib.WorkdirError, match='holds checkpoints but no config.json'):
    loop.train(tiny_config(), str(tmp_path))
  assert sorted(os.listdir(tmp_path)) == ['checkpoints']


def test_metrics_reader_drops_a_line_cut_short_by_a_kill(tmp_path):
  (tmp_path / 'metrics.jsonl').write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo')
  assert metrics.read_metrics(str(tmp_path)) == [{'step': 1, 'loss': 2.0}]
