"""The optax chain built from `config.train`.

Short runs: a run with fewer `train.steps` than `train.warmup_steps` trains with its warmup cut
to the run (the learning rate rises linearly over all its steps; `short_run_warning` is the one
line the loop prints). Resuming such a run to more steps would change the learning rate of the
steps already trained, so `check_resumed_schedule` refuses unless `train.warmup_steps` is set to
the warmup the run actually had.
"""
from __future__ import annotations

import jax
import optax

from configs import schema


def warmup_steps(t) -> int:
  """The warmup the run trains with: `train.warmup_steps`, cut to `train.steps`."""
  return min(t.warmup_steps, t.steps)


def short_run_warning(t) -> str | None:
  """One line when the warmup is cut to a short run; None otherwise."""
  if t.warmup_steps <= t.steps:
    return None
  return (f'train.steps={t.steps} is smaller than train.warmup_steps={t.warmup_steps}: the '
          f'warmup is cut to the run ({t.steps} steps; the learning rate rises linearly over all '
          'of them and never decays).')


def check_resumed_schedule(saved, t) -> None:
  """Raises ConfigError naming train.warmup_steps when resuming a short run (`saved`: the
  train config it started with) would change the learning rate of the steps it already trained."""
  if warmup_steps(saved) == warmup_steps(t) or saved.warmup_steps <= saved.steps:
    return
  raise schema.ConfigError(
      f'train.warmup_steps={t.warmup_steps}: this workdir was started as a short run '
      f'(train.steps={saved.steps} < train.warmup_steps={saved.warmup_steps}, so its warmup was '
      f'cut to {warmup_steps(saved)} steps); resuming it with train.steps={t.steps} would '
      'change the learning rate of the steps already trained. Pass '
      f'--config.train.warmup_steps={warmup_steps(saved)} to keep the schedule it started with, '
      'or use a new --workdir.')


def learning_rate_schedule(t) -> optax.Schedule:
  """Linear warmup from 0 to `learning_rate` over `warmup_steps(t)`, then cosine decay to
  `learning_rate * min_lr_ratio` at `train.steps`."""
  warmup = warmup_steps(t)
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=t.learning_rate, warmup_steps=warmup,
      decay_steps=max(t.steps, warmup + 1), end_value=t.learning_rate * t.min_lr_ratio)


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
