"""Decoder-only language model: embeddings -> N blocks -> norm -> logits."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from models import kv_cache, positional, scan
from models.config import ModelConfig
from models.layers import (Block, Embed, Projection, dropout, dtype_of, fold_key, make_norm,
                           soft_cap)
from models.sharding import RESIDUAL, constrain


def layer_window(cfg: ModelConfig, layer: int) -> int | None:
  """The sliding-window size of `layer` (None: full attention): `cfg.sliding_window` where
  `cfg.window_pattern` (cycled over layers) has 'L', every layer when the pattern is ''."""
  pattern = cfg.window_pattern
  if pattern and pattern[layer % len(pattern)] == 'G':
    return None
  return cfg.sliding_window


class DecoderLM(nnx.Module):
  """tokens [B, T] -> logits [B, T, V] (fp32).

  With `cross_attention=True` every block also attends over a `context` (the decoder of
  models/encoder_decoder.py); `num_layers` overrides `cfg.num_layers`.
  """

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, *, num_layers: int | None = None,
               cross_attention: bool = False):
    self.d_model, self.positional = cfg.d_model, cfg.positional
    self.scale_embeddings = cfg.scale_embeddings
    self.dropout = cfg.dropout
    self.uses_rng = self.dropout > 0   # training/loop.py passes a per-step key then
    emb = dict(std=cfg.init_std, dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
    self.embed = Embed(cfg.vocab_size, cfg.d_model, **emb)
    self.pos_embed = (Embed(cfg.max_len, cfg.d_model, axes=(None, 'embed'), **emb)
                      if cfg.positional == 'learned' else None)
    n = cfg.num_layers if num_layers is None else num_layers
    blocks = [Block(cfg, rngs, sliding_window=layer_window(cfg, i), cross_attention=cross_attention)
              for i in range(n)]
    self.scan_layers, self.remat, self.num_layers = cfg.scan_layers, cfg.remat, n
    if cfg.scan_layers and len({layer_window(cfg, i) for i in range(n)}) > 1:
      raise ValueError('model.scan_layers=True needs identical layers; these sliding windows '
                       'differ per layer. Set model.scan_layers=False.')
    # Scanned: one Block with parameters stacked [L, ...] (same init as unrolled; models/scan.py).
    self.layers = scan.stack_modules(blocks) if cfg.scan_layers else nnx.List(blocks)
    self.final_norm = make_norm(cfg) if cfg.norm_position != 'post' else None
    self.final_softcap = cfg.final_logit_softcap
    # Sampling sets it (sampling/sampler.py): see `logits`.
    self.logit_slices = 1
    self.lm_head = (None if cfg.tie_embeddings else
                    Projection((cfg.d_model,), (cfg.vocab_size,), ('embed', 'vocab'),
                               use_bias=False, std=cfg.init_std, dtype=cfg.dtype,
                               param_dtype=cfg.param_dtype, rngs=rngs))

  def embed_tokens(self, tokens: jnp.ndarray, positions: jnp.ndarray) -> jnp.ndarray:
    """[B, T] -> [B, T, D]: token embeddings plus absolute positions when configured."""
    x = self.embed(tokens, math.sqrt(self.d_model) if self.scale_embeddings else None)
    if self.positional == 'sinusoidal':
      x = x + positional.sinusoidal(positions, self.d_model).astype(x.dtype)
    elif self.pos_embed is not None:
      x = x + self.pos_embed(positions)
    return x

  def logits(self, x: jnp.ndarray) -> jnp.ndarray:
    """Final hidden states [B, T, D] -> fp32 logits [B, T, V] (soft-capped when configured)."""
    if self.final_norm is not None:
      x = self.final_norm(x)
    if self.lm_head is None:
      logits = self.embed.attend(x)
    elif self.logit_slices > 1:
      logits = self.sliced_lm_head(x, self.logit_slices).astype(jnp.float32)
    else:
      logits = self.lm_head(x).astype(jnp.float32)
    return soft_cap(logits, self.final_softcap)

  def sliced_lm_head(self, x: jnp.ndarray, n: int) -> jnp.ndarray:
    """`lm_head(x)` [B, T, V] in `n` vocab slices, each dot after the previous one: XLA:CPU
    computes a bf16 dot from an f32 copy of the weight, here of one slice at a time (the whole
    lm_head was a sampling step's largest temporary). The same dot per logit."""
    head = self.lm_head
    assert head.bias is None and head.lora is None, 'the lm_head is a plain projection'
    w = head.kernel[...]   # [D, V]
    x2d = x.astype(head.dtype).reshape(-1, x.shape[-1])
    step = -(-w.shape[1] // n)
    outs, after = [], x2d
    for a in range(0, w.shape[1], step):
      # the barrier ties this slice to the previous dot's output: converted only after it
      part, _ = jax.lax.optimization_barrier((w[:, a:a + step], after))
      after = x2d @ part.astype(head.dtype)
      outs.append(after)
    return jnp.concatenate(outs, axis=1).reshape(*x.shape[:-1], w.shape[1])

  def layer_list(self) -> list:
    """The blocks one by one (scanned layers: per-layer views of the stacked parameters)."""
    return scan.unstack_module(self.layers) if self.scan_layers else list(self.layers)

  def init_cache(self, batch: int, length: int, dtype=None) -> list[kv_cache.LayerCache]:
    """An empty KV cache per layer: L = `length` slots, or a ring of W for windowed layers."""
    layers = [self.layers] * self.num_layers if self.scan_layers else self.layers
    return [kv_cache.init(batch, length, l.attn.num_kv_heads, l.attn.head_dim,
                          dtype or dtype_of(l.attn.k.dtype), window=l.attn.sliding_window)
            for l in layers]

  def context_caches(self, context: jnp.ndarray,
                     context_mask: jnp.ndarray | None = None) -> list[kv_cache.LayerCache]:
    """Every layer's cross-attention keys/values of `context` [B, S, D], computed once."""
    return [l.cross_attn.context_cache(context, context_mask) for l in self.layer_list()]

  def __call__(self, tokens: jnp.ndarray, positions: jnp.ndarray | None = None,
               segment_ids: jnp.ndarray | None = None, *,
               cache: list[kv_cache.LayerCache] | None = None,
               cache_index: jnp.ndarray | None = None, context: jnp.ndarray | None = None,
               context_mask: jnp.ndarray | None = None,
               context_segment_ids: jnp.ndarray | None = None,
               context_cache: list[kv_cache.LayerCache] | None = None,
               rng: jax.Array | None = None):
    """tokens, positions, segment_ids: [B, T]. Positions default to 0..T-1. Packed rows
    (training/packing.py) give segment_ids (no attention across them) and positions that
    restart at each segment; context_segment_ids [B, S] then masks the cross attention.

    With `cache` (from `init_cache`) returns (logits, updated cache): cache_index None
    prefills the empty cache with the prompt, else tokens are decoded at slot cache_index;
    positions are then required, -1 marking left padding (see models/kv_cache.py).
    context [B, S, D], context_mask [B, S] (True = real token): cross-attention input, or
    context_cache: its per-layer keys and values from `context_caches`.
    rng: training key for dropout (`model.dropout`); None: no dropout.
    """
    ctx = [None] * self.num_layers if context_cache is None else context_cache
    layer_positions = positions   # None: the blocks' attention sees default positions
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    if cache is not None:
      x = self.embed_tokens(tokens, jnp.maximum(positions, 0))
      new_cache = []
      for layer, layer_cache, layer_ctx in zip(self.layer_list(), cache, ctx):
        x, layer_cache = layer(x, positions, cache=layer_cache, cache_index=cache_index,
                               context=context, context_mask=context_mask,
                               context_cache=layer_ctx)
        new_cache.append(layer_cache)
      return self.logits(x), new_cache
    x = dropout(self.embed_tokens(tokens, positions), self.dropout, fold_key(rng, 0))
    x = constrain(x, RESIDUAL)
    rngs = [fold_key(rng, i + 1) for i in range(self.num_layers)]
    if context_cache is not None:   # per-layer cross-attention caches: one block at a time
      for layer, layer_ctx, layer_rng in zip(self.layer_list(), ctx, rngs):
        x = layer(x, layer_positions, segment_ids=segment_ids, context=context,
                  context_mask=context_mask, context_segment_ids=context_segment_ids,
                  context_cache=layer_ctx, rng=layer_rng)
    else:
      x = scan.run_layers(self.layers, x, self.scan_layers, self.remat, positions=layer_positions,
                          segment_ids=segment_ids, context=context, context_mask=context_mask,
                          context_segment_ids=context_segment_ids, per_layer={'rng': rngs})
    return constrain(self.logits(constrain(x, RESIDUAL)), ('batch', 'length', 'vocab'))
