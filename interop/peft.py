"""LoRA adapters out: a PEFT adapter folder that `peft.PeftModel.from_pretrained` loads onto the
transformers model of the workdir's base (`--to_hf` of the same workdir with the adapters left
out, or the Hugging Face folder it was imported from).

  adapter_config.json         peft_type LORA, r, lora_alpha, target_modules (HF module names)
  adapter_model.safetensors   base_model.model.<module>.lora_A.weight [r, in], .lora_B.weight [out, r]

Module names come from interop/hf_params.py's names of the adapted kernels, so every decoder
family `--to_hf` exports is covered without a table here; models transformers cannot load
(encoder-decoder) are refused as `--to_hf` refuses them.
"""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import save_file

from interop import hf_config, hf_params
from interop.convert import _check_target, _staged
from interop.hf_config import InteropError
from models import lora
from workdir import files, runinfo
from workdir.load import load_workdir

ADAPTER_CONFIG, ADAPTER_WEIGHTS = 'adapter_config.json', 'adapter_model.safetensors'
PREFIX = 'base_model.model.'   # PeftModelForCausalLM's prefix of the base model's names


def peft_tensors(params, rank: int, dtype: str) -> dict[str, np.ndarray]:
  """PEFT's adapter tensors of a LoRA model's (unrolled) parameter State."""
  adapters, base = lora.split(params)
  kernels = {s.ours: s for s in hf_params.tensor_specs(base)}
  out = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(adapters):
    name = hf_params.path_name(path)                    # layers.0.attn.q.lora.a
    owner, which = name.rsplit('.lora.', 1)
    module = kernels[f'{owner}.kernel'].hf.removesuffix('.weight')
    x = np.asarray(jax.device_get(leaf)).astype(jnp.dtype(dtype))
    if which == 'a':   # [*in, r] -> lora_A.weight [r, in]
      out[f'{PREFIX}{module}.lora_A.weight'] = np.ascontiguousarray(x.reshape(-1, rank).T)
    else:              # [r, *out] -> lora_B.weight [out, r]
      out[f'{PREFIX}{module}.lora_B.weight'] = np.ascontiguousarray(x.reshape(rank, -1).T)
  return out


def adapter_config(m, tensors: dict, base: str | None) -> dict:
  """adapter_config.json for LoRA fields `m` (config.model) and the tensors written."""
  modules = sorted({k.split('.lora_')[0].rsplit('.', 1)[1] for k in tensors})
  alpha = m.lora_alpha
  return {'peft_type': 'LORA', 'task_type': 'CAUSAL_LM', 'base_model_name_or_path': base,
          'r': m.lora_rank, 'lora_alpha': int(alpha) if float(alpha).is_integer() else alpha,
          'target_modules': modules, 'lora_dropout': 0.0, 'bias': 'none',
          'fan_in_fan_out': False, 'use_rslora': False, 'use_dora': False,
          'init_lora_weights': True, 'inference_mode': True, 'modules_to_save': None,
          'layers_to_transform': None, 'rank_pattern': {}, 'alpha_pattern': {}}


def export_peft(workdir: str, out: str, *, dtype: str | None = None) -> dict:
  """Writes the workdir's LoRA adapters (latest checkpoint) as a PEFT adapter folder; returns
  its adapter_config.json dict."""
  config = files.load_config(workdir)
  if not config.model.lora_rank:
    raise InteropError(f'--to_peft: --workdir={workdir} has no LoRA adapters '
                       '(model.lora_rank=0); fine-tune it with --config.model.lora_rank=R first, '
                       'or export the whole model with --to_hf.')
  hf_config.family_for(config.model)   # a model transformers loads (refuses encoder-decoder)
  _check_target(out, '--to_peft')
  dtype = dtype or config.model.param_dtype
  if dtype not in ('float32', 'bfloat16', 'float16'):
    raise InteropError(f'--dtype={dtype!r}: choose float32, bfloat16 or float16.')
  loaded = load_workdir(workdir)
  tensors = peft_tensors(loaded.params, config.model.lora_rank, dtype)
  info = runinfo.read_run_info(workdir) or {}
  imported = [l['imported_from'] for l in info.get('launches', []) if 'imported_from' in l]
  result = adapter_config(config.model, tensors, imported[0] if imported else None)
  with _staged(out) as tmp:
    save_file(tensors, os.path.join(tmp, ADAPTER_WEIGHTS), metadata={'format': 'pt'})
    with open(os.path.join(tmp, ADAPTER_CONFIG), 'w') as f:
      json.dump(result, f, indent=2)
  return result
