"""KV heads of the default model: MQA (1) .. MHA (8 = num_heads), same data and steps.

  python sweep.py --sweep=configs/sweeps/kv_heads.py --workdir=runs/sweeps/kv_heads
About 15 minutes on 2 CPU cores; `:quick` is a seconds-long version on the tiny model.
"""
from sweeps.spec import grid

BASE = {'train.steps': 300, 'train.eval_every': 50, 'train.checkpoint_every': 100}


def get_sweep(arg: str | None = None):
  if arg == 'quick':
    return {'config': 'configs/default.py:tiny', 'base': {'train.steps': 20},
            'trials': grid({'model.num_kv_heads': [1, 4]})}
  return {'config': 'configs/default.py', 'base': BASE,
          'trials': grid({'model.num_kv_heads': [1, 2, 4, 8]})}
