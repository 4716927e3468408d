"""Train-step throughput, compile time, remat memory and recompilations, measured in one run.

  python benchmarks/train_throughput.py [--steps=5] [--layers=6] [--d_model=512] [--unrolled]

Prints: (1) tokens/s and achieved FLOP/s of a ~20M-parameter train step against this machine's
measured matmul peak (best f32 square matmul); (2) compile time of the scanned train step at 2
and 24 layers (--unrolled adds the unrolled stack for contrast); (3) compiled temporary memory
of the step with each remat policy; (4) compilations after step 1 while training on fresh
batches (should be 0). FLOPs: 6 N_matmul + attention per token (training/preflight.py).
"""
from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from workdir import hostenv  # noqa: E402

hostenv.ensure_fast_malloc('train')

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags, logging  # noqa: E402

from configs import default, schema  # noqa: E402
from training import loop, preflight  # noqa: E402
from training import mesh as mesh_lib  # noqa: E402

_STEPS = flags.DEFINE_integer('steps', 5, 'Timed train steps (after one warm-up step).')
_LAYERS = flags.DEFINE_integer('layers', 6, 'Layers of the throughput model.')
_D_MODEL = flags.DEFINE_integer('d_model', 512, 'Width of the throughput model.')
_BATCH = flags.DEFINE_integer('batch_size', 16, 'Sequences per step.')
_SEQ = flags.DEFINE_integer('seq_len', 256, 'Tokens per sequence.')
_UNROLLED = flags.DEFINE_bool('unrolled', False, 'Also time compiling the unrolled stacks.')

COMPILES = []   # durations of XLA backend compilations, appended by the listener below


def _on_event(event: str, duration: float, **_) -> None:
  if event == '/jax/core/compile/backend_compile_duration':
    COMPILES.append(duration)


def model_config(**overrides):
  d = _D_MODEL.value
  base = {'model.num_layers': _LAYERS.value, 'model.d_model': d, 'model.num_heads': d // 64,
          'model.num_kv_heads': d // 64, 'model.mlp_dim': 3 * d, 'model.max_len': _SEQ.value,
          'data.seq_len': _SEQ.value, 'train.batch_size': _BATCH.value, 'train.steps': 1000,
          'mesh.data': 1, 'mesh.fsdp': 1, 'mesh.tensor': 1}
  return schema.validate(schema.apply_overrides(default.get_config('small'),
                                                {**base, **overrides}))


def random_batch(cfg, seed: int) -> dict:
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, 256, (cfg.train.batch_size, cfg.data.seq_len + 1), np.int32)
  return {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:],
          'weights': np.ones((cfg.train.batch_size, cfg.data.seq_len), np.float32)}


def matmul_peak(device) -> tuple[float, int]:
  """Best FLOP/s of f32 square matmuls over a few sizes on `device`: (rate, size)."""
  best = (0.0, 0)
  for n in (512, 1024, 2048):
    x = jax.device_put(jnp.ones((n, n), jnp.float32), device)
    f = jax.jit(lambda a: a @ a)
    f(x).block_until_ready()
    for _ in range(3):
      start = time.perf_counter()
      f(x).block_until_ready()
      best = max(best, (2.0 * n ** 3 / (time.perf_counter() - start), n))
  return best


def matmul_workload(flops: float, n: int):
  """A jitted chain of n x n f32 matmuls doing `flops` in all, and its input: run right after a
  train step it measures the matmul rate over the same stretch of (shared) machine time."""
  reps = max(1, round(flops / (2.0 * n ** 3)))

  @jax.jit
  def chain(x):
    return jax.lax.fori_loop(0, reps, lambda i, y: (y @ x) * (1.0 / n), x)
  x = jnp.full((n, n), 1.0, jnp.float32)
  chain(x).block_until_ready()
  return chain, x, reps * 2.0 * n ** 3


def flops_per_token(s) -> float:
  infos = preflight.param_infos(s.abstract_state.params)
  return preflight.analytic_flops_per_token(s.config, preflight.matmul_params_of(s.config, infos))


