"""Model definitions (pure: no IO). `build_model(config, rngs)` picks one by `model.kind`."""
from __future__ import annotations

import ml_collections
from flax import nnx

from models import lora
from models.config import ModelConfig
from models.decoder import DecoderLM
from models.encoder_decoder import EncoderDecoder

MODELS = {'decoder': DecoderLM, 'encoder_decoder': EncoderDecoder}


def build_model(config: ml_collections.ConfigDict, rngs: nnx.Rngs) -> nnx.Module:
  """The model named by `config.model.kind`, initialised from `rngs`; with `model.lora_rank`
  its targeted projections carry LoRA adapters (models/lora.py), drawn after the base
  parameters, which are the same as without them."""
  kind = config.model.kind
  if kind not in MODELS:
    raise ValueError(f'model.kind={kind!r} is not available; choose one of {", ".join(MODELS)}.')
  cfg = ModelConfig.from_config(config.model)
  model = MODELS[kind](cfg, rngs)
  if lora.targets_of(cfg):
    lora.init_adapters(model, rngs.lora())
  return model
