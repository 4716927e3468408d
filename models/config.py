"""`config.model` as a typed, frozen dataclass: what every module reads.

The fields, their meanings and defaults are configs/base.py's (`model.*`); this module holds
no defaults of its own, so the two cannot drift (tests/test_config.py checks the field sets
match). Fields whose None means "derived" arrive resolved: `head_dim` (d_model // num_heads)
and `attention_out_bias` (attention_bias). Frozen and hashable: modules keep it in their
static part.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from models.positional import RopeScaling


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """The model's settings (see configs/base.py for each field's meaning)."""
  kind: str
  vocab_size: int
  num_layers: int
  num_encoder_layers: int
  num_decoder_layers: int
  pad_id: int
  d_model: int
  num_heads: int
  num_kv_heads: int
  head_dim: int                       # resolved: never None
  mlp_dim: int
  mlp_activation: str
  norm: str
  norm_position: str
  norm_eps: float
  norm_scale_plus_one: bool
  positional: str
  rope_theta: float
  rope_scaling: RopeScaling
  max_len: int
  sliding_window: int | None
  attention: str
  attention_block_q: int | None
  attention_block_kv: int | None
  window_pattern: str
  tie_embeddings: bool
  scale_embeddings: bool
  query_pre_attn_scalar: float | None
  attn_logit_softcap: float | None
  final_logit_softcap: float | None
  attention_bias: bool
  attention_out_bias: bool            # resolved: never None
  mlp_bias: bool
  init_std: float
  dropout: float
  dtype: str
  param_dtype: str
  scan_layers: bool
  remat: str
  lora_rank: int
  lora_alpha: float
  lora_targets: str

  @classmethod
  def from_config(cls, model: Any) -> ModelConfig:
    """From `config.model` (a ConfigDict or a mapping holding every field of base.py's)."""
    if isinstance(model, ModelConfig):
      return model
    values = dict(model.to_dict() if hasattr(model, 'to_dict') else model)
    names = [f.name for f in dataclasses.fields(cls)]
    missing = [n for n in names if n not in values]
    unknown = sorted(set(values) - set(names))
    if missing or unknown:
      raise ValueError('config.model does not match the model schema: '
                       + '; '.join(filter(None, [
                           missing and 'missing model.' + ', model.'.join(missing),
                           unknown and 'unknown model.' + ', model.'.join(unknown)])))
    if not isinstance(values['rope_scaling'], RopeScaling):
      values['rope_scaling'] = RopeScaling.from_config(values['rope_scaling'])
    if values['head_dim'] is None:
      values['head_dim'] = values['d_model'] // values['num_heads']
    if values['attention_out_bias'] is None:
      values['attention_out_bias'] = values['attention_bias']
    values['norm_scale_plus_one'] = bool(values['norm_scale_plus_one'])
    values['dropout'] = float(values['dropout'] or 0.0)
    return cls(**values)

