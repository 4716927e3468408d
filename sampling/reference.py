"""The reference generator: a full forward pass over the whole sequence for every new token.

Slow (O(T^2) per token) but obviously correct; the cached sampler is tested against it.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from sampling.rules import sample_tokens


@functools.partial(jax.jit, static_argnames=('graphdef', 'max_new_tokens'))
def generate_reference(graphdef, params, prompt: jnp.ndarray, rng: jax.Array, *,
                       max_new_tokens: int, temperature=0.0, top_k=0, top_p=1.0) -> jnp.ndarray:
  """prompt: [B, P] int32 (all rows the same length) -> [B, P + max_new_tokens] tokens."""
  model = nnx.merge(graphdef, params)
  b, p = prompt.shape
  buf = jnp.concatenate([prompt, jnp.zeros((b, max_new_tokens), prompt.dtype)], axis=1)

  def body(i, carry):
    buf, rng = carry
    rng, step_rng = jax.random.split(rng)
    logits = jax.lax.dynamic_index_in_dim(model(buf), i - 1, axis=1, keepdims=False)
    token = sample_tokens(step_rng, logits, temperature, top_k, top_p)
    return jax.lax.dynamic_update_index_in_dim(buf, token.astype(buf.dtype), i, axis=1), rng

  buf, _ = jax.lax.fori_loop(p, p + max_new_tokens, body, (buf, rng))
  return buf
