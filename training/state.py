"""The train state: one typed pytree that the jitted step takes, returns and donates.

On disk (training/checkpoint.py) it is two orbax items: `params` (the `params` field) and
`train` (a dict of `TRAIN_FIELDS`), the layout every earlier version wrote, so older workdirs
resume. A params-only step (an imported model) restores with `opt_state`, `step` and `rng`
None: the loop then starts a fresh optimizer state (`is_params_only`).
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx, struct

TRAIN_FIELDS = ('step', 'opt_state', 'rng')   # the `train` checkpoint item; `params` is its own


@struct.dataclass
class TrainState:
  """What the train step carries from one step to the next.

  step:      [] int32, steps taken (the step after a skipped NaN step still counts it).
  params:    the model's nnx.State of Params (dtypes and shapes per module; sharded by their
             logical axis names), re-attached to the graphdef inside the step with nnx.merge.
  opt_state: the optax state of `params` (e.g. Adam's two parameter-shaped moments and a count).
  rng:       [2] uint32, raw key data of the run's base key (orbax stores plain arrays); each
             step folds in `step` for its own randomness.
  frozen:    None, or with LoRA (models/lora.py) the base model's Params, which do not train:
             `params` then holds the adapters alone. The step takes it as an input and passes
             it through untouched (donated and aliased, never copied or written); it is not
             checkpointed with the state (its own params-only step, training/checkpoint.py).
  """
  step: jax.Array | None
  params: Any
  opt_state: Any
  rng: jax.Array | None
  frozen: Any = None

  @property
  def has_frozen(self) -> bool:
    """True when only part of the model trains (LoRA): `frozen` holds the rest."""
    return bool(jax.tree.leaves(self.frozen))

  def model_params(self):
    """All of the model's Params (concrete or abstract): `params`, with `frozen` merged in."""
    return nnx.merge_state(self.frozen, self.params) if self.has_frozen else self.params

  @property
  def is_params_only(self) -> bool:
    """True for a state restored from a params-only checkpoint (an import)."""
    return self.opt_state is None

  def train_item(self) -> dict:
    """The `train` checkpoint item: {'step', 'opt_state', 'rng'}."""
    return {name: getattr(self, name) for name in TRAIN_FIELDS}

  @classmethod
  def from_items(cls, params, train: dict | None) -> 'TrainState':
    """The state of a checkpoint's `params` and `train` items (train None: params only)."""
    train = train or {}
    unknown = set(train) - set(TRAIN_FIELDS)
    if unknown:
      raise ValueError(f'the train item holds unknown fields {sorted(unknown)}; '
                       f'expected {TRAIN_FIELDS}')
    return cls(params=params, **{name: train.get(name) for name in TRAIN_FIELDS})


def initial_rng(seed: int) -> jnp.ndarray:
  """The train state's base key as raw uint32 data [2]."""
  return jax.random.key_data(jax.random.key(seed))
