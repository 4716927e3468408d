"""The KV cache and the cached sampler against the full forward pass and the reference generator.

Independent references: the model's own uncached forward pass over the whole sequence (logits at
every decode step), sampling/reference.py (full recompute per token), numpy top-k / top-p
filtering and a chi-square test of sampled frequencies.
"""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
from flax import nnx

from configs import default
from models import build_model, kv_cache
from sampling import sampler as sampler_lib
from sampling.reference import generate_reference
from sampling.rules import sample_tokens
from sampling.sampler import Sampler, stream_text
from text.tokenizer import ByteTokenizer
from tests.test_sampling_rules import numpy_filter

ATOL = 1e-4


def split_model(config):
  model = build_model(config, nnx.Rngs(0))
  return nnx.split(model, nnx.Param)


def cached_logits(graphdef, params, tokens, lengths, new_tokens, cache_len):
  """Prefill the left-padded prompts, then feed `new_tokens` [B, n] one step at a time.

  Returns (prefill logits at each row's last prompt token [B, V], step logits [B, n, V]).
  """
  b, p = tokens.shape
  positions = jnp.arange(p)[None] - (p - lengths)[:, None]
  positions = jnp.where(positions >= 0, positions, -1)

  @jax.jit
  def run(params, tokens, positions, new_tokens):
    model = nnx.merge(graphdef, params)
    logits, cache = model(tokens, positions, cache=model.init_cache(b, cache_len))

    def step(cache, xs):
      i, token = xs
      pos = lengths + i
      out, cache = model(token[:, None], pos[:, None], cache=cache, cache_index=p + i)
      return cache, out[:, 0]

    n = new_tokens.shape[1]
    _, steps = jax.lax.scan(step, cache, (jnp.arange(n), new_tokens.T))
    return logits[:, -1], steps.transpose(1, 0, 2)

  return run(params, tokens, positions, new_tokens)


CASES = {   # name: (config overrides, prompt lengths, decode steps, cache slots)
    'mha': ({'model.num_kv_heads': 4}, (5, 9, 12), 12, 32),
    'gqa': ({'model.num_kv_heads': 2}, (5, 9, 12), 12, 32),
    'mqa': ({'model.num_kv_heads': 1}, (5, 9, 12), 12, 32),
    'rope_scaled': ({'model.rope_scaling.kind': 'linear', 'model.rope_scaling.factor': 4.0},
                    (3, 16, 7), 12, 32),
    'learned': ({'model.positional': 'learned'}, (4, 11, 8), 12, 32),
    'sinusoidal': ({'model.positional': 'sinusoidal', 'model.norm_position': 'post'},
                   (4, 11, 8), 12, 32),
    # window 6: prompts shorter and longer than W, then 40 steps: the ring wraps many times
    'sliding_window': ({'model.sliding_window': 6}, (3, 10, 6), 40, 64),
    # Gemma 2's fields: local/global layers, sandwich norms, soft-capped attention and output
    'gemma2': ({'model.sliding_window': 6, 'model.window_pattern': 'LG',
                'model.norm_position': 'sandwich', 'model.norm_scale_plus_one': True,
                'model.attn_logit_softcap': 0.5, 'model.final_logit_softcap': 0.3,
                'model.query_pre_attn_scalar': 3.0, 'model.mlp_activation': 'geglu',
                'model.scale_embeddings': True}, (3, 10, 6), 20, 64),
    # past 128 slots, in a cache with many empty slots (masked)
    'long': ({'model.num_kv_heads': 1}, (100, 120, 60), 40, 256),
}


