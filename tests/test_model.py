"""Model building blocks against independent references (explicit formulas, MHA equivalence)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models import build_model, layers, positional
from models.config import ModelConfig


def test_rope_equals_rotation_matrix_formula():
  """Pair (i, i + H/2) rotated by angle p * theta^(-2i/H): explicit 2x2 rotation matrices."""
  b, t, n, h, theta = 2, 5, 3, 8, 500.0
  x = np.random.default_rng(0).normal(size=(b, t, n, h)).astype(np.float32)
  pos = np.array([[0, 1, 2, 7, 30], [3, 3, 4, 100, 1]])
  got = np.asarray(positional.apply_rope(jnp.asarray(x), jnp.asarray(pos), theta))
  want = np.empty_like(x)
  for bi in range(b):
    for ti in range(t):
      for i in range(h // 2):
        a = pos[bi, ti] * theta ** (-2 * i / h)
        rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
        pair = np.stack([x[bi, ti, :, i], x[bi, ti, :, i + h // 2]])   # [2, N]
        want[bi, ti, :, i], want[bi, ti, :, i + h // 2] = rot @ pair
  np.testing.assert_allclose(got, want, atol=2e-5)


def test_rope_scores_depend_only_on_relative_position():
  rng = np.random.default_rng(1)
  q = jnp.asarray(rng.normal(size=(1, 1, 1, 16)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(1, 1, 1, 16)), jnp.float32)

  def score(pq, pk):
    rq = positional.apply_rope(q, jnp.array([[pq]]), 10_000.0)
    rk = positional.apply_rope(k, jnp.array([[pk]]), 10_000.0)
    return float(jnp.sum(rq * rk))

  for offset in (0, 3, 17):
    assert score(5, 2) == pytest.approx(score(5 + offset, 2 + offset), abs=1e-4)
  assert score(5, 2) != pytest.approx(score(5, 3), abs=1e-3)


def test_sinusoidal_equals_paper_formula():
  pos = np.arange(7)[None]
  got = np.asarray(positional.sinusoidal(jnp.asarray(pos), 10))[0]
  want = np.zeros((7, 10))
  for p in range(7):
    for i in range(5):
      want[p, 2 * i] = np.sin(p / 10_000 ** (2 * i / 10))
      want[p, 2 * i + 1] = np.cos(p / 10_000 ** (2 * i / 10))
  np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.parametrize('num_kv_heads', [1, 2])
def test_gqa_equals_mha_with_repeated_kv_weights(tiny_config, num_kv_heads):
  """GQA/MQA == MHA whose K/V projections repeat each KV head for its group of query heads."""
  gqa_cfg = ModelConfig.from_config(tiny_config({'model.num_kv_heads': num_kv_heads}).model)
  mha_cfg = ModelConfig.from_config(tiny_config({'model.num_kv_heads': gqa_cfg.num_heads}).model)
  gqa = layers.Attention(gqa_cfg, nnx.Rngs(0), rope=True)
  mha = layers.Attention(mha_cfg, nnx.Rngs(1), rope=True)
  group = gqa_cfg.num_heads // num_kv_heads
  for name in ('q', 'o'):
    getattr(mha, name).kernel.value = getattr(gqa, name).kernel.value
  for name in ('k', 'v'):
    getattr(mha, name).kernel.value = jnp.repeat(getattr(gqa, name).kernel.value, group, axis=1)
  x = jax.random.normal(jax.random.key(2), (2, 9, gqa_cfg.d_model))
  pos = jnp.broadcast_to(jnp.arange(9), (2, 9))
  np.testing.assert_allclose(gqa(x, pos), mha(x, pos), atol=1e-5)


@pytest.mark.parametrize('overrides', [
    {}, {'model.positional': 'learned', 'model.tie_embeddings': False},
    {'model.positional': 'sinusoidal', 'model.norm_position': 'post', 'model.norm': 'layernorm',
     'model.mlp_activation': 'relu', 'model.scale_embeddings': True},
    {'model.sliding_window': 3},
])
def test_causality(tiny_config, overrides):
  """Changing token t changes no logit at positions before t (and does change position t)."""
  model = build_model(tiny_config(overrides), nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.key(0), (2, 12), 0, 256)
  t = 7
  changed = tokens.at[:, t].set((tokens[:, t] + 1) % 256)
  a, b = model(tokens), model(changed)
  np.testing.assert_allclose(a[:, :t], b[:, :t], atol=1e-6)
  assert float(jnp.max(jnp.abs(a[:, t:] - b[:, t:]))) > 1e-4


def test_sliding_window_limits_receptive_field(tiny_config):
  """With window W and L layers, token t influences positions up to t + L*(W-1) only."""
  cfg = tiny_config({'model.sliding_window': 3})   # 2 layers: reach 2 * (3 - 1) = 4
  model = build_model(cfg, nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.key(0), (1, 16), 0, 256)
  a, b = model(tokens), model(tokens.at[:, 2].set((tokens[:, 2] + 1) % 256))
  diff = np.max(np.abs(np.asarray(a - b)), axis=-1)[0]
  assert np.all(diff[2:7] > 1e-5) and np.all(diff[7:] < 1e-6)


def test_tied_and_untied_parameters(tiny_config):
  tied = nnx.state(build_model(tiny_config(), nnx.Rngs(0)), nnx.Param)
  untied = nnx.state(build_model(tiny_config({'model.tie_embeddings': False}), nnx.Rngs(0)),
                     nnx.Param)
  count = lambda s: sum(x.size for x in jax.tree.leaves(s))
  assert count(untied) - count(tied) == 64 * 384
  assert 'lm_head' in untied and 'lm_head' not in tied


def test_bfloat16_compute_keeps_float32_params_and_logits(tiny_config):
  model = build_model(tiny_config({'model.dtype': 'bfloat16'}), nnx.Rngs(0))
  ref = build_model(tiny_config(), nnx.Rngs(0))
  params = nnx.state(model, nnx.Param)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
  tokens = jax.random.randint(jax.random.key(0), (2, 16), 0, 256)
  logits = model(tokens)
  assert logits.dtype == jnp.float32
  np.testing.assert_allclose(logits, ref(tokens), atol=0.1)   # bf16 has ~3 significant digits


def test_build_model_unknown_kind(tiny_config):
  config = tiny_config()
  with config.unlocked():
    config.model.kind = 'rnn'
  with pytest.raises(ValueError, match="model.kind='rnn' is not available"):
    build_model(config, nnx.Rngs(0))
