"""Learning rate, warmup and weight decay by TPE search (Optuna), on the tiny model.

  python sweep.py --sweep=configs/sweeps/lr_search.py --workdir=runs/sweeps/lr_search
10 trials of 150 steps (evaluated every 25), a few minutes on 2 CPU cores. The variant is a list
of words: `random` samples uniformly at random instead of TPE; `median` or `asha` prunes trials
whose eval loss falls behind (Optuna's MedianPruner / SuccessiveHalvingPruner), e.g.
`lr_search.py:asha` or `lr_search.py:random,median`. Rerunning the command resumes the study from
WORKDIR/optuna_journal.log.
"""

SPACE = {'train.learning_rate': ('log_uniform', 3e-4, 3e-2),
         'train.warmup_steps': ('int', 0, 60),
         'train.weight_decay': ('uniform', 0.0, 0.3)}
WORDS = ('tpe', 'random', 'median', 'asha')


def get_sweep(arg: str | None = None):
  words = [w for w in (arg or '').split(',') if w]
  unknown = [w for w in words if w not in WORDS]
  if unknown:
    raise ValueError(f'configs/sweeps/lr_search.py: unknown variant word(s) {unknown}; '
                     f'allowed: {", ".join(WORDS)}.')
  search = {'sampler': 'random' if 'random' in words else 'tpe', 'num_trials': 10, 'seed': 0,
            'space': SPACE}
  pruners = [w for w in words if w in ('median', 'asha')]
  if len(pruners) > 1:
    raise ValueError('configs/sweeps/lr_search.py: name one pruner (median or asha).')
  if pruners:
    search['pruner'] = pruners[0]
  return {'config': 'configs/default.py:tiny',
          'base': {'train.steps': 150, 'train.eval_every': 25, 'train.checkpoint_every': 150,
                   'train.log_every': 25},
          'search': search}