@pytest.mark.parametrize('case', CASES)
def test_decode_logits_equal_full_forward(tiny_config, case):
  overrides, lengths, n, cache_len = CASES[case]
  graphdef, params = split_model(tiny_config(overrides))
  rng = np.random.RandomState(0)
  b, p = len(lengths), max(lengths)
  seqs = rng.randint(0, 256, (b, p + n)).astype(np.int32)
  full = np.asarray(jax.jit(lambda prm, x: nnx.merge(graphdef, prm)(x))(params, seqs))
  tokens = np.zeros((b, p), np.int32)
  new = np.zeros((b, n), np.int32)
  for row, length in enumerate(lengths):
    tokens[row, p - length:] = seqs[row, :length]
    new[row] = seqs[row, length:length + n]
  first, steps = cached_logits(graphdef, params, jnp.asarray(tokens), jnp.asarray(lengths),
                               jnp.asarray(new), cache_len)
  for row, length in enumerate(lengths):
    np.testing.assert_allclose(first[row], full[row, length - 1], atol=ATOL, rtol=0)
    np.testing.assert_allclose(steps[row], full[row, length:length + n], atol=ATOL, rtol=0)
  assert np.abs(full).max() > 0.05    # logits are not all ~0, so the comparison means something


def test_ring_cache_holds_window_slots_and_positions():
  cache = kv_cache.init(2, 64, 2, 8, window=4)
  assert cache.k.shape == (2, 2, 8, 4) and cache.v.shape == (2, 2, 4, 8)   # [B, K, H, W], [B, K, W, H]
  assert cache.pos.shape == (2, 4)
  k = jnp.arange(7, dtype=jnp.float32)[None, :, None, None] * jnp.ones((2, 7, 2, 8))
  cache = kv_cache.prefill(cache, k, k, jnp.broadcast_to(jnp.arange(7), (2, 7)))
  np.testing.assert_array_equal(cache.pos[0], [4, 5, 6, 3])      # slot = position % 4
  np.testing.assert_array_equal(cache.k[0, 0, 0, :], [4, 5, 6, 3])
  np.testing.assert_array_equal(cache.v[0, 0, :, 0], [4, 5, 6, 3])
  one = jnp.full((2, 1, 2, 8), 7.0)
  cache = kv_cache.append(cache, one, one, jnp.full((2, 1), 7), jnp.int32(7))
  np.testing.assert_array_equal(cache.pos[0], [4, 5, 6, 7])


def test_cache_bytes_scale_with_kv_heads(tiny_config):
  def cache_bytes(overrides):
    model = build_model(tiny_config(overrides), nnx.Rngs(0))
    cache = jax.eval_shape(lambda: model.init_cache(2, 256))
    return sum(x.size * x.dtype.itemsize for c in cache for x in (c.k, c.v))

  assert cache_bytes({'model.num_kv_heads': 4}) == 4 * cache_bytes({'model.num_kv_heads': 1})
  assert cache_bytes({'model.num_kv_heads': 4}) == 2 * cache_bytes({'model.num_kv_heads': 2})
  assert cache_bytes({'model.sliding_window': 16}) * 16 == cache_bytes({}) * 1


@pytest.mark.parametrize('window, cap', [(None, None), (None, 0.7), (5, None)])
def test_attend_on_stored_layout_equals_dot_product_attention(window, cap):
  """`attend`'s reference path on the cache's own layout (keys [B, K, H, S]) == the
  'blockwise' kernel over the same keys in the [B, S, K, H] layout: left padding, empty slots,
  the window and the soft cap all respected."""
  b, n, k, h, slots, p = 2, 4, 2, 8, 24, 13
  keys = jax.random.split(jax.random.key(1), 4)
  lengths = jnp.array([6, 13])
  positions = jnp.arange(p)[None] - (p - lengths)[:, None]
  positions = jnp.where(positions >= 0, positions, -1)
  cache = kv_cache.init(b, slots, k, h, window=window)
  cache = kv_cache.prefill(cache, jax.random.normal(keys[0], (b, p, k, h)),
                           jax.random.normal(keys[1], (b, p, k, h)), positions)
  kv = jax.random.normal(keys[2], (2, b, 1, k, h))
  cache = kv_cache.append(cache, kv[0], kv[1], lengths[:, None], jnp.int32(p))
  q = jax.random.normal(keys[3], (b, 1, n, h))
  kw = dict(window=window, logits_soft_cap=cap, scale=0.3)
  got = kv_cache.attend(q, lengths[:, None], cache, **kw)
  want = kv_cache.attend(q, lengths[:, None], cache, implementation='blockwise', **kw)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
  padding = kv_cache.attend(q, jnp.full((b, 1), -1), cache, **kw)   # attends to nothing
  np.testing.assert_array_equal(padding, 0.0)


