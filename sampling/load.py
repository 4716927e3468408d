"""Loading a trained workdir for inference: its config, tokenizer and latest parameters."""
from __future__ import annotations

import dataclasses
import os

from configs import schema
from models import scan
from training import checkpoint as ckpt_lib
from training import loop
from training.tokenizer import Tokenizer, make_tokenizer


@dataclasses.dataclass
class Loaded:
  config: object
  graphdef: object
  params: object
  tokenizer: Tokenizer
  step: int


def load_workdir(workdir: str) -> Loaded:
  """Restores the latest usable checkpoint of `workdir` (a damaged newest one is reported and
  the previous one used); raises WorkdirError when there is none."""
  if not os.path.isdir(workdir):
    raise ckpt_lib.WorkdirError(f'--workdir={workdir}: no such directory.')
  config = ckpt_lib.load_config(workdir)
  checkpointer = ckpt_lib.Checkpointer(workdir, read_only=True)
  step = checkpointer.latest_step()
  if step is None:
    raise ckpt_lib.WorkdirError(f'--workdir={workdir}: no checkpoint to sample from yet.')
  s = loop.setup(config)
  state = checkpointer.restore(s.abstract_state)
  params, graphdef = state['params'], s.graphdef
  if config.model.scan_layers:  # per-layer KV caches and exported names want unrolled layers
    config = schema.apply_overrides(config, {'model.scan_layers': False})
    params, graphdef = scan.to_unrolled(params), loop.setup(config).graphdef
  return Loaded(config, graphdef, params, make_tokenizer(config.data.tokenizer),
                checkpointer.restored_step)
