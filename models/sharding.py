"""Activation sharding constraints by logical axis names.

Modules never see the mesh: `constrain` reads the mesh and the logical axis rules the caller set
(`jax.set_mesh` and `nnx.logical_axis_rules`, see workdir/mesh.py) and is a no-op without them.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax.core import spmd
from jax.sharding import PartitionSpec as P

# The residual stream [B, T, D]: rows over the batch axes, features whole (the 'embed' rule
# shards parameters over fsdp, and a mesh axis cannot shard two dimensions of one array).
RESIDUAL = ('batch', 'length', None)


def constrain(x: jnp.ndarray, axes: Sequence[str | None]) -> jnp.ndarray:
  """`with_sharding_constraint(x, rules(axes))` inside a mesh with rules; else `x` unchanged."""
  rules = spmd.get_logical_axis_rules()
  if not rules or jax.sharding.get_abstract_mesh().empty:
    return x
  spec = P(*spmd.from_sharding_rules(tuple(axes), rules))
  return jax.lax.with_sharding_constraint(x, spec)
