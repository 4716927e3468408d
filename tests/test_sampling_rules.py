"""Top-k / top-p filtering and the reference generator against plain numpy / Python loops."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models import build_model
from sampling.reference import generate_reference
from sampling.rules import filter_logits, sample_tokens


def numpy_filter(logits, top_k, top_p):
  """Straightforward reference: sort, keep the top k, then the smallest prefix with mass >= p."""
  order = np.argsort(-logits, kind='stable')
  keep = order[:top_k] if top_k > 0 else order
  probs = np.exp(logits[keep] - logits[keep].max())
  probs /= probs.sum()
  cum = np.cumsum(probs)
  n = int(np.searchsorted(cum, top_p - 1e-12) + 1) if top_p < 1 else len(keep)
  out = np.full_like(logits, -np.inf)
  out[keep[:n]] = logits[keep[:n]]
  return out


@pytest.mark.parametrize('top_k, top_p', [(0, 1.0), (1, 1.0), (5, 1.0), (0, 0.5), (0, 0.9),
                                          (10, 0.8), (3, 0.999), (0, 1e-6)])
def test_filter_logits_matches_numpy(top_k, top_p):
  logits = np.random.default_rng(top_k).normal(size=(4, 50)).astype(np.float32) * 2
  got = np.asarray(filter_logits(jnp.asarray(logits), top_k, top_p))
  for row, g in zip(logits, got):
    np.testing.assert_array_equal(np.isfinite(g), np.isfinite(numpy_filter(row, top_k, top_p)))
    np.testing.assert_allclose(g[np.isfinite(g)], row[np.isfinite(g)])


def test_greedy_and_seeded_sampling():
  logits = jnp.asarray(np.random.default_rng(0).normal(size=(3, 20)), jnp.float32)
  np.testing.assert_array_equal(sample_tokens(jax.random.key(0), logits, 0.0),
                                np.argmax(logits, -1))
  a = sample_tokens(jax.random.key(1), logits, 1.0, 5, 0.9)
  np.testing.assert_array_equal(a, sample_tokens(jax.random.key(1), logits, 1.0, 5, 0.9))


def test_reference_generator_equals_python_loop(tiny_config):
  model = build_model(tiny_config(), nnx.Rngs(0))
  graphdef, params = nnx.split(model, nnx.Param)
  prompt = jnp.asarray([[10, 20, 30, 40], [5, 6, 7, 8]], jnp.int32)
  out = np.asarray(generate_reference(graphdef, params, prompt, jax.random.key(0),
                                      max_new_tokens=6, temperature=0.0))
  forward = jax.jit(lambda p, x: nnx.merge(graphdef, p)(x))
  seq = np.asarray(prompt)
  for _ in range(6):
    nxt = np.argmax(np.asarray(forward(params, jnp.asarray(seq)))[:, -1], axis=-1)
    seq = np.concatenate([seq, nxt[:, None]], axis=1)
  np.testing.assert_array_equal(out, seq)
