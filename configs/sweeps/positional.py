"""Positional encoding of the base model (configs/default.py:base): RoPE, sinusoidal, learned
absolute embeddings.

  python sweep.py --sweep=configs/sweeps/positional.py --workdir=runs/sweeps/positional
About 15 minutes on 2 CPU cores (3 trials).
"""
from sweeps.spec import grid

BASE = {'train.steps': 300, 'train.eval_every': 50, 'train.checkpoint_every': 100}


def get_sweep(arg: str | None = None):
  if arg:
    raise ValueError(f'configs/sweeps/positional.py has no variants (got {arg!r}).')
  return {'config': 'configs/default.py:base', 'base': BASE,
          'trials': grid({'model.positional': ['rope', 'sinusoidal', 'learned']})}
