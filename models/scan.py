"""Layers stacked for `lax.scan`, rematerialisation, and conversion between the two layouts.

Unrolled: `layers.{i}.attn.q.kernel` [D, N, H] with logical axes ('embed', 'heads', 'head_dim').
Scanned:  `layers.attn.q.kernel` [L, D, N, H] with logical axes ('layers', 'embed', ...).
Below `layers` the names are the same, so `to_scanned` / `to_unrolled` convert a parameter (or
gradient, optimizer-moment) State either way, e.g. to sample with per-layer KV caches or export
to Hugging Face from a checkpoint trained with `model.scan_layers=True`.
"""
from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from models.sharding import RESIDUAL, constrain

LAYER_AXIS = 'layers'
# model.remat -> jax.checkpoint policy (what the backward pass may keep instead of recomputing).
REMAT_POLICIES = {
    'full': None,                                                      # keep only block inputs
    'save_dots': jax.checkpoint_policies.dots_saveable,                # keep every matmul output
    'save_dots_no_batch': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # projections,
}                                                                      # not attention scores


def _is_var(x) -> bool:
  return isinstance(x, nnx.Variable)


def _add_layer_axis(v: nnx.Variable, value) -> nnx.Variable:
  axes = v.get_metadata().get('out_sharding')
  return v.copy(value, **({'out_sharding': (LAYER_AXIS, *axes)} if axes else {}))


def _drop_layer_axis(v: nnx.Variable, value) -> nnx.Variable:
  axes = v.get_metadata().get('out_sharding')
  if axes and axes[0] == LAYER_AXIS:
    return v.copy(value, out_sharding=tuple(axes[1:]))
  return v.copy(value)


def stack_states(states: Sequence[nnx.State]) -> nnx.State:
  """Per-layer States (same structure) -> one State, leaves [L, ...], axes ('layers', ...)."""
  return jax.tree.map(lambda *vs: _add_layer_axis(vs[0], jnp.stack([v.get_value() for v in vs])),
                      *states, is_leaf=_is_var)


def unstack_state(state: nnx.State) -> list[nnx.State]:
  """Inverse of `stack_states`."""
  num = jax.tree.leaves(state)[0].shape[0]
  return [jax.tree.map(lambda v: _drop_layer_axis(v, v.get_value()[i]), state, is_leaf=_is_var)
          for i in range(num)]


def stack_modules(modules: Sequence[nnx.Module]) -> nnx.Module:
  """Identical modules -> one module of the same class whose parameters are stacked [L, ...]."""
  graphdef, _ = nnx.split(modules[0])
  return nnx.merge(graphdef, stack_states([nnx.state(m) for m in modules]))


def unstack_module(module: nnx.Module) -> list[nnx.Module]:
  """Inverse of `stack_modules`: one module per layer, viewing slices of the stacked params."""
  graphdef, state = nnx.split(module)
  return [nnx.merge(graphdef, s) for s in unstack_state(state)]


def is_scanned(params: nnx.State) -> bool:
  """Whether a model's State holds stacked layers (`layers.attn...`, not `layers.0.attn...`)."""
  return not all(isinstance(k, int) for k in params['layers'].keys())


def _replace_layers(params: nnx.State, layers: dict) -> nnx.State:
  """`params` with its 'layers' subtree replaced by `layers` (a nested dict of Variables)."""
  flat = [(path, v) for path, v in nnx.to_flat_state(params) if path[0] != 'layers']
  flat += [(('layers', *path), v) for path, v in nnx.to_flat_state(nnx.State(layers))]
  return nnx.from_flat_state(flat)


def to_scanned(params: nnx.State) -> nnx.State:
  """A model State with unrolled `layers.{i}` -> the same State with stacked `layers`."""
  if is_scanned(params):
    return params
  layers = params['layers']
  return _replace_layers(params, stack_states([layers[i] for i in sorted(layers.keys())]))


def to_unrolled(params: nnx.State) -> nnx.State:
  """A model State with stacked `layers` -> the same State with `layers.{i}`."""
  if not is_scanned(params):
    return params
  return _replace_layers(params, dict(enumerate(unstack_state(params['layers']))))


def remat(fn: Callable, policy: str, *, prevent_cse: bool = True) -> Callable:
  """`fn` under `jax.checkpoint` with the named policy; unchanged for 'none'."""
  if policy == 'none':
    return fn
  return jax.checkpoint(fn, policy=REMAT_POLICIES[policy], prevent_cse=prevent_cse)


def run_layers(layers, x: jnp.ndarray, scanned: bool, policy: str, *,
               per_layer: dict | None = None, **kwargs) -> jnp.ndarray:
  """Applies the blocks in order, x -> block(x, **kwargs): a sequence of blocks, or (scanned)
  one block with stacked parameters run under `lax.scan`. x: the residual stream [B, T, D].
  per_layer: {name: [one value per layer]} (e.g. dropout keys); all-None lists are left out."""
  per_layer = {k: v for k, v in (per_layer or {}).items() if v and v[0] is not None}
  if not scanned:
    for i, layer in enumerate(layers):
      kw = {**kwargs, **{k: v[i] for k, v in per_layer.items()}}
      if policy == 'none':
        x = constrain(layer(x, **kw), RESIDUAL)
      else:
        graphdef, state = nnx.split(layer)
        x = remat(lambda s, x, kw, g=graphdef: nnx.merge(g, s)(x, **kw), policy)(state, x, kw)
        x = constrain(x, RESIDUAL)
    return x
  graphdef, state = nnx.split(layers)
  stacked = {k: jnp.stack(v) for k, v in per_layer.items()}
  # Inside lax.scan XLA cannot fold the recomputation into the forward pass: no CSE guard needed.
  body = remat(lambda s, x, kw: nnx.merge(graphdef, s)(x, **kw), policy, prevent_cse=False)
  x, _ = jax.lax.scan(lambda x, xs: (constrain(body(xs[0], x, {**kwargs, **xs[1]}), RESIDUAL),
                                     None), x, (state, stacked))
  return x
