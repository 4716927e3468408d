"""Attention implementations against `jax.nn.dot_product_attention` and explicit masks.

The reference repeats K/V for GQA itself (`jnp.repeat`); masks used to decide which rows are
empty are rebuilt here in numpy from the definitions, independently of models/attention.py.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import blockwise
from models.attention import choose_implementation, dot_product_attention

FWD_TOL, GRAD_TOL = 2e-5, 1e-4
BF16_TOL = 3e-2   # bf16 inputs, fp32 accumulation: vs the fp32 result on the same rounded inputs
# Compiling dominates these tests on CPU; LLVM's optimisation level barely matters for tiny
# shapes and compiles ~3x faster at 0.
FAST_COMPILE = {'xla_backend_optimization_level': 0, 'xla_llvm_disable_expensive_passes': True}


def run_fast(fn, *args):
  """jax.jit(fn)(*args), compiled with FAST_COMPILE."""
  return jax.jit(fn).lower(*args).compile(compiler_options=FAST_COMPILE)(*args)


def random_case(rng, index):
  """One random problem: shapes, masking features and small tiles (several per axis)."""
  k = int(rng.choice([1, 2]))
  g = int(rng.choice([1, 2, 3]))
  t = int(rng.integers(1, 40))
  s = t if rng.random() < 0.5 else int(rng.integers(1, 40))
  c = dict(b=int(rng.choice([1, 2])), t=t, s=s, k=k, n=k * g, h=int(rng.choice([4, 8])),
           causal=bool(rng.random() < 0.5), block_q=int(rng.integers(2, 12)),
           block_kv=int(rng.integers(2, 12)), seed=index)
  c['window'] = [None, None, int(rng.integers(0, 6)),
                 (int(rng.integers(0, 8)), int(rng.integers(0, 4)))][index % 4]
  c['q_len'] = bool(rng.random() < 0.3)
  c['kv_len'] = bool(rng.random() < 0.3)
  c['mask'] = [None, (1, 1, 1, 1), (2, 1, 1, 1), (2, 2, 1, 1)][int(rng.integers(0, 4))]
  c['bias'] = [None, (1, 1, 1, 1), (2, 2, 1, 1), (1, 2, 1, 0)][int(rng.integers(0, 4))]
  return c


def make_inputs(c, dtype=jnp.float32):
  """Arrays for case c; mask/bias shape codes: 1 = full along that axis (B, N, T, S), 0 = one."""
  rng = np.random.default_rng(c['seed'])
  b, t, s, n, k, h = c['b'], c['t'], c['s'], c['n'], c['k'], c['h']
  full = (b, n, t, s)
  q = rng.normal(size=(b, t, n, h))
  kv = rng.normal(size=(2, b, s, k, h))
  out = dict(query=q, key=kv[0], value=kv[1])
  if c['mask'] is not None:
    shape = [f if code else 1 for f, code in zip(full, c['mask'])]
    shape[2], shape[3] = t, s
    out['mask'] = rng.random(shape) < 0.8
  if c['bias'] is not None:
    shape = [f if code else 1 for f, code in zip(full, c['bias'])]
    out['bias'] = rng.normal(size=shape)
  if c['q_len']:
    out['query_seq_lengths'] = rng.integers(1, t + 1, size=b).astype(np.int32)
  if c['kv_len']:
    out['key_value_seq_lengths'] = rng.integers(1, s + 1, size=b).astype(np.int32)
  return {name: jnp.asarray(x, dtype if x.dtype == np.float64 else x.dtype)
          for name, x in out.items()}


def visible_np(c, arrays):
  """[B, N, T] bool: rows with at least one visible key, from the definitions (numpy)."""
  return mask_np(c, arrays).any(-1)


def mask_np(c, arrays):
  """[B, N, T, S] bool: which keys each query sees, from the definitions (numpy)."""
  b, t, s, n = c['b'], c['t'], c['s'], c['n']
  qi, kj = np.arange(t)[:, None], np.arange(s)[None, :]
  m = np.ones((b, n, t, s), bool)
  if c['causal']:
    m &= kj <= qi
  if c['window'] is not None:
    left, right = (c['window'],) * 2 if isinstance(c['window'], int) else c['window']
    m &= (qi - kj <= left) & (kj - qi <= right)
  if 'mask' in arrays:
    m &= np.asarray(arrays['mask'])
  if 'key_value_seq_lengths' in arrays:
    m &= kj[None, None] < np.asarray(arrays['key_value_seq_lengths'])[:, None, None, None]
  return m


def reference(c, arrays, nonempty):
  """jax.nn.dot_product_attention with repeated K/V; rows where `nonempty` [B, T, N, 1] is False
  set to zero (our convention for rows with nothing to attend to)."""
  g = c['n'] // c['k']
  args = {name: x for name, x in arrays.items()
          if name not in ('query', 'key', 'value', 'bias')}

  def fn(query, key, value, bias=None):
    out = jax.nn.dot_product_attention(
        query, jnp.repeat(key, g, axis=2), jnp.repeat(value, g, axis=2),
        **dict(args, bias=bias), is_causal=c['causal'], local_window_size=c['window'])
    return jnp.where(nonempty, out, 0.0)
  return fn


def ours(c, arrays, implementation):
  args = {name: x for name, x in arrays.items() if name not in ('query', 'key', 'value', 'bias')}

  def fn(query, key, value, bias=None):
    return dot_product_attention(query, key, value, bias, **args, is_causal=c['causal'],
                                 local_window_size=c['window'], implementation=implementation,
                                 block_q=c['block_q'], block_kv=c['block_kv'])
  return fn


def fwd_and_grads(fn, arrays):
  """Output and the gradients of a random projection of it w.r.t. q, k, v (and bias)."""
  diff = [arrays['query'], arrays['key'], arrays['value']] + (
      [arrays['bias']] if 'bias' in arrays else [])
  proj = jax.random.normal(jax.random.key(7), arrays['query'].shape, jnp.float32)
  loss = lambda *xs: jnp.sum(fn(*xs).astype(jnp.float32) * proj)
  return fn(*diff), jax.grad(loss, argnums=tuple(range(len(diff))))(*diff)


CASES = [random_case(np.random.default_rng(1000 + i), i) for i in range(16)]


@pytest.mark.parametrize('chunk', range(4))
def test_matches_jax_reference_fp32(chunk):
  """4 random cases per compiled program (compiling dominates on CPU): GQA/MQA, odd T != S,
  causal, windows, lengths, masks, bias, several tiles per axis. 'blockwise' on every case,
  'xla' on every other one: fp32 forward <= 2e-5, grads (q, k, v, bias) <= 1e-4."""
  cases = CASES[chunk::4]
  inputs = [make_inputs(c) for c in cases]
  nonempty = [jnp.asarray(visible_np(c, a).transpose(0, 2, 1)[..., None])
              for c, a in zip(cases, inputs)]

  impls = [('blockwise', 'xla') if c['seed'] % 2 else ('blockwise',) for c in cases]

  def run(inputs, nonempty):
    return [[fwd_and_grads(fn, a) for fn in [reference(c, a, e)] + [ours(c, a, i) for i in im]]
            for c, a, e, im in zip(cases, inputs, nonempty, impls)]

  for c, im, results in zip(cases, impls, run_fast(run, inputs, nonempty)):
    (ref_out, ref_grads) = results[0]
    for name, (out, grads) in zip(im, results[1:]):
      np.testing.assert_allclose(out, ref_out, atol=FWD_TOL, rtol=0, err_msg=f'{name} {c}')
      for arg, got, want in zip('qkvb', grads, ref_grads):
        np.testing.assert_allclose(got, want, atol=GRAD_TOL, rtol=0,
                                   err_msg=f'{name} d{arg} {c}')


def full_mask_np(c, arrays):
  """`mask_np` with query lengths too: [B, N, T, S]."""
  m = mask_np(c, arrays)
  if 'query_seq_lengths' in arrays:
    m &= (np.arange(c['t'])[None, :] < np.asarray(arrays['query_seq_lengths'])[:, None])[
        :, None, :, None]
  return m


def soft_cap_reference(c, m, cap):
  """Attention with Gemma 2's logit soft-capping written out (repeated K/V, the explicit mask
  m [B, N, T, S]): softmax(cap * tanh(q.k / sqrt(H) / cap) + bias) . v."""
  g = c['n'] // c['k']

  def fn(query, key, value, bias=None):
    logits = jnp.einsum('btnh,bsnh->bnts', query, jnp.repeat(key, g, axis=2)) / np.sqrt(c['h'])
    logits = cap * jnp.tanh(logits / cap) + (0.0 if bias is None else bias)
    probs = jax.nn.softmax(jnp.where(m, logits, -1e30), axis=-1) * m.any(-1, keepdims=True)
    return jnp.einsum('bnts,bsnh->btnh', probs, jnp.repeat(value, g, axis=2))
  return fn


# Cases 6, 9, 12, 15: GQA, both window kinds, causal with T != S, query and key lengths, bias and
# none (the cap's code path; each masking feature alone is test_matches_jax_reference_fp32's).
@pytest.mark.parametrize('cases', [CASES[6:16:3]])
def test_logits_soft_cap_forward_and_grads_match_reference(cases):
  """logits_soft_cap=1.5 (strongly saturating: unit-variance logits): 'xla' and 'blockwise'
  (its custom VJP included) == the written-out formula, forward and q/k/v/bias gradients;
  and the cap really changes the result."""
  inputs = [make_inputs(c) for c in cases]
  cap = 1.5

  def capped(c, a, impl):
    args = {name: x for name, x in a.items() if name not in ('query', 'key', 'value', 'bias')}
    return lambda q, k, v, bias=None: dot_product_attention(
        q, k, v, bias, **args, is_causal=c['causal'], local_window_size=c['window'],
        implementation=impl, block_q=c['block_q'], block_kv=c['block_kv'], logits_soft_cap=cap)

  def run(inputs, masks):
    return [[fwd_and_grads(fn, a) for fn in (soft_cap_reference(c, m, cap), capped(c, a, 'xla'),
                                             capped(c, a, 'blockwise'), ours(c, a, 'xla'))]
            for c, a, m in zip(cases, inputs, masks)]

  masks = [jnp.asarray(full_mask_np(c, a)) for c, a in zip(cases, inputs)]
  for c, (want, *got, uncapped) in zip(cases, run_fast(run, inputs, masks)):
    for name, (out, grads) in zip(('xla', 'blockwise'), got):
      np.testing.assert_allclose(out, want[0], atol=FWD_TOL, rtol=0, err_msg=f'{name} {c}')
      for arg, g, w in zip('qkvb', grads, want[1]):
        np.testing.assert_allclose(g, w, atol=GRAD_TOL, rtol=0, err_msg=f'{name} d{arg} {c}')
    assert np.abs(np.asarray(uncapped[0]) - np.asarray(want[0])).max() > 1e-2


def test_logits_soft_cap_refused_by_cudnn_and_never_auto_chosen():
  q, k, v = qkv(1, 4, 4, 2, 1, 8)
  with pytest.raises(ValueError, match='logits_soft_cap'):
    dot_product_attention(q, k, v, logits_soft_cap=-1.0)
  with pytest.raises(ValueError, match="'cudnn'"):
    dot_product_attention(q, k, v, logits_soft_cap=50.0, implementation='cudnn')
  big = jnp.zeros((1, 2048, 2, 64), jnp.bfloat16)
  assert choose_implementation(big, big, is_causal=True, soft_cap=True) != 'cudnn'


def qkv(b, t, s, n, k, h, dtype=jnp.float32, seed=0):
  keys = jax.random.split(jax.random.key(seed), 3)
  return (jax.random.normal(keys[0], (b, t, n, h), dtype),
          jax.random.normal(keys[1], (b, s, k, h), dtype),
          jax.random.normal(keys[2], (b, s, k, h), dtype))


def test_bfloat16_inputs_accumulate_in_fp32():
  """bf16 q/k/v: output within BF16_TOL of the fp32 jax reference on the same (rounded)
  inputs, no worse than jax's own bf16 xla path; output dtype bf16."""
  q, k, v = qkv(2, 37, 37, 4, 2, 16, jnp.bfloat16)
  fn = lambda q, k, v: (
      dot_product_attention(q, k, v, is_causal=True, implementation='blockwise', block_q=8,
                            block_kv=16),
      jax.nn.dot_product_attention(*(x.astype(jnp.float32) for x in (q, jnp.repeat(k, 2, 2),
                                                                      jnp.repeat(v, 2, 2))),
                                   is_causal=True),
      jax.nn.dot_product_attention(q, jnp.repeat(k, 2, 2), jnp.repeat(v, 2, 2), is_causal=True))
  ours_bf16, ref32, jax_bf16 = run_fast(fn, q, k, v)
  assert ours_bf16.dtype == jnp.bfloat16
  err = float(jnp.max(jnp.abs(ours_bf16.astype(jnp.float32) - ref32)))
  jax_err = float(jnp.max(jnp.abs(jax_bf16.astype(jnp.float32) - ref32)))
  assert err <= BF16_TOL and err <= 1.5 * jax_err + 1e-3, (err, jax_err)


