"""Decoder-only byte-level LM on the embedded corpus. README command 1 trains this.

Variants: `tiny` (tests), `small` (default run, a few minutes on 2 CPU cores), `medium`.
"""
from configs.base import base_config


def get_config(arg: str | None = None):
  c = base_config()
  arg = arg or 'small'
  if arg == 'tiny':
    c.model.update(num_layers=2, d_model=64, num_heads=4, num_kv_heads=2, mlp_dim=128, max_len=256)
    c.data.seq_len = 64
    c.train.update(steps=20, batch_size=4, warmup_steps=5, log_every=5, eval_every=10,
                   eval_batches=2, checkpoint_every=10)
  elif arg == 'small':
    pass  # base_config() is the small model
  elif arg == 'medium':
    c.model.update(num_layers=8, d_model=512, num_heads=8, num_kv_heads=2, mlp_dim=1536)
    c.data.seq_len = 512
    c.train.update(steps=20_000, batch_size=32, learning_rate=1e-3, warmup_steps=500,
                   eval_every=1000, checkpoint_every=1000)
  else:
    raise ValueError(f'configs/default.py: unknown variant {arg!r}; choose tiny, small or medium.')
  return c
