"""Scaling with model width: final eval loss against parameters, fitted as L = E + A·N^(-alpha).

  python sweep.py --sweep=configs/sweeps/scaling.py --workdir=runs/sweeps/scaling
Two-layer decoders of d_model 32..128 (about 43K to 490K parameters, a decade), 4 heads, MLP
3·d_model, 128-token sequences, 300 steps of 16 sequences each (the same 614K tokens for every
size), seeds 0 and 1: 10 trials, about 10 minutes on 2 idle CPU cores (estimated from one
trial's time; not run in full). The report fits the
groups' mean final eval loss (scaling.csv, scaling.png, scaling.json) with bootstrap intervals
over seeds. `:quick` is three widths (32, 48, 64: 39K to 131K parameters), seeds 0 and 1, 150
steps: about 3 minutes on idle cores.
"""
from sweeps.spec import zipped

BASE = {'model.num_layers': 2, 'model.num_heads': 4, 'model.num_kv_heads': 4,
        'data.seq_len': 128, 'train.batch_size': 16, 'train.steps': 300,
        'train.warmup_steps': 30, 'train.eval_every': 100, 'train.eval_batches': 8,
        'train.checkpoint_every': 300, 'train.log_every': 25}
WIDTHS = (32, 48, 64, 96, 128)


def trials(widths) -> list[dict]:
  return zipped({'model.d_model': list(widths), 'model.mlp_dim': [3 * d for d in widths]})


def get_sweep(arg: str | None = None):
  if arg == 'quick':
    return {'config': 'configs/default.py:base', 'base': {**BASE, 'train.steps': 150,
                                                     'train.eval_every': 50,
                                                     'train.checkpoint_every': 150},
            'trials': trials((32, 48, 64)), 'seeds': [0, 1], 'scaling': {'x': 'params'}}
  if arg:
    raise ValueError(f'configs/sweeps/scaling.py: unknown variant {arg!r}; choose quick.')
  return {'config': 'configs/default.py:base', 'base': BASE, 'trials': trials(WIDTHS),
          'seeds': [0, 1], 'scaling': {'x': 'params'}}
