"""Blockwise attention (FlashAttention-2 style) in plain JAX: O(T) memory, masked tiles skipped.

Queries are cut into tiles of `block_q` positions and keys/values into tiles of `block_kv`. For
each query tile a loop over key tiles keeps a running max and sum in fp32 (online softmax), so
no [T, S] array ever exists. The custom VJP saves only the inputs, the output and the per-row
log-sum-exp, and recomputes each tile's probabilities in the backward pass.

Layout inside: queries [B, K, T*G, H] with rows ordered (t, g), keys/values [B, K, S, H]: every
product is a batched matmul over (B, K), and GQA never repeats K/V. Elementwise work (masks,
bias, softmax) sees a tile as [B, K, bq, G, bk].

Tile skipping: a [num_q_tiles, num_kv_tiles] table computed from per-tile bounds of positions,
segment ids, lengths and the mask (O(T/bq * S/bk)) marks each tile invisible (skipped), partly
visible (masked) or fully visible (no mask work); `lax.switch` picks the branch. With default positions the loop also runs only over a static band of key tiles, so
a sliding window W costs O(T * W) even under `vmap` (where `switch` computes every branch).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

_BIG = 1 << 29   # sentinel bound for empty tiles; differences of two stay inside int32


@dataclasses.dataclass(frozen=True)
class Spec:
  """Static description of one call (hashable: a nondiff argument of the custom VJP)."""
  scale: float
  causal: bool
  window: tuple[int, int] | None
  t: int                 # true query length
  s: int                 # true key length
  bq: int
  bk: int
  groups: int            # G = N // K
  starts: tuple[int, ...]  # first key tile of each query tile's band
  band: int              # key tiles visited per query tile
  soft_cap: float | None = None   # logits -> cap * tanh(logits / cap), before bias and mask


def band_of(t: int, s: int, bq: int, bk: int, causal: bool, window, default_positions: bool):
  """(starts, band): the static range of key tiles each query tile can see."""
  nq, nk = -(-t // bq), -(-s // bk)
  if not default_positions or (not causal and window is None):
    return (0,) * nq, nk
  left = window[0] if window is not None else None
  right = min(window[1] if window is not None else s, 0 if causal else s)
  ranges = []
  for i in range(nq):
    lo_key = 0 if left is None else max(i * bq - left, 0)
    hi_key = min(i * bq + bq - 1 + right, s - 1)
    ranges.append((min(lo_key, s - 1) // bk, max(hi_key, 0) // bk))
  band = max(max(hi - lo + 1 for lo, hi in ranges), 1)
  return tuple(min(lo, nk - band) for lo, _ in ranges), band


# ----------------------------------------------------------------------------- tile helpers

def _dims(x, full_t, full_s):
  """Whether a [B|1, N|1, T|1, S|1] array is full-size along T and S."""
  return x.shape[2] == full_t and full_t > 1, x.shape[3] == full_s and full_s > 1


def _tile_rows(x, spec: Spec, i, j, tp, sp):
  """Tile (i, j) of a padded [Bx, Nx, Tp|1, Sp|1] array as [Bx, K|1, bq|1, G|1, bk|1]."""
  full_t, full_s = _dims(x, tp, sp)
  bx, nx = x.shape[:2]
  start = (0, 0, i * spec.bq if full_t else 0, j * spec.bk if full_s else 0)
  size = (bx, nx, spec.bq if full_t else 1, spec.bk if full_s else 1)
  t = lax.dynamic_slice(x, start, size)
  if nx == 1:
    return t[:, :, :, None, :]
  return t.reshape(bx, nx // spec.groups, spec.groups, size[2], size[3]).transpose(0, 1, 3, 2, 4)


def _untile_rows(ds, shape, spec: Spec, tp, sp):
  """Inverse of `_tile_rows` for cotangents: reduce [B, K, bq, G, bk] to bias-tile shape."""
  bx, nx = shape[:2]
  full_t, full_s = shape[2] == tp and tp > 1, shape[3] == sp and sp > 1
  b, k, bq, g, bk = ds.shape
  r = ds.sum((1, 3))[:, None] if nx == 1 else ds.transpose(0, 1, 3, 2, 4).reshape(b, k * g, bq, bk)
  if bx == 1:
    r = r.sum(0, keepdims=True)
  if not full_t:
    r = r.sum(2, keepdims=True)
  if not full_s:
    r = r.sum(3, keepdims=True)
  return r


def _tile_mask(spec: Spec, aux, i, j, tp, sp):
  """Boolean mask of tile (i, j) broadcastable to [B, K, bq, G, bk], or None (all visible)."""
  parts = []
  q_idx = i * spec.bq + jnp.arange(spec.bq)
  k_idx = j * spec.bk + jnp.arange(spec.bk)
  if aux['kv_limit'] is not None:
    parts.append((k_idx[None] < aux['kv_limit'][:, None])[:, None, None, None, :])
  if aux['q_len'] is not None:
    parts.append((q_idx[None] < aux['q_len'][:, None])[:, None, :, None, None])

  def rows(x, start, size):
    return lax.dynamic_slice(x, (0, start), (x.shape[0], size))

  if spec.causal or spec.window is not None or aux['k_pos'] is not None:
    qp = q_idx[None] if aux['q_pos'] is None else rows(aux['q_pos'], i * spec.bq, spec.bq)
    kp = k_idx[None] if aux['k_pos'] is None else rows(aux['k_pos'], j * spec.bk, spec.bk)
    dist = qp[:, None, :, None, None] - kp[:, None, None, None, :]
    if spec.causal:
      parts.append(dist >= 0)
    if spec.window is not None:
      parts.append((dist <= spec.window[0]) & (dist >= -spec.window[1]))
    if aux['k_pos'] is not None:   # negative key positions mark empty cache slots
      parts.append((kp >= 0)[:, None, None, None, :])
  if aux['q_seg'] is not None:
    qs, ks = rows(aux['q_seg'], i * spec.bq, spec.bq), rows(aux['k_seg'], j * spec.bk, spec.bk)
    parts.append(qs[:, None, :, None, None] == ks[:, None, None, None, :])
  if aux['mask'] is not None:
    parts.append(_tile_rows(aux['mask'], spec, i, j, tp, sp))
  return functools.reduce(jnp.logical_and, parts) if parts else None


def _tile_bounds(pos, valid, n, b):
  """Per-tile (min, max, any, all) of `pos` [B|1, L] over `valid` [B, L] entries: [B, n]."""
  p = jnp.broadcast_to(pos, valid.shape).reshape(valid.shape[0], n, b)
  v = valid.reshape(valid.shape[0], n, b)
  return (jnp.where(v, p, _BIG).min(-1), jnp.where(v, p, -_BIG).max(-1), v.any(-1), v.all(-1))


def visible_tiles(spec: Spec, aux, batch, tp, sp):
  """[nq, nk] int32: 0 = no visible (query, key) pair in tile (i, j) in any batch row (skip),
  1 = some (apply the mask), 2 = every pair of every row visible (no mask needed)."""
  nq, nk = tp // spec.bq, sp // spec.bk
  q_valid = jnp.broadcast_to(jnp.arange(tp)[None] < spec.t, (batch, tp))
  if aux['q_len'] is not None:
    q_valid &= jnp.arange(tp)[None] < aux['q_len'][:, None]
  k_valid = jnp.broadcast_to(jnp.arange(sp)[None] < spec.s, (batch, sp))
  if aux['kv_limit'] is not None:
    k_valid &= jnp.arange(sp)[None] < aux['kv_limit'][:, None]
  q_pos = jnp.arange(tp)[None] if aux['q_pos'] is None else aux['q_pos']
  k_pos = jnp.arange(sp)[None] if aux['k_pos'] is None else aux['k_pos']
  if aux['k_pos'] is not None:
    k_valid &= aux['k_pos'] >= 0
  q_lo, q_hi, q_any, q_all = _tile_bounds(q_pos, q_valid, nq, spec.bq)
  k_lo, k_hi, k_any, k_all = _tile_bounds(k_pos, k_valid, nk, spec.bk)
  vis = q_any[:, :, None] & k_any[:, None, :]                 # [B, nq, nk]
  full = q_all[:, :, None] & k_all[:, None, :]
  hi_dist = q_hi[:, :, None] - k_lo[:, None, :]               # largest q_pos - k_pos
  lo_dist = q_lo[:, :, None] - k_hi[:, None, :]               # smallest
  if spec.causal:
    vis &= hi_dist >= 0
    full &= lo_dist >= 0
  if spec.window is not None:
    vis &= (hi_dist >= -spec.window[1]) & (lo_dist <= spec.window[0])
    full &= (lo_dist >= -spec.window[1]) & (hi_dist <= spec.window[0])
  if aux['q_seg'] is not None:
    # Id ranges of the non-zero ids, and whether a tile holds id 0 (padding): exact for packed
    # rows (ascending ids, then zeros), conservative for any other layout.
    q_pad, k_pad = aux['q_seg'] == 0, aux['k_seg'] == 0
    qs_lo, qs_hi, _, _ = _tile_bounds(aux['q_seg'], q_valid & ~q_pad, nq, spec.bq)
    ks_lo, ks_hi, _, _ = _tile_bounds(aux['k_seg'], k_valid & ~k_pad, nk, spec.bk)
    q_has_pad = _tile_bounds(aux['q_seg'], q_valid & q_pad, nq, spec.bq)[2]
    k_has_pad = _tile_bounds(aux['k_seg'], k_valid & k_pad, nk, spec.bk)[2]
    vis &= (((qs_lo[:, :, None] <= ks_hi[:, None, :]) & (ks_lo[:, None, :] <= qs_hi[:, :, None]))
            | (q_has_pad[:, :, None] & k_has_pad[:, None, :]))
    qs_lo, qs_hi, _, _ = _tile_bounds(aux['q_seg'], q_valid, nq, spec.bq)
    ks_lo, ks_hi, _, _ = _tile_bounds(aux['k_seg'], k_valid, nk, spec.bk)
    full &= ((qs_lo == qs_hi)[:, :, None] & (ks_lo == ks_hi)[:, None, :]
             & (qs_lo[:, :, None] == ks_lo[:, None, :]))
  if aux['mask'] is not None:
    m = aux['mask'].any(1)                                    # [Bm, Tm, Sm]
    full_t, full_s = _dims(aux['mask'], tp, sp)
    tn, tb = (nq, spec.bq) if full_t else (1, 1)
    sn, sb = (nk, spec.bk) if full_s else (1, 1)
    vis &= m.reshape(m.shape[0], tn, tb, sn, sb).any((2, 4))
    full &= aux['mask'].all(1).reshape(m.shape[0], tn, tb, sn, sb).all((2, 4))
  vis = vis.any(0)
  return vis.astype(jnp.int32) + (vis & full.all(0)).astype(jnp.int32)


# ----------------------------------------------------------------------------- forward / backward

def _logits(spec: Spec, q_i, k_j, bias, aux, i, j, tp, sp, masked: bool):
  """Scaled, soft-capped, biased fp32 logits of tile (i, j): [B, K, bq, G, bk]; masked entries
  -inf (`masked`=False: the tile is known to be fully visible). Also returns the soft cap's
  tanh (its derivative is 1 - tanh^2), or None without one."""
  b, k = q_i.shape[:2]
  s = jnp.einsum('bkrh,bksh->bkrs', q_i, k_j, preferred_element_type=jnp.float32)
  s = s.reshape(b, k, spec.bq, spec.groups, spec.bk) * jnp.float32(spec.scale)
  capped = None
  if spec.soft_cap is not None:
    capped = jnp.tanh(s / jnp.float32(spec.soft_cap))
    s = capped * jnp.float32(spec.soft_cap)
  if bias is not None:
    s = s + _tile_rows(bias, spec, i, j, tp, sp).astype(jnp.float32)
  mask = _tile_mask(spec, aux, i, j, tp, sp) if masked else None
  return (s if mask is None else jnp.where(mask, s, -jnp.inf)), capped


def _kv_tile(x, spec: Spec, j):
  return lax.dynamic_slice_in_dim(x, j * spec.bk, spec.bk, axis=2)


def _q_tile(x, spec: Spec, i):
  return lax.dynamic_slice_in_dim(x, i * spec.bq * spec.groups, spec.bq * spec.groups, axis=2)


def _forward(spec: Spec, q, k, v, bias, aux):
  """q [B, K, Tp*G, H], k/v [B, K, Sp, H] -> (out like q, lse [B, K, Tp, G] fp32)."""
  b, kh, rows, h = q.shape
  tp, sp = rows // spec.groups, k.shape[2]
  kind = visible_tiles(spec, aux, b, tp, sp)
  starts = jnp.asarray(spec.starts, jnp.int32)
  stat_shape = (b, kh, spec.bq, spec.groups)

  def q_loop(i, carry):
    out, lse = carry
    q_i = _q_tile(q, spec, i)

    def kv_step(r, state):
      j = starts[i] + r

      def attend(state, masked):
        acc, m, l = state
        s, _ = _logits(spec, q_i, _kv_tile(k, spec, j), bias, aux, i, j, tp, sp, masked)
        m_new = jnp.maximum(m, s.max(-1))
        m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        p = jnp.exp(s - m_safe[..., None])
        corr = jnp.exp(m - m_safe)
        pv = jnp.einsum('bkrs,bksh->bkrh', p.reshape(b, kh, -1, spec.bk).astype(v.dtype),
                        _kv_tile(v, spec, j), preferred_element_type=jnp.float32)
        acc = acc * corr.reshape(b, kh, -1, 1) + pv
        return acc, m_new, l * corr + p.sum(-1)

      return lax.switch(kind[i, j], (lambda st: st, functools.partial(attend, masked=True),
                                     functools.partial(attend, masked=False)), state)

    init = (jnp.zeros((b, kh, spec.bq * spec.groups, h), jnp.float32),
            jnp.full(stat_shape, -jnp.inf, jnp.float32), jnp.zeros(stat_shape, jnp.float32))
    acc, m, l = lax.fori_loop(0, spec.band, kv_step, init)
    o_i = acc / jnp.where(l > 0, l, 1.0).reshape(b, kh, -1, 1)
    lse_i = jnp.where(l > 0, m + jnp.log(jnp.where(l > 0, l, 1.0)), 0.0)
    out = lax.dynamic_update_slice_in_dim(out, o_i.astype(q.dtype), i * spec.bq * spec.groups, 2)
    return out, lax.dynamic_update_slice_in_dim(lse, lse_i, i * spec.bq, 2)

  init = (jnp.zeros_like(q), jnp.zeros((b, kh, tp, spec.groups), jnp.float32))
  return lax.fori_loop(0, tp // spec.bq, q_loop, init)


def _backward(spec: Spec, res, d_out):
  q, k, v, bias, aux, out, lse = res
  b, kh, rows, h = q.shape
  tp, sp = rows // spec.groups, k.shape[2]
  kind = visible_tiles(spec, aux, b, tp, sp)
  starts = jnp.asarray(spec.starts, jnp.int32)
  delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), -1)
  delta = delta.reshape(b, kh, tp, spec.groups)
  scale = jnp.float32(spec.scale)

  def q_loop(i, carry):
    dq, dk, dv, dbias = carry
    q_i, do_i = _q_tile(q, spec, i), _q_tile(d_out, spec, i)
    lse_i = lax.dynamic_slice_in_dim(lse, i * spec.bq, spec.bq, 2)[..., None]
    delta_i = lax.dynamic_slice_in_dim(delta, i * spec.bq, spec.bq, 2)[..., None]

    def kv_step(r, state):
      dq_i, dk, dv, dbias = state
      j = starts[i] + r
      full_t, full_s = (False, False) if dbias is None else _dims(dbias, tp, sp)
      db_start = (0, 0, i * spec.bq if full_t else 0, j * spec.bk if full_s else 0)

      def grads(masked):   # tile-sized results only: the switch never carries full dk / dv
        k_j, v_j = _kv_tile(k, spec, j), _kv_tile(v, spec, j)
        s, capped = _logits(spec, q_i, k_j, bias, aux, i, j, tp, sp, masked)
        p = jnp.exp(s - lse_i)
        p4 = p.reshape(b, kh, -1, spec.bk)
        dv_j = jnp.einsum('bkrs,bkrh->bksh', p4.astype(do_i.dtype), do_i,
                          preferred_element_type=jnp.float32)
        dp = jnp.einsum('bkrh,bksh->bkrs', do_i, v_j, preferred_element_type=jnp.float32)
        ds = p * (dp.reshape(p.shape) - delta_i)                 # d logits, [B, K, bq, G, bk]
        # Through the soft cap to the scaled q.k (the bias gradient is taken after it).
        ds_qk = ds if capped is None else ds * (1.0 - jnp.square(capped))
        ds4 = ds_qk.reshape(b, kh, -1, spec.bk)
        dq_j = jnp.einsum('bkrs,bksh->bkrh', ds4.astype(k.dtype), k_j,
                          preferred_element_type=jnp.float32) * scale
        dk_j = jnp.einsum('bkrs,bkrh->bksh', ds4.astype(q.dtype), q_i,
                          preferred_element_type=jnp.float32) * scale
        db = None if dbias is None else _untile_rows(ds, dbias.shape, spec, tp, sp)
        return dq_j, dk_j, dv_j, db

      shapes = jax.eval_shape(functools.partial(grads, False))
      skip = lambda: jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), shapes)
      dq_j, dk_j, dv_j, db = lax.switch(kind[i, j], (skip, functools.partial(grads, True),
                                                     functools.partial(grads, False)))
      add = lambda acc, x: lax.dynamic_update_slice_in_dim(
          acc, _kv_tile(acc, spec, j) + x, j * spec.bk, 2)
      if dbias is not None:
        dbias = lax.dynamic_update_slice(
            dbias, lax.dynamic_slice(dbias, db_start, db.shape) + db, db_start)
      return dq_i + dq_j, add(dk, dk_j), add(dv, dv_j), dbias

    dq_i = jnp.zeros((b, kh, spec.bq * spec.groups, h), jnp.float32)
    dq_i, dk, dv, dbias = lax.fori_loop(0, spec.band, kv_step, (dq_i, dk, dv, dbias))
    dq = lax.dynamic_update_slice_in_dim(dq, dq_i, i * spec.bq * spec.groups, 2)
    return dq, dk, dv, dbias

  f32 = lambda x: None if x is None else jnp.zeros(x.shape, jnp.float32)
  dq, dk, dv, dbias = lax.fori_loop(0, tp // spec.bq, q_loop, (f32(q), f32(k), f32(v), f32(bias)))
  dbias = None if bias is None else dbias.astype(bias.dtype)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), dbias, None


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def flash(spec: Spec, q, k, v, bias, aux):
  """Blockwise attention on the inner layout; see `_forward`. Returns [B, K, Tp*G, H]."""
  return _forward(spec, q, k, v, bias, aux)[0]


def _flash_fwd(spec, q, k, v, bias, aux):
  out, lse = _forward(spec, q, k, v, bias, aux)
  return out, (q, k, v, bias, aux, out, lse)


flash.defvjp(_flash_fwd, _backward)


# ----------------------------------------------------------------------------- entry point

def _pad_axis(x, axis, to, value=0):
  if x is None or x.shape[axis] == to or x.shape[axis] == 1:
    return x
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, to - x.shape[axis])
  return jnp.pad(x, pad, constant_values=value)


def blockwise_attention(query, key, value, bias=None, mask=None, *, scale: float,
                        is_causal=False, query_seq_lengths=None, key_value_seq_lengths=None,
                        local_window=None, query_positions=None, key_positions=None,
                        query_segment_ids=None, key_segment_ids=None, block_q: int = 256,
                        block_kv: int = 256, logits_soft_cap: float | None = None):
  """query [B, T, N, H], key/value [B, S, K, H] -> [B, T, N, H]; arguments checked by the caller.

  local_window: None or (left, right). bias / mask: [B|1, N|1, T|1, S|1]. Positions [B|1, T|S],
  segment ids [B, T|S], lengths [B]. logits_soft_cap: None or c (scaled logits ->
  c * tanh(logits / c), before bias and mask). Rows with no visible key return zeros.
  """
  b, t, n, h = query.shape
  s, kh = key.shape[1], key.shape[2]
  g = n // kh
  bq, bk = min(block_q, t), min(block_kv, s)
  tp, sp = -(-t // bq) * bq, -(-s // bk) * bk
  default_pos = query_positions is None and key_positions is None
  starts, band = band_of(t, s, bq, bk, is_causal, local_window, default_pos)
  spec = Spec(scale=float(scale), causal=bool(is_causal), window=local_window, t=t, s=s, bq=bq,
              bk=bk, groups=g, starts=starts, band=band, soft_cap=logits_soft_cap)
  if default_pos is False:   # one given: the other takes its default, as in `attention_mask`
    query_positions = jnp.arange(t)[None] if query_positions is None else query_positions
    key_positions = jnp.arange(s)[None] if key_positions is None else key_positions
  if (query_segment_ids is None) != (key_segment_ids is None):
    query_segment_ids = key_segment_ids if query_segment_ids is None else query_segment_ids
    key_segment_ids = query_segment_ids if key_segment_ids is None else key_segment_ids
  kv_limit = None
  if key_value_seq_lengths is not None:
    kv_limit = jnp.minimum(key_value_seq_lengths.astype(jnp.int32), s)
  elif sp != s:
    kv_limit = jnp.full((b,), s, jnp.int32)
  i32 = lambda x: None if x is None else jnp.asarray(x, jnp.int32)
  aux = dict(
      kv_limit=kv_limit, q_len=i32(query_seq_lengths),
      q_pos=_pad_axis(i32(query_positions), 1, tp), k_pos=_pad_axis(i32(key_positions), 1, sp),
      q_seg=_pad_axis(i32(query_segment_ids), 1, tp),
      k_seg=_pad_axis(i32(key_segment_ids), 1, sp),
      mask=None if mask is None else _pad_axis(_pad_axis(mask, 2, tp, False), 3, sp, False))
  if bias is not None:
    bias = _pad_axis(_pad_axis(bias, 2, tp), 3, sp)
  q = _pad_axis(query, 1, tp).reshape(b, tp, kh, g, h).transpose(0, 2, 1, 3, 4)
  q = q.reshape(b, kh, tp * g, h)
  k, v = (_pad_axis(x, 1, sp).transpose(0, 2, 1, 3) for x in (key, value))
  out = flash(spec, q, k, v, bias, aux)
  out = out.reshape(b, kh, tp, g, h).transpose(0, 2, 1, 3, 4).reshape(b, tp, n, h)
  return out[:, :t]