def test_segment_ids_and_positions_equal_explicit_masks():
  """Packed sequences: segment ids == block-diagonal mask; explicit positions (restarting per
  segment) with causal + window == the mask from the position formula; both implementations."""
  b, t, n, k, h = 2, 29, 4, 2, 8
  q, kk, v = qkv(b, t, t, n, k, h, seed=1)
  seg = np.sort(np.random.default_rng(0).integers(0, 4, size=(b, t)), axis=1)
  pos = np.stack([np.concatenate([np.arange((row == i).sum()) for i in np.unique(row)])
                  for row in seg])
  qi = pos[:, :, None]
  kj = pos[:, None, :]
  block_diag = seg[:, :, None] == seg[:, None, :]
  mask = block_diag & (kj <= qi) & (qi - kj <= 5)
  seg, pos, mask = jnp.asarray(seg), jnp.asarray(pos), jnp.asarray(mask[:, None])

  def fn(q, kk, v):
    out = []
    for impl in ('blockwise', 'xla'):
      kw = dict(implementation=impl, block_q=4, block_kv=8)
      out += [dot_product_attention(q, kk, v, query_segment_ids=seg, key_segment_ids=seg, **kw),
              dot_product_attention(q, kk, v, mask=jnp.asarray(block_diag[:, None]), **kw),
              dot_product_attention(q, kk, v, is_causal=True, local_window_size=(5, 0),
                                    query_segment_ids=seg, key_segment_ids=seg,
                                    query_positions=pos, key_positions=pos, **kw),
              dot_product_attention(q, kk, v, mask=mask, **kw)]
    return out

  outs = run_fast(fn, q, kk, v)
  for got, want in zip(outs[0::2], outs[1::2]):
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_decode_over_ring_buffer_masks_empty_slots():
  """T=1 and a prefill chunk against a cache whose slots hold positions out of order, -1 for
  empty slots: equal to attending over only the filled slots in position order."""
  b, n, k, h, slots = 2, 4, 1, 8, 12
  q, kk, v = qkv(b, 3, slots, n, k, h, seed=2)
  key_pos = jnp.asarray([[8, 9, 10, -1, 4, 5, 6, 7, -1, -1, -1, -1],
                         [12, 13, 14, 3, 4, 5, 6, 7, 8, 9, 10, 11]])
  q_pos = jnp.asarray([[8, 9, 10], [12, 13, 14]])
  window = 6

  def fn(q, kk, v):
    return [dot_product_attention(q[:, :t], kk, v, is_causal=True, local_window_size=(window, 0),
                                  query_positions=q_pos[:, :t], key_positions=key_pos,
                                  implementation=impl, block_q=2, block_kv=4)
            for t in (1, 3) for impl in ('blockwise', 'xla')]

  outs = [np.asarray(x) for x in run_fast(fn, q, kk, v)]
  qn, kn, vn, kp = (np.asarray(x, np.float64) for x in (q, kk, v, key_pos))
  for bi in range(b):
    for t, (blk, xla) in zip((1, 3), (outs[:2], outs[2:])):
      for ti in range(t):
        p = int(q_pos[bi, ti])
        keep = [j for j in np.argsort(kp[bi]) if 0 <= kp[bi, j] <= p and p - kp[bi, j] <= window]
        logits = qn[bi, ti] @ kn[bi, keep, 0].T / np.sqrt(h)            # [N, L]
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        want = (probs / probs.sum(-1, keepdims=True)) @ vn[bi, keep, 0]   # [N, H]
        np.testing.assert_allclose(blk[bi, ti], want, atol=1e-5)
        np.testing.assert_allclose(xla[bi, ti], want, atol=1e-5)


