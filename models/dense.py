"""Causal self-attention with materialised scores, for the short sequences of CPU training.

What `xla_attention` computes for `is_causal=True` with no other mask, bias, window, positions
or soft cap (query and key lengths equal), formulated for speed at T of a few hundred:
- the causal upper triangle is skipped: query rows go in `chunks` groups, and group i attends
  only keys [0, (i + 1) T / chunks), so (chunks + 1) / (2 chunks) of the score work remains;
  only each group's last key block needs a mask;
- a custom VJP saves the probabilities P and uses dS = P (dP - rowsum(dO * O)), whose row sum
  runs over [T, H] instead of [T, S], instead of differentiating through the softmax.
The scale multiplies the fp32 scores, as in the reference (on bf16 queries it would round).
Layout as in `head_major_attention`: queries [B, K, G*Tc, H] against keys [B, K, S, H], so
every product is a plain batched matmul over (B, K) and K/V are never repeated.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

# Query groups of ~32 rows (2-core CPU, T 256: 8 groups ran fwd + bwd 2.6x faster than 'xla',
# 4 groups 2.2x, 1 group 1.4x); at most 16 groups, as each is unrolled in the program.
CHUNK_ROWS, MAX_CHUNKS = 32, 16


def default_chunks(t: int) -> int:
  """The largest divisor of T up to min(MAX_CHUNKS, T // CHUNK_ROWS), at least 1."""
  return max([c for c in range(1, min(MAX_CHUNKS, t // CHUNK_ROWS) + 1) if t % c == 0] or [1])


def supported(query, key, *, is_causal: bool, extras: bool) -> bool:
  """Whether `causal_attention` computes this call: causal self-attention (T == S) with no
  mask, bias, window, positions, segments, lengths or soft cap (`extras`)."""
  return is_causal and not extras and query.shape[1] == key.shape[1]


def _chunk_mask(g: int, tc: int, chunk: int) -> np.ndarray:
  """[G*Tc, (chunk + 1) * Tc] causal mask of query group `chunk` (rows ordered g-major)."""
  rows = np.tile(np.arange(tc), g) + chunk * tc
  return rows[:, None] >= np.arange((chunk + 1) * tc)[None, :]


def _head_major(x, k: int):
  """[B, T, N, H] -> [B, K, G, T, H] (N = K * G)."""
  b, t, n, h = x.shape
  return x.reshape(b, t, k, n // k, h).transpose(0, 2, 3, 1, 4)


def _rows(x, i: int, tc: int):
  """Rows of query group i of [B, K, G, T, H] as [B, K, G*Tc, H]."""
  b, k, g, _, h = x.shape
  return x[:, :, :, i * tc:(i + 1) * tc].reshape(b, k, g * tc, h)


def _from_rows(parts, shape):
  """Inverse of `_rows` over all groups: list of [B, K, G*Tc, H] -> [B, T, N, H]."""
  b, t, n, h = shape
  k, tc = parts[0].shape[1], t // len(parts)
  x = jnp.concatenate([p.reshape(b, k, n // k, tc, h) for p in parts], axis=3)
  return x.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)


def _forward(q, k, v, scale, chunks):
  """(out [B, T, N, H], residuals) with q, k, v as given to `causal_attention`."""
  t, n, kv = q.shape[1], q.shape[2], k.shape[2]
  tc = t // chunks
  qh = _head_major(q, kv)
  kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)      # [B, K, S, H]
  outs, probs = [], []
  for i in range(chunks):
    s_len = (i + 1) * tc
    logits = jnp.einsum('bkqh,bksh->bkqs', _rows(qh, i, tc), kh[:, :, :s_len],
                        preferred_element_type=jnp.float32) * jnp.float32(scale)
    logits = jnp.where(_chunk_mask(n // kv, tc, i), logits, jnp.finfo(jnp.float32).min)
    p = jax.nn.softmax(logits, axis=-1)
    outs.append(jnp.einsum('bkqs,bksh->bkqh', p.astype(v.dtype), vh[:, :, :s_len],
                           preferred_element_type=jnp.float32).astype(q.dtype))
    probs.append(p)
  return _from_rows(outs, q.shape), (qh, kh, vh, outs, probs)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def causal_attention(query, key, value, scale: float, chunks: int):
  """Causal self-attention: query [B, T, N, H], key/value [B, T, K, H] -> [B, T, N, H];
  T % chunks == 0 (see `default_chunks`)."""
  return _forward(query, key, value, scale, chunks)[0]


def _bwd(scale, chunks, res, d_out):
  qh, kh, vh, outs, probs = res
  kv, t = qh.shape[1], qh.shape[3]
  tc = t // chunks
  doh = _head_major(d_out, kv)
  dqs, dk, dv = [], jnp.zeros(kh.shape, jnp.float32), jnp.zeros(vh.shape, jnp.float32)
  for i in range(chunks):
    s_len = (i + 1) * tc
    do_i, p = _rows(doh, i, tc), probs[i]
    delta = jnp.sum(do_i.astype(jnp.float32) * outs[i].astype(jnp.float32), axis=-1,
                    keepdims=True)                                  # [B, K, G*Tc, 1]
    dp = jnp.einsum('bkqh,bksh->bkqs', do_i, vh[:, :, :s_len],
                    preferred_element_type=jnp.float32)
    # d(scaled logits); the scale goes on dq and dk: on [.., S] it was a scalar operand of an
    # XLA:CPU YNNPACK fusion, materialised as a broadcast (T 256, batch 16, GQA 8/2: forward +
    # backward 32.5 -> 29.7 CPU-ms on a 2-core Xeon).
    ds = (p * (dp - delta)).astype(qh.dtype)
    dqs.append(jnp.einsum('bkqs,bksh->bkqh', ds, kh[:, :, :s_len],
                          preferred_element_type=jnp.float32) * jnp.float32(scale))
    pad = ((0, 0), (0, 0), (0, t - s_len), (0, 0))
    dk = dk + jnp.pad(jnp.einsum('bkqs,bkqh->bksh', ds, _rows(qh, i, tc),
                                 preferred_element_type=jnp.float32) * jnp.float32(scale), pad)
    dv = dv + jnp.pad(jnp.einsum('bkqs,bkqh->bksh', p.astype(vh.dtype), do_i,
                                 preferred_element_type=jnp.float32), pad)
  dq = _from_rows(dqs, d_out.shape).astype(qh.dtype)
  back = lambda x: x.transpose(0, 2, 1, 3).astype(kh.dtype)        # [B, K, S, H] -> [B, S, K, H]
  return dq, back(dk), back(dv)


causal_attention.defvjp(_forward, _bwd)
