"""Injected faults around checkpoints: a failing background save (full disk), a never-checksummed
newest step, the non-finite count across a resume, and the seal on every clean exit.

References: the `trained` run (same config, never interrupted) for losses and parameters; the
saved arrays themselves for restores.
"""
import errno
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from training import checkpoint as ckpt_lib
from training import guards, loop, metrics
from workdir import integrity
from tests.test_reliability import _assert_trees_equal, _losses, _poison_steps, _restore


class _NoSpace:
  """A commit future that fails as a full disk does, in orbax's background save thread."""

  def result(self, timeout=None):
    del timeout
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

  def cancel(self):
    pass


def _fail_save_number(monkeypatch, n):
  """The n-th orbax array-tree write of this process fails in the background (its other writes
  succeed). Each checkpoint writes two: params/ then train/."""
  original = ocp.StandardCheckpointHandler.async_save
  calls = {'n': 0}

  async def async_save(self, *args, **kwargs):
    futures = await original(self, *args, **kwargs)
    calls['n'] += 1
    return [*(futures or []), _NoSpace()] if calls['n'] == n else futures
  monkeypatch.setattr(ocp.StandardCheckpointHandler, 'async_save', async_save)


def test_a_failed_background_save_ends_the_run_and_older_checkpoints_resume(
    trained, tmp_path, monkeypatch):
  """Checkpoint 10's write fails (ENOSPC) in the background: the run ends at the next save
  (step 15) naming the workdir and the error; step 5 is intact, and a rerun resumes from it
  and trains exactly as the uninterrupted run."""
  cfg, pristine = trained
  workdir = str(tmp_path / 'run')
  _fail_save_number(monkeypatch, 3)   # checkpoint 10's params/
  with pytest.raises(ckpt_lib.WorkdirError) as e:
    loop.train(cfg, workdir)
  assert str(e.value).startswith(f'--workdir={workdir}: saving checkpoint 10 failed (OSError: '
                                 '[Errno 28] No space left on device); checkpoint 5 and older '
                                 'are intact')
  assert max(s for s, _ in _losses(workdir)) == 15   # ended by the next save, not later
  assert ckpt_lib.Checkpointer.steps(workdir) == [5]
  assert integrity.has_manifest(os.path.join(workdir, 'checkpoints', '5'))
  assert integrity.verify(os.path.join(workdir, 'checkpoints', '5')) is None
  monkeypatch.undo()
  loop.train(cfg, workdir)
  assert _losses(workdir) == _losses(pristine)
  _assert_trees_equal(_restore(cfg, workdir), _restore(cfg, pristine))
  leftovers = [d for d in os.listdir(os.path.join(workdir, 'checkpoints')) if not d.isdigit()]
  assert leftovers == []   # the failed save's temporary folder is cleaned up


def test_clean_end_and_stop_seal_the_newest_step(trained):
  _, pristine = trained
  for step in ckpt_lib.Checkpointer.steps(pristine):
    assert integrity.verify(os.path.join(pristine, 'checkpoints', str(step))) is None
    assert integrity.has_manifest(os.path.join(pristine, 'checkpoints', str(step)))


def test_an_unchecksummed_newest_step_is_reread_before_use(tiny_config, tmp_path, capsys):
  """Committed but killed before its checksums: restored only if it re-reads finite; one with
  a non-finite array (a write gone wrong) falls back to the sealed step before it."""
  cfg = tiny_config()
  s = loop.setup(cfg)
  good = s.init_state()
  bad = jax.tree_util.tree_map_with_path(
      lambda path, x: x.at[(0,) * x.ndim].set(np.nan) if 'embedding' in jax.tree_util.keystr(path)
      else x, good)
  saver = ckpt_lib.Checkpointer(str(tmp_path))
  saver.save(1, good)
  saver.save(2, good)
  saver.manager.wait_until_finished()   # 2 committed, not sealed: "killed" here
  reader = ckpt_lib.Checkpointer(str(tmp_path))
  _assert_trees_equal(reader.restore(s.abstract_state), good)
  assert reader.restored_step == 2 and integrity.has_manifest(reader.step_dir(2))  # sealed now
  reader.save(3, bad)
  reader.manager.wait_until_finished()   # 3 committed with a NaN, not sealed
  again = ckpt_lib.Checkpointer(str(tmp_path))
  _assert_trees_equal(again.restore(s.abstract_state), good)
  assert again.restored_step == 2
  err = capsys.readouterr().err
  assert 'checkpoint 3 is unusable (it was never checksummed and ' in err
  assert 'holds non-finite values' in err and 'embedding' in err
  assert ckpt_lib.Checkpointer.steps(str(tmp_path)) == [1, 2]


def test_the_nonfinite_count_survives_a_resume(tiny_config, tmp_path, monkeypatch):
  """max 3 in a row: steps 4-5 are bad and the run stops (SIGTERM-like) after 5; after the
  resume one more bad step (6) is the third in a row and stops the run."""
  cfg = tiny_config({'train.log_every': 1, 'train.checkpoint_every': 100,   # 20 steps: the
                     'train.eval_every': 100, 'train.max_nonfinite_steps': 3})  # `trained` step
  workdir = str(tmp_path)
  _poison_steps(monkeypatch, {4, 5})
  loop.train(cfg, workdir, stop_after=5)
  saver = ckpt_lib.Checkpointer(workdir, read_only=True)
  saver.restore(loop.setup(cfg).abstract_state)
  assert saver.restored_meta == {'nonfinite_in_a_row': 2}
  monkeypatch.undo()
  _poison_steps(monkeypatch, {1})   # the first batch after the resume: step 6
  with pytest.raises(guards.NonfiniteError, match=r'3 steps in a row \(steps 4-6'):
    loop.train(cfg, workdir)
  assert [m['skipped_steps'] for m in metrics.read_metrics(workdir) if 'loss' in m] == [
      0, 0, 0, 1, 1]   # step 6 was never logged: the stop came first
