"""Self-describing workdirs: run.json records the config hash, tokenizer, mesh and code revision;
`train.py --workdir=DIR` alone resumes the saved config."""
import hashlib
import json
import subprocess
import sys

import pytest

from configs import schema
from training import checkpoint as ckpt_lib
from training import loop, metrics
from workdir import runinfo
from tests.conftest import ROOT


def git(cwd, *args):
  return subprocess.run(['git', *args], cwd=cwd, capture_output=True, text=True,
                        check=True).stdout.strip()


def test_code_revision_follows_git(tmp_path):
  assert runinfo.code_revision(str(tmp_path)) == 'unknown'  # not a repository
  git(tmp_path, 'init', '-q')
  (tmp_path / 'a.py').write_text('x = 1\n')
  git(tmp_path, 'add', 'a.py')
  git(tmp_path, '-c', 'user.name=t', '-c', 'user.email=t@t', 'commit', '-qm', 'one')
  head = git(tmp_path, 'rev-parse', 'HEAD')
  (tmp_path / 'untracked.txt').write_text('ignored')
  assert runinfo.code_revision(str(tmp_path)) == head
  (tmp_path / 'a.py').write_text('x = 2\n')
  assert runinfo.code_revision(str(tmp_path)) == head + '+dirty'


@pytest.mark.slow
def test_run_json_then_resume_from_workdir_alone(tiny_config, tmp_path):
  workdir = tmp_path / 'run'
  loop.train(tiny_config({'train.log_every': 1}), str(workdir), stop_after=10)
  info = json.loads((workdir / 'run.json').read_text())
  config_text = (workdir / 'config.json').read_text()
  assert info['config_hash'] == hashlib.sha256(config_text.encode()).hexdigest()[:12]
  assert info['config_hash'] == schema.config_hash(ckpt_lib.load_config(str(workdir)))
  assert info['code_revision'].split('+')[0] == git(ROOT, 'rev-parse', 'HEAD')
  assert info['mesh'] == {'data': 1, 'fsdp': 1, 'tensor': 1}
  assert info['tokenizer'] == {'spec': 'byte', 'name': 'byte', 'vocab_size': 384, 'sha256': None}
  assert [launch['start_step'] for launch in info['launches']] == [0]

  proc = subprocess.run([sys.executable, 'train.py', f'--workdir={workdir}'], cwd=ROOT,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr
  assert f'Resuming {workdir} from step 10' in proc.stdout + proc.stderr
  info = json.loads((workdir / 'run.json').read_text())
  assert [launch['start_step'] for launch in info['launches']] == [0, 10]
  assert info['launches'][1]['config_hash'] == info['config_hash']
  steps = [m['step'] for m in metrics.read_metrics(str(workdir)) if 'loss' in m]
  assert steps == list(range(1, 21))


def test_overrides_without_config_need_a_saved_run(tmp_path):
  proc = subprocess.run([sys.executable, 'train.py', f'--workdir={tmp_path}',
                         '--config.train.steps=5'], cwd=ROOT, capture_output=True, text=True,
                        timeout=120)
  assert proc.returncode != 0
  assert proc.stderr.strip().splitlines()[-1] == (
      'error: --config.KEY overrides need --config=FILE, or the --workdir of an existing run '
      f'(they then apply to its saved config); --workdir={tmp_path} holds no config.json.')
