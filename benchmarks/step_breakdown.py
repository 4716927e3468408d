"""Where a train step's time goes, ours and the PyTorch + transformers Llama loop's, same shape.

  python benchmarks/step_breakdown.py [--threads=1] [--steps=5] [--attention=auto]

Both sides as in benchmarks/train_vs_torch.py (4 layers, d_model 256, GQA 8/2, T 256, batch 16,
fp32, AdamW), pinned to the first `--threads` cores, CPU time (less sensitive to machine load
than wall time). Prints, for each side, the median CPU ms of the phases (forward with the loss;
backward; gradient clipping + AdamW; the whole step) and the share of
op time per part of the model: ours from a jax.profiler trace of the compiled step (each XLA
thunk attributed through its HLO stack frame to the model function it came from), torch's from
torch.profiler self times of its aten ops. Trace durations are wall time of each op, so under
load only their shares are meaningful.
"""
from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from workdir import hostenv  # noqa: E402

hostenv.ensure_fast_malloc('train')

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from benchmarks.llama_pair import (  # noqa: E402
    cpu_description, our_config, random_tokens, torch_loss, torch_model_and_optimizer)

_THREADS = flags.DEFINE_integer('threads', 1, 'Cores (and threads) for each side.')
_STEPS = flags.DEFINE_integer('steps', 5, 'Timed repetitions of each phase.')
_ATTENTION = flags.DEFINE_string('attention', 'auto', 'Our model.attention.')

SHAPE = dict(layers=4, d_model=256, heads=8, kv_heads=2, mlp=768, batch=16, seq=256)
B, T = SHAPE['batch'], SHAPE['seq']
# Our parts, by the innermost model function on an op's stack (first match wins).
PARTS = (('attention core', ('causal_attention', '_forward', '_bwd', 'head_major_attention',
                             'attention_mask', 'blockwise_attention')),
         ('rope', ('apply_rope',)), ('norms', ('Norm.__call__',)),
         ('logits + loss', ('DecoderLM.logits', 'cross_entropy')),
         ('embedding', ('embed_tokens',)), ('mlp (matmuls + swiglu)', ('Mlp.__call__',)),
         ('q/k/v/o projections', ('Attention.__call__',)),
         ('optimizer + guard', ('update_fn', 'apply_updates', 'global_norm', 'guarded')))
TORCH_PARTS = (('attention core', ('scaled_dot_product', 'flash_attention')),
               ('matmuls (all projections, logits)', ('aten::mm', 'aten::addmm', 'aten::bmm')),
               ('optimizer', ('adam', 'foreach', 'aten::_fused')),
               ('loss', ('log_softmax', 'nll_loss', 'cross_entropy')),
               ('embedding', ('embedding',)),
               ('elementwise (norms, rope, silu, residual, copies)', ('',)))


def median_ms(fn, n):
  times = []
  for _ in range(n):
    c = time.process_time()
    fn()
    times.append(time.process_time() - c)
  return 1e3 * float(np.median(times))


def print_parts(title, durations: dict, total_note: str):
  total = sum(durations.values())
  print(f'  {title} ({total_note}):')
  for name, d in sorted(durations.items(), key=lambda kv: -kv[1]):
    print(f'    {100 * d / total:5.1f}%  {name}')


def ours(steps: int):
  import jax
  from flax import nnx
  import optax
  from training import loop, optim
  from training import mesh as mesh_lib
  cfg = our_config(SHAPE, _ATTENTION.value)
  s = loop.setup(cfg, jax.devices()[:1])
  state = s.init_state()
  t = random_tokens(0, B, T)
  batch = mesh_lib.put_batch({'inputs': t[:, :-1], 'targets': t[:, 1:],
                              'weights': np.ones((B, T), np.float32)}, s.mesh)
  loss = lambda p: loop.model_loss(nnx.merge(s.graphdef, p), batch)[0]
  fwd = jax.jit(loss)
  fwd_bwd = jax.jit(jax.grad(loss))
  tx = optim.make_optimizer(cfg.train)
  update = jax.jit(lambda p, o, g: (optax.apply_updates(p, tx.update(g, o, p)[0]),
                                    optax.global_norm(g)))
  grads = fwd_bwd(state.params)
  hlo = s.train_step.lower(state, batch).compile().as_text()
  holder = [state]

  def step():
    holder[0], m = s.train_step(holder[0], batch)
    jax.block_until_ready(m)

  phases = (lambda: jax.block_until_ready(fwd(holder[0].params)),
            lambda: jax.block_until_ready(fwd_bwd(holder[0].params)),
            lambda: jax.block_until_ready(update(holder[0].params, holder[0].opt_state, grads)))
  for f in (*phases, step):   # compile and warm up each program before any timing
    f()
  f_ms, fb_ms, o_ms = (median_ms(f, steps) for f in phases)
  step_ms = median_ms(step, steps)
  with tempfile.TemporaryDirectory() as d:
    with jax.profiler.trace(d, create_perfetto_trace=True):
      for _ in range(steps):
        step()
    events = json.load(gzip.open(glob.glob(f'{d}/plugins/profile/*/perfetto_trace.json.gz')[0]))
  events = events['traceEvents'] if isinstance(events, dict) else events
  part_of = hlo_parts(hlo)
  parts = collections.Counter()
  for e in events:
    if e.get('ph') == 'X' and e['name'] in part_of:
      parts[part_of[e['name']]] += e['dur']
  return f_ms, fb_ms, o_ms, step_ms, parts


