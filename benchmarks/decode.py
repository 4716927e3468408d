"""Decode speed and KV-cache memory of the cached sampler (CPU, fp32), measured in one run.

  .venv/bin/python benchmarks/decode.py

Models: configs/default.py:small (2 layers, d_model 256, 8 heads / 2 KV heads) and :medium
(8 layers, d_model 512, 8 / 2 heads), random init, greedy. Prints:
  per-token decode time at context 128 vs 1024 and the ratio, for each model (target <= 1.3x)
  cached sampler vs full recompute (sampling/reference.py) per token at context 1024, on the
  first model (target >= 5x)
  KV-cache bytes MHA vs GQA (must equal num_heads / num_kv_heads)
  sliding-window ring cache vs full cache bytes for W=256, L=4096
Per-token time of the cached sampler: the time from its first token (prefill done) to the
last of 1 + n, over n; of the full recompute: (time for 1 + r tokens - time for 1) / r.
Timings are medians of interleaved repeats, so machine noise hits every variant alike; the
decode ratio is also printed in CPU time (process_time: every thread of this process), which a
machine loaded by other processes disturbs far less than wall time.
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from workdir import hostenv  # noqa: E402

hostenv.ensure_fast_malloc('sample')   # sample.py's malloc and XLA:CPU set-up: what users get

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from configs import default, schema  # noqa: E402
from models import build_model  # noqa: E402
from sampling.reference import generate_reference  # noqa: E402
from sampling.sampler import Sampler  # noqa: E402


def parse_args():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--batch', type=int, default=1)
  p.add_argument('--new_tokens', type=int, default=64, help='decode steps timed per run')
  p.add_argument('--reference_tokens', type=int, default=4, help='full-recompute steps timed')
  p.add_argument('--repeats', type=int, default=5)
  p.add_argument('--models', default='small,medium',
                 help='configs/default.py variants; the first is also timed against recompute')
  return p.parse_args()


def median_times(fns, repeats):
  """Interleaved timing: {name: median seconds}; a fn may return the seconds it measured, or a
  dict of them ({'wall': s, 'cpu': s}: each gets its own median, as name/key)."""
  times = {}
  for _ in range(repeats):
    for name, fn in fns.items():
      start = time.perf_counter()
      measured = fn()
      if not isinstance(measured, dict):
        measured = {None: measured if isinstance(measured, float)
                    else time.perf_counter() - start}
      for key, seconds in measured.items():
        times.setdefault(name if key is None else f'{name}/{key}', []).append(seconds)
  return {name: float(np.median(t)) for name, t in times.items()}


def cache_bytes(config, overrides, length):
  """Bytes of the keys and values of a batch-1 cache (slot positions excluded)."""
  model = nnx.eval_shape(lambda: build_model(schema.apply_overrides(config, overrides),
                                             nnx.Rngs(0)))
  cache = jax.eval_shape(lambda: model.init_cache(1, length))
  return sum(x.size * x.dtype.itemsize for c in cache for x in (c.k, c.v))


def describe(name, m):
  return (f'configs/default.py:{name} ({m.num_layers} layers, d_model={m.d_model}, '
          f'{m.num_heads} heads / {m.num_kv_heads} KV heads)')


def timed_variants(args, variant, with_reference):
  """Per-token seconds at contexts 128 and 1024 (and of the full recompute at 1024)."""
  config = default.get_config(variant)
  graphdef, params = nnx.split(build_model(config, nnx.Rngs(0)), nnx.Param)
  sampler = Sampler(graphdef, params, max_len=config.model.max_len, chunk=args.new_tokens)
  rng = np.random.RandomState(0)
  prompts = {ctx: list(rng.randint(0, 256, (args.batch, ctx))) for ctx in (128, 1024)}
  n, r = args.new_tokens, args.reference_tokens

  def ours(ctx):
    """Wall and CPU seconds from the first token (prefill done) to the last of 1 + n."""
    def run():
      chunks = sampler.stream(prompts[ctx], max_new_tokens=1 + n)
      next(chunks)
      start, cpu = time.perf_counter(), time.process_time()
      for _ in chunks:
        pass
      return {'wall': time.perf_counter() - start, 'cpu': time.process_time() - cpu}
    return run

  def reference(new):
    x = jnp.asarray(np.stack(prompts[1024]), jnp.int32)
    return lambda: generate_reference(graphdef, params, x, jax.random.key(0),
                                      max_new_tokens=new).block_until_ready()

  fns = {128: ours(128), 1024: ours(1024)}
  if with_reference:
    fns.update(ref_1=reference(1), ref_n=reference(1 + r))
  for fn in fns.values():   # compile
    fn()
  t = median_times(fns, args.repeats)
  out = {ctx: t[f'{ctx}/wall'] / n for ctx in (128, 1024)}
  out.update({f'cpu{ctx}': t[f'{ctx}/cpu'] / n for ctx in (128, 1024)})
  if with_reference:
    out['reference'] = (t['ref_n'] - t['ref_1']) / r
  return config.model, out


def main():
  args = parse_args()
  print(f'decode: fp32 CPU, batch {args.batch}, random init, greedy, median of {args.repeats} '
        f'interleaved repeats, load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores')
  for variant in args.models.split(','):
    m, t = timed_variants(args, variant, with_reference=variant == args.models.split(',')[0])
    print(f'{describe(variant, m)} per-token decode ms: context 128 {1e3 * t[128]:.2f}, '
          f'context 1024 {1e3 * t[1024]:.2f}, ratio {t[1024] / t[128]:.2f}x (target <= 1.3x); '
          f'CPU ms {1e3 * t["cpu128"]:.2f} vs {1e3 * t["cpu1024"]:.2f}, ratio '
          f'{t["cpu1024"] / t["cpu128"]:.2f}x')
    if 'reference' in t:
      print(f'{describe(variant, m)} context 1024 per token ms: full recompute '
            f'{1e3 * t["reference"]:.1f}, cached {1e3 * t[1024]:.2f}, cached is '
            f'{t["reference"] / t[1024]:.1f}x faster (target >= 5x)')
  config, length = default.get_config('small'), 4096
  m = config.model
  mha = cache_bytes(config, {'model.num_kv_heads': m.num_heads}, length)
  gqa = cache_bytes(config, {}, length)
  print(f'KV cache bytes ({describe("small", m)}, batch 1, L={length}): MHA {mha:,}, GQA '
        f'{gqa:,}, ratio {mha / gqa:g} (num_heads / num_kv_heads = {m.num_heads / m.num_kv_heads:g})')
  ring = cache_bytes(config, {'model.sliding_window': 256}, length)
  print(f'KV cache bytes (batch 1): full L={length} {gqa:,}, ring W=256 {ring:,}, ratio '
        f'{gqa / ring:g} (L / W = {length / 256:g})')


if __name__ == '__main__':
  main()
