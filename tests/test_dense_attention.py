"""models/dense.py ('dense': causal self-attention without the masked upper blocks, custom VJP)
against the 'xla' reference, and the default CPU train step against the same step with
model.attention='xla': outputs, losses and gradients agree to fp32 round-off."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import dense
from models.attention import dot_product_attention
from tests.test_attention import fwd_and_grads, qkv, run_fast

TOL = 1e-5   # relative to the largest magnitude of each compared array


def assert_close(got, want, tol=TOL):
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
    assert g.shape == w.shape
    np.testing.assert_allclose(g, w, rtol=0, atol=tol * np.abs(w).max())


@pytest.mark.parametrize('b, t, n, k, h', [
    (2, 256, 8, 2, 32),   # the default model: 8 query groups of 32 rows
    (3, 96, 4, 1, 16),    # MQA, 3 groups
    (1, 37, 3, 3, 8),     # MHA, T prime: one group
    (2, 64, 6, 2, 8),     # GQA 3 per K/V head, 2 groups
])
def test_dense_matches_xla_forward_and_grads(b, t, n, k, h):
  arrays = dict(zip(('query', 'key', 'value'), qkv(b, t, t, n, k, h, seed=t)))
  scale = 0.3
  both = lambda impl: run_fast(lambda a: fwd_and_grads(
      lambda q, kk, v: dot_product_attention(q, kk, v, is_causal=True, scale=scale,
                                             implementation=impl), a), arrays)
  assert_close(both('dense'), both('xla'))


@pytest.mark.parametrize('chunks', [1, 2, 4, 16])
def test_every_chunking_is_the_same_function(chunks):
  """The query grouping only skips work: any divisor of T gives the reference's values."""
  q, k, v = qkv(2, 64, 64, 4, 2, 8, seed=chunks)
  got = run_fast(lambda a: fwd_and_grads(
      lambda q, k, v: dense.causal_attention(q, k, v, 0.25, chunks), a),
      dict(query=q, key=k, value=v))
  want = run_fast(lambda a: fwd_and_grads(
      lambda q, k, v: dot_product_attention(q, k, v, is_causal=True, scale=0.25,
                                            implementation='xla'), a),
      dict(query=q, key=k, value=v))
  assert_close(got, want)


def test_default_chunks():
  assert [dense.default_chunks(t) for t in (1, 37, 64, 96, 256, 512, 1024, 100)] == [
      1, 1, 2, 3, 8, 16, 16, 2]


@pytest.mark.parametrize('kwargs', [dict(), dict(is_causal=True, local_window_size=4),
                                    dict(is_causal=True, logits_soft_cap=2.0),
                                    dict(is_causal=True, query_positions=jnp.zeros((1, 8),
                                                                                   jnp.int32))])
def test_dense_refuses_what_it_does_not_compute(kwargs):
  q, k, v = qkv(1, 8, 8, 2, 1, 4)
  with pytest.raises(ValueError, match="'dense' computes plain causal self-attention only"):
    dot_product_attention(q, k, v, implementation='dense', **kwargs)


def test_default_cpu_train_step_equals_the_xla_reference_step(tiny_config):
  """One train step of the default shape's layout (GQA 4/2, T 64) with model.attention='auto'
  (dense on CPU) and with 'xla' on the same batch and state: loss, gradient norm and both Adam
  moments of every parameter agree to <= 1e-5 relative (after one step the first moment is the
  clipped gradient times 1 - b1, the second its square times 1 - b2). The updated parameters
  are not compared: Adam's first update is ~g / |g|, which turns the round-off of a near-zero
  gradient into a whole learning-rate step."""
  from training import loop
  from training import mesh as mesh_lib
  if jax.default_backend() != 'cpu':
    pytest.skip('auto picks dense on CPU only')
  tokens = np.random.default_rng(0).integers(0, 256, (4, 65), np.int32)
  results = {}
  for impl in ('auto', 'xla'):
    cfg = tiny_config({'model.attention': impl, 'train.warmup_steps': 0, 'mesh.data': 1})
    s = loop.setup(cfg, jax.devices()[:1])
    batch = mesh_lib.put_batch({'inputs': tokens[:, :-1], 'targets': tokens[:, 1:],
                                'weights': np.ones((4, 64), np.float32)}, s.mesh)
    results[impl] = jax.device_get(s.train_step(s.init_state(), batch))
  (state, metrics), (ref_state, ref_metrics) = results['auto'], results['xla']
  assert_close(metrics, ref_metrics)
  assert_close(state.opt_state, ref_state.opt_state)


def test_bfloat16_forward_and_grads_no_worse_than_xla():
  """bf16 q/k/v (T 64, 2 groups): output and gradients within BF16_TOL of the fp32 reference
  on the same rounded inputs, and no further from it than 'xla' run in bf16."""
  from tests.test_attention import BF16_TOL
  q, k, v = qkv(2, 64, 64, 4, 2, 16, jnp.bfloat16, seed=3)
  arrays = dict(query=q, key=k, value=v)
  run = lambda impl, a: run_fast(lambda a: fwd_and_grads(
      lambda q, kk, v: dot_product_attention(q, kk, v, is_causal=True, implementation=impl),
      a), a)
  ref = run('xla', {n: x.astype(jnp.float32) for n, x in arrays.items()})
  got, xla16 = run('dense', arrays), run('xla', arrays)
  assert got[0].dtype == jnp.bfloat16
  for g, x, r in zip(jax.tree.leaves(got), jax.tree.leaves(xla16), jax.tree.leaves(ref)):
    scale = float(jnp.max(jnp.abs(r)))
    err = float(jnp.max(jnp.abs(g.astype(jnp.float32) - r))) / scale
    xla_err = float(jnp.max(jnp.abs(x.astype(jnp.float32) - r))) / scale
    assert err <= BF16_TOL and err <= 1.5 * xla_err + 1e-3, (err, xla_err)
