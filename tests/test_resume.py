"""Resuming and extending runs: which config fields may change on a resume (elastic), which are
refused naming them, and `train.py --workdir=DIR --config.a.b=v` continuing a saved run.

Reference for extension: a run trained to the longer length from the start (bitwise, when the
learning-rate schedule does not depend on train.steps), else the new schedule's formula.
"""
import os
import re
import shutil

import jax
import numpy as np
import pytest

from configs import schema
from training import checkpoint as ckpt_lib
from training import loop, metrics, optim
from workdir.files import write_config
from tests.conftest import run_cli


def _workdir_with_run(tmp_path, cfg, step=5, data=True):
  """A workdir that looks resumable: config.json and a committed step (with a data position)."""
  write_config(str(tmp_path), cfg)
  os.makedirs(tmp_path / 'checkpoints' / str(step) / ('data' if data else 'state'))
  return str(tmp_path)


@pytest.mark.parametrize('field, value', [
    ('train.batch_size', 8), ('data.seq_len', 32), ('data.tokenizer', 'tok/tokenizer.json'),
    ('data.corpus', 'files'), ('data.files', 'a/*.txt'), ('train.seed', 1),
    ('train.learning_rate', 1e-4), ('data.num_workers', 2), ('model.num_kv_heads', 1)])
def test_fixed_fields_are_refused_naming_them(tiny_config, tmp_path, field, value):
  cfg = tiny_config()
  workdir = _workdir_with_run(tmp_path, cfg)
  saved = schema.flatten(cfg.to_dict())[field]
  expected = f'refusing to resume it with: {field}: {saved!r} -> {value!r} '
  with pytest.raises(ckpt_lib.WorkdirError, match=re.escape(expected)):
    ckpt_lib.check_resume(workdir, schema.apply_overrides(cfg, {field: value}))
  assert schema.from_json((tmp_path / 'config.json').read_text()) == cfg   # nothing written


def test_several_fixed_fields_are_all_named(tiny_config, tmp_path):
  cfg = tiny_config()
  workdir = _workdir_with_run(tmp_path, cfg)
  new = schema.apply_overrides(cfg, {'train.batch_size': 8, 'data.seq_len': 32,
                                     'train.steps': 500})
  with pytest.raises(ckpt_lib.WorkdirError) as e:
    ckpt_lib.check_resume(workdir, new)
  assert 'data.seq_len: 64 -> 32; train.batch_size: 4 -> 8 (saved -> given)' in str(e.value)
  assert 'train.steps' not in str(e.value)


def test_elastic_fields_continue_and_are_listed(tiny_config, tmp_path):
  cfg = tiny_config()
  workdir = _workdir_with_run(tmp_path, cfg)
  new = schema.apply_overrides(cfg, {'train.steps': 500, 'train.eval_every': 7,
                                     'train.checkpoint_every': 9, 'train.log_every': 3,
                                     'mesh.data': 1, 'model.remat': 'full'})
  assert ckpt_lib.check_resume(workdir, new) == [
      'mesh.data: -1 -> 1', "model.remat: 'none' -> 'full'", 'train.checkpoint_every: 10 -> 9',
      'train.eval_every: 10 -> 7', 'train.log_every: 5 -> 3', 'train.steps: 20 -> 500']
  assert ckpt_lib.check_resume(workdir, cfg) == []
  assert ckpt_lib.check_resume(str(tmp_path / 'new'), new) is None


def test_a_start_without_data_position_only_fixes_the_model(tiny_config, tmp_path):
  """An imported model's step-0 checkpoint (no data position): fine-tuning changes the data
  and the optimizer freely, but not the parameter shapes."""
  cfg = tiny_config()
  workdir = _workdir_with_run(tmp_path, cfg, step=0, data=False)
  tuned = schema.apply_overrides(cfg, {'data.corpus': 'files', 'data.files': 'n/*.txt',
                                       'train.learning_rate': 1e-5, 'data.seq_len': 32})
  assert len(ckpt_lib.check_resume(workdir, tuned)) == 4
  with pytest.raises(ckpt_lib.WorkdirError, match=r'a different model.*model.d_model: 64 -> 32'):
    ckpt_lib.check_resume(workdir, schema.apply_overrides(cfg, {'model.d_model': 32}))


def test_max_steps_env_caps_steps_idempotently(tiny_config, monkeypatch):
  monkeypatch.setenv(schema.MAX_STEPS_ENV, '3')
  cfg = schema.validate(tiny_config({'train.warmup_steps': 10}))
  t = cfg.train
  assert (t.steps, t.warmup_steps, t.log_every, t.eval_every, t.checkpoint_every,
          t.eval_batches) == (3, 2, 3, 3, 3, 2)
  assert schema.validate(cfg).to_dict() == cfg.to_dict()
  monkeypatch.setenv(schema.MAX_STEPS_ENV, '0')
  with pytest.raises(schema.ConfigError, match='LMX_MAX_STEPS'):
    schema.validate(tiny_config())


def _logged(workdir, key):
  return [(m['step'], m[key]) for m in metrics.read_metrics(workdir) if key in m]


@pytest.mark.slow
def test_extending_a_run_from_the_command_line_equals_the_longer_run(tiny_config, tmp_path):
  """Constant learning rate after warmup (min_lr_ratio=1, so the schedule does not depend on
  train.steps): 6 steps, then `train.py --workdir=DIR --config.train.steps=12`, is bitwise the
  run trained for 12 steps from the start."""
  over = {'train.min_lr_ratio': 1.0, 'train.warmup_steps': 2, 'train.log_every': 1,
          'train.eval_every': 100, 'train.checkpoint_every': 100}
  run, ref = str(tmp_path / 'run'), str(tmp_path / 'ref')
  loop.train(tiny_config({**over, 'train.steps': 6}), run)
  r = run_cli('train.py', f'--workdir={run}', '--config.train.steps=12',
              env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  assert r.returncode == 0, r.stderr
  assert f'Resuming {run} from step 6 with changes: train.steps: 6 -> 12.' in r.stdout + r.stderr
  loop.train(tiny_config({**over, 'train.steps': 12}), ref)
  assert _logged(run, 'loss') == _logged(ref, 'loss') and len(_logged(ref, 'loss')) == 12
  assert ckpt_lib.load_config(run).train.steps == 12
  cfg = ckpt_lib.load_config(ref)
  s = loop.setup(cfg)
  a = ckpt_lib.Checkpointer(run, read_only=True).restore(s.abstract_state)
  b = ckpt_lib.Checkpointer(ref, read_only=True).restore(s.abstract_state)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_extending_a_cosine_run_follows_the_new_schedule(trained, tmp_path):
  """The documented difference: the cosine decays over train.steps, so after an extension the
  steps already trained keep the old schedule's rates and the rest follow the new one. (A copy
  of the `trained` run, 20 steps, extended to 40.)"""
  old, pristine = trained
  run = str(tmp_path / 'run')
  shutil.copytree(pristine, run)
  new = schema.apply_overrides(ckpt_lib.load_config(run), {'train.steps': 40})
  loop.train(new, run)
  rates = dict(_logged(run, 'learning_rate'))
  old_lr, new_lr = optim.learning_rate_schedule(old.train), optim.learning_rate_schedule(new.train)
  expected = {s: float(old_lr(s - 1) if s <= 20 else new_lr(s - 1)) for s in range(1, 41)}
  np.testing.assert_allclose([rates[s] for s in range(1, 41)],
                             [expected[s] for s in range(1, 41)], rtol=1e-6)
  assert abs(float(new_lr(19)) - float(old_lr(19))) > 1e-4   # the schedules do differ
