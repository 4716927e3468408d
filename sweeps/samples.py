"""Side-by-side samples: the same prompts, the same seed, every finished trial's final checkpoint.

`sweep.py --samples --prompt=TEXT [--prompt=...]` writes WORKDIR/samples.json; the report puts
each trial's completions beside its losses (results.md, in the report's trial order).
"""
from __future__ import annotations

import os

from workdir.load import load_workdir
from sampling.sampler import Sampler
from sweeps.runner import read_json, write_json
from sweeps.spec import SweepError

SAMPLES = 'samples.json'


def complete(loaded, prompts: list[str], *, max_new_tokens: int, temperature: float,
             seed: int) -> list[str]:
  """Each prompt followed by the model's completion (up to end-of-sequence), one batch."""
  tok = loaded.tokenizer
  ids = [tok.encode(p) for p in prompts]
  sampler = Sampler(loaded.graphdef, loaded.params, max_len=loaded.config.model.max_len,
                    eos_id=tok.eos_id if tok.eos_id >= 0 else None, pad_id=max(tok.pad_id, 0))
  try:
    sampler.check(ids, max_new_tokens, temperature, 0, 1.0)
  except ValueError as e:
    raise SweepError(f'--samples: {e}') from None
  new = sampler.generate(ids, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
  return [p + tok.decode(n) for p, n in zip(prompts, new)]


def sample_trials(workdir: str, prompts: list[str], *, max_new_tokens: int = 64,
                  temperature: float = 0.8, seed: int = 0) -> dict:
  """Samples every finished trial of a sweep WORKDIR; writes and returns samples.json's content:
  {'prompts', 'seed', 'temperature', 'max_new_tokens', 'trials': {name: {'step', 'samples'}}}."""
  sweep = read_json(os.path.join(workdir, 'sweep.json'))
  if sweep is None:
    raise FileNotFoundError(f'--workdir={workdir}: no sweep.json there (not a sweep workdir).')
  out = {'prompts': prompts, 'seed': seed, 'temperature': temperature,
         'max_new_tokens': max_new_tokens, 'trials': {}}
  for entry in sweep['trials']:
    directory = os.path.join(workdir, entry['name'])
    if read_json(os.path.join(directory, 'trial.json'), {}).get('status') != 'done':
      continue
    loaded = load_workdir(directory)
    out['trials'][entry['name']] = {'step': loaded.step, 'samples': complete(
        loaded, prompts, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)}
  write_json(os.path.join(workdir, SAMPLES), out)
  return out


def markdown(workdir: str, rows: list[dict]) -> str:
  """The samples section of results.md ('' without samples.json), trials in `rows` order."""
  data = read_json(os.path.join(workdir, SAMPLES))
  if not data:
    return ''
  lines = [f'\nSamples (seed {data["seed"]}, temperature {data["temperature"]:g}, '
           f'{data["max_new_tokens"]} new tokens, each trial\'s final checkpoint):\n']
  for row in rows:
    trial = data['trials'].get(row['trial'])
    if trial is None:
      continue
    loss = '' if row['eval_loss'] is None else f', eval loss {row["eval_loss"]:.4f}'
    lines.append(f'- `{row["trial"]}` (step {trial["step"]}{loss}):\n')
    for text in trial['samples']:
      fence = '````' if '```' in text else '```'
      lines.append(f'{fence}\n{text}\n{fence}\n')
  return '\n'.join(lines)
