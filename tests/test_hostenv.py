"""workdir/hostenv.py: the XLA:CPU flags it sets change the kernels, not what the train step
computes (loss and gradients equal with and without them, to fp32 round-off)."""
import json
import os

import numpy as np
import pytest

from workdir import hostenv
from tests.conftest import run_cli

# Loss and gradients of the tiny decoder on one fixed batch, printed as JSON.
SCRIPT = '''
import json, sys
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
from configs import default
from models import build_model
from training import loop
cfg = default.get_config('tiny')
graphdef, params = nnx.split(build_model(cfg, nnx.Rngs(0)), nnx.Param)
tokens = np.random.default_rng(0).integers(0, 256, (4, cfg.data.seq_len + 1), np.int32)
batch = {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:],
         'weights': np.ones((4, cfg.data.seq_len), np.float32)}
def loss(p):
  total, weight = loop.model_loss(nnx.merge(graphdef, p), batch)
  return total / weight
value, grads = jax.jit(jax.value_and_grad(loss))(params)
print(json.dumps({'xla_flags': __import__('os').environ.get('XLA_FLAGS', ''), 'loss': float(value),
                  'grads': [np.asarray(g).ravel().tolist() for g in jax.tree.leaves(grads)]}))
'''


def _run(xla_flags: str) -> dict:
  env = dict(os.environ, XLA_FLAGS=xla_flags, JAX_ENABLE_COMPILATION_CACHE='false')
  r = run_cli('-c', SCRIPT, env=env)
  assert r.returncode == 0, r.stderr[-2000:]
  return json.loads(r.stdout.strip().splitlines()[-1])


def test_configure_xla_cpu_adds_flags_once_and_keeps_the_users(monkeypatch):
  monkeypatch.delenv('JAX_DISABLE_MOST_OPTIMIZATIONS', raising=False)
  monkeypatch.setenv('XLA_FLAGS', '--xla_cpu_enable_fast_math=false')
  hostenv.configure_xla_cpu()
  hostenv.configure_xla_cpu()
  assert os.environ['XLA_FLAGS'].split() == ['--xla_cpu_enable_fast_math=false',
                                             *hostenv.XLA_CPU_FLAGS]
  user = hostenv.XLA_CPU_FLAGS[0].split('=')[0] + '=dot'
  monkeypatch.setenv('XLA_FLAGS', user)
  hostenv.configure_xla_cpu()
  assert os.environ['XLA_FLAGS'] == user   # the user's own choice wins
  monkeypatch.setenv('JAX_DISABLE_MOST_OPTIMIZATIONS', 'true')   # cheap compilation asked for
  monkeypatch.setenv('XLA_FLAGS', '')
  hostenv.configure_xla_cpu()
  assert os.environ['XLA_FLAGS'].split() == [*hostenv.XLA_CPU_FLAGS,
                                             *hostenv.CHEAP_COMPILE_XLA_CPU_FLAGS]


@pytest.mark.slow
def test_xla_cpu_flags_keep_loss_and_gradients():
  """Also with the cheap-compile flags the tests run under: what they test is what users get."""
  default = _run('')
  assert default['xla_flags'] == ''
  for flags in (hostenv.XLA_CPU_FLAGS,
                (*hostenv.XLA_CPU_FLAGS, *hostenv.CHEAP_COMPILE_XLA_CPU_FLAGS)):
    tuned = _run(' '.join(flags))
    assert tuned['xla_flags'] == ' '.join(flags)
    np.testing.assert_allclose(tuned['loss'], default['loss'], rtol=1e-6)
    assert len(tuned['grads']) == len(default['grads'])
    for a, b in zip(tuned['grads'], default['grads']):
      a, b = np.asarray(a), np.asarray(b)
      assert np.max(np.abs(a - b)) <= 1e-5 * np.max(np.abs(b)), flags
