"""Learning rate, warmup and weight decay by TPE search (Optuna), on the tiny model.

  python sweep.py --sweep=configs/sweeps/lr_search.py --workdir=runs/sweeps/lr_search
10 trials of 150 steps, a few minutes on 2 CPU cores; `:random` samples uniformly at random
instead. Rerunning the command resumes the study from WORKDIR/optuna_journal.log.
"""

SPACE = {'train.learning_rate': ('log_uniform', 3e-4, 3e-2),
         'train.warmup_steps': ('int', 0, 60),
         'train.weight_decay': ('uniform', 0.0, 0.3)}


def get_sweep(arg: str | None = None):
  sampler = arg or 'tpe'
  return {'config': 'configs/default.py:tiny',
          'base': {'train.steps': 150, 'train.eval_every': 50, 'train.checkpoint_every': 150,
                   'train.log_every': 25},
          'search': {'sampler': sampler, 'num_trials': 10, 'seed': 0, 'space': SPACE}}
