"""Sliding-window attention of the base model (configs/default.py:base): windows of 64 and 256
tokens vs full attention.

Sequences are 512 tokens (batch 8, the same tokens per step as the default) so that a
256-token window differs from full attention.
  python sweep.py --sweep=configs/sweeps/window.py --workdir=runs/sweeps/window
About 15 minutes on 2 CPU cores (3 trials).
"""
from sweeps.spec import grid

BASE = {'train.steps': 300, 'train.eval_every': 50, 'train.checkpoint_every': 100,
        'data.seq_len': 512, 'train.batch_size': 8}


def get_sweep(arg: str | None = None):
  if arg:
    raise ValueError(f'configs/sweeps/window.py has no variants (got {arg!r}).')
  return {'config': 'configs/default.py:base', 'base': BASE,
          'trials': grid({'model.sliding_window': [64, 256, None]})}