def test_grow_keeps_every_token_in_its_slot():
  b, k, h, p = 2, 2, 8, 10
  keys = jax.random.split(jax.random.key(2), 3)
  positions = jnp.broadcast_to(jnp.arange(p), (b, p))
  cache = kv_cache.prefill(kv_cache.init(b, 16, k, h), jax.random.normal(keys[0], (b, p, k, h)),
                           jax.random.normal(keys[1], (b, p, k, h)), positions)
  grown = kv_cache.grow(cache, kv_cache.init(b, 40, k, h))
  assert grown.size == 40
  np.testing.assert_array_equal(grown.k[..., :16], cache.k)
  np.testing.assert_array_equal(grown.v[:, :, :16], cache.v)
  np.testing.assert_array_equal(grown.pos[:, :16], cache.pos)
  assert np.all(np.asarray(grown.pos[:, 16:]) == -1)
  q = jax.random.normal(keys[2], (b, 1, 4, h))
  np.testing.assert_allclose(kv_cache.attend(q, positions[:, -1:], grown),
                             kv_cache.attend(q, positions[:, -1:], cache), atol=1e-6, rtol=0)
  ring = kv_cache.init(b, 64, k, h, window=8)
  assert kv_cache.grow(ring, kv_cache.init(b, 128, k, h, window=8)) is ring
  with pytest.raises(ValueError, match='cannot grow a cache of 40 slots to 16'):
    kv_cache.grow(grown, cache)


def test_view_sizes():
  assert kv_cache.view_sizes(64) == [64]
  assert kv_cache.view_sizes(1024) == [128, 256, 384, 512, 640, 896, 1024]
  assert kv_cache.view_sizes(300) == [128, 256, 300]


# --- the sampler -----------------------------------------------------------------------------

@pytest.fixture(scope='module')
def tiny_model():
  return split_model(default.get_config('tiny'))


def test_greedy_equals_reference_generator(tiny_model):
  graphdef, params = tiny_model
  prompts = np.random.RandomState(1).randint(0, 256, (3, 11)).astype(np.int32)
  ref = np.asarray(generate_reference(graphdef, params, jnp.asarray(prompts), jax.random.key(0),
                                      max_new_tokens=40))[:, 11:]
  out = Sampler(graphdef, params, max_len=256, chunk=7).generate(list(prompts), max_new_tokens=40)
  np.testing.assert_array_equal(np.stack(out), ref)


def test_cache_grows_between_chunks_and_greedy_still_equals_reference(tiny_model):
  """A long generation grows the cache (128 -> 256 slots: prompt bucket 64 + 100 tokens) between
  chunks; the tokens equal the full recompute's."""
  graphdef, params = tiny_model
  prompts = np.random.RandomState(7).randint(0, 256, (2, 50)).astype(np.int32)
  ref = np.asarray(generate_reference(graphdef, params, jnp.asarray(prompts), jax.random.key(0),
                                      max_new_tokens=100))[:, 50:]
  grown = []
  real_grow = sampler_lib.grow_cache

  def spy(*args, cache_len, **kwargs):
    grown.append(cache_len)
    return real_grow(*args, cache_len=cache_len, **kwargs)

  sampler_lib.grow_cache = spy
  try:
    out = Sampler(graphdef, params, max_len=256, chunk=16).generate(list(prompts),
                                                                   max_new_tokens=100)
  finally:
    sampler_lib.grow_cache = real_grow
  assert grown == [256]
  np.testing.assert_array_equal(np.stack(out), ref)


def test_mixed_length_batch_equals_each_prompt_alone(tiny_model):
  graphdef, params = tiny_model
  rng = np.random.RandomState(2)
  prompts = [rng.randint(0, 256, n).astype(np.int32) for n in (3, 17, 9)]
  out = Sampler(graphdef, params, max_len=256, chunk=8).generate(prompts, max_new_tokens=20)
  for prompt, got in zip(prompts, out):
    ref = generate_reference(graphdef, params, jnp.asarray(prompt[None]), jax.random.key(0),
                             max_new_tokens=20)
    np.testing.assert_array_equal(got, np.asarray(ref)[0, prompt.size:])


