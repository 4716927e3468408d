"""Building blocks shared by every model: projections, norms, MLPs, embeddings, attention.

Parameters carry logical axis names (`out_sharding` metadata, e.g. ('embed', 'mlp')) that
`workdir/mesh.py` maps to mesh axes; modules never see the mesh.
"""
from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models import kv_cache, lora, positional
from models.attention import dot_product_attention
from models.config import ModelConfig


def dtype_of(name: str):
  return jnp.dtype(name)


def make_param(rngs: nnx.Rngs | None, shape: Sequence[int], axes: Sequence[str | None],
               std: float | None, dtype) -> nnx.Param:
  """A parameter: normal(std) when std is given, else ones. Annotated with logical axes."""
  if std is None:
    value = jnp.ones(shape, dtype)
  else:
    value = std * jax.random.normal(rngs.params(), shape, dtype)
  return nnx.Param(value, out_sharding=tuple(axes), eager_sharding=False)


class Projection(nnx.Module):
  """y = x . W (+ b) (+ a LoRA adapter's term, models/lora.py), contracting x's trailing
  `in_shape` dims. W: [*in_shape, *out_shape]."""

  def __init__(self, in_shape: Sequence[int], out_shape: Sequence[int],
               axes: Sequence[str | None], *, use_bias: bool, std: float, dtype: str,
               param_dtype: str, rngs: nnx.Rngs, lora: lora.Adapter | None = None):
    self.n_in = len(in_shape)
    self.lora = lora
    self.dtype = dtype_of(dtype)
    pdt = dtype_of(param_dtype)
    self.kernel = make_param(rngs, (*in_shape, *out_shape), axes, std, pdt)
    self.bias = (nnx.Param(jnp.zeros(tuple(out_shape), pdt), out_sharding=tuple(axes[self.n_in:]),
                           eager_sharding=False) if use_bias else None)

  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    kernel = self.kernel[...].astype(self.dtype)
    in_shape, out_shape = kernel.shape[:self.n_in], kernel.shape[self.n_in:]
    lead = x.shape[:x.ndim - self.n_in]
    # A plain 2-D matmul: XLA:CPU handles it far better than a multi-dim contraction.
    x2d = x.astype(self.dtype).reshape(-1, math.prod(in_shape))
    y = x2d @ kernel.reshape(math.prod(in_shape), math.prod(out_shape))
    if self.lora is not None:
      y = y + self.lora(x2d)
    y = y.reshape(*lead, *out_shape)
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    return y


def projection(cfg: ModelConfig, name: str, in_shape: Sequence[int], out_shape: Sequence[int],
               axes: Sequence[str | None], **kw) -> Projection:
  """A block's projection called `name` (q, k, v, o, gate, up, down), with a LoRA adapter when
  cfg.lora_targets names it (models/lora.py)."""
  return Projection(in_shape, out_shape, axes, **kw,
                    lora=lora.adapter_for(cfg, name, in_shape, out_shape, axes))


class Norm(nnx.Module):
  """RMSNorm (scale only) or LayerNorm (scale and bias); statistics in fp32.

  plus_one: the output is multiplied by (1 + scale) with scale initialised to 0 (Gemma's
  parameterisation: the stored weight is the offset from 1), else by scale (initialised to 1).
  """

  def __init__(self, dim: int, kind: str, eps: float, param_dtype: str, plus_one: bool = False):
    self.kind, self.eps, self.plus_one = kind, eps, plus_one
    pdt = dtype_of(param_dtype)
    self.scale = (nnx.Param(jnp.zeros((dim,), pdt), out_sharding=('norm',), eager_sharding=False)
                  if plus_one else make_param(None, (dim,), ('norm',), None, pdt))
    self.bias = (nnx.Param(jnp.zeros((dim,), pdt), out_sharding=('norm',),
                           eager_sharding=False) if kind == 'layernorm' else None)

  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    xf = x.astype(jnp.float32)
    if self.kind == 'layernorm':
      xf = xf - jnp.mean(xf, axis=-1, keepdims=True)
    y = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + self.eps)
    scale = self.scale[...].astype(jnp.float32)
    y = y * (1.0 + scale if self.plus_one else scale)
    if self.bias is not None:
      y = y + self.bias[...].astype(jnp.float32)
    return y.astype(x.dtype)


def make_norm(cfg: ModelConfig) -> Norm:
  return Norm(cfg.d_model, cfg.norm, cfg.norm_eps, cfg.param_dtype,
              plus_one=cfg.norm_scale_plus_one)


