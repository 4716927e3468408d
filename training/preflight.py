"""Preflight (`train.py --dry_run`): compile the train step ahead of time and report its cost.

Nothing is trained and nothing is written. The report gives the parameter count by component,
FLOPs per token and per step (analytic and XLA's compiled count), compiled memory per device
against the device's memory, the mesh and each parameter's sharding, and a step-time estimate
from a measured matmul rate. `check_fits` raises `PreflightError` naming the figure that is over.
"""
from __future__ import annotations

import dataclasses
import math
import os

import jax
import numpy as np

from configs import schema
from training import data as data_lib
from training import flops
from training import loop
from training import mesh as mesh_lib
from text.tokenizer import make_tokenizer
from training.flops import analytic_flops_per_token

GIB = 1024 ** 3


class PreflightError(ValueError):
  """The configured run will not work on these devices (e.g. it does not fit in memory)."""


@dataclasses.dataclass
class ParamInfo:
  path: str                 # 'layers.0.attn.q.kernel'
  shape: tuple[int, ...]
  spec: str                 # the PartitionSpec, e.g. "('fsdp', 'tensor', None)"
  device_shape: tuple[int, ...]
  device_bytes: int


@dataclasses.dataclass
class Report:
  """Everything the dry run measured. Memory and compiled FLOPs are per device."""
  mesh: dict[str, int]
  platform: str
  num_devices: int
  params: list[ParamInfo]
  num_params: int
  components: dict[str, int]          # component -> parameter count
  tokens_per_step: int
  flops_per_token: float              # analytic: 6 N_matmul + attention (whole step / tokens)
  matmul_params: int                  # N_matmul: parameters that take part in matmuls
  compiled_flops: float | None        # XLA cost analysis of the compiled step, per device
  memory: dict[str, int]              # arguments, outputs, aliased, temporaries, total (bytes)
  device_memory: int
  device_memory_source: str
  matmul_flops_per_sec: float | None
  step_seconds: float | None          # estimate: FLOPs / matmul rate (a lower bound)

  @property
  def flops_per_step(self) -> float:
    return self.flops_per_token * self.tokens_per_step

  @property
  def compiled_flops_per_token(self) -> float | None:
    if self.compiled_flops is None:
      return None
    return self.compiled_flops * self.num_devices / self.tokens_per_step


def component_of(path: tuple) -> str:
  """Groups a parameter path: ('layers', 0, 'attn', 'q', 'kernel') -> 'layers.attn',
  ('embed', 'embedding') -> 'embed'. Layer indices are dropped so layers add up."""
  names, after_layer = [], False
  for p in path[:-1]:
    if isinstance(p, int):
      after_layer = True
      continue
    names.append(str(p))
    if after_layer:
      break
  if not after_layer:  # stacked (scanned) layers have no index: keep two levels when nested
    names = names[:2] if len(names) >= 3 else names[:1]
  return '.'.join(names) or str(path[-1])


def _key_name(k) -> str | int:
  for attr in ('key', 'name', 'idx'):
    if hasattr(k, attr):
      return getattr(k, attr)
  return str(k)


def param_infos(abstract_params) -> list[tuple[tuple, ParamInfo]]:
  """(path tuple, ParamInfo) for every leaf of the sharded abstract parameters."""
  out = []
  for keys, leaf in jax.tree_util.tree_flatten_with_path(abstract_params)[0]:
    path = tuple(_key_name(k) for k in keys if _key_name(k) != 'value')
    sharding = leaf.sharding
    device_shape = tuple(sharding.shard_shape(leaf.shape)) if sharding is not None else leaf.shape
    spec = tuple(getattr(sharding, 'spec', ()))
    spec = spec + (None,) * (len(leaf.shape) - len(spec))
    out.append((path, ParamInfo('.'.join(map(str, path)), tuple(leaf.shape), str(spec),
                                device_shape,
                                math.prod(device_shape) * np.dtype(leaf.dtype).itemsize)))
  return out


def matmul_params_of(config, infos) -> int:
  """Parameters used in matmuls (training/flops.py) from `param_infos`."""
  return flops.matmul_params_of(config, [(path, info.shape) for path, info in infos])


