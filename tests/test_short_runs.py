"""Short runs: fewer steps than train.warmup_steps train with the warmup cut to the run (one
warning line); resuming one to more steps keeps its schedule or refuses naming the field."""
import logging

import numpy as np
import optax
import pytest

from configs import schema
from training import loop, optim
from training.metrics import read_metrics

SHORT = {'train.steps': 4, 'train.warmup_steps': 10, 'train.log_every': 1, 'train.eval_every': 4,
         'train.checkpoint_every': 4, 'model.num_layers': 1}   # 1 layer: compiles faster


def test_short_run_schedule_is_the_warmup_cut_to_the_run(tiny_config):
  t = schema.validate(tiny_config({'train.steps': 20, 'train.warmup_steps': 50})).train
  schedule = optim.learning_rate_schedule(t)
  reference = optax.linear_schedule(0.0, t.learning_rate, transition_steps=20)
  for step in range(21):
    assert float(schedule(step)) == pytest.approx(float(reference(step)), abs=1e-9)
  assert optim.short_run_warning(t).startswith('train.steps=20 is smaller than '
                                               'train.warmup_steps=50: the warmup is cut to the run')
  # Runs at least as long as their warmup keep the schedule they name, and no warning.
  long = tiny_config({'train.steps': 50, 'train.warmup_steps': 50}).train
  assert optim.short_run_warning(long) is None and optim.warmup_steps(long) == 50


def test_short_run_trains_warns_once_and_resumes_only_with_its_schedule(tiny_config, tmp_path,
                                                                         caplog):
  workdir = str(tmp_path / 'short')
  config = tiny_config(SHORT)
  with caplog.at_level(logging.WARNING):
    result = loop.train(config, workdir)
  assert result['step'] == 4 and np.isfinite(result['eval_loss'])
  warnings = [r.getMessage() for r in caplog.records if 'warmup is cut' in r.getMessage()]
  assert len(warnings) == 1
  lr = config.train.learning_rate
  logged = {m['step']: m['learning_rate'] for m in read_metrics(workdir) if 'learning_rate' in m}
  assert logged == pytest.approx({s: lr * (s - 1) / 4 for s in range(1, 5)})
  # Resuming to more steps with the same warmup_steps would change the steps already trained.
  longer = tiny_config({**SHORT, 'train.steps': 8})
  with pytest.raises(schema.ConfigError) as e:
    loop.train(longer, workdir)
  assert str(e.value).startswith('train.warmup_steps=10: this workdir was started as a short run')
  assert '--config.train.warmup_steps=4 to keep the schedule it started with' in str(e.value)
  # With the warmup it had, the run resumes: its first 4 steps' rates are what they were, then
  # the cosine decay of a 4-step warmup over 8 steps.
  kept = tiny_config({**SHORT, 'train.steps': 8, 'train.warmup_steps': 4})
  assert loop.train(kept, workdir)['step'] == 8
  reference = optim.learning_rate_schedule(kept.train)
  logged = {m['step']: m['learning_rate'] for m in read_metrics(workdir) if 'learning_rate' in m}
  assert logged == pytest.approx({s: float(reference(s - 1)) for s in range(1, 9)})
  assert all(logged[s] == pytest.approx(lr * (s - 1) / 4) for s in range(1, 5))
