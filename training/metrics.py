"""metrics.jsonl (one JSON object a line), TensorBoard events, the progress bar, and optionally
Weights & Biases (`train.wandb_project`; `WANDB_MODE=offline` works without an account).

The W&B run's id derives from the workdir's absolute path, so a resumed run continues the same
W&B run; it carries the same lines as metrics.jsonl and the resolved config. Its files go to
WORKDIR/wandb/.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys

import numpy as np
import tqdm

from configs import schema


def _tensorboardx():
  """tensorboardX, imported without torch: it imports torch whenever torch is installed (~2.5 s
  of CPU a launch) only to accept torch tensors, and this logger writes Python floats."""
  if 'torch' in sys.modules:
    import tensorboardX
    return tensorboardX
  sys.modules['torch'] = None   # `import torch` raises ImportError while tensorboardX imports
  try:
    import tensorboardX
  finally:
    del sys.modules['torch']
  return tensorboardX


def read_metrics(workdir: str) -> list[dict]:
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.isfile(path):
    return []
  with open(path) as f:
    lines = [line for line in f if line.strip()]
  out = []
  for i, line in enumerate(lines):
    try:
      out.append(json.loads(line))
    except json.JSONDecodeError:
      if i < len(lines) - 1:
        raise
      # the last line of a killed run can be cut short; resuming rewrites it
  return out


def wandb_run_id(workdir: str) -> str:
  return 'lmx-' + hashlib.sha256(os.path.abspath(workdir).encode()).hexdigest()[:16]


def check_wandb(project: str | None) -> None:
  """Raises ConfigError naming train.wandb_project when it is set and wandb is not installed."""
  if project is None:
    return
  try:
    import wandb  # noqa: F401  (optional: the `wandb` extra)
  except ImportError:
    raise schema.ConfigError(f"train.wandb_project={project!r} needs Weights & Biases: "
                      "pip install '.[wandb]' (or leave train.wandb_project unset).") from None


class MetricsLogger:
  """Writes metrics for steps after `start_step`; lines from a killed run's later steps are dropped.

  wandb_project: also log every line to this W&B project, with `run_config` (the resolved config
  as a dict) as the run's config.
  """

  def __init__(self, workdir: str, total_steps: int, start_step: int, enabled: bool = True,
               wandb_project: str | None = None, run_config: dict | None = None):
    self.enabled = enabled
    self.path = os.path.join(workdir, 'metrics.jsonl')
    self.wandb = None
    if not enabled:
      return
    kept = [m for m in read_metrics(workdir) if m['step'] <= start_step]
    with open(self.path, 'w') as f:  # resume: forget what happened after the restored step
      f.writelines(json.dumps(m) + '\n' for m in kept)
    self.tb = _tensorboardx().SummaryWriter(os.path.join(workdir, 'tb'), purge_step=start_step + 1)
    self.bar = tqdm.tqdm(total=total_steps, initial=start_step, unit='step', dynamic_ncols=True,
                         mininterval=1.0)
    if wandb_project is not None:
      check_wandb(wandb_project)
      import wandb
      self.wandb = wandb.init(project=wandb_project, dir=workdir, id=wandb_run_id(workdir),
                              name=os.path.basename(os.path.abspath(workdir)), resume='allow',
                              config=run_config or {})

  def write(self, step: int, metrics: dict) -> None:
    if not self.enabled:
      return
    line = {'step': int(step), **{k: float(np.asarray(v)) for k, v in metrics.items()}}
    with open(self.path, 'a') as f:
      f.write(json.dumps(line) + '\n')
    for k, v in line.items():
      if k != 'step':
        self.tb.add_scalar(k, v, step)
    if self.wandb is not None:
      self.wandb.log({k: v for k, v in line.items() if k != 'step'}, step=line['step'])
    shown = {k: f'{line[k]:.4g}' for k in ('loss', 'eval_loss', 'tokens_per_sec', 'mfu')
             if k in line}
    if shown:
      self.bar.set_postfix(shown, refresh=False)

  def advance(self, step: int) -> None:
    if self.enabled:
      self.bar.update(step - self.bar.n)

  def print(self, text: str) -> None:
    if self.enabled:
      self.bar.write(text)

  def close(self) -> None:
    if self.enabled:
      self.bar.close()
      self.tb.close()
      if self.wandb is not None:
        self.wandb.finish()
        self.wandb = None
