"""Decoder-only language model: embeddings -> N blocks -> norm -> logits."""
from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from models import positional
from models.layers import Block, Embed, Projection, make_norm


def layer_window(cfg, layer: int) -> int | None:
  """The sliding-window size of `layer` (None: full attention)."""
  return cfg.sliding_window


class DecoderLM(nnx.Module):
  """tokens [B, T] -> logits [B, T, V] (fp32)."""

  def __init__(self, cfg, rngs: nnx.Rngs):
    self.d_model, self.positional = cfg.d_model, cfg.positional
    self.scale_embeddings = cfg.scale_embeddings
    emb = dict(std=cfg.init_std, dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
    self.embed = Embed(cfg.vocab_size, cfg.d_model, **emb)
    self.pos_embed = (Embed(cfg.max_len, cfg.d_model, axes=(None, 'embed'), **emb)
                      if cfg.positional == 'learned' else None)
    self.layers = nnx.List([Block(cfg, rngs, sliding_window=layer_window(cfg, i))
                            for i in range(cfg.num_layers)])
    self.final_norm = make_norm(cfg) if cfg.norm_position == 'pre' else None
    self.lm_head = (None if cfg.tie_embeddings else
                    Projection((cfg.d_model,), (cfg.vocab_size,), ('embed', 'vocab'),
                               use_bias=False, std=cfg.init_std, dtype=cfg.dtype,
                               param_dtype=cfg.param_dtype, rngs=rngs))

  def embed_tokens(self, tokens: jnp.ndarray, positions: jnp.ndarray) -> jnp.ndarray:
    """[B, T] -> [B, T, D]: token embeddings plus absolute positions when configured."""
    x = self.embed(tokens)
    if self.scale_embeddings:
      x = x * jnp.sqrt(jnp.float32(self.d_model)).astype(x.dtype)
    if self.positional == 'sinusoidal':
      x = x + positional.sinusoidal(positions, self.d_model).astype(x.dtype)
    elif self.pos_embed is not None:
      x = x + self.pos_embed(positions)
    return x

  def logits(self, x: jnp.ndarray) -> jnp.ndarray:
    """Final hidden states [B, T, D] -> fp32 logits [B, T, V]."""
    if self.final_norm is not None:
      x = self.final_norm(x)
    if self.lm_head is None:
      return self.embed.attend(x)
    return self.lm_head(x).astype(jnp.float32)

  def __call__(self, tokens: jnp.ndarray, positions: jnp.ndarray | None = None,
               segment_ids: jnp.ndarray | None = None) -> jnp.ndarray:
    """tokens, positions, segment_ids: [B, T]. Positions default to 0..T-1."""
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    x = self.embed_tokens(tokens, positions)
    for layer in self.layers:
      x = layer(x, positions, segment_ids=segment_ids)
    return self.logits(x)
