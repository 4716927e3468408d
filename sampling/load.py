"""Loading a trained workdir for inference: its config, tokenizer and latest parameters."""
from __future__ import annotations

import dataclasses
import os

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
  return Loaded(config, s.graphdef, state['params'], make_tokenizer(config.data.tokenizer),
                checkpointer.restored_step)
