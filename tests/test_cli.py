"""The README's workflow through the real CLIs: train, rerun (resume), sample."""
import json
import re

import pytest

from tests.conftest import run_cli as run


@pytest.mark.slow
def test_train_resume_and_sample(tmp_path):
  workdir = str(tmp_path / 'run')
  first = run('-X', 'importtime', 'train.py', '--config=configs/default.py:tiny',
              f'--workdir={workdir}', '--config.train.steps=12', '--config.train.checkpoint_every=6')
  assert first.returncode == 0, first.stderr[-3000:]
  # TensorBoard logging without torch, even where it is installed (2-3 s of CPU a launch).
  assert re.search(r'\| +tensorboardX$', first.stderr, re.M)
  assert not re.search(r'\| +torch\._C$', first.stderr, re.M)   # the blocked import logs 'torch'
  assert 'Held-out loss' in first.stdout and 'unigram baseline' in first.stdout
  longer = run('train.py', '--config=configs/default.py:tiny', f'--workdir={workdir}',
               '--config.train.steps=16', '--config.train.checkpoint_every=6')
  assert longer.returncode == 0, longer.stderr
  assert f'Resuming {workdir} from step 12' in longer.stdout + longer.stderr
  with open(f'{workdir}/metrics.jsonl') as f:
    steps = [json.loads(line)['step'] for line in f]
  assert steps == sorted(steps) and steps[-1] == 16
  sample = run('sample.py', f'--workdir={workdir}', '--prompt=import o', '--max_new_tokens=20',
               '--num_samples=2', '--seed=1')
  assert sample.returncode == 0, sample.stderr
  assert sample.stdout.count('import o') == 2
  assert sample.stderr == ''   # no library noise
