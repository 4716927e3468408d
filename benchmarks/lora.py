"""LoRA vs a full fine-tune of the same model: trainable parameters, optimizer state, checkpoint
bytes per step and the compiled train step's memory and time.

  python benchmarks/lora.py [--config=configs/default.py] [--rank=8] [--targets=q,k,v,o,gate,up,down]
                            [--steps=3] [--config.model.d_model=512 ...]

Both train states come from `training.loop.setup` of the config with `model.lora_rank` 0 and
--rank; sizes are summed over the abstract state (nothing is allocated for them). The step is
compiled for both (XLA's `memory_analysis`), then timed over --steps steps after one warm-up
(0: not timed). A full fine-tune's optimizer (AdamW) keeps two moments per parameter; LoRA's
only per adapter parameter, and a LoRA checkpoint holds the adapters and their moments, not
the base (written once).
"""
from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from workdir import hostenv  # noqa: E402

hostenv.ensure_fast_malloc('train')

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from configs import schema  # noqa: E402
from training import loop, preflight  # noqa: E402
from training import mesh as mesh_lib  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/default.py', 'Model to compare.')
_RANK = flags.DEFINE_integer('rank', 8, 'LoRA rank.')
_TARGETS = flags.DEFINE_string('targets', 'q,k,v,o,gate,up,down', 'model.lora_targets.')
_STEPS = flags.DEFINE_integer('steps', 3, 'Timed train steps per variant (0: none).')


def nbytes(tree) -> int:
  return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def count(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def measure(config) -> dict:
  s = loop.setup(config)
  a = s.abstract_state
  batch = preflight.abstract_batch(config, s.mesh)
  mem = s.train_step.lower(a, batch).compile().memory_analysis()
  out = {'trainable': count(a.params), 'frozen': count(a.frozen),
         'opt_bytes': nbytes(a.opt_state),
         'ckpt_bytes': nbytes(a.replace(frozen=None)),
         'temp_bytes': mem.temp_size_in_bytes, 'arg_bytes': mem.argument_size_in_bytes}
  if _STEPS.value:
    rng = np.random.default_rng(0)
    state = s.init_state()
    host = {k: rng.integers(0, config.model.vocab_size, x.shape).astype(x.dtype)
            if k in ('inputs', 'targets') else np.ones(x.shape, x.dtype)
            for k, x in batch.items()}
    put = lambda: mesh_lib.put_batch(host, s.mesh)
    state, m = s.train_step(state, put())
    jax.block_until_ready(m)
    start = time.perf_counter()
    for _ in range(_STEPS.value):
      state, m = s.train_step(state, put())
    jax.block_until_ready(m)
    out['step_s'] = (time.perf_counter() - start) / _STEPS.value
  return out


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  base = schema.apply_overrides(_CONFIG.value, {'model.lora_rank': 0})
  tuned = schema.apply_overrides(base, {'model.lora_rank': _RANK.value,
                                        'model.lora_targets': _TARGETS.value})
  schema.validate(base)
  schema.validate(tuned)
  full, lo = measure(base), measure(tuned)
  m = base.model
  mib = lambda b: f'{b / 2**20:,.2f} MiB'
  print(f'Model: {m.kind}, {m.num_layers} layers, d_model={m.d_model}, mlp_dim={m.mlp_dim}, '
        f'{full["trainable"]:,} parameters; LoRA rank {_RANK.value} on {_TARGETS.value}; '
        f'batch {base.train.batch_size} x {base.data.seq_len}, {jax.devices()[0].platform}.')
  rows = [('trainable parameters', f'{full["trainable"]:,}', f'{lo["trainable"]:,}',
           lo['trainable'] / full['trainable']),
          ('optimizer state (AdamW)', mib(full['opt_bytes']), mib(lo['opt_bytes']),
           lo['opt_bytes'] / full['opt_bytes']),
          ('checkpoint per step', mib(full['ckpt_bytes']), mib(lo['ckpt_bytes']),
           lo['ckpt_bytes'] / full['ckpt_bytes']),
          ('step arguments (compiled)', mib(full['arg_bytes']), mib(lo['arg_bytes']),
           lo['arg_bytes'] / full['arg_bytes']),
          ('step temporaries (compiled)', mib(full['temp_bytes']), mib(lo['temp_bytes']),
           lo['temp_bytes'] / full['temp_bytes'])]
  if _STEPS.value:
    rows.append(('step time', f'{full["step_s"] * 1e3:,.0f} ms', f'{lo["step_s"] * 1e3:,.0f} ms',
                 lo['step_s'] / full['step_s']))
  print(f'{"":30s}{"full fine-tune":>18s}{"LoRA":>18s}{"LoRA / full":>14s}')
  for name, a, b, ratio in rows:
    print(f'{name:30s}{a:>18s}{b:>18s}{ratio:>14.4f}')
  load = os.getloadavg()[0]
  print(f'(load average {load:.1f}; the base, {lo["frozen"]:,} parameters, is frozen under '
        'LoRA: an input of the step, not trained or checkpointed.)')


if __name__ == '__main__':
  app.run(main)
