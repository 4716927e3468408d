"""The one attention entry point every model calls.

`dot_product_attention` has the semantics of `jax.nn.dot_product_attention` for the same
arguments (BTNH layout, boolean mask with True = attend, `local_window_size` int or
(left, right)), plus keyword-only extras: explicit query/key positions (used by the KV cache)
and segment ids (packed sequences). One deliberate difference: a query row with no key to
attend to returns zeros (jax returns the mean of the values there).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

IMPLEMENTATIONS = ('xla',)


def _check_args(query, key, value, local_window_size, implementation):
  if query.ndim != 4 or key.ndim != 4 or value.ndim != 4:
    raise ValueError(f'query, key and value must be 4-D [B, T|S, N|K, H]; got shapes '
                     f'{query.shape}, {key.shape}, {value.shape}.')
  if key.shape != value.shape:
    raise ValueError(f'key {key.shape} and value {value.shape} must have the same shape.')
  if query.shape[0] != key.shape[0]:
    raise ValueError(f'query batch {query.shape[0]} != key batch {key.shape[0]}.')
  if query.shape[-1] != key.shape[-1]:
    raise ValueError(f'query head_dim {query.shape[-1]} != key head_dim {key.shape[-1]}.')
  if query.shape[2] % key.shape[2]:
    raise ValueError(f'query heads ({query.shape[2]}) must be a multiple of key/value heads '
                     f'({key.shape[2]}).')
  if local_window_size is not None:
    window = ((local_window_size, local_window_size) if isinstance(local_window_size, int)
              else tuple(local_window_size))
    if len(window) != 2 or min(window) < 0:
      raise ValueError(f'local_window_size must be an int >= 0 or a (left, right) pair of ints '
                       f'>= 0; got {local_window_size!r}.')
  if implementation is not None and implementation not in IMPLEMENTATIONS:
    raise ValueError(f'implementation={implementation!r} is unknown; choose one of '
                     f'{", ".join(IMPLEMENTATIONS)} or None.')


def attention_mask(batch: int, q_len: int, kv_len: int, *, mask=None, is_causal=False,
                   query_seq_lengths=None, key_value_seq_lengths=None, local_window_size=None,
                   query_positions=None, key_positions=None, query_segment_ids=None,
                   key_segment_ids=None):
  """Combines every masking argument into one boolean [B|1, N|1, T, S] mask, or None."""
  combined = None

  def both(m):
    nonlocal combined
    combined = m if combined is None else jnp.logical_and(combined, m)

  if mask is not None:
    both(mask)
  if is_causal or local_window_size is not None:
    q_pos = (jnp.arange(q_len)[None] if query_positions is None else query_positions)
    k_pos = (jnp.arange(kv_len)[None] if key_positions is None else key_positions)
    dist = q_pos[:, None, :, None] - k_pos[:, None, None, :]   # [B|1, 1, T, S]
    if is_causal:
      both(dist >= 0)
    if local_window_size is not None:
      left, right = ((local_window_size, local_window_size)
                     if isinstance(local_window_size, int) else local_window_size)
      both((dist <= left) & (dist >= -right))
  if query_seq_lengths is not None:
    both((jnp.arange(q_len)[None, :] < query_seq_lengths[:, None])[:, None, :, None])
  if key_value_seq_lengths is not None:
    both((jnp.arange(kv_len)[None, :] < key_value_seq_lengths[:, None])[:, None, None, :])
  if query_segment_ids is not None or key_segment_ids is not None:
    q_seg = query_segment_ids if query_segment_ids is not None else key_segment_ids
    k_seg = key_segment_ids if key_segment_ids is not None else query_segment_ids
    both(q_seg[:, None, :, None] == k_seg[:, None, None, :])
  return combined


def _grouped(t, num_kv_heads):
  """[B|1, N|1, T, S] -> [B|1, K|1, G|1, T, S] to match grouped-query logits."""
  if t is None:
    return None
  b, n, tq, s = t.shape
  if n == 1:
    return t[:, :, None]
  return t.reshape(b, num_kv_heads, n // num_kv_heads, tq, s)


def xla_attention(query, key, value, bias, mask, scale):
  """Reference: materialises fp32 scores; GQA without repeating K/V.

  Queries are laid out [B, K, G*T, H] so both products are plain batched matmuls over (B, K),
  which XLA:CPU runs several times faster than a contraction with two free dimensions.
  """
  b, t, n, h = query.shape
  s, k = key.shape[1], key.shape[2]
  g = n // k
  q = query.reshape(b, t, k, g, h).transpose(0, 2, 3, 1, 4).reshape(b, k, g * t, h)
  kt, vt = key.transpose(0, 2, 1, 3), value.transpose(0, 2, 1, 3)          # [B, K, S, H]
  logits = jnp.einsum('bkqh,bksh->bkqs', q, kt, preferred_element_type=jnp.float32)
  logits = logits.reshape(b, k, g, t, s) * jnp.float32(scale)
  if bias is not None:
    logits = logits + _grouped(bias, k).astype(jnp.float32)
  if mask is not None:
    mask = _grouped(mask, k)
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1)
  if mask is not None:  # rows with nothing to attend to give zeros
    probs = jnp.where(jnp.any(mask, axis=-1, keepdims=True), probs, 0.0)
  out = jnp.einsum('bkqs,bksh->bkqh', probs.reshape(b, k, g * t, s).astype(value.dtype), vt,
                   preferred_element_type=jnp.float32)
  out = out.reshape(b, k, g, t, h).transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)
  return out.astype(query.dtype)


def dot_product_attention(query, key, value, bias=None, mask=None, *, scale=None,
                          is_causal=False, query_seq_lengths=None, key_value_seq_lengths=None,
                          local_window_size=None, implementation=None, query_positions=None,
                          key_positions=None, query_segment_ids=None, key_segment_ids=None):
  """Scaled dot-product attention.

  Args:
    query: [B, T, N, H]; key, value: [B, S, K, H] with N % K == 0 (GQA / MQA).
    bias: additive, broadcastable to [B, N, T, S]. mask: boolean, True = attend.
    is_causal: key position <= query position. local_window_size: int w or (left, right):
      query at p attends keys in [p - left, p + right].
    query_seq_lengths, key_value_seq_lengths: [B] int32 valid lengths (padding).
    query_positions [B|1, T], key_positions [B|1, S]: positions used by the causal and window
      masks (default: 0..T-1 and 0..S-1, as in jax).
    query_segment_ids [B, T], key_segment_ids [B, S]: attend only within equal ids.
    implementation: 'xla' or None (choose the best available).
  Returns: [B, T, N, H] in query's dtype.
  """
  _check_args(query, key, value, local_window_size, implementation)
  scale = 1.0 / np.sqrt(query.shape[-1]) if scale is None else scale
  full_mask = attention_mask(
      query.shape[0], query.shape[1], key.shape[1], mask=mask, is_causal=is_causal,
      query_seq_lengths=query_seq_lengths, key_value_seq_lengths=key_value_seq_lengths,
      local_window_size=local_window_size, query_positions=query_positions,
      key_positions=key_positions, query_segment_ids=query_segment_ids,
      key_segment_ids=key_segment_ids)
  return xla_attention(query, key, value, bias, full_mask, scale)
