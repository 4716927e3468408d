"""Attention implementations: compiled memory, window cost and speed of forward + backward.

  GLIBC_TUNABLES=glibc.malloc.hugetlb=1 .venv/bin/python benchmarks/attention.py

Every number comes from this one run, on this machine. The measured function is
value_and_grad of sum(attention(q, k, v) * w) w.r.t. q, k, v, jitted; times are the minimum of
`--repeats` runs after a warm-up, interleaving the compared implementations.
Prints:
  (a) temporary memory of the compiled function (XLA's memory analysis), blockwise vs xla, at
      T = 1024 ... 8192 (target: >= 10x lower at 8192);
  (b) causal window W vs full causal, both blockwise, at T = 8192 (target: <= 0.25x the time),
      also with explicit positions as the model passes them;
  (c) blockwise vs xla time at T = 2048, causal (target: no worse than 1.5x slower);
  on a GPU also (d) TFLOP/s of cudnn, blockwise and xla (causal FLOPs counted as half).
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from models.attention import dot_product_attention  # noqa: E402


def parse_args():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--batch', type=int, default=1)
  p.add_argument('--heads', type=int, default=4)
  p.add_argument('--kv_heads', type=int, default=2)
  p.add_argument('--head_dim', type=int, default=64)
  p.add_argument('--window', type=int, default=512)
  p.add_argument('--memory_lengths', default='1024,2048,4096,8192')
  p.add_argument('--window_length', type=int, default=8192)
  p.add_argument('--speed_length', type=int, default=2048)
  p.add_argument('--repeats', type=int, default=3)
  p.add_argument('--dtype', default=None, help='default: bfloat16 on GPU, float32 on CPU')
  return p.parse_args()


def step_fn(impl, window=None, positions=False, **kw):
  """positions=True passes explicit query/key positions (as the model does): tiles are then
  skipped by the runtime visibility table instead of the static band."""
  def loss(q, k, v, w):
    if positions:
      kw.update(query_positions=jnp.arange(q.shape[1])[None],
                key_positions=jnp.arange(k.shape[1])[None])
    out = dot_product_attention(q, k, v, is_causal=True, implementation=impl,
                                local_window_size=None if window is None else (window - 1, 0),
                                **kw)
    return jnp.sum(out.astype(jnp.float32) * w)
  return jax.jit(jax.value_and_grad(loss, (0, 1, 2)))


def shapes(args, t, dtype):
  q = jax.ShapeDtypeStruct((args.batch, t, args.heads, args.head_dim), dtype)
  kv = jax.ShapeDtypeStruct((args.batch, t, args.kv_heads, args.head_dim), dtype)
  w = jax.ShapeDtypeStruct(q.shape, jnp.float32)
  return q, kv, kv, w


def arrays(args, t, dtype):
  keys = jax.random.split(jax.random.key(0), 4)
  return [jax.random.normal(key, s.shape, s.dtype) for key, s in zip(keys, shapes(args, t, dtype))]


def temp_bytes(fn, args, t, dtype):
  return fn.lower(*shapes(args, t, dtype)).compile().memory_analysis().temp_size_in_bytes


def timings(fns, inputs, repeats):
  """Minimum seconds per call of each fn, runs interleaved."""
  compiled = [fn.lower(*inputs).compile() for fn in fns]
  for c in compiled:
    jax.block_until_ready(c(*inputs))
  best = [float('inf')] * len(fns)
  for _ in range(repeats):
    for i, c in enumerate(compiled):
      start = time.perf_counter()
      jax.block_until_ready(c(*inputs))
      best[i] = min(best[i], time.perf_counter() - start)
  return best


def main():
  args = parse_args()
  gpu = jax.default_backend() == 'gpu'
  dtype = jnp.dtype(args.dtype or ('bfloat16' if gpu else 'float32'))
  print(f'backend={jax.default_backend()} device={jax.devices()[0].device_kind} dtype={dtype} '
        f'B={args.batch} N={args.heads} K={args.kv_heads} H={args.head_dim}')

  print('\n(a) compiled temporary memory of forward+gradient, causal')
  print(f'{"T":>6} {"xla MiB":>10} {"blockwise MiB":>14} {"xla/blockwise":>14}')
  for t in (int(x) for x in args.memory_lengths.split(',')):
    xla = temp_bytes(step_fn('xla'), args, t, dtype)
    blk = temp_bytes(step_fn('blockwise'), args, t, dtype)
    print(f'{t:>6} {xla / 2**20:>10.1f} {blk / 2**20:>14.1f} {xla / blk:>13.1f}x')

  t = args.window_length
  full, win, win_pos = timings(
      [step_fn('blockwise'), step_fn('blockwise', args.window),
       step_fn('blockwise', args.window, positions=True)], arrays(args, t, dtype), args.repeats)
  print(f'\n(b) blockwise forward+backward at T={t}: full causal {full * 1e3:.0f} ms, window '
        f'W={args.window} {win * 1e3:.0f} ms; window/full = {win / full:.3f} '
        f'(W/T = {args.window / t:.3f}); with explicit positions (the model\'s call) '
        f'{win_pos * 1e3:.0f} ms, {win_pos / full:.3f} of full')

  t = args.speed_length
  xla, blk = timings([step_fn('xla'), step_fn('blockwise')], arrays(args, t, dtype),
                     args.repeats)
  print(f'\n(c) forward+backward at T={t}, causal: xla {xla * 1e3:.0f} ms, blockwise '
        f'{blk * 1e3:.0f} ms; blockwise/xla = {blk / xla:.2f}x')

  if gpu:
    impls = ('cudnn', 'blockwise', 'xla')
    secs = timings([step_fn(i) for i in impls], arrays(args, t, dtype), args.repeats)
    # causal: half of 4*B*N*T*T*H forward FLOPs; backward 2.5x forward (5 matmuls vs 2).
    flops = 3.5 * 4 * args.batch * args.heads * t * t * args.head_dim / 2
    print(f'\n(d) GPU forward+backward at T={t}: ' + ', '.join(
        f'{i} {flops / s / 1e12:.1f} TFLOP/s' for i, s in zip(impls, secs)))


if __name__ == '__main__':
  main()
