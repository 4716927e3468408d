"""metrics.jsonl (one JSON object a line), TensorBoard events, and the progress bar."""
from __future__ import annotations

import json
import os

import numpy as np
import tensorboardX
import tqdm


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


class MetricsLogger:
  """Writes metrics for steps after `start_step`; lines from a killed run's later steps are dropped."""

  def __init__(self, workdir: str, total_steps: int, start_step: int, enabled: bool = True):
    self.enabled = enabled
    self.path = os.path.join(workdir, 'metrics.jsonl')
    if not enabled:
      return
    kept = [m for m in read_metrics(workdir) if m['step'] <= start_step]
    with open(self.path, 'w') as f:  # resume: forget what happened after the restored step
      f.writelines(json.dumps(m) + '\n' for m in kept)
    self.tb = tensorboardX.SummaryWriter(os.path.join(workdir, 'tb'), purge_step=start_step + 1)
    self.bar = tqdm.tqdm(total=total_steps, initial=start_step, unit='step', dynamic_ncols=True,
                         mininterval=1.0)

  def write(self, step: int, metrics: dict) -> None:
    if not self.enabled:
      return
    line = {'step': int(step), **{k: float(np.asarray(v)) for k, v in metrics.items()}}
    with open(self.path, 'a') as f:
      f.write(json.dumps(line) + '\n')
    for k, v in line.items():
      if k != 'step':
        self.tb.add_scalar(k, v, step)
    shown = {k: f'{line[k]:.4g}' for k in ('loss', 'eval_loss', 'tokens_per_sec') if k in line}
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
