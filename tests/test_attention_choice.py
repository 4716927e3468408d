"""Which attention implementation `auto` picks, and the models' attention calls: decision tables,
the splash (TPU) kernel in Pallas interpret mode, sharding, model-level parity across
implementations, and the GPU-only cuDNN checks. Kernel-level parity is in test_attention.py.
"""
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.attention import choose_implementation, dot_product_attention
from tests.test_attention import _packed_ids, qkv, run_fast

def _shape(t, h=64, dtype=jnp.bfloat16, s=None):
  return jax.ShapeDtypeStruct((2, t, 8, h), dtype), jax.ShapeDtypeStruct((2, s or t, 2, h), dtype)


AUTO_CASES = [   # (backend, (T, head_dim, dtype[, S]), call flags, choice)
    ('cpu', (8, 8, jnp.float32), {}, 'xla'),
    ('cpu', (1024, 8, jnp.bfloat16), {}, 'blockwise'),
    ('cpu', (1024, 128, jnp.bfloat16), dict(is_causal=True), 'blockwise'),   # never a kernel
    ('cpu', (256, 32, jnp.float32), dict(is_causal=True), 'dense'),          # training step
    ('cpu', (256, 32, jnp.float32, 128), dict(is_causal=True), 'xla'),       # T != S
    ('cpu', (256, 32, jnp.float32), dict(is_causal=True, positions=True), 'xla'),   # cache
    ('cpu', (256, 32, jnp.float32), dict(is_causal=True, segments=True), 'xla'),    # packed
    ('cpu', (256, 32, jnp.float32), dict(is_causal=True, local_window=(63, 0)), 'xla'),
    ('cpu', (256, 32, jnp.float32), dict(is_causal=True, soft_cap=True), 'xla'),
    ('cpu', (256, 32, jnp.float32), dict(is_causal=True, mask=True), 'xla'),
    ('gpu', (256, 32, jnp.float32), dict(is_causal=True), 'xla'),            # dense: CPU only
    ('gpu', (256, 64, jnp.bfloat16), dict(is_causal=True), 'cudnn'),
    ('gpu', (256, 64, jnp.float16), dict(is_causal=True, local_window=(63, 0)), 'cudnn'),
    ('gpu', (256, 64, jnp.bfloat16), dict(local_window=(8, 8)), 'xla'),      # window: causal only
    ('gpu', (256, 64, jnp.float32), dict(is_causal=True), 'xla'),            # fp32: no cuDNN
    ('gpu', (1024, 64, jnp.float32), dict(is_causal=True), 'blockwise'),
    ('gpu', (256, 192, jnp.bfloat16), dict(is_causal=True), 'xla'),          # head_dim > 128
    ('gpu', (256, 64, jnp.bfloat16), dict(is_causal=True, positions=True), 'xla'),   # packed/
    ('gpu', (256, 64, jnp.bfloat16), dict(is_causal=True, segments=True), 'xla'),    # cached
    ('gpu', (2048, 64, jnp.bfloat16), dict(is_causal=True, positions=True), 'blockwise'),
    ('gpu', (256, 64, jnp.bfloat16), dict(is_causal=True, soft_cap=True), 'xla'),
    ('gpu', (256, 64, jnp.bfloat16), dict(is_causal=True, mask=True, lengths=True), 'cudnn'),
    ('tpu', (256, 128, jnp.bfloat16), dict(is_causal=True), 'splash'),
    ('tpu', (512, 128, jnp.float32), dict(is_causal=True, local_window=(127, 0)), 'splash'),
    ('tpu', (512, 256, jnp.bfloat16), dict(segments=True), 'splash'),
    ('tpu', (256, 128, jnp.bfloat16), dict(is_causal=True, soft_cap=True), 'splash'),
    ('tpu', (200, 128, jnp.bfloat16), dict(is_causal=True), 'xla'),          # T % 128
    ('tpu', (256, 64, jnp.bfloat16), dict(is_causal=True), 'xla'),           # head_dim % 128
    ('tpu', (256, 128, jnp.bfloat16, 512), dict(), 'xla'),                   # T != S
    ('tpu', (256, 128, jnp.bfloat16), dict(is_causal=True, positions=True), 'xla'),
    ('tpu', (2048, 128, jnp.bfloat16), dict(is_causal=True, bias=True), 'blockwise'),
    ('tpu', (256, 128, jnp.bfloat16), dict(mask=True), 'xla'),
    ('tpu', (256, 128, jnp.bfloat16), dict(lengths=True), 'xla'),
]


