"""The KV cache: one small pytree per attention layer, allocated once and updated in place.

A `LayerCache` holds, for a batch of B sequences:
  k, v: [B, S, K, H]  keys and values (K = num_kv_heads: GQA / MQA shrink the cache by N / K)
  pos:  [B, S] int32  the position of the token held in each slot; -1 = empty or padding
S is the allocated length L for full-attention layers and the window W for sliding-window
layers, which keep a ring buffer (O(W) memory): the token of step index i lives in slot i % S
(i < L, so a full cache never wraps). The index is shared by the batch: prompts are
left-padded, so rows differ only in their positions, and padding (position -1) is never
attended to.

  prefill(cache, k, v, positions)        the T prompt tokens go to slots 0..T-1 (ring: the last W)
  append(cache, k, v, positions, index)  T new tokens go to slots index..index+T-1 (mod S)
  attend(q, positions, cache, ...)       attention of queries [B, T, N, H] over the cache

Every update is a `lax.dynamic_update_slice` (or one scatter) of the buffers, so under a jit that
donates them the cache is written in place. An encoder-decoder's cross-attention cache is the
same pytree, filled once by `prefill` with the encoder's keys and values and only attended to.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from models.attention import dot_product_attention

VIEW_BLOCK, VIEW_GROWTH = 128, 1.25   # decode reads the smallest such prefix holding every token


class LayerCache(NamedTuple):
  """k, v: [B, S, K, H]; pos: [B, S] int32 (-1 = empty). See the module docstring."""
  k: jax.Array
  v: jax.Array
  pos: jax.Array

  @property
  def size(self) -> int:
    return self.k.shape[1]


def init(batch: int, length: int, num_kv_heads: int, head_dim: int, dtype=jnp.float32,
         window: int | None = None) -> LayerCache:
  """An empty cache of L = `length` slots, or min(window, length) ring slots for a window."""
  size = length if window is None else min(window, length)
  shape = (batch, size, num_kv_heads, head_dim)
  return LayerCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype),
                    jnp.full((batch, size), -1, jnp.int32))


def prefill(cache: LayerCache, k: jax.Array, v: jax.Array, positions: jax.Array) -> LayerCache:
  """Stores T prompt tokens (k, v: [B, T, K, H], positions [B, T]) in an empty cache.

  Token j goes to slot j % S; when T > S (a ring shorter than the prompt) only the last S
  tokens are kept, which is all a window of S ever sees again.
  """
  t, s = k.shape[1], cache.size
  new = (k, v, positions.astype(jnp.int32))
  if t <= s:
    return LayerCache(*(jax.lax.dynamic_update_slice_in_dim(old, x.astype(old.dtype), 0, axis=1)
                        for old, x in zip(cache, new)))
  shift = (t - s) % s   # token j = t - s + i sits at position i of the tail; its slot is j % s
  return LayerCache(*(jnp.roll(x[:, t - s:], shift, axis=1).astype(old.dtype)
                      for old, x in zip(cache, new)))


def append(cache: LayerCache, k: jax.Array, v: jax.Array, positions: jax.Array,
           index: jax.Array) -> LayerCache:
  """Writes T new tokens (k, v: [B, T, K, H], positions [B, T]) at slots index.. (mod S).

  A ring (sliding-window) cache must take one token at a time: a longer write would evict keys
  its own earlier tokens still attend to.
  """
  new = (k, v, positions.astype(jnp.int32))
  s, t = cache.size, k.shape[1]
  if t == 1:
    slot = jnp.asarray(index, jnp.int32) % s
    return LayerCache(*(jax.lax.dynamic_update_slice_in_dim(old, x.astype(old.dtype), slot, axis=1)
                        for old, x in zip(cache, new)))
  slots = (jnp.asarray(index, jnp.int32) + jnp.arange(t)) % s
  return LayerCache(*(old.at[:, slots].set(x.astype(old.dtype), unique_indices=True)
                      for old, x in zip(cache, new)))


def view_sizes(size: int, block: int = VIEW_BLOCK, growth: float = VIEW_GROWTH) -> list[int]:
  """Prefix lengths decode may attend over: multiples of `block`, each at least `growth` times
  the one before, then `size`. Reading the smallest one that holds the filled slots costs at
  most ~growth x the filled length (plus one block)."""
  sizes, n = [], block
  while n < size:
    sizes.append(n)
    n = max(n + block, -(-int(n * growth) // block) * block)
  return sizes + [size]


def attend(q: jax.Array, positions: jax.Array, cache: LayerCache, *, window: int | None = None,
           filled: jax.Array | None = None, implementation: str | None = None,
           scale: float | None = None, logits_soft_cap: float | None = None) -> jax.Array:
  """Causal (windowed) attention of queries over the cached keys. Returns [B, T, N, H].

  q: [B, T, N, H] at `positions` [B, T] (-1: padding, attends to nothing). A key is visible
  when its slot is not empty, its position <= the query's, and (window W) within W - 1 of it.
  filled: number of slots in use, all in a prefix (a full cache). When given, only the
  smallest `view_sizes` prefix that holds them is read, so a step costs O(filled), not O(S).
  scale, logits_soft_cap: as in `dot_product_attention`.
  """
  local = None if window is None else (window - 1, 0)

  def over(n, q, positions, cache):
    k, v, pos = cache.k[:, :n], cache.v[:, :n], cache.pos[:, :n]
    return dot_product_attention(q, k, v, mask=(pos >= 0)[:, None, None, :], is_causal=True,
                                 local_window_size=local, query_positions=positions,
                                 key_positions=pos, implementation=implementation, scale=scale,
                                 logits_soft_cap=logits_soft_cap)

  sizes = view_sizes(cache.size)
  if filled is None or len(sizes) == 1:
    return over(cache.size, q, positions, cache)
  branch = jnp.sum(jnp.asarray(sizes[:-1]) < filled)   # the first size >= filled
  return jax.lax.switch(branch, [lambda *a, n=n: over(n, *a) for n in sizes], q, positions, cache)
