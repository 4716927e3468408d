"""jax's splash attention (Pallas TPU kernel) behind `dot_product_attention`'s arguments.

Splash attention (`jax.experimental.pallas.ops.tpu.splash_attention`) is the I/O-aware kernel on
TPU: it tiles q/k/v through VMEM, skips tiles its static mask marks empty, and has a fused
backward pass. It takes one sequence at a time ([N, T, H] queries, [K, S, H] keys/values, GQA
when N % K == 0) with a static mask over token indices, plus optional segment ids; we vmap it
over the batch. What it can express is what `choose_implementation` sends it: default positions
(0..T-1), causal and/or a sliding window, segment ids, a logit soft cap; no bias, no boolean
mask, no padding lengths. `interpret=True` runs the same kernel through the Pallas interpreter
on any backend (the tests compare it with the reference on CPU).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

BLOCK = 128   # tile size along T and S: both must be multiples of it


def supported(query, key, *, backend: str, is_causal: bool, local_window, positions: bool,
              segments: bool, bias: bool, mask: bool, lengths: bool) -> bool:
  """Whether 'auto' sends this call to splash: a TPU, self-attention shapes (T == S, multiples
  of BLOCK), head_dim a multiple of 128, and only masking splash expresses (default positions,
  causal / window / segment ids)."""
  t, h = query.shape[1], query.shape[-1]
  return (backend == 'tpu' and t == key.shape[1] and t % BLOCK == 0 and h % 128 == 0
          and not (positions or bias or mask or lengths))


@functools.lru_cache(maxsize=64)
def _kernel(t: int, s: int, num_heads: int, is_causal: bool, local_window, soft_cap,
            interpret: bool):
  from jax.experimental.pallas.ops.tpu import splash_attention as sa
  if local_window is not None:
    left, right = local_window
    mask = sa.LocalMask((t, s), window_size=(left, 0 if is_causal else right), offset=0)
  elif is_causal:
    mask = sa.CausalMask((t, s))
  else:
    mask = sa.FullMask((t, s))
  b = BLOCK
  sizes = sa.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b,
                        block_kv_dkv=b, block_kv_dkv_compute=b, block_q_dq=b, block_kv_dq=b)
  return sa.make_splash_mha(sa.MultiHeadMask([mask] * num_heads), block_sizes=sizes,
                            head_shards=1, q_seq_shards=1, attn_logits_soft_cap=soft_cap,
                            interpret=interpret)


def splash_attention(query, key, value, *, scale: float, is_causal: bool = False,
                     local_window: tuple[int, int] | None = None, query_segment_ids=None,
                     key_segment_ids=None, logits_soft_cap: float | None = None,
                     interpret: bool = False):
  """query [B, T, N, H], key/value [B, S, K, H] (T, S multiples of BLOCK) -> [B, T, N, H].

  Semantics of `dot_product_attention` with default positions: is_causal, local_window
  (left, right) as there, segment ids [B, T] / [B, S] (attend within equal ids)."""
  b, t, n, _ = query.shape
  s = key.shape[1]
  kernel = _kernel(t, s, n, is_causal, local_window, logits_soft_cap, interpret)
  q = (query * jnp.asarray(scale, query.dtype)).transpose(0, 2, 1, 3)   # [B, N, T, H]
  k, v = key.transpose(0, 2, 1, 3), value.transpose(0, 2, 1, 3)        # [B, K, S, H]
  if query_segment_ids is None and key_segment_ids is None:
    out = jax.vmap(kernel)(q, k, v)
  else:
    from jax.experimental.pallas.ops.tpu.splash_attention import SegmentIds
    q_seg = query_segment_ids if query_segment_ids is not None else key_segment_ids
    k_seg = key_segment_ids if key_segment_ids is not None else query_segment_ids
    out = jax.vmap(lambda q, k, v, qs, ks: kernel(q, k, v, segment_ids=SegmentIds(qs, ks)))(
        q, k, v, q_seg.astype(jnp.int32), k_seg.astype(jnp.int32))
  return out.transpose(0, 2, 1, 3).astype(query.dtype)
