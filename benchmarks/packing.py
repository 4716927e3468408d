"""Document packing vs the unpacked token stream: held-out loss at equal steps, measured in one run.

  python benchmarks/packing.py [--config=configs/default.py] [--steps=200] [--workdir=DIR]

Trains the config twice from the same seed for the same steps, once with data.packing=False
(windows cut from documents joined by EOS) and once with data.packing=True (documents packed
with segment ids and positions restarting per document). Both models are then evaluated on
both held-out sets (the stream windows and the packed documents), so the table separates the
effect of training on packed rows from the effect of the evaluation format. Also prints the
share of padding in packed rows and each run's training throughput.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from workdir import hostenv  # noqa: E402

hostenv.ensure_fast_malloc('train')

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from configs import schema  # noqa: E402
from workdir.load import load_workdir  # noqa: E402
from training import loop  # noqa: E402
from text.tokenizer import make_tokenizer  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/default.py',
                                           'Experiment file[:variant]; --config.a.b=v overrides.')
_STEPS = flags.DEFINE_integer('steps', 200, 'Training steps of each run.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Where the two runs go (default: a temp dir).')


def _tokens_per_sec(workdir: str) -> float:
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    rates = [r['tokens_per_sec'] for r in map(json.loads, f) if 'tokens_per_sec' in r]
  return float(np.median(rates)) if rates else float('nan')


def main(argv):
  del argv
  if _WORKDIR.value:
    compare(_WORKDIR.value)
  else:   # the runs are only read back for the table: nothing is left behind
    with tempfile.TemporaryDirectory(prefix='lmx-packing-') as root:
      compare(root)


def compare(root: str) -> None:
  """Trains both runs under `root` and prints the table."""
  base = _CONFIG.value
  steps = _STEPS.value
  runs = {}
  for packing in (False, True):
    config = schema.apply_overrides(base, {
        'data.packing': packing, 'train.steps': steps, 'train.eval_every': steps,
        'train.checkpoint_every': steps, 'train.log_every': max(1, steps // 10)})
    workdir = os.path.join(root, f'packing_{packing}')
    start = time.time()
    loop.train(config, workdir)
    runs[packing] = (config, workdir, time.time() - start)
  tokenizer = make_tokenizer(base.data.tokenizer)
  eval_sets = {p: loop.load_data(c, tokenizer)[1] for p, (c, _, _) in runs.items()}
  name = config_flags.get_config_filename(flags.FLAGS['config'])
  print(f'\n{name}, {steps} steps of batch {base.train.batch_size} x {base.data.seq_len}, '
        f'seed {base.train.seed}; held-out loss (nats/token):')
  print(f'{"trained with":<16}{"eval: stream":>14}{"eval: packed":>14}{"tokens/s":>10}'
        f'{"wall s":>8}')
  for packing, (config, workdir, wall) in runs.items():
    loaded = load_workdir(workdir)
    s = loop.setup(loaded.config)
    losses = [loop.evaluate(s, loaded.params, eval_sets[p]) for p in (False, True)]
    print(f'{"packing=" + str(packing):<16}{losses[0]:>14.4f}{losses[1]:>14.4f}'
          f'{_tokens_per_sec(workdir):>10.0f}{wall:>8.0f}')
  train_rows = iter(loop.load_data(runs[True][0], tokenizer)[0])
  weights = np.concatenate([next(train_rows)['weights'] for _ in range(50)])
  print(f'padding in the first 50 packed training batches: {100 * (1 - weights.mean()):.2f}% of '
        'slots (tokens/s counts every slot, padding included)')

if __name__ == '__main__':
  app.run(main)