def hlo_parts(hlo: str) -> dict:
  """HLO instruction name -> model part, through the stack frame tables of the HLO text."""
  def table(title):
    out, on = {}, False
    for line in hlo.splitlines():
      if line == title:
        on = True
      elif on:
        m = re.match(r'(\d+) (.*)', line)
        if not m:
          break
        out[int(m.group(1))] = m.group(2)
    return out
  funcs = {k: v.strip('"') for k, v in table('FunctionNames').items()}
  locs = {k: int(re.search(r'function_name_id=(\d+)', v).group(1))
          for k, v in table('FileLocations').items()}
  frames = {k: tuple(int(x) for x in re.search(
      r'file_location_id=(\d+) parent_frame_id=(\d+)', v).groups())
            for k, v in table('StackFrames').items()}

  def part(frame):
    names, seen = [], set()
    while frame in frames and frame not in seen:   # parent ids are printed 1-based
      seen.add(frame)
      loc, parent = frames[frame]
      names.append(funcs[locs[loc]])
      frame = parent - 1
    for name, keys in PARTS:
      if any(k in n for n in names for k in keys):
        return name
    return 'other (residual adds, layout copies)'
  out = {}
  for line in hlo.splitlines():
    m = re.match(r'\s*(?:ROOT )?%?([\w.\-]+) = ', line)
    if m:
      f = re.search(r'stack_frame_id=(\d+)', line)
      out[m.group(1)] = part(int(f.group(1))) if f else 'other (residual adds, layout copies)'
  return out


def torch_side(steps: int):
  import torch
  torch.set_num_threads(_THREADS.value)
  model, opt = torch_model_and_optimizer(SHAPE)
  t = torch.from_numpy(random_tokens(0, B, T)).long()
  loss_of = lambda: torch_loss(model, t)
  phases = collections.defaultdict(list)

  def step(record=True):
    c0 = time.process_time()
    loss = loss_of()
    c1 = time.process_time()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    c2 = time.process_time()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    c3 = time.process_time()
    if record:
      for k, v in (('f', c1 - c0), ('b', c2 - c1), ('o', c3 - c2)):
        phases[k].append(1e3 * v)

  step(False)
  for _ in range(steps):
    step()
  with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
    for _ in range(steps):
      step(False)
  parts = collections.Counter()
  for e in prof.key_averages():
    if e.self_cpu_time_total <= 0:
      continue
    name = next(p for p, keys in TORCH_PARTS if any(k in e.key.lower() for k in keys))
    parts[name] += e.self_cpu_time_total
  med = lambda k: float(np.median(phases[k]))
  return med('f'), med('b'), med('o'), parts


def main(argv):
  del argv
  os.sched_setaffinity(0, range(_THREADS.value))
  load = os.getloadavg()[0]
  tf, tb, to, tparts = torch_side(_STEPS.value)
  f, fb, o, st, parts = ours(_STEPS.value)
  print(f'{_THREADS.value} core(s) of {cpu_description()}, load average {load:.2f} before, '
        f'{os.getloadavg()[0]:.2f} after; CPU ms per step (median of {_STEPS.value})')
  print(f'  ours (attention={_ATTENTION.value!r}): forward+loss {f:.0f}, backward {fb - f:.0f}, '
        f'clip+AdamW {o:.0f} (each jitted alone); whole step {st:.0f}')
  print(f'  torch: forward+loss {tf:.0f}, backward {tb:.0f}, clip+AdamW {to:.0f}; whole step '
        f'{tf + tb + to:.0f}')
  print_parts('ours, share of traced op time', parts, 'jax.profiler, compiled step')
  print_parts('torch, share of aten self time', tparts, 'torch.profiler')


if __name__ == '__main__':
  app.run(main)
