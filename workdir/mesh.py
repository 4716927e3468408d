"""The device mesh of a config's `mesh` fields, and shardings from logical axis names.

Modules annotate parameters with logical names ('embed', 'mlp', ...); `config.mesh.rules` maps
those to mesh axes ('data', 'fsdp', 'tensor'). Training, sampling and the import place
parameters with these shardings; training/mesh.py adds the batch layout.
"""
from __future__ import annotations

import functools
import math
from typing import Callable

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from configs.schema import ConfigError

AXES = ('data', 'fsdp', 'tensor')


def mesh_shape(mesh_cfg, num_devices: int) -> tuple[int, ...]:
  """Resolves -1 ("the rest of the devices") and checks the product equals `num_devices`."""
  sizes = [mesh_cfg[a] for a in AXES]
  if sizes.count(-1) > 1:
    raise ConfigError(f'mesh: at most one axis may be -1; got {dict(zip(AXES, sizes))}.')
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise ConfigError(f'mesh: {dict(zip(AXES, sizes))} cannot fill {num_devices} devices '
                        f'({num_devices} is not divisible by {known}).')
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ConfigError(f'mesh: data*fsdp*tensor = {math.prod(sizes)} '
                      f'({dict(zip(AXES, sizes))}) but there are {num_devices} devices.')
  return tuple(sizes)


def make_mesh(mesh_cfg, devices=None) -> Mesh:
  """`jax.make_mesh` over `devices` (default: all), which orders devices by the physical
  topology (ICI/NVLink neighbours share the inner axes) on TPU and GPU. Axis types stay Auto:
  the sharding of intermediates is left to the compiler (explicit axes would demand sharding
  rules of every op, which blockwise attention's custom VJP does not give)."""
  devices = jax.devices() if devices is None else list(devices)
  shape = mesh_shape(mesh_cfg, len(devices))
  return jax.make_mesh(shape, AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(AXES),
                       devices=devices)


def under_rules(fn: Callable, mesh: Mesh, rules) -> Callable:
  """`fn` traced with `mesh` and logical `rules` active, so that the models' activation
  constraints (models/sharding.py) resolve. Wrap the function that `jax.jit` traces."""
  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nnx.logical_axis_rules(rules):
      return fn(*args, **kwargs)
  return wrapped


def rules_of(mesh_cfg) -> tuple:
  rules = tuple((name, tuple(ax) if isinstance(ax, list) else ax) for name, ax in mesh_cfg.rules)
  for name, axes in rules:
    for ax in (axes if isinstance(axes, tuple) else (axes,)):
      if ax is not None and ax not in AXES:
        raise ConfigError(f'mesh.rules: logical axis {name!r} maps to unknown mesh axis {ax!r}; '
                          f'mesh axes are {", ".join(AXES)}.')
  return rules


def state_shardings(abstract_state, mesh: Mesh, rules) -> object:
  """NamedShardings for a pytree of nnx Variables (annotated) and plain arrays (replicated)."""
  with nnx.logical_axis_rules(rules):
    specs = nnx.get_partition_spec(abstract_state)
  return jax.tree.map(lambda s: NamedSharding(mesh, s if isinstance(s, P) else P()), specs,
                      is_leaf=lambda x: isinstance(x, P) or x is None)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())
