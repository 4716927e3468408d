"""Encoder-decoder transformer (Vaswani et al. 2017) built from the decoder-only model's layers.

The encoder is a stack of `Block`s with bidirectional self-attention under a padding mask; the
decoder is a `DecoderLM` whose blocks add cross attention over the encoder output. Source and
target share one embedding table (and the output projection when `tie_embeddings`). Source
tokens equal to `model.pad_id` are padding: no query attends to them.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from models.config import ModelConfig
from models.decoder import DecoderLM
from models.layers import Block, dropout, fold_key, make_norm


class EncoderDecoder(nnx.Module):
  """(sources [B, S], targets [B, T]) -> logits [B, T, V] (fp32)."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.pad_id = cfg.pad_id
    self.decoder = DecoderLM(cfg, rngs, num_layers=cfg.num_decoder_layers, cross_attention=True)
    self.encoder_layers = nnx.List([Block(cfg, rngs) for _ in range(cfg.num_encoder_layers)])
    self.encoder_norm = make_norm(cfg) if cfg.norm_position != 'post' else None
    self.dropout = self.decoder.dropout
    self.uses_rng = self.decoder.uses_rng   # training/loop.py passes a per-step key then

  def source_mask(self, sources: jnp.ndarray) -> jnp.ndarray:
    """[B, S] bool, True at real (non-pad) source tokens."""
    return sources != self.pad_id

  def encode(self, sources: jnp.ndarray, rng: jax.Array | None = None, *,
             segment_ids: jnp.ndarray | None = None,
             positions: jnp.ndarray | None = None) -> tuple[jnp.ndarray, jnp.ndarray]:
    """sources [B, S] -> (encoder output [B, S, D], source mask [B, S]). rng: dropout key.
    Packed sources: segment_ids [B, S] (no attention across them), positions restarting."""
    mask = self.source_mask(sources)
    layer_positions = positions   # None: the layers' attention sees default positions
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(sources.shape[1]), sources.shape)
    x = self.decoder.embed_tokens(sources, positions)   # the shared embedding table
    x = dropout(x, self.dropout, fold_key(rng, 0))
    attn_mask = mask[:, None, None, :]                  # keys: real tokens only
    for i, layer in enumerate(self.encoder_layers):
      x = layer(x, layer_positions, segment_ids=segment_ids, causal=False, mask=attn_mask,
                rng=fold_key(rng, i + 1))
    if self.encoder_norm is not None:
      x = self.encoder_norm(x)
    return x, mask

  def decode(self, encoded: jnp.ndarray, source_mask: jnp.ndarray, targets: jnp.ndarray,
             positions: jnp.ndarray | None = None, rng: jax.Array | None = None, *,
             segment_ids: jnp.ndarray | None = None,
             source_segment_ids: jnp.ndarray | None = None) -> jnp.ndarray:
    """Teacher-forced decoder: targets [B, T] (shifted right, starting with BOS) -> [B, T, V].
    Packed pairs: segment_ids [B, T] and source_segment_ids [B, S] (pair k of a row is k on
    both sides) mask self and cross attention."""
    return self.decoder(targets, positions, segment_ids, context=encoded,
                        context_mask=source_mask, context_segment_ids=source_segment_ids,
                        rng=rng)

  def __call__(self, sources: jnp.ndarray, targets: jnp.ndarray,
               rng: jax.Array | None = None, *, source_segment_ids: jnp.ndarray | None = None,
               source_positions: jnp.ndarray | None = None,
               segment_ids: jnp.ndarray | None = None,
               positions: jnp.ndarray | None = None) -> jnp.ndarray:
    """rng: training key for dropout (`model.dropout`, the paper's 0.1); None: none.
    Packed rows (training/packing.py `pack_pairs`): segment ids and positions of both sides."""
    if (source_segment_ids is None) != (segment_ids is None):
      raise ValueError('packed pairs need both source_segment_ids and segment_ids, or neither.')
    encoded, mask = self.encode(sources, fold_key(rng, 0), segment_ids=source_segment_ids,
                                positions=source_positions)
    return self.decode(encoded, mask, targets, positions, rng=fold_key(rng, 1),
                       segment_ids=segment_ids, source_segment_ids=source_segment_ids)