def abstract_batch(config, mesh) -> dict:
  """Shapes and shardings of one global batch, taken from the data pipeline itself."""
  b, t = config.train.batch_size, config.data.seq_len
  tokens = np.zeros((b + 1) * (t + 1), np.int32)
  example = next(iter(data_lib.train_dataset(tokens, t, b, 0)))
  if config.data.task != 'lm':  # encoder-decoder batches (training/seq2seq_data.py) add sources
    example['sources'] = np.zeros((b, config.data.source_len), np.int32)
  if config.data.packing:       # packed rows (training/packing.py) add segment ids, positions
    for side, key in (('', 'inputs'), ('source_', 'sources')):
      if key in example:
        example[f'{side}segment_ids'] = example[f'{side}positions'] = np.zeros_like(example[key])
  sharding = mesh_lib.batch_sharding(mesh)
  return {k: jax.ShapeDtypeStruct(np.shape(v), np.asarray(v).dtype, sharding=sharding)
          for k, v in example.items()}


def device_memory(devices, override_gb: float | None = None) -> tuple[int, str]:
  """(bytes per device, where the figure came from)."""
  if override_gb:
    return int(override_gb * GIB), '--device_memory_gb'
  stats = devices[0].memory_stats() if hasattr(devices[0], 'memory_stats') else None
  if stats and stats.get('bytes_limit'):
    return int(stats['bytes_limit']), f'{devices[0].device_kind} bytes_limit'
  ram = os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')
  local = max(1, sum(d.process_index == jax.process_index() for d in devices))
  return ram // local, f'host RAM / {local} local devices'


def measure_matmul_rate(device, dtype: str, reps: int = 3) -> float:
  """FLOP/s of one square matmul on `device` in `dtype` (best of `reps`)."""
  return flops.measure_matmul_rate(device, dtype, n=1024 if device.platform == 'cpu' else 8192,
                                   reps=reps)


def _flops(compiled) -> float | None:
  try:
    cost = compiled.cost_analysis()
  except Exception:  # some backends do not implement it
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  return float(cost['flops']) if cost and cost.get('flops', -1) >= 0 else None


def memory_of(compiled) -> dict[str, int]:
  """Per-device bytes from the compiled step's memory analysis; total counts donated (aliased)
  arguments once."""
  m = compiled.memory_analysis()
  mem = {'arguments': m.argument_size_in_bytes, 'outputs': m.output_size_in_bytes,
         'aliased': m.alias_size_in_bytes, 'temporaries': m.temp_size_in_bytes,
         'code': m.generated_code_size_in_bytes}
  mem['total'] = (mem['arguments'] + mem['outputs'] - mem['aliased'] + mem['temporaries']
                  + mem['code'])
  return mem


def run(config, *, devices=None, device_memory_gb: float | None = None,
        measure: bool = True) -> Report:
  """Validates `config`, compiles its train step for the configured mesh and measures it."""
  schema.validate(config)
  vocab = make_tokenizer(config.data.tokenizer).vocab_size
  if vocab > config.model.vocab_size:
    raise schema.ConfigError(f'model.vocab_size={config.model.vocab_size} is smaller than the '
                             f'tokenizer vocabulary ({vocab}).')
  devices = jax.devices() if devices is None else devices
  s = loop.setup(config, devices)
  compiled = s.train_step.lower(s.abstract_state, abstract_batch(config, s.mesh)).compile()
  infos = param_infos(s.abstract_state.model_params())   # LoRA: base and adapters
  components: dict[str, int] = {}
  for path, info in infos:
    components[component_of(path)] = components.get(component_of(path), 0) + math.prod(info.shape)
  matmul_params = matmul_params_of(config, infos)
  tokens = config.train.batch_size * config.data.seq_len
  flops_per_token = analytic_flops_per_token(config, matmul_params)
  compiled_flops = _flops(compiled)
  mem_bytes, mem_source = device_memory(devices, device_memory_gb)
  rate = measure_matmul_rate(devices[0], config.model.dtype) if measure else None
  step_seconds = None
  if rate:
    per_device = (compiled_flops if compiled_flops is not None
                  else flops_per_token * tokens / len(devices))
    if devices[0].platform == 'cpu':  # simulated CPU devices share the host's cores
      per_device *= len(devices)
    step_seconds = per_device / rate
  return Report(
      mesh=dict(zip(s.mesh.axis_names, s.mesh.devices.shape)), platform=devices[0].platform,
      num_devices=len(devices), params=[info for _, info in infos],
      num_params=sum(components.values()), components=components, tokens_per_step=tokens,
      flops_per_token=flops_per_token, matmul_params=matmul_params, compiled_flops=compiled_flops,
      memory=memory_of(compiled), device_memory=mem_bytes, device_memory_source=mem_source,
      matmul_flops_per_sec=rate, step_seconds=step_seconds)