@pytest.mark.parametrize('backend, shape, flags, want', AUTO_CASES)
def test_auto_choice_is_a_function_of_backend_dtype_shapes_and_arguments(backend, shape, flags,
                                                                          want):
  q, k = _shape(*shape[:2], *shape[2:3], *shape[3:])
  assert choose_implementation(q, k, backend=backend, **flags) == want
  if backend == jax.default_backend():
    assert choose_implementation(q, k, **flags) == want


def test_models_pass_default_positions_as_none(tiny_config, monkeypatch):
  """The decoder tells its attention when positions are the default 0..T-1 (no explicit
  positions reach dot_product_attention, so 'auto' can pick cuDNN / splash), and explicit
  positions equal to 0..T-1 give the same logits."""
  from flax import nnx
  from models import build_model, layers
  model = build_model(tiny_config(), nnx.Rngs(0))
  seen = []
  real = layers.dot_product_attention
  monkeypatch.setattr(layers, 'dot_product_attention', lambda *a, **kw: (
      seen.append(kw['query_positions'] is None and kw['key_positions'] is None),
      real(*a, **kw))[1])
  graphdef, params = nnx.split(model)
  forward = lambda params, *args: nnx.merge(graphdef, params)(*args)   # `seen` fills at trace
  tokens = jax.random.randint(jax.random.key(0), (2, 12), 0, 256)
  default = run_fast(forward, params, tokens)
  assert seen and all(seen)
  seen.clear()
  explicit = run_fast(forward, params, tokens, jnp.broadcast_to(jnp.arange(12), (2, 12)))
  assert seen and not any(seen)
  np.testing.assert_allclose(default, explicit, atol=1e-5, rtol=1e-5)


def test_splash_matches_xla_in_interpret_mode():
  """jax's splash kernel (Pallas interpreter on CPU) == 'xla', forward and grads (q, k, v), for
  a causal sliding window with packed segments over a GQA batch of 2, with a soft cap."""
  from models import splash
  t = 2 * splash.BLOCK
  q, k, v = qkv(2, t, t, 4, 2, 32, seed=3)
  seg = jnp.asarray(np.stack([np.repeat([0, 1], [100, t - 100]),
                              np.repeat([0, 1, 2], [60, 150, t - 210])]))
  kw = dict(is_causal=True, local_window_size=(40, 0), query_segment_ids=seg,
            key_segment_ids=seg, logits_soft_cap=5.0)

  def ours(q, k, v):
    return splash.splash_attention(q, k, v, scale=32 ** -0.5, is_causal=True,
                                   local_window=(40, 0), query_segment_ids=seg,
                                   key_segment_ids=seg, logits_soft_cap=5.0, interpret=True)

  def ref(q, k, v):
    return dot_product_attention(q, k, v, implementation='xla', **kw)

  proj = jax.random.normal(jax.random.key(9), q.shape)
  for fn in (ours, ref):
    fn.result = (fn(q, k, v), jax.grad(lambda *a: jnp.sum(fn(*a) * proj), (0, 1, 2))(q, k, v))
  for got, want in zip(jax.tree.leaves(ours.result), jax.tree.leaves(ref.result)):
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-4)
  with pytest.raises(ValueError, match="'splash' needs a TPU"):
    dot_product_attention(q, k, v, implementation='splash')


