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


@dataclasses.dataclass
class Opened:
  """A workdir before its parameters are read: `abstract` are the sampling model's parameters as
  jax.ShapeDtypeStruct (unrolled layers, see `load_workdir`), enough to compile against."""
  workdir: str
  config: object
  graphdef: object
  abstract: object
  tokenizer: Tokenizer
  stored: object   # the checkpoint's abstract params (scanned layers if config says so)
  scanned: bool


def open_workdir(workdir: str) -> Opened:
  """The config, tokenizer and abstract parameters of `workdir`; nothing is allocated. Raises
  WorkdirError when it is not a workdir or holds no checkpoint."""
  if not os.path.isdir(workdir):
    raise WorkdirError(f'--workdir={workdir}: no such directory.')
  config = load_config(workdir)
  if not checkpoints.steps(workdir):
    raise WorkdirError(f'--workdir={workdir}: no checkpoint to sample from yet.')
  graphdef, stored, _ = checkpoints.abstract_params(config)
  abstract, scanned = stored, bool(config.model.scan_layers)
  if scanned:  # per-layer KV caches and exported names want unrolled layers
    config = schema.apply_overrides(config, {'model.scan_layers': False})
    graphdef, abstract, _ = checkpoints.abstract_params(config)
  return Opened(workdir, config, graphdef, abstract, make_tokenizer(config.data.tokenizer),
                stored, scanned)


def restore(opened: Opened) -> Loaded:
  """Restores the parameters of the latest usable checkpoint of `opened` (a damaged newest one
  is reported and the previous one used)."""
  params, step = checkpoints.restore_params(opened.workdir, opened.stored)
  if opened.scanned:
    params = scan.to_unrolled(params)
  return Loaded(opened.config, opened.graphdef, params, opened.tokenizer, step)


def load_workdir(workdir: str) -> Loaded:
  """`restore(open_workdir(workdir))`: config, tokenizer and parameters (layers unrolled)."""
  return restore(open_workdir(workdir))
