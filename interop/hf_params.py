"""Hugging Face safetensors <-> our parameters: tensor names and layouts, checks, reading, writing.

Names and layouts are derived from our model's own parameter tree, so the set of tensors a
checkpoint must hold follows from the config (biases, tied embeddings) without per-family code.
Layouts: torch Linear weights are [out, in]; our kernels are [*in, *out] (q: [D, N, H],
o: [N, H, D]), biases [N, H]. RoPE needs no permutation: both use the half-split pairing.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from typing import Callable

import jax
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from interop.hf_config import InteropError

# Safetensors dtypes we convert from (anything else: quantized or integer weights).
SUPPORTED_DTYPES = ('F32', 'BF16', 'F16', 'F64')
INDEX = 'model.safetensors.index.json'
SINGLE = 'model.safetensors'
# Tensors some checkpoints carry that hold no learned weights.
IGNORED = re.compile(r'(.*\.)?rotary_emb\.inv_freq$')

# (our parameter path, its Hugging Face name, layout); layout 'same' | 'flat' | ('linear', n_in)
RULES = (
    (r'embed\.embedding', r'model.embed_tokens.weight', 'same'),
    (r'final_norm\.scale', r'model.norm.weight', 'same'),
    (r'lm_head\.kernel', r'lm_head.weight', ('linear', 1)),
    (r'layers\.(\d+)\.attn_norm\.scale', r'model.layers.\1.input_layernorm.weight', 'same'),
    (r'layers\.(\d+)\.mlp_norm\.scale', r'model.layers.\1.post_attention_layernorm.weight',
     'same'),
    (r'layers\.(\d+)\.attn\.([qkv])\.kernel', r'model.layers.\1.self_attn.\2_proj.weight',
     ('linear', 1)),
    (r'layers\.(\d+)\.attn\.o\.kernel', r'model.layers.\1.self_attn.o_proj.weight', ('linear', 2)),
    (r'layers\.(\d+)\.attn\.([qkvo])\.bias', r'model.layers.\1.self_attn.\2_proj.bias', 'flat'),
    (r'layers\.(\d+)\.mlp\.(gate|up|down)\.kernel', r'model.layers.\1.mlp.\2_proj.weight',
     ('linear', 1)),
    (r'layers\.(\d+)\.mlp\.(gate|up|down)\.bias', r'model.layers.\1.mlp.\2_proj.bias', 'flat'),
)
# Sandwich norms (Gemma 2): post_attention_layernorm is the norm *after* attention there, and
# the MLP's input norm is pre_feedforward_layernorm. Tried before RULES when a model has them.
SANDWICH_RULES = (
    (r'layers\.(\d+)\.post_attn_norm\.scale', r'model.layers.\1.post_attention_layernorm.weight',
     'same'),
    (r'layers\.(\d+)\.mlp_norm\.scale', r'model.layers.\1.pre_feedforward_layernorm.weight',
     'same'),
    (r'layers\.(\d+)\.post_mlp_norm\.scale',
     r'model.layers.\1.post_feedforward_layernorm.weight', 'same'),
)


@dataclasses.dataclass(frozen=True)
class TensorSpec:
  """One parameter: our path and shape, its Hugging Face name and how the layouts relate."""
  ours: str
  hf: str
  layout: str | tuple
  shape: tuple

  @property
  def hf_shape(self) -> tuple:
    if self.layout == 'same':
      return self.shape
    if self.layout == 'flat':
      return (math.prod(self.shape),)
    n_in = self.layout[1]
    return (math.prod(self.shape[n_in:]), math.prod(self.shape[:n_in]))

  def to_ours(self, x: np.ndarray, dtype=None) -> np.ndarray:
    """HF layout -> ours, cast to `dtype`, in at most one copy."""
    dtype = x.dtype if dtype is None else dtype
    if self.layout in ('same', 'flat'):
      return x.astype(dtype, copy=False).reshape(self.shape)
    return np.array(x.T, dtype=dtype, order='C').reshape(self.shape)

  def to_hf(self, x: np.ndarray) -> np.ndarray:
    if self.layout in ('same', 'flat'):
      return x.reshape(self.hf_shape)
    out_size, in_size = self.hf_shape
    return np.ascontiguousarray(x.reshape(in_size, out_size).T)


def path_name(path) -> str:
  """A pytree path of an nnx param State -> 'layers.0.attn.q.kernel'."""
  return '.'.join(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))


def tensor_specs(params) -> list[TensorSpec]:
  """One spec per leaf of `params` (an nnx State of Params, concrete or abstract)."""
  specs = []
  leaves = [(path_name(p), leaf) for p, leaf in jax.tree_util.tree_leaves_with_path(params)]
  sandwich = any('.post_attn_norm.' in ours for ours, _ in leaves)
  rules = SANDWICH_RULES + RULES if sandwich else RULES
  for ours, leaf in leaves:
    for pattern, hf, layout in rules:
      if re.fullmatch(pattern, ours):
        specs.append(TensorSpec(ours, re.sub(pattern, hf, ours), layout, tuple(leaf.shape)))
        break
    else:
      raise InteropError(f'model parameter {ours} {tuple(leaf.shape)} has no Hugging Face '
                         'counterpart.')
  return specs


class SafetensorsFolder:
  """The tensors of a checkpoint folder: `model.safetensors`, or the shards that
  `model.safetensors.index.json` lists. Headers (names, dtypes, shapes) are read on open;
  tensor data only when asked for."""

  def __init__(self, folder: str):
    self.folder = folder
    index_path, single_path = os.path.join(folder, INDEX), os.path.join(folder, SINGLE)
    weight_map = None
    if os.path.isfile(index_path):
      try:
        with open(index_path) as f:
          weight_map = json.load(f)['weight_map']
        files = sorted(set(weight_map.values()))
      except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise InteropError(f'{index_path}: not a safetensors index (needs a `weight_map` of '
                           f'tensor name -> file; {type(e).__name__}: {e}).') from None
    elif os.path.isfile(single_path):
      files = [SINGLE]
    else:
      others = sorted(f for f in os.listdir(folder) if f.endswith(('.bin', '.pt', '.pth')))
      hint = f' (found {", ".join(others)}: PyTorch pickles are not read)' if others else ''
      raise InteropError(f'{folder}: neither {SINGLE} nor {INDEX}{hint}.')
    self.entries = {}                      # name -> (file, dtype, shape)
    for name in files:
      path = os.path.join(folder, name)
      if not os.path.isfile(path):
        raise InteropError(f'{index_path}: lists shard {name}, which is missing from {folder}.')
      try:
        with safe_open(path, framework='numpy') as f:
          for key in f.keys():
            sl = f.get_slice(key)
            self.entries[key] = (name, sl.get_dtype(), tuple(sl.get_shape()))
      except Exception as e:  # safetensors raises its own error types for corrupt files
        raise InteropError(f'{path}: not a readable safetensors file ({e}).') from None
    for key, name in (weight_map or {}).items():
      if self.entries.get(key, (None,))[0] != name:
        raise InteropError(f'{index_path}: tensor {key} is listed in {name}, which does not hold '
                           'it.')

  def check(self, specs: list[TensorSpec], tied: bool) -> None:
    """Raises InteropError naming the tensors that are missing, mis-shaped, of an unsupported
    dtype, or that the model has no place for."""
    def names(items):
      items = sorted(items)
      return ', '.join(items[:8]) + (f' and {len(items) - 8} more' if len(items) > 8 else '')

    missing = [s.hf for s in specs if s.hf not in self.entries]
    if missing:
      raise InteropError(f'{self.folder}: missing tensor(s) {names(missing)} (config.json '
                         'implies them).')
    for s in specs:
      file, dtype, shape = self.entries[s.hf]
      if shape != s.hf_shape:
        raise InteropError(f'tensor {s.hf} in {file}: shape {list(shape)} does not match '
                           f'{list(s.hf_shape)} implied by config.json.')
      if dtype not in SUPPORTED_DTYPES:
        raise InteropError(f'tensor {s.hf} in {file}: dtype {dtype} is not supported; '
                           f'supported: {", ".join(SUPPORTED_DTYPES)}.')
    expected = {s.hf for s in specs} | ({'lm_head.weight'} if tied else set())
    extra = [k for k in self.entries if k not in expected and not IGNORED.fullmatch(k)]
    if extra:
      raise InteropError(f'{self.folder}: tensor(s) {names(extra)} have no place in the model '
                         'config.json describes (unsupported architecture variant?).')

  def read(self, specs: list[TensorSpec], dtype):
    """Yields (spec, array in our layout and `dtype`), one tensor in host memory at a time.

    Each tensor is read from a file opened for it alone, so no memory mapping of a whole shard
    stays resident, and converted in one copy. A file that cannot be read (truncated...) is an
    InteropError naming it.
    """
    # The flax framework reads bf16 (numpy cannot); keep the arrays on the host.
    with jax.default_device(jax.local_devices(backend='cpu')[0]):
      for s in sorted(specs, key=lambda s: self.entries[s.hf][0]):
        path = os.path.join(self.folder, self.entries[s.hf][0])
        try:
          with safe_open(path, framework='flax') as f:
            raw = f.get_tensor(s.hf)
        except Exception as e:  # safetensors raises its own error types for corrupt files
          raise InteropError(f'{path}: tensor {s.hf} cannot be read ({e}).') from None
        yield s, s.to_ours(np.asarray(raw), dtype)
        del raw


def parse_size(text: str) -> int:
  """'5GB' | '500MB' | '20KB' | '1234' -> bytes (powers of 1000, as transformers uses)."""
  m = re.fullmatch(r'\s*(\d+(?:\.\d+)?)\s*([KMG]?B?)\s*', text.upper())
  if not m:
    raise InteropError(f'--max_shard_size={text!r}: expected e.g. 5GB, 500MB or a byte count.')
  scale = {'': 1, 'B': 1, 'K': 1e3, 'KB': 1e3, 'M': 1e6, 'MB': 1e6, 'G': 1e9, 'GB': 1e9}[m[2]]
  return int(float(m[1]) * scale)


def write_safetensors(sizes: dict[str, int], fetch: Callable[[str], np.ndarray], folder: str,
                      max_shard_bytes: int) -> None:
  """`model.safetensors`, or shards of at most `max_shard_bytes` (a bigger tensor gets a shard
  of its own) plus `model.safetensors.index.json`, as transformers writes them.

  sizes: tensor name -> bytes, in file order; fetch(name) gives the tensor. Only one shard's
  tensors are in host memory at a time.
  """
  shards, size = [[]], 0
  for name, nbytes in sizes.items():
    if shards[-1] and size + nbytes > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(name)
    size += nbytes
  metadata = {'format': 'pt'}  # transformers refuses files without it
  if len(shards) == 1:
    save_file({name: fetch(name) for name in shards[0]}, os.path.join(folder, SINGLE),
              metadata=metadata)
    return
  weight_map = {}
  for i, names in enumerate(shards):
    file = f'model-{i + 1:05d}-of-{len(shards):05d}.safetensors'
    save_file({name: fetch(name) for name in names}, os.path.join(folder, file),
              metadata=metadata)
    weight_map.update({name: file for name in names})
  with open(os.path.join(folder, INDEX), 'w') as f:
    json.dump({'metadata': {'total_size': sum(sizes.values())}, 'weight_map': weight_map}, f,
              indent=2)
