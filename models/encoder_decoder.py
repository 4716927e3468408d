"""Encoder-decoder transformer (Vaswani et al. 2017) built from the decoder-only model's layers.

The encoder is a stack of `Block`s with bidirectional self-attention under a padding mask; the
decoder is a `DecoderLM` whose blocks add cross attention over the encoder output. Source and
target share one embedding table (and the output projection when `tie_embeddings`). Source
tokens equal to `model.pad_id` are padding: no query attends to them.
"""
from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from models.decoder import DecoderLM
from models.layers import Block, make_norm


class EncoderDecoder(nnx.Module):
  """(sources [B, S], targets [B, T]) -> logits [B, T, V] (fp32)."""

  def __init__(self, cfg, rngs: nnx.Rngs):
    self.pad_id = cfg.pad_id
    self.decoder = DecoderLM(cfg, rngs, num_layers=cfg.num_decoder_layers, cross_attention=True)
    self.encoder_layers = nnx.List([Block(cfg, rngs) for _ in range(cfg.num_encoder_layers)])
    self.encoder_norm = make_norm(cfg) if cfg.norm_position == 'pre' else None

  def source_mask(self, sources: jnp.ndarray) -> jnp.ndarray:
    """[B, S] bool, True at real (non-pad) source tokens."""
    return sources != self.pad_id

  def encode(self, sources: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """sources [B, S] -> (encoder output [B, S, D], source mask [B, S])."""
    mask = self.source_mask(sources)
    positions = jnp.broadcast_to(jnp.arange(sources.shape[1]), sources.shape)
    x = self.decoder.embed_tokens(sources, positions)   # the shared embedding table
    attn_mask = mask[:, None, None, :]                  # keys: real tokens only
    for layer in self.encoder_layers:
      x = layer(x, positions, causal=False, mask=attn_mask)
    if self.encoder_norm is not None:
      x = self.encoder_norm(x)
    return x, mask

  def decode(self, encoded: jnp.ndarray, source_mask: jnp.ndarray, targets: jnp.ndarray,
             positions: jnp.ndarray | None = None) -> jnp.ndarray:
    """Teacher-forced decoder: targets [B, T] (shifted right, starting with BOS) -> [B, T, V]."""
    return self.decoder(targets, positions, context=encoded, context_mask=source_mask)

  def __call__(self, sources: jnp.ndarray, targets: jnp.ndarray) -> jnp.ndarray:
    encoded, mask = self.encode(sources)
    return self.decode(encoded, mask, targets)
