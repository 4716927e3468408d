"""Turning next-token logits into tokens: greedy, temperature, top-k, top-p (nucleus).

All controls are traced values, so changing them never recompiles.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def filter_logits(logits: jnp.ndarray, top_k, top_p) -> jnp.ndarray:
  """Sets logits outside the top-k, then outside the top-p nucleus, to -inf. logits: [B, V].

  top_k <= 0 disables top-k; top_p >= 1 disables top-p. Ties with the last kept logit are kept.
  """
  vocab = logits.shape[-1]
  sorted_desc = -jnp.sort(-logits, axis=-1)
  k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
  kth = jnp.take_along_axis(sorted_desc, jnp.broadcast_to(k - 1, logits.shape[:-1] + (1,)), -1)
  ranks = jnp.arange(vocab)
  sorted_desc = jnp.where(ranks < k, sorted_desc, -jnp.inf)
  probs = jax.nn.softmax(sorted_desc, axis=-1)
  # A token stays in the nucleus if the mass strictly before it is < top_p (the first always does).
  in_nucleus = (jnp.cumsum(probs, axis=-1) - probs) < top_p
  last = jnp.sum(in_nucleus & (ranks < k), axis=-1, keepdims=True) - 1
  threshold = jnp.maximum(jnp.take_along_axis(sorted_desc, last, -1), kth)
  return jnp.where(logits < threshold, -jnp.inf, logits)


def sample_tokens(rng: jax.Array, logits: jnp.ndarray, temperature, top_k=0,
                  top_p=1.0) -> jnp.ndarray:
  """[B, V] fp32 logits -> [B] int32 tokens. temperature == 0 is greedy (argmax).

  temperature, top_k, top_p: scalars. Greedy decoding, and sampling with top-k and top-p off,
  skip `filter_logits` (its sort over the vocabulary) in a `lax.cond`."""
  def sample(logits):
    scaled = logits / jnp.maximum(temperature, 1e-6)
    filtered = jax.lax.cond((top_k > 0) | (top_p < 1), lambda x: filter_logits(x, top_k, top_p),
                            lambda x: x, scaled)
    return jax.random.categorical(rng, filtered, axis=-1).astype(jnp.int32)

  return jax.lax.cond(temperature > 0, sample,
                      lambda logits: jnp.argmax(logits, axis=-1).astype(jnp.int32), logits)
