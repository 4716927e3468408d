"""Model FLOPs per token and the device peak they are measured against (MFU).

MFU = flops_per_token x tokens/s / peak, with the analytic count of `analytic_flops_per_token`
(PaLM appendix B: 6 N_matmul + 12 L H Q T per token, forward and backward) and `peak_flops`: a
table of dense bf16 peaks for known GPU/TPU kinds, and on CPU a matmul rate measured once.
"""
from __future__ import annotations

import math
import time

import jax
import jax.numpy as jnp

# Dense (no sparsity) bf16 peak FLOP/s per device, matched as a substring of the lower-cased
# `device.device_kind` (first match wins, so longer names come first).
PEAK_BF16 = (
    ('tpu v6', 918e12), ('tpu v5p', 459e12), ('tpu v5', 197e12),   # v5 lite / v5e
    ('tpu v4', 275e12), ('tpu v3', 123e12), ('tpu v2', 45e12),
    ('gb200', 2450e12), ('b200', 2250e12), ('h200', 989e12), ('h100', 989e12), ('h800', 989e12),
    ('gh200', 989e12), ('a100', 312e12), ('a800', 312e12), ('l40s', 362e12), ('l4', 121e12),
    ('a10', 125e12), ('rtx 4090', 165e12), ('rtx 3090', 71e12), ('v100', 125e12),
)


def analytic_flops_per_token(config, matmul_params: int) -> float:
  """Training FLOPs per token: 6 N_matmul (forward 2N, backward 4N) plus attention scores and
  values, 6 * 2 * 2 * layers * heads * head_dim * context (dense causal attention, as computed;
  the PaLM convention 6N + 12 L H Q T)."""
  m, t = config.model, config.data.seq_len
  head_dim = m.head_dim or m.d_model // m.num_heads
  if m.kind == 'decoder':
    attention_layers = m.num_layers
  else:  # encoder self-attention, decoder self- and cross-attention
    attention_layers = m.num_encoder_layers + 2 * m.num_decoder_layers
  return 6.0 * matmul_params + 12.0 * attention_layers * m.num_heads * head_dim * t


def matmul_params_of(config, shapes) -> int:
  """Parameters used in matmuls, from (path tuple, shape) pairs: all but lookup tables (token
  embeddings unless tied to the output layer, learned positions)."""
  total = sum(math.prod(shape) for _, shape in shapes)
  lookup = sum(math.prod(shape) for path, shape in shapes if path[-1] == 'embedding')
  if config.model.tie_embeddings:
    lookup -= config.model.vocab_size * config.model.d_model
  return total - lookup


def _name(k) -> str:
  for attr in ('key', 'name', 'idx'):
    if hasattr(k, attr):
      return getattr(k, attr)
  return str(k)


def flops_per_token(config, params) -> float:
  """Analytic training FLOPs per token of a model with these (abstract) parameters."""
  shapes = [(tuple(_name(k) for k in keys if _name(k) != 'value'), tuple(leaf.shape))
            for keys, leaf in jax.tree_util.tree_flatten_with_path(params)[0]]
  return analytic_flops_per_token(config, matmul_params_of(config, shapes))


def measure_matmul_rate(device, dtype='float32', n: int = 1024, reps: int = 3) -> float:
  """FLOP/s of one n x n matmul on `device` in `dtype` (best of `reps`)."""
  x = jax.device_put(jnp.ones((n, n), dtype), device)
  f = jax.jit(lambda a: a @ a)
  f(x).block_until_ready()
  best = float('inf')
  for _ in range(reps):
    start = time.perf_counter()
    f(x).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2.0 * n ** 3 / best


def peak_flops(devices, dtype: str = 'float32') -> tuple[float, str]:
  """(peak FLOP/s of all `devices` together, where the figure came from). GPU/TPU: the bf16
  table times the device count; CPU (or an unknown kind): a 512^3 matmul in `dtype` (best of 20)
  once on a device of this process, times the number of processes (simulated CPU devices of one
  process share its host's cores)."""
  kind = devices[0].device_kind.lower()
  if devices[0].platform != 'cpu':
    for name, peak in PEAK_BF16:
      if name in kind:
        return peak * len(devices), f'{devices[0].device_kind} bf16 peak x{len(devices)}'
  here = jax.process_index()
  local = next((d for d in devices if getattr(d, 'process_index', here) == here), devices[0])
  rate = measure_matmul_rate(local, dtype, n=512, reps=20)   # best of 20: ~0.1 s in all
  if devices[0].platform == 'cpu':
    scale = len({getattr(d, 'process_index', here) for d in devices})
  else:
    scale = len(devices)
  return rate * scale, f'measured {dtype} matmul rate of {devices[0].device_kind} x{scale}'