def soft_cap(x: jnp.ndarray, cap: float | None) -> jnp.ndarray:
  """cap * tanh(x / cap) (Gemma 2's logit soft-capping); x unchanged when cap is None."""
  return x if cap is None else jnp.tanh(x / cap) * cap


ACTIVATIONS = {'swiglu': jax.nn.silu, 'geglu': jax.nn.gelu, 'gelu': jax.nn.gelu,
               'relu': jax.nn.relu}
GATED = ('swiglu', 'geglu')


class Mlp(nnx.Module):
  """Feed-forward block: act(x W_gate) * (x W_up) -> W_down when gated, else act(x W_up) W_down."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    kw = dict(use_bias=cfg.mlp_bias, std=cfg.init_std, dtype=cfg.dtype,
              param_dtype=cfg.param_dtype, rngs=rngs)
    self.act = ACTIVATIONS[cfg.mlp_activation]
    self.gate = (projection(cfg, 'gate', (cfg.d_model,), (cfg.mlp_dim,), ('embed', 'mlp'), **kw)
                 if cfg.mlp_activation in GATED else None)
    self.up = projection(cfg, 'up', (cfg.d_model,), (cfg.mlp_dim,), ('embed', 'mlp'), **kw)
    self.down = projection(cfg, 'down', (cfg.mlp_dim,), (cfg.d_model,), ('mlp', 'embed'), **kw)

  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    h = self.up(x)
    h = self.act(self.gate(x)) * h if self.gate is not None else self.act(h)
    return self.down(h)


class Embed(nnx.Module):
  """Token embedding [V, D]; `attend` gives fp32 logits against the same table (tying)."""

  def __init__(self, vocab_size: int, dim: int, *, std: float, dtype: str, param_dtype: str,
               rngs: nnx.Rngs, axes=('vocab', 'embed')):
    self.dtype = dtype_of(dtype)
    self.embedding = make_param(rngs, (vocab_size, dim), axes, std, dtype_of(param_dtype))

  def __call__(self, tokens: jnp.ndarray, scale: float | None = None) -> jnp.ndarray:
    """[B, T] -> [B, T, D]; `scale` multiplies the rows in the table's dtype (as transformers'
    Gemma does: sqrt(3072) is 55.5 in bfloat16) before the cast to the compute dtype."""
    x = jnp.take(self.embedding[...], tokens, axis=0)
    if scale is not None:
      x = x * np.asarray(scale, np.float32).astype(x.dtype)
    return x.astype(self.dtype)

  def attend(self, x: jnp.ndarray) -> jnp.ndarray:
    return jnp.einsum('btd,vd->btv', x.astype(self.dtype), self.embedding[...].astype(self.dtype),
                      preferred_element_type=jnp.float32)


class Attention(nnx.Module):
  """Multi-head attention with grouped K/V heads (MHA: K = N, GQA: 1 < K < N, MQA: K = 1).

  Self-attention when `context` is None (RoPE applied to q and k when configured), else cross
  attention over `context` [B, S, D] (no rotary positions).
  """

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, *, rope: bool,
               sliding_window: int | None = None):
    h = cfg.head_dim
    kw = dict(use_bias=cfg.attention_bias, std=cfg.init_std, dtype=cfg.dtype,
              param_dtype=cfg.param_dtype, rngs=rngs)
    self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, h
    self.rope, self.rope_theta = rope, cfg.rope_theta
    self.rope_scaling = cfg.rope_scaling
    self.sliding_window = sliding_window
    scalar = cfg.query_pre_attn_scalar
    self.scale = 1.0 / math.sqrt(h if scalar is None else scalar)
    self.softcap = cfg.attn_logit_softcap
    self.implementation = None if cfg.attention == 'auto' else cfg.attention
    self.block_q, self.block_kv = cfg.attention_block_q, cfg.attention_block_kv
    self.q = projection(cfg, 'q', (cfg.d_model,), (cfg.num_heads, h),
                        ('embed', 'heads', 'head_dim'), **kw)
    self.k = projection(cfg, 'k', (cfg.d_model,), (cfg.num_kv_heads, h),
                        ('embed', 'kv_heads', 'head_dim'), **kw)
    self.v = projection(cfg, 'v', (cfg.d_model,), (cfg.num_kv_heads, h),
                        ('embed', 'kv_heads', 'head_dim'), **kw)
    self.o = projection(cfg, 'o', (cfg.num_heads, h), (cfg.d_model,),
                        ('heads', 'head_dim', 'embed'),
                        **dict(kw, use_bias=cfg.attention_out_bias))

  def __call__(self, x: jnp.ndarray, positions: jnp.ndarray | None, *, segment_ids=None,
               context: jnp.ndarray | None = None, context_mask: jnp.ndarray | None = None,
               causal: bool = True, mask: jnp.ndarray | None = None) -> jnp.ndarray:
    """x: [B, T, D]; positions: [B, T], or None for the default 0..T-1 (then the attention
    kernels see no explicit positions and 'auto' may pick cuDNN / splash); segment_ids: [B, T]
    (packed sequences).

    context: [B, S, D] for cross attention with context_mask [B, S] (True = real token).
    mask: extra boolean [B|1, 1, T, T] self-attention mask (e.g. encoder padding).
    """
    if context is not None:
      return self.attend_context(x, self.context_cache(context, context_mask))
    q, k, v = self.q(x), self.k(x), self.v(x)
    if self.rope:
      # Default positions as [1, T]: the rotation angles are computed once, not once per row.
      rope_pos = jnp.arange(x.shape[1])[None] if positions is None else positions
      q = positional.apply_rope(q, rope_pos, self.rope_theta, scaling=self.rope_scaling)
      k = positional.apply_rope(k, rope_pos, self.rope_theta, scaling=self.rope_scaling)
    window = None if self.sliding_window is None else (self.sliding_window - 1, 0)
    out = dot_product_attention(
        q, k, v, mask=mask, is_causal=causal, local_window_size=window,
        query_positions=positions, key_positions=positions, query_segment_ids=segment_ids,
        key_segment_ids=segment_ids, scale=self.scale, logits_soft_cap=self.softcap,
        implementation=self.implementation, block_q=self.block_q, block_kv=self.block_kv)
    return self.o(out)

  def context_cache(self, context: jnp.ndarray,
                    context_mask: jnp.ndarray | None = None) -> kv_cache.LayerCache:
    """Cross-attention keys and values of `context` [B, S, D], computed once for a whole
    decode; `pos` is the source position, -1 where context_mask [B, S] is False (padding)."""
    pos = jnp.broadcast_to(jnp.arange(context.shape[1], dtype=jnp.int32), context.shape[:2])
    if context_mask is not None:
      pos = jnp.where(context_mask, pos, -1)
    return kv_cache.LayerCache.from_sequence(self.k(context), self.v(context), pos)

  def attend_context(self, x: jnp.ndarray, cache: kv_cache.LayerCache, *, segment_ids=None,
                     context_segment_ids=None) -> jnp.ndarray:
    """Cross attention of x [B, T, D] over a `context_cache` (no positions, no causality).
    segment_ids [B, T] with context_segment_ids [B, S] (packed pairs): attend within equal ids."""
    if (segment_ids is None) != (context_segment_ids is None):
      raise ValueError('cross attention of packed pairs needs both segment_ids (targets) and '
                       'context_segment_ids (sources), or neither.')
    k, v, pos = cache.sequence()
    out = dot_product_attention(self.q(x), k, v, mask=(pos >= 0)[:, None, None],
                                query_segment_ids=segment_ids,
                                key_segment_ids=context_segment_ids,
                                scale=self.scale, logits_soft_cap=self.softcap,
                                implementation=self.implementation, block_q=self.block_q,
                                block_kv=self.block_kv)
    return self.o(out)

  def cached(self, x: jnp.ndarray, positions: jnp.ndarray, cache: kv_cache.LayerCache,
             cache_index: jnp.ndarray | None = None):
    """Self-attention through a KV cache: (out [B, T, D], updated cache).

    positions: [B, T], -1 for (left) padding. cache_index None: prefill, x is the whole prompt
    and the cache is empty; it attends over itself and is stored at slots 0..T-1. Otherwise
    decode: x's tokens are written at slot `cache_index` and attend over the cache.
    """
    q, k, v = self.q(x), self.k(x), self.v(x)
    if self.rope:
      rope_pos = jnp.maximum(positions, 0)
      q = positional.apply_rope(q, rope_pos, self.rope_theta, scaling=self.rope_scaling)
      k = positional.apply_rope(k, rope_pos, self.rope_theta, scaling=self.rope_scaling)
    kw = dict(window=self.sliding_window, implementation=self.implementation, scale=self.scale,
              logits_soft_cap=self.softcap)
    if cache_index is None:
      out = kv_cache.attend(q, positions, kv_cache.LayerCache.from_sequence(k, v, positions), **kw)
      return self.o(out), kv_cache.prefill(cache, k, v, positions)
    if self.sliding_window is not None and x.shape[1] > 1:
      raise ValueError(f'a sliding-window cache decodes one token at a time; got {x.shape[1]}.')
    cache = kv_cache.append(cache, k, v, positions, cache_index)
    filled = None if self.sliding_window is not None else cache_index + x.shape[1]
    return self.o(kv_cache.attend(q, positions, cache, filled=filled, **kw)), cache


def dropout(x: jnp.ndarray, rate: float, rng: jax.Array | None) -> jnp.ndarray:
  """Inverted dropout: zeroes each element with probability `rate` and scales the rest by
  1 / (1 - rate). Identity when rng is None (evaluation, decoding) or rate == 0."""
  if rng is None or rate == 0:
    return x
  keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


class Block(nnx.Module):
  """Transformer block: self-attention, optional cross-attention, MLP. norm_position 'pre':
  x + f(norm(x)); 'post' (Vaswani): norm(x + f(x)); 'sandwich' (Gemma 2): x + norm'(f(norm(x)))
  with a second norm (`post_attn_norm`, `post_cross_norm`, `post_mlp_norm`) per sublayer."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, *, sliding_window: int | None = None,
               cross_attention: bool = False):
    self.pre_norm = cfg.norm_position != 'post'
    sandwich = cfg.norm_position == 'sandwich'
    post = lambda on=True: make_norm(cfg) if sandwich and on else None
    self.attn_norm = make_norm(cfg)
    self.post_attn_norm = post()
    self.attn = Attention(cfg, rngs, rope=cfg.positional == 'rope', sliding_window=sliding_window)
    self.cross_norm = make_norm(cfg) if cross_attention else None
    self.post_cross_norm = post(cross_attention)
    self.cross_attn = Attention(cfg, rngs, rope=False) if cross_attention else None
    self.mlp_norm = make_norm(cfg)
    self.post_mlp_norm = post()
    self.mlp = Mlp(cfg, rngs)
    self.dropout = cfg.dropout

  def _residual(self, x, norm, fn, rng=None, post_norm=None):
    out = lambda h: post_norm(fn(h)) if post_norm is not None else fn(h)
    drop = lambda h: dropout(out(h), self.dropout, rng)
    return x + drop(norm(x)) if self.pre_norm else norm(x + drop(x))

  def __call__(self, x: jnp.ndarray, positions: jnp.ndarray, *, segment_ids=None, causal=True,
               mask=None, context=None, context_mask=None, context_segment_ids=None, cache=None,
               cache_index=None, context_cache=None, rng=None):
    """x: [B, T, D] -> [B, T, D]. context: [B, S, D] encoder output for cross attention, or
    context_cache: its keys and values, precomputed by `cross_attn.context_cache`.
    segment_ids [B, T] (and context_segment_ids [B, S]): packed sequences, see Attention.
    rng: training key for dropout on each sublayer's output (None: no dropout).

    With a self-attention `cache` (see `Attention.cached`) returns (x, updated cache).
    """
    if cache is not None:
      new_cache = []
      x = self._residual(x, self.attn_norm, lambda h: _keep_cache(
          self.attn.cached(h, positions, cache, cache_index), new_cache),
                         post_norm=self.post_attn_norm)
    else:
      x = self._residual(x, self.attn_norm, lambda h: self.attn(
          h, positions, segment_ids=segment_ids, causal=causal, mask=mask),
                         fold_key(rng, 0), self.post_attn_norm)
    if self.cross_attn is not None:
      if context_cache is None:
        context_cache = self.cross_attn.context_cache(context, context_mask)
      x = self._residual(x, self.cross_norm,
                         lambda h: self.cross_attn.attend_context(
                             h, context_cache, segment_ids=segment_ids if
                             context_segment_ids is not None else None,
                             context_segment_ids=context_segment_ids),
                         fold_key(rng, 1), self.post_cross_norm)
    x = self._residual(x, self.mlp_norm, self.mlp, fold_key(rng, 2), self.post_mlp_norm)
    return x if cache is None else (x, new_cache[0])


def fold_key(rng: jax.Array | None, i: int) -> jax.Array | None:
  """fold_in(rng, i), or None when rng is None."""
  return None if rng is None else jax.random.fold_in(rng, i)


def _keep_cache(out_and_cache, sink: list):
  out, cache = out_and_cache
  sink.append(cache)
  return out
