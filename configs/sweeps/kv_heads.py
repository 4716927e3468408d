"""KV heads of the base model (configs/default.py:base): MQA (1) .. MHA (8 = num_heads), same
data and steps.

  python sweep.py --sweep=configs/sweeps/kv_heads.py --workdir=runs/sweeps/kv_heads
About 15 minutes on 2 unloaded CPU cores. `:short` is a 2-layer d_model=128 version (8 query
heads still) of 200 steps over seeds 0 and 1, ~2x cheaper in all (the README's table; its
summary.csv tests each group against MHA, the baseline);
`:quick` is the tiny model.
"""
from sweeps.spec import grid

BASE = {'train.steps': 300, 'train.eval_every': 50, 'train.checkpoint_every': 100}
SHORT = {'model.num_layers': 2, 'model.d_model': 128, 'model.mlp_dim': 384, 'data.seq_len': 128,
         'train.steps': 200, 'train.warmup_steps': 20, 'train.eval_every': 25,
         'train.eval_batches': 8, 'train.checkpoint_every': 100}


def get_sweep(arg: str | None = None):
  if arg == 'quick':
    return {'config': 'configs/default.py:tiny', 'base': {'train.steps': 20},
            'trials': grid({'model.num_kv_heads': [1, 4]})}
  if arg == 'short':
    return {'config': 'configs/default.py:base', 'base': SHORT,
            'trials': grid({'model.num_kv_heads': [1, 2, 4, 8]}), 'seeds': [0, 1],
            'baseline': {'model.num_kv_heads': 8}}
  if arg:
    raise ValueError(f'configs/sweeps/kv_heads.py: unknown variant {arg!r}; choose short or quick.')
  return {'config': 'configs/default.py:base', 'base': BASE,
          'trials': grid({'model.num_kv_heads': [1, 2, 4, 8]})}
