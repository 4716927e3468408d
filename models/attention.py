"""The one attention entry point every model calls.

`dot_product_attention` has the semantics of `jax.nn.dot_product_attention` for the same
arguments (BTNH layout, boolean mask with True = attend, `local_window_size` int or
(left, right)), plus keyword-only extras: explicit query/key positions (used by the KV cache;
a negative key position marks an empty slot and is never attended), segment ids (packed
sequences), block sizes and `logits_soft_cap` (Gemma 2: scaled logits become
cap * tanh(logits / cap) before bias and masking). One deliberate difference: a query row with no key to attend to
returns zeros (jax returns the mean of the values there).

Implementations: 'xla' (reference, materialises [T, S] scores), 'dense' (models/dense.py: plain
causal self-attention only, materialised scores without the masked upper blocks, custom VJP;
what auto picks for short causal training sequences on CPU), 'blockwise' (models/blockwise.py:
tiled online softmax, O(T) memory, masked tiles skipped), 'cudnn' (jax's fused kernel, GPU only),
'splash' (jax's Pallas kernel, TPU only: models/splash.py), None / 'auto'
(`choose_implementation`: a pure function of backend, dtype, shapes and which arguments are given;
the models pass no positions when they are the default 0..T-1, so training reaches the kernels).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from models import dense, splash
from models.blockwise import blockwise_attention

IMPLEMENTATIONS = ('xla', 'blockwise', 'cudnn', 'splash', 'dense')
# None picks blockwise when T * S reaches this (below it the reference is as fast on CPU and the
# [T, S] scores are small); see benchmarks/attention.py.
BLOCKWISE_MIN_SCORES = 512 * 1024
DEFAULT_BLOCK_Q, DEFAULT_BLOCK_KV = 256, 256


def _window_pair(local_window_size):
  if local_window_size is None:
    return None
  if isinstance(local_window_size, (int, np.integer)) and not isinstance(local_window_size, bool):
    pair = (int(local_window_size),) * 2
  else:
    try:
      pair = tuple(int(w) for w in local_window_size)
    except (TypeError, ValueError):
      pair = ()
  if len(pair) != 2 or min(pair) < 0:
    raise ValueError(f'local_window_size must be an int >= 0 or a (left, right) pair of ints '
                     f'>= 0; got {local_window_size!r}.')
  return pair


def _check_broadcast(name, x, full, dtype_kind=None):
  if x is None:
    return
  if x.ndim != 4 or any(d not in (1, f) for d, f in zip(x.shape, full)):
    raise ValueError(f'{name} must be 4-D and broadcastable to [B, N, T, S] = {list(full)}; '
                     f'got shape {x.shape}.')
  if dtype_kind == 'bool' and x.dtype != jnp.bool_:
    raise ValueError(f'{name} must be boolean (True = attend); got dtype {x.dtype}. Pass an '
                     'additive mask as bias.')


def _check_rows(name, x, batch, length, allow_batch_one):
  if x is None:
    return
  ok_batch = (batch, 1) if allow_batch_one else (batch,)
  if x.ndim != 2 or x.shape[0] not in ok_batch or x.shape[1] != length:
    want = f'[{"B|1" if allow_batch_one else "B"}, {length}] with B={batch}'
    raise ValueError(f'{name} must have shape {want}; got {x.shape}.')
  if not jnp.issubdtype(x.dtype, jnp.integer):
    raise ValueError(f'{name} must be integer; got dtype {x.dtype}.')


def _check_args(query, key, value, bias, mask, query_seq_lengths, key_value_seq_lengths,
                query_positions, key_positions, query_segment_ids, key_segment_ids,
                implementation, block_q, block_kv):
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
  if not query.dtype == key.dtype == value.dtype:
    raise ValueError(f'query, key and value must share a dtype; got {query.dtype}, {key.dtype}, '
                     f'{value.dtype}.')
  (b, t, n, _), s = query.shape, key.shape[1]
  _check_broadcast('bias', bias, (b, n, t, s))
  _check_broadcast('mask', mask, (b, n, t, s), 'bool')
  for name, x in (('query_seq_lengths', query_seq_lengths),
                  ('key_value_seq_lengths', key_value_seq_lengths)):
    if x is not None and (x.shape != (b,) or not jnp.issubdtype(x.dtype, jnp.integer)):
      raise ValueError(f'{name} must be an integer array of shape [B] = ({b},); got '
                       f'{x.dtype}{list(x.shape)}.')
  _check_rows('query_positions', query_positions, b, t, True)
  _check_rows('key_positions', key_positions, b, s, True)
  _check_rows('query_segment_ids', query_segment_ids, b, t, False)
  _check_rows('key_segment_ids', key_segment_ids, b, s, False)
  if implementation not in (None, 'auto') + IMPLEMENTATIONS:
    raise ValueError(f'implementation={implementation!r} is unknown; choose one of '
                     f'{", ".join(IMPLEMENTATIONS)}, or None / "auto".')
  for name, size in (('block_q', block_q), ('block_kv', block_kv)):
    if size is not None and (not isinstance(size, (int, np.integer)) or size <= 0):
      raise ValueError(f'{name}={size!r}: must be a positive integer.')
  for impl, backend, kind in (('cudnn', 'gpu', 'a GPU'), ('splash', 'tpu', 'a TPU')):
    if implementation == impl and jax.default_backend() != backend:
      raise ValueError(f"implementation={impl!r} needs {kind}; the default backend is "
                       f"{jax.default_backend()!r}. Use 'blockwise', 'xla' or None.")


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
  if is_causal or local_window_size is not None or key_positions is not None:
    q_pos = (jnp.arange(q_len)[None] if query_positions is None else query_positions)
    k_pos = (jnp.arange(kv_len)[None] if key_positions is None else key_positions)
    dist = q_pos[:, None, :, None] - k_pos[:, None, None, :]   # [B|1, 1, T, S]
    if is_causal:
      both(dist >= 0)
    if local_window_size is not None:
      left, right = _window_pair(local_window_size)
      both((dist <= left) & (dist >= -right))
    if key_positions is not None:   # negative key positions mark empty cache slots
      both((key_positions >= 0)[:, None, None, :])
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


def xla_attention(query, key, value, bias, mask, scale, logits_soft_cap=None):
  """Reference: materialises fp32 scores; GQA without repeating K/V.

  Queries are laid out [B, K, G*T, H] so both products are plain batched matmuls over (B, K),
  which XLA:CPU runs several times faster than a contraction with two free dimensions.
  """
  return head_major_attention(query, key.transpose(0, 2, 1, 3), value.transpose(0, 2, 1, 3),
                              bias, mask, scale, logits_soft_cap)


def head_major_attention(query, key, value, bias, mask, scale, logits_soft_cap=None):
  """`xla_attention` of query [B, T, N, H] over head-major key, value [B, K, S, H].
  bias, mask: [B|1, N|1, T, S]. (The KV cache's own layout, keys [B, K, H, S], has its decode
  formulation in models/kv_cache.py.)"""
  b, t, n, h = query.shape
  k, s = key.shape[1], value.shape[2]
  g = n // k
  q = query.reshape(b, t, k, g, h).transpose(0, 2, 3, 1, 4).reshape(b, k, g * t, h)
  logits = jnp.einsum('bkqh,bksh->bkqs', q, key, preferred_element_type=jnp.float32)
  logits = logits.reshape(b, k, g, t, s) * jnp.float32(scale)
  if logits_soft_cap is not None:
    logits = jnp.tanh(logits / jnp.float32(logits_soft_cap)) * jnp.float32(logits_soft_cap)
  if bias is not None:
    logits = logits + _grouped(bias, k).astype(jnp.float32)
  if mask is not None:
    mask = _grouped(mask, k)
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1)
  if mask is not None:  # rows with nothing to attend to give zeros
    probs = jnp.where(jnp.any(mask, axis=-1, keepdims=True), probs, 0.0)
  out = jnp.einsum('bkqs,bksh->bkqh', probs.reshape(b, k, g * t, s).astype(value.dtype), value,
                   preferred_element_type=jnp.float32)
  out = out.reshape(b, k, g, t, h).transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)
  return out.astype(query.dtype)


def cudnn_supported(query, key, *, is_causal: bool, local_window, extras: bool,
                    soft_cap: bool = False, backend: str | None = None) -> bool:
  """Whether jax's cuDNN kernel handles this call: GPU, half precision, head_dim a multiple of
  8 up to 128, a window only with causal masking, none of our extras (positions, segments) and
  no logit soft-capping (jax's cuDNN call has none)."""
  h = query.shape[-1]
  backend = jax.default_backend() if backend is None else backend
  return (backend == 'gpu' and query.dtype in (jnp.bfloat16, jnp.float16)
          and h % 8 == 0 and h <= 128 and not extras and not soft_cap
          and (local_window is None or is_causal))


def choose_implementation(query, key, *, is_causal: bool = False, local_window=None,
                          positions: bool = False, segments: bool = False, bias: bool = False,
                          mask: bool = False, lengths: bool = False, soft_cap: bool = False,
                          backend: str | None = None) -> str:
  """What None / 'auto' runs: a pure function of the backend (default: jax's), query/key
  shapes and dtype, and which arguments the call has (explicit positions, segment ids, bias,
  boolean mask, padding lengths, soft cap). On GPU cudnn where it applies; on TPU splash where
  it applies; else blockwise for T * S >= BLOCKWISE_MIN_SCORES; else on CPU dense for plain
  causal self-attention (no extras: the training step's case); else xla."""
  backend = jax.default_backend() if backend is None else backend
  if cudnn_supported(query, key, is_causal=is_causal, local_window=local_window,
                     extras=positions or segments, soft_cap=soft_cap, backend=backend):
    return 'cudnn'
  if splash.supported(query, key, backend=backend, is_causal=is_causal,
                      local_window=local_window, positions=positions, segments=segments,
                      bias=bias, mask=mask, lengths=lengths):
    return 'splash'
  if query.shape[1] * key.shape[1] >= BLOCKWISE_MIN_SCORES:
    return 'blockwise'
  if backend == 'cpu' and dense.supported(
      query, key, is_causal=is_causal,
      extras=(local_window is not None or positions or segments or bias or mask or lengths
              or soft_cap)):
    return 'dense'
  return 'xla'


def dot_product_attention(query, key, value, bias=None, mask=None, *, scale=None,
                          is_causal=False, query_seq_lengths=None, key_value_seq_lengths=None,
                          local_window_size=None, implementation=None, query_positions=None,
                          key_positions=None, query_segment_ids=None, key_segment_ids=None,
                          block_q=None, block_kv=None, logits_soft_cap=None):
  """Scaled dot-product attention.

  Args:
    query: [B, T, N, H]; key, value: [B, S, K, H] with N % K == 0 (GQA / MQA).
    bias: additive, broadcastable to [B, N, T, S]. mask: boolean, True = attend.
    is_causal: key position <= query position. local_window_size: int w or (left, right):
      query at p attends keys in [p - left, p + right].
    query_seq_lengths, key_value_seq_lengths: [B] int32 valid lengths (padding).
    query_positions [B|1, T], key_positions [B|1, S]: positions used by the causal and window
      masks (default: 0..T-1 and 0..S-1, as in jax); key positions < 0 are never attended.
    query_segment_ids [B, T], key_segment_ids [B, S]: attend only within equal ids.
    implementation: 'xla', 'blockwise', 'dense' (causal self-attention only), 'cudnn' (GPU
      only), 'splash' (TPU only), or None /
      'auto' (`choose_implementation`).
    block_q, block_kv: blockwise tile sizes (default 256 / 256; lengths need not divide).
    logits_soft_cap: None or c > 0: the scaled logits become c * tanh(logits / c) before the
      bias and mask apply (Gemma 2). jax's cuDNN kernel has no such option: 'cudnn' refuses it.
  Returns: [B, T, N, H] in query's dtype.
  """
  _check_args(query, key, value, bias, mask, query_seq_lengths, key_value_seq_lengths,
              query_positions, key_positions, query_segment_ids, key_segment_ids,
              implementation, block_q, block_kv)
  if logits_soft_cap is not None:
    if (isinstance(logits_soft_cap, bool) or not isinstance(logits_soft_cap, (int, float))
        or not logits_soft_cap > 0):
      raise ValueError(f'logits_soft_cap={logits_soft_cap!r}: must be a number > 0 or None.')
    if implementation == 'cudnn':
      raise ValueError("implementation='cudnn' has no logit soft-capping (jax's cuDNN call "
                       "takes no soft cap); use 'blockwise', 'xla' or None (auto never picks "
                       'cudnn for a soft-capped call).')
    logits_soft_cap = float(logits_soft_cap)
  window = _window_pair(local_window_size)
  scale = 1.0 / np.sqrt(query.shape[-1]) if scale is None else scale
  positions = query_positions is not None or key_positions is not None
  segments = query_segment_ids is not None or key_segment_ids is not None
  extras = positions or segments
  if implementation in (None, 'auto'):
    implementation = choose_implementation(
        query, key, is_causal=is_causal, local_window=window, positions=positions,
        segments=segments, bias=bias is not None, mask=mask is not None,
        lengths=query_seq_lengths is not None or key_value_seq_lengths is not None,
        soft_cap=logits_soft_cap is not None)
  if implementation == 'splash':
    unsupported = [name for name, x in (('bias', bias), ('mask', mask),
                                        ('query_seq_lengths', query_seq_lengths),
                                        ('key_value_seq_lengths', key_value_seq_lengths),
                                        ('query_positions', query_positions),
                                        ('key_positions', key_positions)) if x is not None]
    if unsupported or query.shape[1] % splash.BLOCK or key.shape[1] % splash.BLOCK:
      raise ValueError(f"implementation='splash' takes default positions, causal / window "
                       f"masks and segment ids, with T and S multiples of {splash.BLOCK}; got "
                       f"{', '.join(unsupported) or 'no other argument'} with T={query.shape[1]}, "
                       f"S={key.shape[1]}. Use 'blockwise', 'xla' or None.")
    return splash.splash_attention(
        query, key, value, scale=scale, is_causal=is_causal, local_window=window,
        query_segment_ids=query_segment_ids, key_segment_ids=key_segment_ids,
        logits_soft_cap=logits_soft_cap)
  if implementation == 'dense':
    extras = {'bias': bias, 'mask': mask, 'query_seq_lengths': query_seq_lengths,
              'key_value_seq_lengths': key_value_seq_lengths, 'local_window_size': window,
              'query_positions': query_positions, 'key_positions': key_positions,
              'query_segment_ids': query_segment_ids, 'key_segment_ids': key_segment_ids,
              'logits_soft_cap': logits_soft_cap}
    given = [name for name, x in extras.items() if x is not None]
    if not dense.supported(query, key, is_causal=is_causal, extras=bool(given)):
      raise ValueError(f"implementation='dense' computes plain causal self-attention only "
                       f"(is_causal=True, T == S, none of {', '.join(extras)}); got "
                       f"is_causal={is_causal}, T={query.shape[1]}, S={key.shape[1]}"
                       f"{', ' + ', '.join(given) if given else ''}. Use 'xla', 'blockwise' "
                       "or None.")
    return dense.causal_attention(query, key, value, float(scale),
                                  dense.default_chunks(query.shape[1]))
  if implementation == 'blockwise':
    return blockwise_attention(
        query, key, value, bias, mask, scale=scale, is_causal=is_causal,
        query_seq_lengths=query_seq_lengths, key_value_seq_lengths=key_value_seq_lengths,
        local_window=window, query_positions=query_positions, key_positions=key_positions,
        query_segment_ids=query_segment_ids, key_segment_ids=key_segment_ids,
        block_q=block_q or DEFAULT_BLOCK_Q, block_kv=block_kv or DEFAULT_BLOCK_KV,
        logits_soft_cap=logits_soft_cap)
  if implementation == 'cudnn':
    if extras:   # positions / segments have no cuDNN form: fold them into the boolean mask
      mask = attention_mask(
          query.shape[0], query.shape[1], key.shape[1], mask=mask, is_causal=is_causal,
          local_window_size=window, query_positions=query_positions,
          key_positions=key_positions, query_segment_ids=query_segment_ids,
          key_segment_ids=key_segment_ids)
      is_causal, window = False, None
    i32 = lambda x: None if x is None else x.astype(jnp.int32)   # jax wants int32 lengths
    return jax.nn.dot_product_attention(
        query, key, value, bias, mask, scale=scale, is_causal=is_causal,
        query_seq_lengths=i32(query_seq_lengths), key_value_seq_lengths=i32(key_value_seq_lengths),
        local_window_size=window, implementation='cudnn')
  full_mask = attention_mask(
      query.shape[0], query.shape[1], key.shape[1], mask=mask, is_causal=is_causal,
      query_seq_lengths=query_seq_lengths, key_value_seq_lengths=key_value_seq_lengths,
      local_window_size=window, query_positions=query_positions,
      key_positions=key_positions, query_segment_ids=query_segment_ids,
      key_segment_ids=key_segment_ids)
  return xla_attention(query, key, value, bias, full_mask, scale, logits_soft_cap)
