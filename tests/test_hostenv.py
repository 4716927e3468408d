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


# A jitted program whose temporaries (64 MiB or more) exceed glibc's largest mmap threshold,
# run after `ensure_fast_malloc`; prints the minor page faults of 5 calls after a warm-up.
FAULTS = '''
import json, os, resource, sys
from workdir import hostenv
hostenv.ensure_fast_malloc('train' if sys.argv[1] == 'training' else 'default')
import jax, jax.numpy as jnp
def f(x):
  a, b = jax.lax.optimization_barrier((jnp.sin(x), jnp.cos(x)))
  return (a * b).sum()
step, x = jax.jit(f), jnp.ones((4096, 4096))
assert step.lower(x).compile().memory_analysis().temp_size_in_bytes >= 2 ** 26
for _ in range(2):
  step(x).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
  step(x).block_until_ready()
print(json.dumps({'faults': resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before,
                  'tunables': os.environ.get('GLIBC_TUNABLES', ''),
                  'async': jax.config.read('jax_cpu_enable_async_dispatch')}))
'''


@pytest.mark.skipif(not hostenv.has_glibc_malloc(), reason='glibc malloc tunables')
def test_training_setup_reuses_step_temporaries_instead_of_faulting_them_in_again():
  """With TRAINING_TUNABLES and inline dispatch each call reuses the heap pages of the previous
  call's temporaries; with the default set the kernel maps and zeroes them again every call."""
  env = {k: v for k, v in os.environ.items() if k not in ('GLIBC_TUNABLES', 'LMX_NO_REEXEC')}
  env['JAX_ENABLE_COMPILATION_CACHE'] = 'false'   # a cached executable reports no temp size
  out = {}
  for mode in ('default', 'training'):
    r = run_cli('-c', FAULTS, mode, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    out[mode] = json.loads(r.stdout.strip().splitlines()[-1])
  assert all(t in out['training']['tunables'] for t in hostenv.TRAINING_TUNABLES)
  assert out['training']['async'] is False and out['default']['async'] is True
  # >= 64 MiB of temporaries a call: >= 32 faults of 2 MiB huge pages (16K of 4 KiB pages) each
  # time they are mapped afresh.
  assert out['default']['faults'] >= 5 * 24, out
  assert out['training']['faults'] < out['default']['faults'] / 10, out
