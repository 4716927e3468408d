"""Hugging Face `config.json` <-> our model config, for the Llama, Mistral, Qwen2, Gemma and Gemma 2
families.

All are one network with RoPE (half-split pairing), RMSNorm and GQA. Llama, Mistral and Qwen2:
pre-norm SwiGLU, differing in biases and sliding windows. Gemma: GeGLU (tanh GELU), embeddings
scaled by sqrt(d_model), norms that multiply by (1 + w). Gemma 2 adds sandwich norms,
`query_pre_attn_scalar`, attention- and final-logit soft-capping and alternating local/global
layers. A `Family` says which of our fields it fixes and how its other config.json keys map onto
our fields and back, so no code branches on model names.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable

from configs import schema
from configs.base import base_config
from models.config import ModelConfig
from models.decoder import layer_window


class InteropError(ValueError):
  """A checkpoint or workdir cannot be converted; the message names the field, tensor or file."""


@dataclasses.dataclass(frozen=True)
class Family:
  """How one Hugging Face causal-LM architecture maps onto our model fields."""
  architecture: str                               # config.json `architectures[0]`
  model_type: str
  fixed: dict                                     # our model fields it always has (set on import)
  import_fields: Callable[[dict], dict]           # its config.json -> our other fields
  export_fields: Callable[[Any], dict]            # our model config -> its config.json keys
  accepts: Callable[[Any], bool]                  # can it express our model config (beyond fixed)?
  requires: str                                   # `accepts` in words, for errors


def _out_bias(m) -> bool:
  return m.attention_bias if m.attention_out_bias is None else m.attention_out_bias


# Llama, Mistral, Qwen2: pre-norm SwiGLU, plain embeddings and norms, no soft-capping.
LLAMA_LIKE = {'mlp_activation': 'swiglu', 'norm_position': 'pre', 'scale_embeddings': False,
              'norm_scale_plus_one': False, 'query_pre_attn_scalar': None,
              'attn_logit_softcap': None, 'final_logit_softcap': None}
GEMMA_LIKE = {'mlp_activation': 'geglu', 'scale_embeddings': True, 'norm_scale_plus_one': True,
              'mlp_bias': False}


def _activation(hf: dict, key: str, allowed: tuple, default: str) -> None:
  act = hf.get(key, default)
  if act not in allowed:
    raise InteropError(f'config.json: {key}={act!r} is not supported for '
                       f'{hf.get("architectures") or hf.get("model_type")}; supported: '
                       f'{", ".join(allowed)}.')


def _window_fields(hf: dict, window: int | None, types: list | None) -> dict:
  """model.sliding_window and model.window_pattern from per-layer `layer_types`
  ('sliding_attention' | 'full_attention'; None: every layer sliding when there is a window)."""
  layers = _int(hf, 'num_hidden_layers')
  if types is None:
    types = ['sliding_attention' if window is not None else 'full_attention'] * layers
  kinds = {'sliding_attention': 'L', 'full_attention': 'G'}
  if (not isinstance(types, list) or len(types) != layers
          or any(t not in kinds for t in types)):
    raise InteropError(f'config.json: layer_types={types!r}: expected {layers} entries '
                       f'(num_hidden_layers), each one of {", ".join(kinds)}.')
  pattern = ''.join(kinds[t] for t in types)
  if window is None or 'L' not in pattern:
    return {'sliding_window': None, 'window_pattern': ''}
  if 'G' not in pattern:
    return {'sliding_window': window, 'window_pattern': ''}
  period = next(p for p in range(1, layers + 1)   # the shortest pattern that cycles to it
                if all(pattern[i] == pattern[i % p] for i in range(layers)))
  return {'sliding_window': window, 'window_pattern': pattern[:period]}


def _layer_types(m) -> list[str]:
  typed = ModelConfig.from_config(m)
  return ['full_attention' if layer_window(typed, i) is None else 'sliding_attention'
          for i in range(m.num_layers)]


def _uniform_window(m) -> bool:
  return len(set(_layer_types(m))) == 1


def _windowed(m) -> bool:
  """Whether any layer attends through a sliding window."""
  return 'sliding_attention' in _layer_types(m)


def _llama_fields(hf: dict) -> dict:
  _activation(hf, 'hidden_act', ('silu', 'swish'), 'silu')
  return {'attention_bias': bool(hf.get('attention_bias', False)), 'attention_out_bias': None,
          'mlp_bias': bool(hf.get('mlp_bias', False)), 'sliding_window': None,
          'window_pattern': ''}


def _mistral_fields(hf: dict) -> dict:
  # Mistral applies `sliding_window` (null: none) to every layer and has no biases.
  _activation(hf, 'hidden_act', ('silu', 'swish'), 'silu')
  return {'attention_bias': False, 'attention_out_bias': None, 'mlp_bias': False,
          **_window_fields(hf, _optional_int(hf, 'sliding_window'), None)}


def _qwen2_fields(hf: dict) -> dict:
  """Qwen2's window: `sliding_window` on the layers `layer_types` marks sliding (default: from
  `max_window_layers` on), only when `use_sliding_window` is true (transformers' rules)."""
  _activation(hf, 'hidden_act', ('silu', 'swish'), 'silu')
  window = _optional_int(hf, 'sliding_window') if hf.get('use_sliding_window', False) else None
  types = hf.get('layer_types') or [
      'sliding_attention' if window is not None and i >= hf.get('max_window_layers', 28)
      else 'full_attention' for i in range(_int(hf, 'num_hidden_layers'))]
  return {'attention_bias': True, 'attention_out_bias': False, 'mlp_bias': False,
          **_window_fields(hf, window, types)}


def _qwen2_export(m) -> dict:
  types = _layer_types(m)
  sliding = 'sliding_attention' in types
  return {'use_sliding_window': sliding, 'sliding_window': m.sliding_window if sliding else None,
          'max_window_layers': 0 if sliding else m.num_layers, 'layer_types': types}


def _gemma_fields(hf: dict) -> dict:
  # transformers reads Gemma's legacy hidden_act='gelu' as the tanh approximation too.
  _activation(hf, 'hidden_act', ('gelu_pytorch_tanh', 'gelu'), 'gelu_pytorch_tanh')
  return {'attention_bias': bool(hf.get('attention_bias', False)), 'attention_out_bias': None,
          'sliding_window': None, 'window_pattern': '',
          'tie_embeddings': bool(hf.get('tie_word_embeddings', True))}


def _optional_float(hf: dict, key: str, default) -> float | None:
  value = hf.get(key, default)
  if value is None:
    return None
  value = _float({key: value}, key)
  if value <= 0:
    raise InteropError(f'config.json: field `{key}`={value!r} must be > 0 (or null).')
  return value


def _gemma2_fields(hf: dict) -> dict:
  # Defaults are Gemma2Config's, for keys a config.json leaves out.
  _activation(hf, 'hidden_activation', ('gelu_pytorch_tanh',), 'gelu_pytorch_tanh')
  layers = _int(hf, 'num_hidden_layers')
  types = hf.get('layer_types') or ['sliding_attention' if (i + 1) % 2 else 'full_attention'
                                    for i in range(layers)]
  window = _int(hf, 'sliding_window', 4096) if hf.get('sliding_window', 4096) is not None else None
  return {'attention_bias': bool(hf.get('attention_bias', False)), 'attention_out_bias': None,
          'tie_embeddings': bool(hf.get('tie_word_embeddings', True)),
          'query_pre_attn_scalar': _optional_float(hf, 'query_pre_attn_scalar', 256),
          'attn_logit_softcap': _optional_float(hf, 'attn_logit_softcapping', 50.0),
          'final_logit_softcap': _optional_float(hf, 'final_logit_softcapping', 30.0),
          **_window_fields(hf, window, types)}


def _gemma2_export(m) -> dict:
  head_dim = m.head_dim or m.d_model // m.num_heads
  return {'hidden_activation': 'gelu_pytorch_tanh', 'attention_bias': m.attention_bias,
          'query_pre_attn_scalar': int(head_dim if m.query_pre_attn_scalar is None
                                       else m.query_pre_attn_scalar),
          'attn_logit_softcapping': m.attn_logit_softcap,
          'final_logit_softcapping': m.final_logit_softcap,
          # No sliding layer: the window is never used, but transformers wants a number.
          'sliding_window': m.sliding_window or m.max_len, 'layer_types': _layer_types(m)}


FAMILIES = (
    Family('LlamaForCausalLM', 'llama', LLAMA_LIKE, _llama_fields,
           lambda m: {'hidden_act': 'silu', 'attention_bias': m.attention_bias,
                      'mlp_bias': m.mlp_bias},
           lambda m: _out_bias(m) == m.attention_bias and not _windowed(m),
           'the same bias on q/k/v and o, no sliding window'),
    Family('MistralForCausalLM', 'mistral', LLAMA_LIKE, _mistral_fields,
           lambda m: {'hidden_act': 'silu',
                      'sliding_window': m.sliding_window if _windowed(m) else None},
           lambda m: not (m.attention_bias or _out_bias(m) or m.mlp_bias) and _uniform_window(m),
           'no biases, the same attention window on every layer'),
    Family('Qwen2ForCausalLM', 'qwen2', LLAMA_LIKE, _qwen2_fields,
           lambda m: {'hidden_act': 'silu', **_qwen2_export(m)},
           lambda m: m.attention_bias and not _out_bias(m) and not m.mlp_bias,
           'q/k/v bias, no o or MLP bias'),
    Family('GemmaForCausalLM', 'gemma', {**GEMMA_LIKE, 'norm_position': 'pre',
                                         'query_pre_attn_scalar': None,
                                         'attn_logit_softcap': None, 'final_logit_softcap': None},
           _gemma_fields,
           lambda m: {'hidden_act': 'gelu_pytorch_tanh', 'attention_bias': m.attention_bias},
           lambda m: _out_bias(m) == m.attention_bias and not _windowed(m),
           'the same bias on q/k/v and o, no sliding window'),
    Family('Gemma2ForCausalLM', 'gemma2', {**GEMMA_LIKE, 'norm_position': 'sandwich'},
           _gemma2_fields, _gemma2_export,
           lambda m: _out_bias(m) == m.attention_bias and float(
               m.query_pre_attn_scalar or 0).is_integer(),
           'the same bias on q/k/v and o, an integer query_pre_attn_scalar'),
)
SUPPORTED = ', '.join(f.architecture for f in FAMILIES)
ROPE_TYPES = ('default', 'linear', 'llama3')


def _int(hf: dict, key: str, default: int | None = None) -> int:
  value = hf.get(key, default)
  if value is None:
    raise InteropError(f'config.json: field `{key}` is missing.')
  if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
    raise InteropError(f'config.json: field `{key}`={value!r} must be a positive integer.')
  return value


def _optional_int(hf: dict, key: str) -> int | None:
  return None if hf.get(key) is None else _int(hf, key)


def _float(hf: dict, key: str, default: float | None = None, where: str = 'config.json') -> float:
  value = hf.get(key, default)
  if value is None:
    raise InteropError(f'{where}: field `{key}` is missing.')
  if not isinstance(value, (int, float)) or isinstance(value, bool):
    raise InteropError(f'{where}: field `{key}`={value!r} must be a number.')
  return float(value)


def read_hf_config(hf_dir: str) -> dict:
  """The parsed config.json of a Hugging Face checkpoint folder."""
  if not os.path.isdir(hf_dir):
    raise InteropError(f'--from_hf={hf_dir}: no such directory.')
  path = os.path.join(hf_dir, 'config.json')
  if not os.path.isfile(path):
    raise InteropError(f'--from_hf={hf_dir}: no config.json there.')
  try:
    with open(path) as f:
      hf = json.load(f)
  except (OSError, ValueError) as e:
    raise InteropError(f'{path}: not valid JSON ({e}).') from None
  if not isinstance(hf, dict):
    raise InteropError(f'{path}: expected a JSON object.')
  return hf


def family_of(hf: dict) -> Family:
  """The family named by config.json `architectures` (or `model_type` when that is absent)."""
  archs = hf.get('architectures')
  if archs:
    if not isinstance(archs, list) or len(archs) != 1:
      raise InteropError(f'config.json: architectures={archs!r}; expected one of {SUPPORTED}.')
    for family in FAMILIES:
      if family.architecture == archs[0]:
        return family
    raise InteropError(f'config.json: architectures={archs!r} is not supported; supported: '
                       f'{SUPPORTED}.')
  for family in FAMILIES:
    if family.model_type == hf.get('model_type'):
      return family
  raise InteropError(f'config.json: model_type={hf.get("model_type")!r} (and no `architectures`) '
                     f'is not supported; supported: {SUPPORTED}.')


def _rope_fields(hf: dict, max_len: int) -> dict:
  """rope_theta and model.rope_scaling from `rope_parameters` (transformers >= 5) or the older
  `rope_theta` + `rope_scaling` keys."""
  key = 'rope_parameters' if hf.get('rope_parameters') is not None else 'rope_scaling'
  params = hf.get(key) or {}
  if not isinstance(params, dict) or any(isinstance(v, dict) for v in params.values()):
    raise InteropError(f'config.json: `{key}`={params!r}: expected one flat dict (per-layer RoPE '
                       'parameters are not supported).')
  where = f'config.json `{key}`'
  theta = _float(params, 'rope_theta', hf.get('rope_theta', 10_000.0), where)
  partial = params.get('partial_rotary_factor', hf.get('partial_rotary_factor', 1.0))
  if partial != 1.0:
    raise InteropError(f'config.json: partial_rotary_factor={partial!r} is not supported (RoPE '
                       'on the full head dimension only).')
  kind = params.get('rope_type', params.get('type', 'default'))
  scaling = {'model.rope_scaling.kind': 'none'}
  if kind == 'linear':
    scaling = {'model.rope_scaling.kind': 'linear',
               'model.rope_scaling.factor': _float(params, 'factor', where=where)}
  elif kind == 'llama3':
    original = hf.get('original_max_position_embeddings',
                      params.get('original_max_position_embeddings', max_len))
    scaling = {'model.rope_scaling.kind': 'llama3',
               'model.rope_scaling.factor': _float(params, 'factor', where=where),
               'model.rope_scaling.low_freq_factor': _float(params, 'low_freq_factor', where=where),
               'model.rope_scaling.high_freq_factor': _float(params, 'high_freq_factor',
                                                             where=where),
               'model.rope_scaling.original_max_len': _int(
                   {'original_max_position_embeddings': original},
                   'original_max_position_embeddings')}
  elif kind != 'default':
    raise InteropError(f'config.json: {key}.rope_type={kind!r} is not supported; supported: '
                       f'{", ".join(ROPE_TYPES)}.')
  return {'model.rope_theta': theta, **scaling}


def to_config(hf: dict, family: Family, overrides: dict | None = None):
  """Our validated config for a Hugging Face config.json (raises InteropError naming the field)."""
  if hf.get('quantization_config') is not None:
    raise InteropError('config.json: quantization_config is set; quantized checkpoints are not '
                       'supported (use the unquantized weights).')
  d_model, heads = _int(hf, 'hidden_size'), _int(hf, 'num_attention_heads')
  max_len = _int(hf, 'max_position_embeddings', 2048)
  head_dim = hf.get('head_dim')
  fields = {
      'model.kind': 'decoder', 'model.vocab_size': _int(hf, 'vocab_size'),
      'model.num_layers': _int(hf, 'num_hidden_layers'), 'model.d_model': d_model,
      'model.num_heads': heads, 'model.num_kv_heads': _int(hf, 'num_key_value_heads', heads),
      'model.head_dim': d_model // heads if head_dim is None else _int(hf, 'head_dim'),
      'model.mlp_dim': _int(hf, 'intermediate_size'), 'model.norm': 'rmsnorm',
      'model.norm_eps': _float(hf, 'rms_norm_eps', 1e-6), 'model.positional': 'rope',
      'model.max_len': max_len, 'model.tie_embeddings': bool(hf.get('tie_word_embeddings', False)),
      'model.init_std': _float(hf, 'initializer_range', 0.02),
      **_rope_fields(hf, max_len),
      **{f'model.{k}': v for k, v in {**family.fixed, **family.import_fields(hf)}.items()},
  }
  config = schema.apply_overrides(base_config(), {**fields, **(overrides or {})})
  config.data.seq_len = min(config.data.seq_len, max_len)
  try:
    return schema.validate(config)
  except schema.ConfigError as e:
    raise InteropError(f'config.json maps to an invalid model: {e}') from None


# Our fields that no supported Hugging Face family can change, with the value they need.
_FIXED = {'kind': 'decoder', 'positional': 'rope', 'norm': 'rmsnorm'}


def _mismatch(m, family: Family) -> str | None:
  """Why `family` cannot express our model config `m`, or None when it can."""
  for name, value in family.fixed.items():
    if m[name] != value:
      return f'model.{name}={value!r} (this model has {m[name]!r})'
  return None if family.accepts(m) else family.requires


def family_for(m) -> Family:
  """The first family that expresses our model config `m` (config.model)."""
  for name, value in _FIXED.items():
    if m[name] != value:
      raise InteropError(f'model.{name}={m[name]!r} has no Hugging Face equivalent among '
                         f'{SUPPORTED} (they need {value!r}).')
  for family in FAMILIES:
    if _mismatch(m, family) is None:
      return family
  raise InteropError('no supported Hugging Face family expresses this model; '
                     + '; '.join(f'{f.architecture} needs {_mismatch(m, f)}' for f in FAMILIES)
                     + '.')


def _rope_export(m) -> dict:
  r = m.rope_scaling
  params = {'rope_type': 'default', 'rope_theta': m.rope_theta}
  if r.kind == 'linear':
    params.update(rope_type='linear', factor=r.factor)
  elif r.kind == 'llama3':
    params.update(rope_type='llama3', factor=r.factor, low_freq_factor=r.low_freq_factor,
                  high_freq_factor=r.high_freq_factor,
                  original_max_position_embeddings=r.original_max_len)
  # `rope_parameters` is what transformers >= 5 reads; `rope_theta` + `rope_scaling` older ones.
  legacy = None if r.kind == 'none' else {k: v for k, v in params.items() if k != 'rope_theta'}
  return {'rope_parameters': params, 'rope_theta': m.rope_theta, 'rope_scaling': legacy}


def from_config(config, family: Family, *, dtype: str, bos_id: int | None = None,
                eos_id: int | None = None, pad_id: int | None = None) -> dict:
  """The config.json transformers needs to load our model as `family`."""
  m = config.model
  return {
      'architectures': [family.architecture], 'model_type': family.model_type,
      'vocab_size': m.vocab_size, 'hidden_size': m.d_model, 'intermediate_size': m.mlp_dim,
      'num_hidden_layers': m.num_layers, 'num_attention_heads': m.num_heads,
      'num_key_value_heads': m.num_kv_heads, 'head_dim': m.head_dim or m.d_model // m.num_heads,
      'max_position_embeddings': m.max_len, 'rms_norm_eps': m.norm_eps,
      'initializer_range': m.init_std, 'tie_word_embeddings': bool(m.tie_embeddings),
      'attention_dropout': 0.0, 'use_cache': True, 'dtype': dtype, 'torch_dtype': dtype,
      'bos_token_id': bos_id, 'eos_token_id': eos_id, 'pad_token_id': pad_id,
      **_rope_export(m), **family.export_fields(m),
  }