def test_stop_tokens_and_max_new_tokens_per_row(tiny_model):
  graphdef, params = tiny_model
  sampler = Sampler(graphdef, params, max_len=256, chunk=4)
  prompts = list(np.random.RandomState(3).randint(0, 256, (3, 6)).astype(np.int32))
  free = sampler.generate(prompts, max_new_tokens=24)
  eos = int(free[0][5])                  # row 0 makes this token at step 5 (maybe earlier too)
  stopped = sampler.generate(prompts, max_new_tokens=24, eos_id=eos)
  for full, got in zip(free, stopped):
    cut = np.flatnonzero(full == eos)
    np.testing.assert_array_equal(got, full[:cut[0]] if cut.size else full)
  assert stopped[0].size <= 5
  per_row = sampler.generate(prompts, max_new_tokens=[3, 0, 24])
  assert [r.size for r in per_row] == [3, 0, 24]
  np.testing.assert_array_equal(per_row[2], free[2])
  assert all(r.size == 0 for r in sampler.generate(prompts, max_new_tokens=0))


def test_seeded_and_independent_of_chunk_size(tiny_model):
  graphdef, params = tiny_model
  prompts = list(np.random.RandomState(4).randint(0, 256, (2, 5)).astype(np.int32))
  kw = dict(max_new_tokens=30, temperature=1.0, top_p=0.9, seed=7)
  a = Sampler(graphdef, params, max_len=256, chunk=4).generate(prompts, **kw)
  b = Sampler(graphdef, params, max_len=256, chunk=16).generate(prompts, **kw)
  c = Sampler(graphdef, params, max_len=256, chunk=4).generate(prompts, **dict(kw, seed=8))
  np.testing.assert_array_equal(np.stack(a), np.stack(b))
  assert not np.array_equal(np.stack(a), np.stack(c))


@pytest.mark.parametrize('top_k, top_p', [(3, 1.0), (0, 0.3), (8, 0.5)])
def test_top_k_top_p_never_emit_excluded_tokens(tiny_config, top_k, top_p):
  # A larger init makes the next-token distributions peaked, so the filters really exclude.
  graphdef, params = split_model(tiny_config({'model.init_std': 0.5}))
  prompts = np.random.RandomState(5).randint(0, 256, (4, 6)).astype(np.int32)
  out = np.stack(Sampler(graphdef, params, max_len=256).generate(
      list(prompts), max_new_tokens=24, temperature=1.0, top_k=top_k, top_p=top_p, seed=1))
  seqs = np.concatenate([prompts, out], axis=1)
  logits = np.asarray(nnx.merge(graphdef, params)(jnp.asarray(seqs)))
  excluded_somewhere = False
  for row in range(seqs.shape[0]):
    for t in range(out.shape[1]):
      allowed = np.isfinite(numpy_filter(logits[row, 5 + t], top_k, top_p))
      assert allowed[out[row, t]], (row, t)
      excluded_somewhere |= not allowed.all()
  assert excluded_somewhere


@pytest.mark.parametrize('temperature, top_k, top_p', [(1.0, 0, 1.0), (0.7, 0, 1.0),
                                                       (1.0, 4, 1.0), (1.0, 0, 0.8)])
def test_sampled_frequencies_match_distribution(temperature, top_k, top_p):
  logits = np.array([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0], np.float32)
  n = 40_000
  tokens = sample_tokens(jax.random.key(0), jnp.broadcast_to(jnp.asarray(logits), (n, 8)),
                         temperature, top_k, top_p)
  counts = np.bincount(np.asarray(tokens), minlength=8)
  kept = numpy_filter(logits / temperature, top_k, top_p).astype(np.float64)
  probs = np.exp(kept - kept[np.isfinite(kept)].max())
  probs /= probs.sum()
  assert counts[probs == 0].sum() == 0
  nz = probs > 0
  result = scipy.stats.chisquare(counts[nz], n * probs[nz])
  assert result.pvalue > 1e-3, (counts, n * probs)