def throughput(cfg, steps: int, n: int) -> dict:
  """Times `steps` train steps after a warm-up step, each followed by a matmul chain of the
  step's FLOPs (n x n); counts compilations after step 1."""
  s = loop.setup(cfg, jax.devices()[:1])
  step_flops = flops_per_token(s) * cfg.train.batch_size * cfg.data.seq_len
  chain, x, chain_flops = matmul_workload(step_flops, n)
  state = s.init_state()
  state, m = s.train_step(state, mesh_lib.put_batch(random_batch(cfg, 0), s.mesh))
  jax.block_until_ready(m)
  compiles_before = len(COMPILES)
  times, rates = [], []
  for i in range(steps):
    batch = mesh_lib.put_batch(random_batch(cfg, i + 1), s.mesh)
    start = time.perf_counter()
    state, m = s.train_step(state, batch)
    jax.block_until_ready(m)
    times.append(time.perf_counter() - start)
    start = time.perf_counter()
    chain(x).block_until_ready()
    rates.append(chain_flops / (time.perf_counter() - start))
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(s.abstract_state.params))
  tokens = cfg.train.batch_size * cfg.data.seq_len
  return {'params': n_params, 'step_s': float(np.median(times)), 'best_s': min(times),
          'flops_per_token': flops_per_token(s), 'recompiles': len(COMPILES) - compiles_before,
          'tokens': tokens, 'chain_rate': float(np.median(rates)),
          'paired': float(np.median([step_flops / t / r for t, r in zip(times, rates)]))}


def compiled(cfg):
  s = loop.setup(cfg, jax.devices()[:1])
  batch = preflight.abstract_batch(cfg, s.mesh)
  start = time.perf_counter()
  c = s.train_step.lower(s.abstract_state, batch).compile()
  return c, time.perf_counter() - start


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  jax.config.update('jax_enable_compilation_cache', False)   # time real compilations
  jax.monitoring.register_event_duration_secs_listener(_on_event)
  device = jax.devices()[0]
  print(f'device: {device.device_kind} x{jax.device_count()} ({jax.default_backend()}), '
        f'jax {jax.__version__}')

  peak, n = matmul_peak(device)
  cfg = model_config()
  r = throughput(cfg, _STEPS.value, n)
  peak = max(peak, matmul_peak(device)[0])   # the machine is shared: the better of two reads
  tok_s = r['tokens'] / r['step_s']
  achieved = tok_s * r['flops_per_token']
  print(f'[throughput] {r["params"] / 1e6:.1f}M params, {_LAYERS.value} layers, d={_D_MODEL.value}'
        f', batch {_BATCH.value} x {_SEQ.value} tokens, fp32, unrolled, remat none')
  print(f'  step: {r["step_s"]:.3f} s median of {_STEPS.value} (best {r["best_s"]:.3f} s); '
        f'{tok_s:,.0f} tokens/s; {r["flops_per_token"] / 1e6:.1f} MFLOP/token; achieved '
        f'{achieved / 1e9:.1f} GFLOP/s')
  print(f'  matmul peak (best single f32 {n}x{n}): {peak / 1e9:.1f} GFLOP/s -> achieved = '
        f'{achieved / peak:.0%} of peak (target >= 50%)')
  print(f'  paired: a chain of {n}x{n} matmuls with the step\'s FLOPs, run after each step, '
        f'{r["chain_rate"] / 1e9:.1f} GFLOP/s -> step = {r["paired"]:.0%} of matmul rate '
        '(median of pairs; robust to other load on a shared machine)')
  print(f'[recompilations] after step 1, {_STEPS.value} steps on fresh batches: '
        f'{r["recompiles"]} (target 0)')

  times = {}
  kinds = (True, False) if _UNROLLED.value else (True,)
  for scanned in kinds:
    for layers in (2, 24):
      _, times[scanned, layers] = compiled(model_config(**{'model.num_layers': layers,
                                                           'model.scan_layers': scanned}))
  for scanned in kinds:
    name = 'scanned' if scanned else 'unrolled'
    ratio = times[scanned, 24] / times[scanned, 2]
    print(f'[compile] {name}: 2 layers {times[scanned, 2]:.1f} s, 24 layers '
          f'{times[scanned, 24]:.1f} s, ratio {ratio:.2f}x' + (' (target <= 1.5x)' if scanned
                                                                  else ''))

  print('[remat] compiled memory of the scanned train step (per device):')
  base = None
  for policy in ('none', 'save_dots', 'save_dots_no_batch', 'full'):
    c, _ = compiled(model_config(**{'model.scan_layers': True, 'model.remat': policy}))
    temp = preflight.memory_of(c)['temporaries']
    base = base or temp
    print(f'  remat={policy:<19} temporaries {temp / 2 ** 20:8.1f} MiB  ({temp / base:.2f}x of '
          'none)')


if __name__ == '__main__':
  app.run(main)
