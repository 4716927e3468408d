"""The optax chain built from `config.train`."""
from __future__ import annotations

import jax
import optax


def learning_rate_schedule(t) -> optax.Schedule:
  """Linear warmup from 0 to `learning_rate`, then cosine decay to `learning_rate * min_lr_ratio`."""
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=t.learning_rate, warmup_steps=t.warmup_steps,
      decay_steps=max(t.steps, t.warmup_steps + 1), end_value=t.learning_rate * t.min_lr_ratio)


DECAYED = ('kernel', 'embedding')


def decay_mask(params):
  """Weight decay on kernels and embeddings only: not on norm scales or biases (whose shape,
  e.g. a [K, H] attention bias, can be a matrix too)."""
  def decayed(path, _):
    names = {str(getattr(k, 'key', getattr(k, 'name', k))) for k in path}
    return bool(names & set(DECAYED))
  return jax.tree_util.tree_map_with_path(decayed, params)


def make_optimizer(t) -> optax.GradientTransformation:
  """Global-norm clipping, then AdamW on the schedule above."""
  adamw = optax.adamw(learning_rate_schedule(t), b1=t.b1, b2=t.b2, eps=1e-8,
                      weight_decay=t.weight_decay, mask=decay_mask)
  return optax.chain(optax.clip_by_global_norm(t.grad_clip), adamw) if t.grad_clip > 0 else adamw