def test_no_recompilation_within_a_prompt_bucket(tiny_model):
  graphdef, params = tiny_model
  sampler = Sampler(graphdef, params, max_len=256, chunk=8, min_bucket=16)
  rng = np.random.RandomState(6)
  sampler.generate([rng.randint(0, 256, 9)], max_new_tokens=20)   # compiles (or finds) them
  sizes = (sampler_lib.prefill._cache_size(), sampler_lib.decode_program()._cache_size())
  for n in (10, 12, 13, 16):
    sampler.generate([rng.randint(0, 256, n)], max_new_tokens=20, temperature=0.5, top_k=n)
  assert (sampler_lib.prefill._cache_size(), sampler_lib.decode_program()._cache_size()) == sizes


def test_decode_updates_the_cache_in_place(tiny_model):
  """The compiled decode loop holds no copy of a cache buffer (it would cost O(L) a token)."""
  graphdef, params = tiny_model
  state, _ = sampler_lib.prefill(
      graphdef, params, jnp.zeros((1, 16), jnp.int32), jnp.array([10]), jnp.array([50]),
      jnp.array([-1]), sampler_lib.SamplingControls(temperature=jnp.float32(0),
                                                    top_k=jnp.int32(0), top_p=jnp.float32(1)),
      jnp.int32(0), cache_len=512)
  hlo = sampler_lib.decode_program().lower(graphdef, params, state, chunk=8).compile().as_text()
  shapes = {'f32[1,2,16,512]', 'f32[1,2,512,16]', 's32[1,512]'}   # k, v, pos
  assert 'f32[1,2,16,512]' in hlo and 'f32[1,2,512,16]' in hlo
  copies = [line for line in hlo.splitlines()
            if re.search(r'= (\S+?)\{[^}]*\} copy(-start)?\(', line)
            and re.search(r'= (\S+?)\{', line).group(1) in shapes]
  assert not copies, copies[:3]


@pytest.mark.parametrize('kwargs, message', [
    (dict(prompts=[[1, 2], []]), 'prompt 1 is empty'),
    (dict(prompts=[]), 'prompts is empty'),
    (dict(prompts=[list(range(250))], max_new_tokens=10), 'exceeds the model maximum length'),
    (dict(max_new_tokens=-1), 'max_new_tokens=-1'),
    (dict(top_p=0.0), r'top_p=0.0: must be in \(0, 1\]'),
    (dict(top_p=1.5), r'top_p=1.5'),
    (dict(temperature=-1.0), 'temperature=-1.0'),
    (dict(top_k=-2), 'top_k=-2'),
])
def test_bad_requests_raise_clear_errors(tiny_model, kwargs, message):
  graphdef, params = tiny_model
  kwargs = dict(dict(prompts=[[1, 2, 3]], max_new_tokens=4), **kwargs)
  prompts = kwargs.pop('prompts')
  with pytest.raises(ValueError, match=message):
    Sampler(graphdef, params, max_len=256).generate(prompts, **kwargs)


def test_stream_text_holds_back_split_characters():
  """sample.py's streaming: chunks that split multi-byte UTF-8 characters print cleanly."""
  data = 'héllo wörld 🙂 done'.encode()
  ids = np.frombuffer(data, np.uint8).astype(np.int32)
  chunks = [np.stack([ids[i:i + 3], np.full(len(ids[i:i + 3]), 7)]) for i in range(0, len(ids), 3)]
  chunks.append(np.full((2, 4), -1, np.int32))      # a finished row makes no tokens
  pieces = list(stream_text(ByteTokenizer().decode, chunks))
  assert ''.join(pieces) == data.decode()
  assert len(pieces) > 3 and not any('\ufffd' in p for p in pieces)


