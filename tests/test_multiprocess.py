"""Two train.py processes of 2 CPU devices each over jax.distributed (gloo): the same training as
one process on 4 devices, and a SIGTERM to one of them stops both (XLA_FLAGS must be set before
jax is imported, hence subprocesses)."""
import os
import re
import signal
import socket
import subprocess

import numpy as np
import pytest


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_train_like_one_and_a_sigterm_to_one_stops_both(tmp_path):
  """One 2-process run (train.py, 2 CPU devices each, over gloo) serves two properties:
  - its first 3 losses and its step-3 held-out loss are those of one process on 4 devices (the
    learning rate is constant after a 2-step warmup, so a 3-step run is its first 3 steps), and
    each process loads only its rows of the batch;
  - SIGTERM to process 1 alone stops both after the same step, exit 143, with one checkpoint of
    that step, written by both together and checksummed."""
  from tests.test_reliability import _losses, _train_cmd, _wait_for_step
  from training import checkpoint as ckpt_lib
  from training import data as data_lib
  from workdir import integrity
  from workdir.runinfo import read_run_info
  over = ['--config.train.log_every=1', '--config.train.eval_every=3',
          '--config.train.checkpoint_every=1000', '--config.train.warmup_steps=2',
          '--config.train.min_lr_ratio=1.0']

  def env(devices):   # both runs compile alike (the tests' -O0: tests/conftest.py)
    return dict(os.environ, LMX_NO_REEXEC='1', JAX_PLATFORMS='cpu',
                XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}')
  two, one = str(tmp_path / 'two'), str(tmp_path / 'one')
  flags = [f'--coordinator_address=127.0.0.1:{_free_port()}', '--num_processes=2']
  procs = [subprocess.Popen(_train_cmd(two, '--config.train.steps=500', *over, *flags,
                                       f'--process_id={i}'),
                            env=env(2), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  _wait_for_step(two, 3, procs[0], timeout=600)
  procs[1].send_signal(signal.SIGTERM)
  outs = [p.communicate(timeout=300) for p in procs]
  ref = subprocess.run(_train_cmd(one, '--config.train.steps=3', *over), env=env(4),
                       capture_output=True, text=True, timeout=600)
  assert ref.returncode == 0, ref.stderr[-3000:]
  assert [p.returncode for p in procs] == [143, 143], [e[-2000:] for _, e in outs]
  # Two processes of 2 devices each, one data-parallel mesh over all 4.
  info = read_run_info(two)
  assert info['devices']['count'] == 4 and info['devices']['processes'] == 2
  assert info['mesh']['data'] == 4 and read_run_info(one)['devices']['processes'] == 1
  np.testing.assert_allclose([x for _, x in _losses(two)[:3]], [x for _, x in _losses(one)],
                             rtol=2e-6)
  assert len(_losses(one)) == 3 and _losses(two, 'eval_loss')[0][0] == 3
  assert _losses(two, 'eval_loss')[0][1] == pytest.approx(_losses(one, 'eval_loss')[-1][1],
                                                          rel=2e-6)
  cfg = ckpt_lib.load_config(two)   # each process loads only its rows (i::2) of the batch
  tokens = data_lib.load_corpus(cfg.data).train
  args = (tokens, cfg.data.seq_len, cfg.train.batch_size, cfg.train.seed)
  whole = next(iter(data_lib.train_dataset(*args)))
  for i in range(2):
    mine = next(iter(data_lib.train_dataset(*args, process_index=i, process_count=2)))
    assert len(mine['inputs']) == cfg.train.batch_size // 2
    assert all(np.array_equal(mine[k], whole[k][i::2]) for k in whole)
  # The stop: the same step on both, one checkpoint of it, sealed.
  stops = [re.findall(r'Stopped by SIGTERM after step (\d+)', o + e) for o, e in outs]
  assert len(stops[0]) == len(stops[1]) == 1 and stops[0] == stops[1], outs
  step = int(stops[0][0])
  assert ckpt_lib.Checkpointer.steps(two) == [step]
  assert integrity.verify(os.path.join(two, 'checkpoints', str(step))) is None
  assert integrity.has_manifest(os.path.join(two, 'checkpoints', str(step)))
  assert max(s for s, _ in _losses(two)) == step