@pytest.mark.parametrize('kwargs, match', [
    (dict(query=(1, 4, 3, 8), key=(1, 4, 2, 8)), 'multiple of key/value heads'),
    (dict(key=(1, 4, 2, 4), value=(1, 4, 2, 4)), 'head_dim'),
    (dict(local_window_size=-1), 'local_window_size'),
    (dict(local_window_size=(2, -1)), 'local_window_size'),
    (dict(implementation='flash'), "implementation='flash' is unknown"),
    (dict(implementation='cudnn'), "implementation='cudnn' needs a GPU"),
    (dict(mask=np.ones((1, 1, 4, 4), np.float32)), 'mask must be boolean'),
    (dict(bias=np.ones((1, 3, 4, 4), np.float32)), 'bias must be 4-D and broadcastable'),
    (dict(query_seq_lengths=np.ones((2,), np.int32)), 'query_seq_lengths'),
    (dict(key_positions=np.ones((1, 5), np.int32)), 'key_positions'),
    (dict(block_q=0), 'block_q'),
])
def test_bad_arguments_raise_one_clear_error(kwargs, match):
  shapes = dict(query=(1, 4, 4, 8), key=(1, 4, 2, 8), value=(1, 4, 2, 8))
  arrays = {name: jnp.zeros(kwargs.pop(name, shape)) for name, shape in shapes.items()}
  kwargs = {name: jnp.asarray(x) if isinstance(x, np.ndarray) else x for name, x in kwargs.items()}
  with pytest.raises(ValueError, match=match):
    dot_product_attention(**arrays, **kwargs)


SHARDED = textwrap.dedent('''
    import os
    os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=8'
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from models.attention import dot_product_attention
    mesh = jax.make_mesh((4, 2), ('data', 'tensor'), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    ks = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(ks[0], (8, 24, 4, 8))
    k, v = (jax.random.normal(x, (8, 24, 2, 8)) for x in ks[1:])
    loss = lambda q, k, v, impl: jnp.sum(jnp.sin(dot_product_attention(
        q, k, v, is_causal=True, local_window_size=(6, 0), implementation=impl, block_q=8,
        block_kv=8)))
    f = jax.jit(jax.value_and_grad(loss, (0, 1, 2)), static_argnums=3)
    sh = NamedSharding(mesh, P('data', None, 'tensor', None))
    want = f(q, k, v, 'xla')
    got = f(*(jax.device_put(x, sh) for x in (q, k, v)), 'blockwise')
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_allclose(a, b, atol=1e-4)
    assert got[1][0].sharding.spec[0] == 'data', got[1][0].sharding
    print('ok')
''')


def test_sharded_over_batch_and_heads():
  """8 simulated devices, batch over 'data' and heads over 'tensor': same loss and grads."""
  env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  result = subprocess.run([sys.executable, '-c', SHARDED], env=env, capture_output=True,
                          text=True, timeout=300)
  assert result.returncode == 0 and 'ok' in result.stdout, result.stderr[-3000:]


@pytest.mark.parametrize('overrides', [
    {}, {'model.sliding_window': 5, 'model.window_pattern': 'LG', 'model.num_kv_heads': 1,
         # Gemma 2's fields (soft-capped attention logits through blockwise's custom VJP)
         'model.norm_position': 'sandwich', 'model.norm_scale_plus_one': True,
         'model.attn_logit_softcap': 0.5, 'model.final_logit_softcap': 2.0,
         'model.query_pre_attn_scalar': 3.0, 'model.mlp_activation': 'geglu',
         'model.scale_embeddings': True}])
def test_model_logits_and_grads_equal_across_implementations(tiny_config, overrides):
  """Tiny decoder: 'blockwise' (tiles of 8, several per sequence) == 'xla' for logits and every
  parameter gradient (of a loss over packed rows with segment ids)."""
  from flax import nnx
  from models import build_model
  tokens = jax.random.randint(jax.random.key(0), (2, 29), 0, 256)
  segments = jnp.asarray(np.repeat([[0, 1, 2]], 2, 0).repeat([10, 12, 7], axis=1))
  results = []
  for impl in ('blockwise', 'xla'):
    cfg = tiny_config(dict(overrides, **{'model.attention': impl, 'model.attention_block_q': 8,
                                         'model.attention_block_kv': 8}))
    graphdef, params = nnx.split(build_model(cfg, nnx.Rngs(0)), nnx.Param)

    def fn(params, tokens, segments, graphdef=graphdef):
      loss = lambda p: jnp.mean(nnx.merge(graphdef, p)(tokens, segment_ids=segments) ** 2)
      return nnx.merge(graphdef, params)(tokens), jax.grad(loss)(params)
    results.append(run_fast(fn, params, tokens, segments))
  for a, b in zip(jax.tree.leaves(results[0]), jax.tree.leaves(results[1])):
    np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4)