DECODE_KERNEL_CASES = [   # (backend, T, window, filled known, soft cap, cache slots, head_dim, impl)
    ('gpu', 1, None, True, False, 256, 64, None, True),
    ('gpu', 1, None, True, False, 384, 32, 'auto', True),
    ('cpu', 1, None, True, False, 256, 64, None, False),
    ('tpu', 1, None, True, False, 256, 64, None, False),
    ('gpu', 4, None, True, False, 256, 64, None, False),      # several tokens: the views path
    ('gpu', 1, 64, True, False, 64, 64, None, False),         # ring cache
    ('gpu', 1, None, False, False, 256, 64, None, False),     # prefill: filled unknown
    ('gpu', 1, None, True, True, 256, 64, None, False),       # soft cap
    ('gpu', 1, None, True, False, 200, 64, None, False),      # slots % 128
    ('gpu', 1, None, True, False, 256, 40, None, False),      # head_dim % 16
    ('gpu', 1, None, True, False, 256, 64, 'xla', False),     # an explicit implementation
]


@pytest.mark.parametrize('backend, t, window, filled, cap, slots, h, impl, want',
                         DECODE_KERNEL_CASES)
def test_gpu_decode_kernel_choice(backend, t, window, filled, cap, slots, h, impl, want):
  q = jax.ShapeDtypeStruct((2, t, 8, h), jnp.bfloat16)
  cache = jax.eval_shape(lambda: kv_cache.init(2, slots, 2, h, jnp.bfloat16, window=window))
  assert kv_cache.decode_kernel_supported(q, cache, backend=backend, window=window, filled=filled,
                                          soft_cap=cap, implementation=impl) == want


def test_gpu_decode_kernel_matches_attend_in_interpret_mode():
  """jax's Pallas GPU decode kernel (interpreted on CPU) over a left-padded, partly filled cache
  == `attend`'s reference path: padding, empty slots and the filled length all respected."""
  b, n, k, h, slots = 2, 4, 2, 16, 128
  keys = jax.random.split(jax.random.key(0), 4)
  lengths = jnp.array([40, 70])
  p = 70
  positions = jnp.arange(p)[None] - (p - lengths)[:, None]
  positions = jnp.where(positions >= 0, positions, -1)
  cache = kv_cache.prefill(kv_cache.init(b, slots, k, h), jax.random.normal(keys[0], (b, p, k, h)),
                           jax.random.normal(keys[1], (b, p, k, h)), positions)
  for i in range(3):   # three decode tokens
    kv = jax.random.normal(jax.random.fold_in(keys[2], i), (2, b, 1, k, h))
    cache = kv_cache.append(cache, kv[0], kv[1], (lengths + i)[:, None], jnp.int32(p + i))
  q = jax.random.normal(keys[3], (b, 1, n, h))
  want = kv_cache.attend(q, (lengths + 2)[:, None], cache, filled=jnp.int32(p + 3))
  got = kv_cache.decode_kernel(q, cache, jnp.int32(p + 3), scale=h ** -0.5, interpret=True)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_precompiled_programs_give_the_same_tokens_and_nothing_compiles_after(tiny_model):
  """`Sampler.compile` against abstract parameters (as sample.py does before restoring) builds
  every program a request runs, including each grown cache length: generating then compiles
  nothing and makes the plain jit path's tokens."""
  graphdef, params = tiny_model
  prompts = [np.random.RandomState(9).randint(0, 256, n) for n in (5, 40)]
  kw = dict(max_new_tokens=150, temperature=0.7, top_k=20, seed=3)
  plain = Sampler(graphdef, params, max_len=256, chunk=16).generate(prompts, **kw)
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), params)
  sampler = Sampler(graphdef, abstract, max_len=256, chunk=16)
  p, lengths = sampler.schedule(40, 150)
  assert p == 64 and lengths == [128, 256]   # so a grow_cache runs
  compiles = []
  jax.monitoring.register_event_duration_secs_listener(
      lambda event, _, **kw: compiles.append(event)
      if event == '/jax/core/compile/backend_compile_duration' else None)
  jax.clear_caches()
  sampler.compile(2, 40, 150)
  assert len(compiles) == 4   # prefill, decode at 128, grow to 256, decode at 256
  sampler.params = params
  out = sampler.generate(prompts, **kw)
  assert len(compiles) == 4
  for a, b in zip(out, plain):
    np.testing.assert_array_equal(a, b)

