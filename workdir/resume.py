"""Which config fields a resumed run may change, and how a saved config and a new one differ.

A workdir with a checkpoint resumes only with a config whose fixed fields equal the saved ones
(training/checkpoint.py); `RESUME_ELASTIC` lists the rest.
"""
from __future__ import annotations

import ml_collections

from configs.schema import flatten

# Fields that define the model's parameters: a workdir refuses to resume if these differ.
MODEL_SHAPE_PREFIXES = ('model.',)
MODEL_SHAPE_EXEMPT = ('model.attention', 'model.dtype', 'model.scan_layers', 'model.remat',
                      'model.sliding_window', 'model.max_len', 'model.attention_block_q',
                      'model.attention_block_kv', 'model.window_pattern')
# Fields a resumed run may change: how far it trains, how it is logged, evaluated, checkpointed,
# computed and sharded, never what it trains on or the state it continues. Every other field is
# fixed once a run has a checkpoint (prefixes end with '.'). data.num_workers is fixed: grain's
# saved iterator position is per worker and does not carry over to another worker count.
# train.warmup_steps changes only the rates still to come, except in a short run (fewer steps
# than warmup), which optim.check_resumed_schedule guards.
RESUME_ELASTIC = (
    'train.steps', 'train.warmup_steps', 'train.log_every', 'train.eval_every',
    'train.eval_batches', 'train.checkpoint_every', 'train.keep_checkpoints', 'train.nonfinite',
    'train.max_nonfinite_steps', 'train.grad_accum_steps', 'train.wandb_project',
    'data.prepare_workers', 'data.cache_dir', 'model.attention', 'model.attention_block_q',
    'model.attention_block_kv', 'model.dtype', 'model.remat', 'model.scan_layers',
    'model.max_len', 'mesh.')
# The fields of a LoRA run: elastic while the saved run has no adapters (turning LoRA on makes the
# saved parameters the frozen base), fixed once it trains them.
LORA_FIELDS = ('model.lora_rank', 'model.lora_alpha', 'model.lora_targets')


def _is_elastic(key: str) -> bool:
  return any(key == e or (e.endswith('.') and key.startswith(e)) for e in RESUME_ELASTIC)


def resume_differences(saved: ml_collections.ConfigDict, new: ml_collections.ConfigDict,
                       fresh_start: bool = False) -> tuple[list[str], list[str]]:
  """(fixed, elastic): the fields that differ between a run's saved config and the config it
  is resumed with, as 'train.steps: 200 -> 400'. A resume with any `fixed` difference must be
  refused. fresh_start: the checkpoint holds no training progress (an imported model's step 0):
  only the model's parameter shapes are fixed then. A run without LoRA may turn it on
  (LORA_FIELDS are elastic while the saved model.lora_rank is 0)."""
  a, b = flatten(saved.to_dict()), flatten(new.to_dict())
  changed = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
  line = lambda k: f'{k}: {a.get(k)!r} -> {b.get(k)!r}'
  if fresh_start:
    fixed = set(k.split(':')[0] for k in shape_differences(saved, new))
  else:
    fixed = {k for k in changed if not _is_elastic(k)}
  if not a.get('model.lora_rank'):
    fixed -= set(LORA_FIELDS)
  return [line(k) for k in changed if k in fixed], [line(k) for k in changed if k not in fixed]


def shape_differences(saved: ml_collections.ConfigDict,
                      new: ml_collections.ConfigDict) -> list[str]:
  """Model fields that differ between two configs: 'model.d_model: 256 (saved) != 512'."""
  a, b = flatten(saved.to_dict()), flatten(new.to_dict())
  return [f'{k}: {a.get(k)!r} (saved) != {b.get(k)!r}' for k in sorted(set(a) | set(b))
          if k.startswith(MODEL_SHAPE_PREFIXES) and k not in MODEL_SHAPE_EXEMPT
          and a.get(k) != b.get(k)]