def test_vmap_and_grad_compose():
  """vmap over an extra leading axis (cond turns into select) == per-item calls, grads too."""
  q, k, v = qkv(3, 19, 19, 2, 1, 8, seed=3)
  attn = functools.partial(dot_product_attention, is_causal=True, local_window_size=4,
                           implementation='blockwise', block_q=4, block_kv=4)
  loss = lambda q, k, v: jnp.sum(jnp.sin(attn(q, k, v)))
  single = lambda q, k, v: attn(q[None], k[None], v[None])[0]
  batched_loss = lambda q, k, v: jnp.sum(jnp.sin(jax.vmap(single)(q, k, v)))

  def fn(q, k, v):
    return (jax.vmap(single)(q, k, v), attn(q, k, v),
            jax.grad(batched_loss, (0, 1, 2))(q, k, v), jax.grad(loss, (0, 1, 2))(q, k, v))

  vm, direct, g_vm, g_direct = run_fast(fn, q, k, v)
  np.testing.assert_allclose(vm, direct, atol=1e-6)
  for a, b in zip(g_vm, g_direct):
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_band_and_visible_tiles_skip_masked_tiles():
  """Causal window W: the static band covers ceil((W + bq) / bk) + 1 key tiles at most and the
  table marks exactly the tiles holding a visible pair, and those where every pair is visible
  (numpy, from the definition)."""
  t, bq, bk, left = 64, 8, 8, 11
  starts, band = blockwise.band_of(t, t, bq, bk, True, (left, 0), True)
  assert band == 3 and len(starts) == t // bq
  spec = blockwise.Spec(scale=1.0, causal=True, window=(left, 0), t=t, s=t, bq=bq, bk=bk,
                        groups=1, starts=starts, band=band)
  aux = dict(kv_limit=None, q_len=None, q_pos=None, k_pos=None, q_seg=None, k_seg=None,
             mask=None)
  kind = np.asarray(blockwise.visible_tiles(spec, aux, 1, t, t))
  qi, kj = np.arange(t)[:, None], np.arange(t)[None]
  pair = (kj <= qi) & (qi - kj <= left)
  want = pair.reshape(t // bq, bq, t // bk, bk).any((1, 3))
  np.testing.assert_array_equal(kind > 0, want)
  np.testing.assert_array_equal(kind == 2, pair.reshape(t // bq, bq, t // bk, bk).all((1, 3)))
  for i, start in enumerate(starts):   # every visible tile lies inside the band
    assert all(start <= j < start + band for j in np.nonzero(want[i])[0])
  full_starts, full_band = blockwise.band_of(t, t, bq, bk, True, None, True)
  assert full_band == t // bk


def _packed_ids(rng, b, length, sizes):
  """[B, L] segment ids 1, 2, ... of the given sizes per row, 0 (padding) after."""
  rows = []
  for _ in range(b):
    ids = np.repeat(np.arange(1, len(sizes) + 1), rng.permutation(sizes))[:length]
    rows.append(np.pad(ids, (0, length - ids.size)))
  return np.stack(rows).astype(np.int32)


def test_packed_segments_blockwise_and_xla_equal_reference_fwd_and_grads():
  """Packed rows: self attention (causal, positions restarting per segment) and cross attention
  (T != S, query and key segment ids differ; a query segment missing among the keys sees
  nothing). 'blockwise' (tiles of 4 x 8) and 'xla' == jax.nn.dot_product_attention with the
  explicit mask built in numpy, forward and grads of q, k, v and bias."""
  rng = np.random.default_rng(3)
  b, t, s, n, k, h = 2, 23, 31, 4, 2, 8
  q_seg = _packed_ids(rng, b, t, [7, 5, 6, 3])
  kv_seg = _packed_ids(rng, b, s, [9, 4, 12])      # no segment 4 among the keys
  pos = np.stack([np.concatenate([np.arange((r == i).sum()) for i in np.unique(r)]) for r in q_seg])
  self_mask = (q_seg[:, :, None] == q_seg[:, None, :]) & (pos[:, None, :] <= pos[:, :, None])
  cross_mask = q_seg[:, :, None] == kv_seg[:, None, :]
  q, kk, v = qkv(b, t, s, n, k, h, seed=4)
  bias = jnp.asarray(rng.normal(size=(1, n, t, s)), jnp.float32)
  cases = [  # (keys, values, ours kwargs, explicit mask [B, 1, T, S])
      (kk[:, :t], v[:, :t], dict(is_causal=True, query_segment_ids=q_seg, key_segment_ids=q_seg,
                                 query_positions=pos, key_positions=pos), self_mask),
      (kk, v, dict(query_segment_ids=q_seg, key_segment_ids=kv_seg), cross_mask)]

  def run(q, kk, v, bias):
    out = []
    for keys, values, kw, mask in cases:
      kw = {a: jnp.asarray(x) if isinstance(x, np.ndarray) else x for a, x in kw.items()}
      m = jnp.asarray(mask[:, None])
      nonempty = jnp.asarray(mask.any(-1))[:, :, None, None]
      sb = bias[..., :keys.shape[1]]
      g = n // k

      def ref(q, kk, vv, bb, m=m, nonempty=nonempty):
        o = jax.nn.dot_product_attention(q, jnp.repeat(kk, g, 2), jnp.repeat(vv, g, 2), bb, m)
        return jnp.where(nonempty, o, 0.0)
      fns = [ref] + [functools.partial(
          lambda q, kk, vv, bb, impl, kw: dot_product_attention(
              q, kk, vv, bb, implementation=impl, block_q=4, block_kv=8, **kw), impl=impl, kw=kw)
          for impl in ('blockwise', 'xla')]
      arrays = dict(query=q, key=keys, value=values, bias=sb)
      out.append([fwd_and_grads(f, arrays) for f in fns])
    return out

  for results in run_fast(run, q, kk, v, bias):
    (ref_out, ref_grads) = results[0]
    for out, grads in results[1:]:
      np.testing.assert_allclose(out, ref_out, atol=FWD_TOL, rtol=0)
      for got, want in zip(grads, ref_grads):
        np.testing.assert_allclose(got, want, atol=GRAD_TOL, rtol=0)


def test_segment_ids_skip_tiles_of_other_segments():
  """The tile table from segment ids: a tile is skipped exactly when no (query, key) pair in it
  shares a segment, and needs no mask exactly when every pair does (numpy, from the definition)."""
  rng = np.random.default_rng(5)
  t, bq, bk = 48, 4, 8
  seg = _packed_ids(rng, 1, t, [13, 9, 20, 4])
  spec = blockwise.Spec(scale=1.0, causal=False, window=None, t=t, s=t, bq=bq, bk=bk,
                        groups=1, starts=(0,) * (t // bq), band=t // bk)
  aux = dict(kv_limit=None, q_len=None, q_pos=None, k_pos=None, q_seg=jnp.asarray(seg),
             k_seg=jnp.asarray(seg), mask=None)
  kind = np.asarray(blockwise.visible_tiles(spec, aux, 1, t, t))
  pair = (seg[0][:, None] == seg[0][None]).reshape(t // bq, bq, t // bk, bk)
  np.testing.assert_array_equal(kind > 0, pair.any((1, 3)))
  np.testing.assert_array_equal(kind == 2, pair.all((1, 3)))
  assert (kind == 0).sum() > kind.size // 3


def test_memory_is_linear_in_length():
  """Compiled fwd+grad temp memory: blockwise stays below one [T, S] fp32 score array, while the
  reference needs several."""
  t, n, h = 2048, 2, 16
  args = [jax.ShapeDtypeStruct(s, jnp.float32) for s in ((1, t, n, h), (1, t, 1, h),
                                                          (1, t, 1, h))]

  def temp(impl):
    loss = lambda q, k, v: jnp.sum(dot_product_attention(q, k, v, is_causal=True,
                                                         implementation=impl))
    fn = jax.jit(jax.value_and_grad(loss, (0, 1, 2)))
    return fn.lower(*args).compile(FAST_COMPILE).memory_analysis().temp_size_in_bytes

  scores = t * t * 4
  blk, xla = temp('blockwise'), temp('xla')
  assert blk < scores / 4 and xla > 2 * scores, (blk, xla, scores)
