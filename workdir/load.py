"""Loading a workdir for inference (sampling, export): its config, tokenizer and parameters.

Only the checkpoint's `params` item is read (workdir/checkpoints.py): no optimizer, no train
step, no data pipeline is built or restored, so sampling needs memory for the parameters alone.
"""
from __future__ import annotations

import dataclasses
import os

from configs import schema
from models import scan
from text.tokenizer import Tokenizer, make_tokenizer
from workdir import checkpoints
from workdir.files import WorkdirError, load_config


@dataclasses.dataclass
class Loaded:
  config: object
  graphdef: object
  params: object
  tokenizer: Tokenizer
  step: int


def load_workdir(workdir: str) -> Loaded:
  """Restores the parameters of the latest usable checkpoint of `workdir` (a damaged newest one
  is reported and the previous one used); raises WorkdirError when there is none."""
  if not os.path.isdir(workdir):
    raise WorkdirError(f'--workdir={workdir}: no such directory.')
  config = load_config(workdir)
  if not checkpoints.steps(workdir):
    raise WorkdirError(f'--workdir={workdir}: no checkpoint to sample from yet.')
  graphdef, abstract, _ = checkpoints.abstract_params(config)
  params, step = checkpoints.restore_params(workdir, abstract)
  if config.model.scan_layers:  # per-layer KV caches and exported names want unrolled layers
    config = schema.apply_overrides(config, {'model.scan_layers': False})
    params = scan.to_unrolled(params)
    graphdef = checkpoints.abstract_params(config)[0]
  return Loaded(config, graphdef, params, make_tokenizer(config.data.tokenizer), step)