def check_fits(report: Report) -> None:
  """Raises PreflightError naming the memory figure when the step does not fit a device."""
  m = report.memory
  if m['total'] <= report.device_memory:
    return
  raise PreflightError(
      f'the train step needs {_gib(m["total"])} per device (arguments {_gib(m["arguments"])} + '
      f'outputs {_gib(m["outputs"])} - donated {_gib(m["aliased"])} + temporaries '
      f'{_gib(m["temporaries"])}) but a device has {_gib(report.device_memory)} '
      f'({report.device_memory_source}). Lower train.batch_size, raise train.grad_accum_steps, '
      'set model.remat=full, or shard parameters over more devices with mesh.fsdp.')


def _gib(n: float) -> str:
  return f'{n / GIB:.3f} GiB' if n >= GIB / 100 else f'{n / 1024 ** 2:.2f} MiB'


def _si(x: float) -> str:
  for unit, scale in (('T', 1e12), ('G', 1e9), ('M', 1e6), ('K', 1e3)):
    if abs(x) >= scale:
      return f'{x / scale:.3g}{unit}'
  return f'{x:.3g}'


def format_report(report: Report) -> str:
  """The dry run's printed report."""
  r, m = report, report.memory
  mesh = ' x '.join(f'{k}={v}' for k, v in r.mesh.items())
  plural = 's' if r.num_devices > 1 else ''
  lines = [f'Mesh: {mesh} ({r.num_devices} {r.platform} device{plural})',
           f'Parameters: {r.num_params:,} (N = {r.matmul_params:,} without lookup-only tables)']
  width = max(len(c) for c in r.components)
  for name, count in r.components.items():
    lines.append(f'  {name:<{width}}  {count:>12,}  {100 * count / r.num_params:5.1f}%')
  lines.append(f'FLOPs per token: {_si(r.flops_per_token)} analytic (6N + attention); '
               f'per step ({r.tokens_per_step:,} tokens): {_si(r.flops_per_step)}')
  if r.compiled_flops is not None:
    lines.append(f'  compiled (XLA cost analysis): {_si(r.compiled_flops_per_token)} per token, '
                 f'{_si(r.compiled_flops)} per device per step '
                 f'({r.compiled_flops_per_token / r.flops_per_token:.3f}x analytic)')
  lines.append(f'Memory per device (compiled): arguments {_gib(m["arguments"])}, outputs '
               f'{_gib(m["outputs"])}, donated {_gib(m["aliased"])}, temporaries '
               f'{_gib(m["temporaries"])}; total {_gib(m["total"])} of '
               f'{_gib(r.device_memory)} ({100 * m["total"] / r.device_memory:.1f}%, '
               f'{r.device_memory_source})')
  if r.step_seconds is not None:
    lines.append(f'Estimated step time: >= {r.step_seconds * 1e3:.1f} ms at the measured matmul '
                 f'rate {_si(r.matmul_flops_per_sec)}FLOP/s per device '
                 f'(<= {r.tokens_per_step / r.step_seconds:,.0f} tokens/s; matmuls only)')
  lines.append('Sharding:')
  rows, seen = [], {}
  for p in r.params:  # one row for the same parameter of every layer
    key = '.'.join('*' if part.isdigit() else part for part in p.path.split('.'))
    row = (key, 'x'.join(map(str, p.shape)) or 'scalar', p.spec,
           'x'.join(map(str, p.device_shape)) or 'scalar')
    if row in seen:
      seen[row] += 1
    else:
      seen[row] = 1
      rows.append(row)
  rows = [(f'{row[0]} (x{seen[row]})' if seen[row] > 1 else row[0], *row[1:]) for row in rows]
  widths = [max(len(h), *(len(row[i]) for row in rows))
            for i, h in enumerate(('parameter', 'shape', 'spec', 'per device'))]
  for row in [('parameter', 'shape', 'spec', 'per device'), *rows]:
    lines.append('  ' + '  '.join(f'{c:<{w}}' for c, w in zip(row, widths)).rstrip())
  return '\n'.join(lines)
