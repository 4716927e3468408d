"""Positional information: rotary embeddings (RoPE) and Vaswani's sinusoidal table.

Learned absolute positions are an embedding table and live in the models.
"""
from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp

ROPE_SCALINGS = ('none', 'linear', 'llama3')


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """Context-extension rescaling of the RoPE frequencies (`model.rope_scaling`).

  'linear': every frequency / factor (position interpolation). 'llama3': wavelengths longer
  than original_max_len / low_freq_factor are divided by `factor`, those shorter than
  original_max_len / high_freq_factor are kept, and the band between is interpolated smoothly
  (Llama 3.1). Frozen and hashable: it lives in the static part of a module.
  """
  kind: str = 'none'
  factor: float = 1.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_len: int = 8192

  @classmethod
  def from_config(cls, c) -> 'RopeScaling':
    """From `model.rope_scaling` (a ConfigDict or dict; None: no scaling)."""
    if c is None:
      return cls()
    return cls(c['kind'], float(c['factor']), float(c['low_freq_factor']),
               float(c['high_freq_factor']), int(c['original_max_len']))


def scale_inv_frequencies(inv_freq: jnp.ndarray, scaling: RopeScaling) -> jnp.ndarray:
  """Applies `scaling` to [H/2] inverse frequencies (computed in fp32, as Hugging Face does)."""
  if scaling.kind == 'none':
    return inv_freq
  if scaling.kind == 'linear':
    return inv_freq / scaling.factor
  if scaling.kind == 'llama3':
    wavelen = 2 * math.pi / inv_freq
    low_wavelen = scaling.original_max_len / scaling.low_freq_factor
    high_wavelen = scaling.original_max_len / scaling.high_freq_factor
    smooth = ((scaling.original_max_len / wavelen - scaling.low_freq_factor)
              / (scaling.high_freq_factor - scaling.low_freq_factor))
    interpolated = (1 - smooth) * inv_freq / scaling.factor + smooth * inv_freq
    return jnp.where(wavelen < high_wavelen, inv_freq,
                     jnp.where(wavelen > low_wavelen, inv_freq / scaling.factor, interpolated))
  raise ValueError(f'model.rope_scaling.kind={scaling.kind!r} is unknown; choose one of '
                   f'{", ".join(ROPE_SCALINGS)}.')


def rope_inv_frequencies(head_dim: int, theta: float,
                         scaling: RopeScaling | None = None) -> jnp.ndarray:
  """[H/2] inverse frequencies theta^(-2i/H), rescaled by `scaling` when given."""
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  return inv_freq if scaling is None else scale_inv_frequencies(inv_freq, scaling)


def apply_rope(x: jnp.ndarray, positions: jnp.ndarray, theta: float,
               inv_freq: jnp.ndarray | None = None,
               scaling: RopeScaling | None = None) -> jnp.ndarray:
  """Rotates channel pairs (i, i + H/2) of x [B, T, N, H] by angle position * inv_freq[i].

  The half-split pairing is the one Llama-family checkpoints use (Hugging Face `rotate_half`),
  so their q/k weights load without a permutation. positions: [B|1, T] ints.
  """
  h = x.shape[-1]
  if inv_freq is None:
    inv_freq = rope_inv_frequencies(h, theta, scaling)
  angles = positions[..., None].astype(jnp.float32) * inv_freq      # [B|1, T, H/2]
  cos, sin = jnp.cos(angles)[:, :, None, :], jnp.sin(angles)[:, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


def sinusoidal(positions: jnp.ndarray, dim: int, max_timescale: float = 10_000.0) -> jnp.ndarray:
  """Vaswani et al.: PE[p, 2i] = sin(p / 10000^(2i/d)), PE[p, 2i+1] = cos(...). [B, T] -> [B, T, D]."""
  inv = 1.0 / (max_timescale ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
  angles = positions[..., None].astype(jnp.float32) * inv            # [B, T, D/2]
  return jnp.stack([jnp.sin(angles), jnp.cos(angles)], axis=-1).reshape(*positions.shape, dim)
