"""Low-rank adapters (LoRA, Hu et al. 2021) on the models' projections, with PEFT's parameters.

A targeted projection y = x . W, W [*in, *out] (models/layers.py `Projection`), gains
    y += (alpha / r) * (x . A) . B,    A [*in, r], B [r, *out]
both held as `nnx.LoRAParam`s (a subclass of nnx.Param) at `<projection>.lora.a` / `.lora.b`.
A starts as PEFT's lora_A (kaiming-uniform, a=sqrt(5): uniform(+-1/sqrt(fan_in))), B at zero,
so an untrained adapter leaves the model unchanged. PEFT's tensors are
    lora_A.weight = A.reshape(in, r).T  [r, in]     lora_B.weight = B.reshape(r, out).T  [out, r]
(in, out: the projection's flattened Hugging Face dims; interop/peft.py writes them).

`model.lora_targets` names projections by their attribute: q, k, v, o (every attention, self
and cross) and gate, up, down (the MLP); `configs.schema.LORA_TARGETS` lists them. Training
splits the state with `split(params)`: the adapters train, the rest stays frozen.
"""
from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from models.config import ModelConfig


def targets_of(cfg: ModelConfig) -> tuple[str, ...]:
  """The projection names `cfg.lora_targets` ('q,k,v') lists; () when LoRA is off."""
  if not cfg.lora_rank:
    return ()
  return tuple(t.strip() for t in cfg.lora_targets.split(',') if t.strip())


def adapter_for(cfg: ModelConfig, name: str, in_shape: Sequence[int], out_shape: Sequence[int],
                axes: Sequence[str | None]) -> 'Adapter | None':
  """The adapter of projection `name` ([*in_shape] -> [*out_shape], logical `axes` of its
  kernel) when cfg's LoRA targets it, else None."""
  if name not in targets_of(cfg):
    return None
  return Adapter(in_shape, out_shape, axes, rank=cfg.lora_rank, alpha=cfg.lora_alpha,
                 dtype=cfg.dtype, param_dtype=cfg.param_dtype)


class Adapter(nnx.Module):
  """x2d [N, in] -> (alpha / r) * (x2d . A) . B  [N, out], computed in `dtype`.

  A is created at zero here and drawn by `init_adapters` once the whole model exists, so adding
  adapters changes none of the base parameters' random draws."""

  def __init__(self, in_shape: Sequence[int], out_shape: Sequence[int],
               axes: Sequence[str | None], *, rank: int, alpha: float, dtype: str,
               param_dtype: str):
    n_in = len(in_shape)
    self.rank, self.scale, self.n_in = rank, alpha / rank, n_in
    self.dtype = jnp.dtype(dtype)
    pdt = jnp.dtype(param_dtype)
    self.a = nnx.LoRAParam(jnp.zeros((*in_shape, rank), pdt), out_sharding=(*axes[:n_in], None),
                           eager_sharding=False)
    self.b = nnx.LoRAParam(jnp.zeros((rank, *out_shape), pdt), out_sharding=(None, *axes[n_in:]),
                           eager_sharding=False)

  def __call__(self, x2d: jnp.ndarray) -> jnp.ndarray:
    a = self.a[...].astype(self.dtype)
    b = self.b[...].astype(self.dtype)
    h = x2d.astype(self.dtype) @ a.reshape(-1, self.rank)
    return (h @ b.reshape(self.rank, -1)) * jnp.asarray(self.scale, self.dtype)


def init_adapters(model: nnx.Module, key: jax.Array) -> None:
  """Draws every adapter's A in place: PEFT's kaiming_uniform(a=sqrt(5)) = variance scaling 1/3,
  fan_in, uniform (bound 1/sqrt(fan_in)); stacked (scanned) layers draw per layer."""
  adapters = [m for _, m in model.iter_modules() if isinstance(m, Adapter)]
  for i, m in enumerate(adapters):
    shape = m.a.shape
    batch = tuple(range(len(shape) - m.n_in - 1))   # a leading [L] axis when scanned
    init = jax.nn.initializers.variance_scaling(
        1 / 3, 'fan_in', 'uniform', in_axis=tuple(range(len(batch), len(batch) + m.n_in)),
        out_axis=-1, batch_axis=batch)
    m.a.set_value(init(jax.random.fold_in(key, i), shape, m.a.dtype))


def split(params: nnx.State) -> tuple[nnx.State, nnx.State]:
  """A model's Param State -> (adapters, everything else). Both keep the model's paths, so
  `nnx.merge(graphdef, adapters, base)` rebuilds the model."""
  adapters, base = nnx.split_state(params, nnx.LoRAParam, ...)
  return adapters, base


def num_adapters(params: nnx.State) -> int:
  return len(jax.tree.leaves(split(params)[0]))


def _delta(a: jnp.ndarray, b: jnp.ndarray, kernel_shape: tuple, scale: float) -> jnp.ndarray:
  """scale * A . B in the kernel's layout; a [*L, *in, r], b [*L, r, *out] (L: stacked layers)."""
  lead = a.ndim + b.ndim - 2 - len(kernel_shape)
  lead_shape = kernel_shape[:lead]
  rank = b.shape[lead]
  a2 = a.reshape(*lead_shape, -1, rank).astype(jnp.float32)
  b2 = b.reshape(*lead_shape, rank, -1).astype(jnp.float32)
  return (scale * (a2 @ b2)).reshape(kernel_shape)


def merge(params: nnx.State, scale: float) -> nnx.State:
  """The model's parameters with every adapter folded into its kernel (W + scale * A . B, in
  fp32, then W's dtype) and the adapters removed: the State of the same model without LoRA."""
  flat = dict(nnx.to_flat_state(params))
  out = []
  for path, var in flat.items():
    if 'lora' in path:
      continue
    lora = path[:-1] + ('lora',)
    if path[-1] == 'kernel' and lora + ('a',) in flat:
      w = var.get_value()
      d = _delta(flat[lora + ('a',)].get_value(), flat[lora + ('b',)].get_value(), w.shape, scale)
      var = var.replace(value=(w.astype(jnp.float32) + d).astype(w.dtype))
    out.append((path, var))
  return nnx.from_flat_state(out)


def scale_of(cfg: ModelConfig) -> float:
  """alpha / r of a model config with LoRA on."""
  return cfg.lora_alpha / cfg.lora_rank


def count(tree) -> int:
  """Number of scalars in a pytree of arrays."""
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))
