"""Positional information: rotary embeddings (RoPE) and Vaswani's sinusoidal table.

Learned absolute positions are an embedding table and live in the models.
"""
from __future__ import annotations

import jax.numpy as jnp


def rope_inv_frequencies(head_dim: int, theta: float) -> jnp.ndarray:
  """[H/2] inverse frequencies theta^(-2i/H)."""
  return 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))


def apply_rope(x: jnp.ndarray, positions: jnp.ndarray, theta: float,
               inv_freq: jnp.ndarray | None = None) -> jnp.ndarray:
  """Rotates channel pairs (i, i + H/2) of x [B, T, N, H] by angle position * inv_freq[i].

  The half-split pairing is the one Llama-family checkpoints use. positions: [B, T] ints.
  """
  h = x.shape[-1]
  if inv_freq is None:
    inv_freq = rope_inv_frequencies(h, theta)
  angles = positions[..., None].astype(jnp.float32) * inv_freq      # [B, T, H/2]
  cos, sin = jnp.cos(angles)[:, :, None, :], jnp.sin(angles)[:, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


def sinusoidal(positions: jnp.ndarray, dim: int, max_timescale: float = 10_000.0) -> jnp.ndarray:
  """Vaswani et al.: PE[p, 2i] = sin(p / 10000^(2i/d)), PE[p, 2i+1] = cos(...). [B, T] -> [B, T, D]."""
  inv = 1.0 / (max_timescale ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
  angles = positions[..., None].astype(jnp.float32) * inv            # [B, T, D/2]
  return jnp.stack([jnp.sin(angles), jnp.cos(angles)], axis=-1).reshape(*positions.shape, dim)