def test_window_pattern_cycles_over_layers(tiny_config):
  from configs import schema
  from models.config import ModelConfig
  from models.decoder import layer_window
  cfg = tiny_config({'model.sliding_window': 7, 'model.window_pattern': 'LLG',
                     'model.num_layers': 5})
  schema.validate(cfg)
  typed = ModelConfig.from_config(cfg.model)
  assert [layer_window(typed, i) for i in range(5)] == [7, 7, None, 7, 7]
  cfg = tiny_config({'model.sliding_window': 7})
  assert [layer_window(ModelConfig.from_config(cfg.model), i) for i in range(2)] == [7, 7]
  for bad, match in (({'model.sliding_window': 7, 'model.window_pattern': 'LX'},
                      'model.window_pattern'),
                     ({'model.window_pattern': 'LG'}, 'model.sliding_window is None')):
    with pytest.raises(schema.ConfigError, match=match):
      schema.validate(tiny_config(bad))


@pytest.mark.skipif(jax.default_backend() != 'gpu', reason='cuDNN attention needs a GPU')
def test_cudnn_matches_xla_on_gpu():
  """GPU only: 'cudnn' and None (auto, which picks cudnn here) == 'xla' in bf16, causal GQA with
  a window and key lengths, forward and grads."""
  q, k, v = qkv(2, 256, 256, 8, 2, 64, jnp.bfloat16, seed=5)
  assert choose_implementation(q, k, is_causal=True) == 'cudnn'
  lengths = jnp.asarray([256, 200], jnp.int32)

  def fn(impl):
    loss = lambda q, k, v: jnp.sum(dot_product_attention(
        q, k, v, is_causal=True, local_window_size=(63, 0), key_value_seq_lengths=lengths,
        implementation=impl).astype(jnp.float32) ** 2)
    return jax.jit(jax.value_and_grad(loss, (0, 1, 2)))(q, k, v)

  want = fn('xla')
  for impl in ('cudnn', None):
    for a, b in zip(jax.tree.leaves(fn(impl)), jax.tree.leaves(want)):
      a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
      assert np.max(np.abs(a - b)) <= 0.05 * max(1.0, np.max(np.abs(b))), impl


@pytest.mark.skipif(jax.default_backend() != 'gpu', reason='cuDNN attention needs a GPU')
def test_cudnn_with_packed_segments_matches_xla_on_gpu():
  """GPU only: packed rows (segment ids, positions restarting per segment) through 'cudnn'
  (folded into its mask) == 'xla' in bf16, causal GQA, forward and grads."""
  q, k, v = qkv(2, 256, 256, 8, 2, 64, jnp.bfloat16, seed=6)
  seg = jnp.asarray(_packed_ids(np.random.default_rng(6), 2, 256, [90, 40, 100]))
  pos = jnp.asarray(np.stack([np.concatenate([np.arange((r == i).sum()) for i in np.unique(r)])
                              for r in np.asarray(seg)]))

  def fn(impl):
    loss = lambda q, k, v: jnp.sum(dot_product_attention(
        q, k, v, is_causal=True, query_segment_ids=seg, key_segment_ids=seg,
        query_positions=pos, key_positions=pos, implementation=impl).astype(jnp.float32) ** 2)
    return jax.jit(jax.value_and_grad(loss, (0, 1, 2)))(q, k, v)

  want = fn('xla')
  for a, b in zip(jax.tree.leaves(fn('cudnn')), jax.tree.leaves(want)):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    assert np.max(np.abs(a - b)) <= 0.05 * max(1.0, np.max(np.abs(b)))
