"""Hugging Face checkpoint folder <-> training workdir.

Both directions check everything (config, tensor names, shapes, dtypes, tokenizer, the target
folder) before writing, then write into a temporary sibling folder that is renamed into place,
so a bad input or an interrupted run leaves the target untouched.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from configs import schema
from interop import hf_config, hf_params, hf_tokenizer
from interop.hf_config import InteropError
from models import lora
from models.config import ModelConfig
from text.tokenizer import make_tokenizer
from workdir import checkpoints, files, runinfo
from workdir.load import load_workdir

# A pre-trained model wants a gentle fine-tune, not the from-scratch defaults of base_config().
FINETUNE_DEFAULTS = {'train.learning_rate': 1e-5, 'train.warmup_steps': 10, 'train.steps': 100,
                     'train.weight_decay': 0.0, 'train.eval_every': 50,
                     'train.checkpoint_every': 50}


def _check_dtypes(dtype: str, param_dtype: str) -> None:
  for name, value in (('model.dtype', dtype), ('model.param_dtype', param_dtype)):
    if value not in schema.ENUMS[name]:
      raise InteropError(f'--{name.split(".")[1]}={value!r}: choose one of '
                         f'{", ".join(schema.ENUMS[name])}.')


def _check_target(path: str, flag: str) -> None:
  if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
    raise InteropError(f'{flag}={path} exists and is not empty; refusing to overwrite it. Give a '
                       'new folder.')


@contextlib.contextmanager
def _staged(target: str):
  """Yields a temporary sibling folder that becomes `target` only when the block succeeds."""
  target = os.path.abspath(target)
  tmp = f'{target}.partial-{os.getpid()}'
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  try:
    yield tmp
    if os.path.isdir(target):
      os.rmdir(target)  # empty (checked before)
    os.rename(tmp, target)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def import_hf(hf_dir: str, workdir: str, *, dtype: str = 'float32',
              param_dtype: str = 'float32') -> object:
  """Turns a Hugging Face folder into a workdir that train.py and sample.py use; returns its
  config. The workdir holds config.json, the tokenizer files and a params-only orbax checkpoint
  at step 0 (train.py starts a fresh optimizer state from it)."""
  _check_dtypes(dtype, param_dtype)
  hf = hf_config.read_hf_config(hf_dir)
  family = hf_config.family_of(hf)
  tok_files = hf_tokenizer.tokenizer_files(hf_dir)
  _check_target(workdir, '--workdir')
  final = os.path.abspath(workdir)
  overrides = {**FINETUNE_DEFAULTS, 'model.dtype': dtype, 'model.param_dtype': param_dtype}
  if tok_files:
    overrides['data.tokenizer'] = os.path.join(final, os.path.basename(tok_files[0]))
  config = hf_config.to_config(hf, family, overrides)
  if tok_files:
    size = hf_tokenizer.vocab_size(tok_files[0])
    if size > config.model.vocab_size:
      raise InteropError(f'{tok_files[0]}: {size} tokens, more than config.json vocab_size='
                         f'{config.model.vocab_size}.')
  else:
    logging.warning('%s has no tokenizer.json or tokenizer.model; the workdir uses '
                    'data.tokenizer=byte.', hf_dir)
  folder = hf_params.SafetensorsFolder(hf_dir)
  _, abstract, mesh = checkpoints.abstract_params(config)
  specs = hf_params.tensor_specs(abstract)
  folder.check(specs, tied=config.model.tie_embeddings)

  shardings = {hf_params.path_name(p): a.sharding
               for p, a in jax.tree_util.tree_leaves_with_path(abstract)}
  values = {spec.ours: jax.make_array_from_callback(array.shape, shardings[spec.ours],
                                                    lambda index, a=array: a[index])
            for spec, array in folder.read(specs, jnp.dtype(param_dtype))}
  params = jax.tree_util.tree_map_with_path(lambda p, _: values[hf_params.path_name(p)],
                                            abstract)
  with _staged(workdir) as tmp:
    files.write_config(tmp, config)
    hf_tokenizer.copy_files(tok_files, tmp)
    checkpoints.save_params(tmp, 0, params)
    tok_file = os.path.join(tmp, os.path.basename(tok_files[0])) if tok_files else None
    runinfo.record_launch(tmp, config, make_tokenizer(tok_file or 'byte'), mesh, 0,
                          tokenizer_file=tok_file, imported_from=os.path.abspath(hf_dir))
  return config


def export_hf(workdir: str, out: str, *, dtype: str | None = None, max_shard_size: str = '5GB',
              merge_lora: bool = False) -> dict:
  """Writes the workdir's latest parameters as a Hugging Face folder (safetensors, config.json,
  tokenizer files) that transformers' AutoModelForCausalLM loads; returns the config.json dict.
  merge_lora: a LoRA workdir's adapters are folded into the kernels (models/lora.py `merge`);
  without it such a workdir is refused (its adapters go out with interop/peft.py)."""
  max_bytes = hf_params.parse_size(max_shard_size)
  config = files.load_config(workdir)
  rank = config.model.lora_rank
  if rank and not merge_lora:
    raise InteropError(f'--workdir={workdir} trains LoRA adapters (model.lora_rank={rank}): give '
                       '--merge_lora to export the model with the adapters merged into its '
                       'weights, or --to_peft=OUT to export the adapters alone.')
  if merge_lora and not rank:
    raise InteropError(f'--merge_lora: --workdir={workdir} has no LoRA adapters '
                       '(model.lora_rank=0); export it without --merge_lora.')
  family = hf_config.family_for(config.model)
  _check_target(out, '--to_hf')
  dtype = dtype or config.model.param_dtype
  if dtype not in ('float32', 'bfloat16', 'float16'):
    raise InteropError(f'--dtype={dtype!r}: choose float32, bfloat16 or float16.')
  loaded = load_workdir(workdir)
  if rank:
    params = lora.merge(loaded.params, lora.scale_of(ModelConfig.from_config(config.model)))
  else:
    params = loaded.params
  specs = hf_params.tensor_specs(params)
  flat = {hf_params.path_name(p): leaf for p, leaf in jax.tree_util.tree_leaves_with_path(params)}
  by_name = {s.hf: s for s in specs}
  itemsize = jnp.dtype(dtype).itemsize

  def fetch(name):
    spec = by_name[name]
    return spec.to_hf(np.asarray(jax.device_get(flat[spec.ours])).astype(jnp.dtype(dtype)))
  tok = loaded.tokenizer
  ids = {f'{k}_id': (i if i >= 0 else None)
         for k, i in (('bos', tok.bos_id), ('eos', tok.eos_id), ('pad', tok.pad_id))}
  hf = hf_config.from_config(config, family, dtype=dtype, **ids)
  with _staged(out) as tmp:
    hf_params.write_safetensors({s.hf: math.prod(s.shape) * itemsize for s in specs}, fetch,
                                tmp, max_bytes)
    with open(os.path.join(tmp, 'config.json'), 'w') as f:
      json.dump(hf, f, indent=2)
    hf_tokenizer.export_files(config.data.tokenizer, tok, tmp)
  return hf
