"""The KV cache: one small pytree per attention layer, allocated once and updated in place.

A `LayerCache` holds, for a batch of B sequences:
  k:    [B, K, H, S]  keys, head-major and transposed (K = num_kv_heads: GQA / MQA shrink the
                      cache by N / K): a decode token's scores are a plain [G, H] x [H, S]
                      matmul per (row, head) against the cache as stored (on XLA:CPU ~3x faster
                      than contracting the minor dimension of both operands)
  v:    [B, K, S, H]  values, head-major: the [G, S] x [S, H] product reads it as stored
  pos:  [B, S] int32  the position of the token held in each slot; -1 = empty or padding
S is the allocated length L for full-attention layers and the window W for sliding-window
layers, which keep a ring buffer (O(W) memory): the token of step index i lives in slot i % S
(i < L, so a full cache never wraps). The index is shared by the batch: prompts are
left-padded, so rows differ only in their positions, and padding (position -1) is never
attended to.

  prefill(cache, k, v, positions)        the T prompt tokens go to slots 0..T-1 (ring: the last W)
  append(cache, k, v, positions, index)  T new tokens go to slots index..index+T-1 (mod S)
  grow(cache, empty)                     the same tokens in a longer cache (between decode chunks)
  attend(q, positions, cache, ...)       attention of queries [B, T, N, H] over the cache

Attention reads every slot of the cache, so a step costs O(S). The sampler keeps S close to the
filled length: it allocates one of `view_sizes` (multiples of 128 growing by ~1.25x) that holds
the next chunk of decode steps and `grow`s the cache between chunks. (Reading a prefix of a longer
cache instead costs a copy of that prefix each step on CPU: XLA cannot pass a slice to a dot.)

Every update is a `lax.dynamic_update_slice` (or one scatter) of the buffers, so under a jit that
donates them the cache is written in place. An encoder-decoder's cross-attention cache is the
same pytree, filled once by `prefill` with the encoder's keys and values and only attended to.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import struct

from models.attention import attention_mask, choose_implementation, dot_product_attention

VIEW_BLOCK, VIEW_GROWTH = 128, 1.25   # cache lengths the sampler allocates: see view_sizes
SLOT_AXES = (3, 2, 1)   # the slot axis of LayerCache.buffers(): k [B, K, H, S], v [B, K, S, H], pos


@struct.dataclass
class LayerCache:
  """One attention layer's cache. See the module docstring."""
  k: jax.Array     # [B, K, H, S] keys (transposed), in the cache dtype
  v: jax.Array     # [B, K, S, H] values
  pos: jax.Array   # [B, S] int32, the position held in each slot (-1 = empty)

  @property
  def size(self) -> int:
    return self.pos.shape[1]

  def buffers(self) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(k, v, pos); their slot axes are `SLOT_AXES`."""
    return self.k, self.v, self.pos

  @classmethod
  def from_sequence(cls, k: jax.Array, v: jax.Array, pos: jax.Array) -> 'LayerCache':
    """A cache holding k, v [B, S, K, H] (the projections' layout) at positions pos [B, S]."""
    return cls(k.transpose(0, 2, 3, 1), v.transpose(0, 2, 1, 3), pos.astype(jnp.int32))

  def sequence(self) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(k, v [B, S, K, H], pos [B, S]): the layout `dot_product_attention` takes (XLA cancels
    these transposes against those of `from_sequence`)."""
    return self.k.transpose(0, 3, 1, 2), self.v.transpose(0, 2, 1, 3), self.pos



def init(batch: int, length: int, num_kv_heads: int, head_dim: int, dtype=jnp.float32,
         window: int | None = None) -> LayerCache:
  """An empty cache of L = `length` slots, or min(window, length) ring slots for a window."""
  size = length if window is None else min(window, length)
  return LayerCache(jnp.zeros((batch, num_kv_heads, head_dim, size), dtype),
                    jnp.zeros((batch, num_kv_heads, size, head_dim), dtype),
                    jnp.full((batch, size), -1, jnp.int32))


def prefill(cache: LayerCache, k: jax.Array, v: jax.Array, positions: jax.Array) -> LayerCache:
  """Stores T prompt tokens (k, v: [B, T, K, H], positions [B, T]) in an empty cache.

  Token j goes to slot j % S; when T > S (a ring shorter than the prompt) only the last S
  tokens are kept, which is all a window of S ever sees again.
  """
  t, s = k.shape[1], cache.size
  new = LayerCache.from_sequence(k, v, positions)
  if t <= s:
    return LayerCache(*(jax.lax.dynamic_update_slice_in_dim(old, x.astype(old.dtype), 0, axis=a)
                        for old, x, a in zip(cache.buffers(), new.buffers(), SLOT_AXES)))
  shift = (t - s) % s   # token j = t - s + i sits at position i of the tail; its slot is j % s
  return LayerCache(*(jnp.roll(jax.lax.slice_in_dim(x, t - s, t, axis=a), shift, axis=a)
                      .astype(old.dtype)
                      for old, x, a in zip(cache.buffers(), new.buffers(), SLOT_AXES)))


def append(cache: LayerCache, k: jax.Array, v: jax.Array, positions: jax.Array,
           index: jax.Array) -> LayerCache:
  """Writes T new tokens (k, v: [B, T, K, H], positions [B, T]) at slots index.. (mod S).

  A ring (sliding-window) cache must take one token at a time: a longer write would evict keys
  its own earlier tokens still attend to.

  """
  new = LayerCache.from_sequence(k, v, positions)
  s, t = cache.size, k.shape[1]
  if t == 1:
    slot = jnp.asarray(index, jnp.int32) % s
    out = LayerCache(*(jax.lax.dynamic_update_slice_in_dim(old, x.astype(old.dtype), slot, axis=a)
                       for old, x, a in zip(cache.buffers(), new.buffers(), SLOT_AXES)))
  else:
    slots = (jnp.asarray(index, jnp.int32) + jnp.arange(t)) % s
    out = LayerCache(cache.k.at[..., slots].set(new.k.astype(cache.k.dtype), unique_indices=True),
                     cache.v.at[:, :, slots].set(new.v.astype(cache.v.dtype), unique_indices=True),
                     cache.pos.at[:, slots].set(new.pos, unique_indices=True))
  return out


def grow(cache: LayerCache, empty: LayerCache) -> LayerCache:
  """`cache`'s slots 0..S-1 copied into the front of `empty` (from `init`, at least as long); the
  rest stays empty. `cache` itself when the sizes are equal (a full ring keeps its W slots).

  Only for a cache that has not wrapped (every token of step index i in slot i), which holds for
  a full cache and for a ring shorter than its window: its S was the whole allocated length.
  """
  if empty.size == cache.size:
    return cache
  if empty.size < cache.size:
    raise ValueError(f'cannot grow a cache of {cache.size} slots to {empty.size}.')
  return LayerCache(*(jax.lax.dynamic_update_slice_in_dim(new, old, 0, axis=a)
                      for old, new, a in zip(cache.buffers(), empty.buffers(), SLOT_AXES)))


def view_sizes(size: int, block: int = VIEW_BLOCK, growth: float = VIEW_GROWTH) -> list[int]:
  """Cache lengths up to `size`: multiples of `block`, each at least `growth` times the one
  before, then `size`. Allocating the smallest one that holds the filled slots makes a decode
  step cost at most ~growth x the filled length (plus one block)."""
  sizes, n = [], block
  while n < size:
    sizes.append(n)
    n = max(n + block, -(-int(n * growth) // block) * block)
  return sizes + [size]


def decode_kernel_supported(q: jax.Array, cache: LayerCache, *, backend: str,
                            window: int | None, filled: bool, soft_cap: bool,
                            implementation: str | None) -> bool:
  """Whether `attend` runs jax's Pallas GPU decode kernel (`decode_kernel`): 'auto' on a GPU,
  one query token over a full cache (no window ring) whose filled length is known, S a multiple
  of 128 (the kernel's key blocks), head_dim a multiple of 16, no soft cap. A pure function of
  backend, shapes and flags."""
  return (implementation in (None, 'auto') and backend == 'gpu' and q.shape[1] == 1
          and window is None and filled and not soft_cap and cache.size % 128 == 0
          and q.shape[-1] % 16 == 0)


def decode_kernel(q: jax.Array, cache: LayerCache, filled: jax.Array, *, scale: float,
                  interpret: bool = False) -> jax.Array:
  """One token's attention over a full cache with jax's Pallas GPU decode kernel
  (`jax.experimental.pallas.ops.gpu.decode_attention`, split-K flash decoding), which reads
  only the key blocks below `filled`. q: [B, 1, N, H] -> [B, 1, N, H].

  The cache's occupied slots of row b are one run [start_b, filled): left padding, then the
  prompt and the decoded tokens (see the module docstring), all at positions <= the query's,
  so the kernel's [start, end) slot range is exactly the causal, non-empty key set.
  interpret: run the kernel in the Pallas interpreter (any backend; tests)."""
  from jax.experimental.pallas.ops.gpu import decode_attention
  splits = math.gcd(16, cache.size // 128)
  start = jnp.argmax(cache.pos >= 0, axis=1).astype(jnp.int32)   # first occupied slot
  end = jnp.broadcast_to(jnp.asarray(filled, jnp.int32), start.shape)
  k, v, _ = cache.sequence()
  out = decode_attention.gqa(q[:, 0], k, v, start, end, sm_scale=scale, block_k=128,
                             k_splits=splits, interpret=interpret)
  return out[:, None].astype(q.dtype)


def attend(q: jax.Array, positions: jax.Array, cache: LayerCache, *, window: int | None = None,
           filled: jax.Array | None = None, implementation: str | None = None,
           scale: float | None = None, logits_soft_cap: float | None = None) -> jax.Array:
  """Causal (windowed) attention of queries over the cached keys. Returns [B, T, N, H].

  q: [B, T, N, H] at `positions` [B, T] (-1: padding, attends to nothing). A key is visible
  when its slot is not empty, its position <= the query's, and (window W) within W - 1 of it.
  filled: number of slots in use, all in a prefix (a full cache). When given, one decode token
  goes to `decode_kernel` on a GPU, which reads only the filled blocks; elsewhere every slot is
  read (empty ones masked), so callers keep S close to the filled length (see `grow`).
  scale, logits_soft_cap: as in `dot_product_attention`. When its 'xla' reference is the
  implementation chosen, the same softmax runs on the cache's own layout
  (`_stored_layout_attention`).
  """
  local = None if window is None else (window - 1, 0)
  if decode_kernel_supported(q, cache, backend=jax.default_backend(), window=window,
                             filled=filled is not None, soft_cap=logits_soft_cap is not None,
                             implementation=implementation):
    return decode_kernel(q, cache, filled, scale=q.shape[-1] ** -0.5 if scale is None else scale)

  k, v, pos = cache.sequence()
  chosen = implementation
  if chosen in (None, 'auto'):
    chosen = choose_implementation(q, k, is_causal=True, local_window=local, positions=True,
                                   mask=True, soft_cap=logits_soft_cap is not None)
  if chosen == 'xla':   # the reference formulation, on the cache's own layout
    attention = functools.partial(_stored_layout_attention, local=local,
                                  scale=q.shape[-1] ** -0.5 if scale is None else scale,
                                  cap=logits_soft_cap)
    # Padding queries (position -1) attend to nothing: zeros. Skipping an all-padding batch in
    # a conditional also keeps the cache's in-place update out of the attention's fusions:
    # reading a bitcast of the updated buffer (a batch-1 cache's dot drops the unit dimension)
    # made XLA:CPU copy the whole cache every decode step.
    return jax.lax.cond(jnp.any(positions >= 0), attention, lambda q, *_: jnp.zeros_like(q),
                        q, positions, cache)
  return dot_product_attention(q, k, v, mask=(pos >= 0)[:, None, None, :], is_causal=True,
                               local_window_size=local, query_positions=positions,
                               key_positions=pos, implementation=implementation, scale=scale,
                               logits_soft_cap=logits_soft_cap)


def _stored_layout_attention(q: jax.Array, positions: jax.Array, cache: LayerCache, *, local,
                             scale: float, cap: float | None) -> jax.Array:
  """What `head_major_attention` computes (the reference's masked softmax), on the cache's layout
  and with fewer passes over the [.., S] scores, which a decode step's cost grows with: the scale
  is applied to the queries, the scores keep the [B, K, G*T, S] layout of the products, the
  softmax is normalised after the [G, S] x [S, H] product (on [G, H]), and a query sees at least
  its own slot unless it is padding (position -1: zeros), so no per-row "anything visible"
  reduction is needed. q: [B, T, N, H] -> [B, T, N, H]."""
  b, t, n, h = q.shape
  k, s = cache.k.shape[1], cache.size
  g = n // k
  qs = (q.astype(jnp.float32) * jnp.float32(scale)).astype(cache.k.dtype)
  qs = qs.reshape(b, t, k, g, h).transpose(0, 2, 3, 1, 4).reshape(b, k, g * t, h)
  logits = jnp.einsum('bkqh,bkhs->bkqs', qs, cache.k, preferred_element_type=jnp.float32)
  if cap is not None:
    logits = jnp.tanh(logits / jnp.float32(cap)) * jnp.float32(cap)
  # Scores stay [B, K, G*T, S] (rows: g major, t minor), so no reshape copies them.
  visible = attention_mask(b, t, s, is_causal=True, local_window_size=local,
                           query_positions=positions, key_positions=cache.pos)   # [B, 1, T, S]
  visible = jnp.tile(visible, (1, 1, g, 1)) if t > 1 else visible
  logits = jnp.where(visible, logits, -jnp.inf)
  peak = jnp.max(logits, axis=-1, keepdims=True)
  peak = jnp.where(peak > -jnp.inf, peak, 0.0)   # a padding row (nothing visible): no NaNs
  weights = jnp.exp(logits - peak)                                      # [B, K, G*T, S]
  total = jnp.sum(weights, axis=-1, keepdims=True)                      # [B, K, G*T, 1]
  out = jnp.einsum('bkqs,bksh->bkqh', weights.astype(cache.v.dtype), cache.v,
                   preferred_element_type=jnp.float32)                  # [B, K, G*T, H]
  real = jnp.tile((positions >= 0)[:, None, :, None], (1, 1, g, 1))     # [B, 1, G*T, 1]
  out = jnp.where(real, out / jnp.where(real, total, 1.0), 0.0).reshape(b, k, g, t, h)
  return out.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h).astype(q.dtype)
