"""Our CPU train step against a PyTorch loop over transformers' LlamaForCausalLM, same shape.

  python benchmarks/train_vs_torch.py [--pairs=7] [--steps=3] [--layers=4] [--d_model=256]

Both sides train the same decoder (default: 4 layers, d_model 256, GQA 8/2 heads, SwiGLU 768,
tied byte embeddings, T 256, batch 16, fp32) with AdamW and global-norm clipping on random
batches. The PyTorch loop runs in a worker process started by this one, so neither side's
thread pool spins while the other works; both see the same cores (XLA's and torch's default:
every core of the machine; `--threads=N` pins both to the first N cores) and the same malloc
settings (workdir/hostenv.py). Timing is
interleaved: each pair times `--steps` steps of ours, then of torch's (the order alternates), so
load from other users of a shared machine hits both alike; the ratio printed is the median of the
per-pair ratios. Each side first runs `--warmup` untimed steps, as a training loop never switches
to another framework: timed right after a torch step, our step ran at about half its speed,
torch's did not change. The load average before and after is printed with it, and the ratio of
CPU time per step (torch's over ours).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from workdir import hostenv  # noqa: E402

hostenv.ensure_fast_malloc('train')

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from benchmarks.llama_pair import (  # noqa: E402
    cpu_description, our_config, random_tokens, torch_loss, torch_model_and_optimizer)

_PAIRS = flags.DEFINE_integer('pairs', 7, 'Interleaved (ours, torch) timing pairs.')
_STEPS = flags.DEFINE_integer('steps', 3, 'Train steps timed per side in each pair.')
_WARMUP = flags.DEFINE_integer(
    'warmup', 1, 'Untimed steps each side runs just before its timed ones (0: time the first '
    'step after the other side ran: ours then ran at ~6K tokens/s instead of ~11K).')
_LAYERS = flags.DEFINE_integer('layers', 4, 'Decoder layers.')
_D_MODEL = flags.DEFINE_integer('d_model', 256, 'Width (heads of 32, mlp 3x).')
_BATCH = flags.DEFINE_integer('batch_size', 16, 'Sequences per step.')
_SEQ = flags.DEFINE_integer('seq_len', 256, 'Tokens per sequence.')
_THREADS = flags.DEFINE_integer(
    'threads', 0, 'Threads per side (0: each library\'s default, every core). 1 is the least '
    'load-sensitive comparison on a shared machine (no thread pool waits for a descheduled peer).')
_WORKER = flags.DEFINE_bool('torch_worker', False, 'Internal: serve torch steps on stdin/stdout.')

def shape() -> dict:
  d = _D_MODEL.value
  return dict(layers=_LAYERS.value, d_model=d, heads=d // 32, kv_heads=d // 128, mlp=3 * d,
              batch=_BATCH.value, seq=_SEQ.value)


# ---------------------------------------------------------------- torch worker (its own process)
def torch_worker(sh: dict) -> None:
  """Reads a step count per line on stdin, trains that many steps, writes the seconds taken."""
  import torch
  import transformers
  if _THREADS.value:
    os.sched_setaffinity(0, range(_THREADS.value))
    torch.set_num_threads(_THREADS.value)
  model, opt = torch_model_and_optimizer(sh)

  def step(seed: int) -> float:
    tokens = torch.from_numpy(random_tokens(seed, sh['batch'], sh['seq'])).long()
    loss = torch_loss(model, tokens)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return loss.item()

  step(0)  # warm-up
  print(json.dumps({'ready': True, 'threads': torch.get_num_threads(),
                    'torch': torch.__version__, 'transformers': transformers.__version__}),
        flush=True)
  seed = 1
  for line in sys.stdin:
    n = int(line)
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(n):
      step(seed)
      seed += 1
    print(json.dumps({'seconds': time.perf_counter() - start,
                      'cpu_seconds': time.process_time() - cpu}), flush=True)


# ---------------------------------------------------------------- ours
def our_step(sh: dict):
  """A `run(n) -> (seconds, CPU seconds)` closure over our jitted train step (compiled and
  warmed up)."""
  import jax
  from training import loop
  from training import mesh as mesh_lib
  cfg = our_config(sh)
  s = loop.setup(cfg, jax.devices()[:1])
  state = [s.init_state()]

  def batch(seed):
    tokens = random_tokens(seed, sh['batch'], sh['seq'])
    return mesh_lib.put_batch({'inputs': tokens[:, :-1], 'targets': tokens[:, 1:],
                               'weights': np.ones((sh['batch'], sh['seq']), np.float32)}, s.mesh)

  seeds = iter(range(10 ** 9))

  def run(n: int) -> tuple[float, float]:
    batches = [batch(next(seeds)) for _ in range(n)]   # host work outside the timing
    start, cpu = time.perf_counter(), time.process_time()
    for b in batches:
      state[0], metrics = s.train_step(state[0], b)
    jax.block_until_ready(metrics)
    return time.perf_counter() - start, time.process_time() - cpu

  run(2)  # compile + warm-up
  return run, cfg


def main(argv):
  del argv
  sh = shape()
  if _WORKER.value:
    torch_worker(sh)
    return
  load_before = os.getloadavg()
  worker = subprocess.Popen(
      [sys.executable, os.path.abspath(__file__), '--torch_worker',
       *[f'--{k}={v}' for k, v in (('layers', _LAYERS.value), ('d_model', _D_MODEL.value),
                                    ('batch_size', _BATCH.value), ('seq_len', _SEQ.value),
                                    ('threads', _THREADS.value))]],
      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
  info = json.loads(worker.stdout.readline())
  if _THREADS.value:   # before JAX starts its CPU client, which sizes its pools by affinity
    os.sched_setaffinity(0, range(_THREADS.value))
  import jax
  run, _ = our_step(sh)

  def torch_run(n: int) -> tuple[float, float]:
    worker.stdin.write(f'{n}\n')
    worker.stdin.flush()
    reply = json.loads(worker.stdout.readline())
    return reply['seconds'], reply['cpu_seconds']

  def timed(side) -> tuple[float, float]:
    if _WARMUP.value:
      side(_WARMUP.value)
    return side(_STEPS.value)

  torch_run(1)
  tokens = sh['batch'] * sh['seq'] * _STEPS.value
  ours, theirs, cpu_ratios = [], [], []
  for i in range(_PAIRS.value):
    first, second = (run, torch_run) if i % 2 == 0 else (torch_run, run)
    a, b = timed(first), timed(second)
    o, t = (a, b) if i % 2 == 0 else (b, a)
    ours.append(tokens / o[0])
    theirs.append(tokens / t[0])
    cpu_ratios.append(t[1] / o[1])
  worker.stdin.close()
  worker.wait()
  load_after = os.getloadavg()
  ratios = [o / t for o, t in zip(ours, theirs)]
  print(f'shape: {sh["layers"]} layers, d_model {sh["d_model"]}, GQA {sh["heads"]}/'
        f'{sh["kv_heads"]}, mlp {sh["mlp"]}, T {sh["seq"]}, batch {sh["batch"]}, fp32, AdamW')
  print(f'ours: jax {jax.__version__} on {jax.devices()[0].device_kind}; torch {info["torch"]} '
        f'({info["threads"]} threads), transformers {info["transformers"]} LlamaForCausalLM (sdpa)')
  print(f'load average (1 min) before {load_before[0]:.2f}, after {load_after[0]:.2f}; '
        f'{os.cpu_count()} cores of {cpu_description()}')
  print('pairs (tokens/s ours / torch): ' + ', '.join(
      f'{o:,.0f}/{t:,.0f}' for o, t in zip(ours, theirs)))
  print(f'ours {np.median(ours):,.0f} tokens/s, torch {np.median(theirs):,.0f} tokens/s; '
        f'ratio ours/torch = {np.median(ratios):.2f}x (median of {len(ratios)} interleaved pairs '
        f'of {_STEPS.value} steps; range {min(ratios):.2f}-{max(ratios):.2f})')
  print(f'CPU time per step, torch / ours = {np.median(cpu_ratios):.2f}x (median; range '
        f'{min(cpu_ratios):.2f}-{max(cpu_ratios):.2f}): less sensitive to load than wall time, '
        'but it counts thread pools spinning while they wait')


if __name__ == '__main__':
  app.run(main)
