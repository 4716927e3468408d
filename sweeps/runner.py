"""Runs a sweep's trials: each a `train.py` subprocess in WORKDIR/<trial>/, locally or on Ray.

Each trial folder holds `sweep_config.json` (the resolved config train.py is given),
`trial.json` (name, overrides, hash, status, error, wall time), `train.log` (the subprocess's
output, appended per launch) and what train.py writes (config.json, metrics.jsonl, checkpoints).
A trial whose final checkpoint and final evaluation exist is finished and skipped on rerun; any
other trial is (re)launched, and train.py resumes it from its latest checkpoint.
"""
from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import subprocess
import sys
import time

from configs import schema
from sweeps import spec
from sweeps.spec import ROOT, Sweep, Trial, describe
from training.metrics import read_metrics

ERROR_TAIL_LINES = 20
POLL_SECONDS = 0.5


def trial_dir(workdir: str, trial: Trial) -> str:
  """Absolute: train.py runs with the repository root as its working directory."""
  return os.path.join(os.path.abspath(workdir), trial.name)


def read_json(path: str, default=None):
  if not os.path.isfile(path):
    return default
  with open(path) as f:
    return json.load(f)


def write_json(path: str, value) -> None:
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(value, f, indent=2, sort_keys=True)
  os.replace(tmp, path)


def is_finished(directory: str, steps: int) -> bool:
  """The final step's checkpoint is committed and its evaluation logged."""
  committed = os.path.isdir(os.path.join(directory, 'checkpoints', str(steps)))
  return committed and any(m.get('step') == steps and 'eval_loss' in m
                           for m in read_metrics(directory))


def command(directory: str) -> list[str]:
  """The train.py command line of a trial (its resolved config travels as JSON)."""
  config_json = os.path.join(directory, 'sweep_config.json')
  return [sys.executable, os.path.join(ROOT, 'train.py'),
          f'--config={os.path.join(ROOT, "configs", "resolved.py")}:{config_json}',
          f'--workdir={directory}']


def _folders_by_hash(workdir: str) -> dict[str, str]:
  """{config hash: folder} of the trial folders already in `workdir`."""
  found = {}
  for name in sorted(os.listdir(workdir)):
    info = read_json(os.path.join(workdir, name, 'trial.json'))
    if info and info.get('hash'):
      found[info['hash']] = name
  return found


def prepare(workdir: str, sweep: Sweep) -> None:
  """Writes WORKDIR/sweep.json and each trial's folder, resolved config and trial.json.

  A folder holding the same resolved config under another name (the sweep file changed, e.g.
  seeds were added) is renamed to the trial's name, so that config is not trained again.
  """
  os.makedirs(workdir, exist_ok=True)
  existing = _folders_by_hash(workdir)
  for trial in sweep.trials:
    old = existing.get(trial.hash)
    if old and old != trial.name and not os.path.exists(trial_dir(workdir, trial)):
      os.rename(os.path.join(workdir, old), trial_dir(workdir, trial))
  write_json(os.path.join(workdir, 'sweep.json'), {
      'sweep': sweep.source, 'config': sweep.config_file, 'base': sweep.base,
      'baseline': sweep.baseline, 'scaling': sweep.scaling,
      'trials': [{'name': t.name, 'overrides': t.overrides, 'hash': t.hash} for t in sweep.trials]})
  for trial in sweep.trials:
    directory = trial_dir(workdir, trial)
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, 'sweep_config.json'), 'w') as f:
      f.write(schema.to_json(trial.config))
    info_path = os.path.join(directory, 'trial.json')
    info = read_json(info_path, {'status': 'pending', 'wall_time': 0.0, 'error': None})
    info.update(name=trial.name, overrides=trial.overrides, hash=trial.hash,
                steps=trial.config.train.steps)
    write_json(info_path, info)


def checkpointed_step(directory: str) -> int:
  """The latest committed checkpoint's step (0 when none)."""
  folder = os.path.join(directory, 'checkpoints')
  steps = [int(n) for n in os.listdir(folder) if n.isdigit()] if os.path.isdir(folder) else []
  return max(steps, default=0)


def watch(proc: subprocess.Popen, directory: str, steps: int, on_eval) -> int | None:
  """Feeds each new eval line of DIRECTORY/metrics.jsonl to `on_eval(step, eval_loss)` while
  `proc` runs (the final step's evaluation excepted). When it answers True while the process
  still runs, the trial is pruned: train.py gets SIGTERM (it checkpoints the current step and
  exits) and that eval's step is returned; None when the process ended by itself."""
  seen = set()
  while True:
    ended = proc.poll() is not None
    for m in read_metrics(directory):
      step = m.get('step')
      if 'eval_loss' not in m or step in seen:
        continue
      seen.add(step)
      prune = step < steps and on_eval(step, m['eval_loss'])
      if prune and not ended:  # a trial that ended by itself keeps its result
        proc.send_signal(signal.SIGTERM)
        proc.wait()
        return step
    if ended:
      return None
    time.sleep(POLL_SECONDS)


def run_trial(directory: str, steps: int, on_eval=None) -> dict:
  """Runs (or resumes, or skips) one trial; returns its updated trial.json. Never raises for a
  failing train.py: the failure is recorded as status 'failed' with the end of its output.

  on_eval(step, eval_loss) -> bool: called with each evaluation as it appears in metrics.jsonl;
  True prunes the trial (status 'pruned', `steps_trained` its last checkpointed step). A trial
  finished earlier is not rerun; its evaluations are still passed to on_eval.
  """
  info_path = os.path.join(directory, 'trial.json')
  info = read_json(info_path)
  if is_finished(directory, steps):
    if on_eval is not None:  # the study still learns its evaluations (no pruning: it finished)
      for m in read_metrics(directory):
        if 'eval_loss' in m and m['step'] < steps:
          on_eval(m['step'], m['eval_loss'])
    if info['status'] != 'done':
      info.update(status='done', error=None)
      write_json(info_path, info)
    return {**info, 'skipped': True}
  info['status'] = 'running'
  write_json(info_path, info)
  start = time.time()
  log_path = os.path.join(directory, 'train.log')
  pruned_at = None
  with open(log_path, 'a') as log:
    log.write(f'$ {" ".join(command(directory))}\n')
    log.flush()
    proc = subprocess.Popen(command(directory), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL)
    try:
      if on_eval is not None:
        pruned_at = watch(proc, directory, steps, on_eval)
      proc.wait()
    finally:
      if proc.poll() is None:  # interrupted sweep: stop the trial too (it checkpoints)
        proc.send_signal(signal.SIGTERM)
        proc.wait()
  info['wall_time'] = info.get('wall_time', 0.0) + time.time() - start
  info['steps_trained'] = max(checkpointed_step(directory),
                              max((m['step'] for m in read_metrics(directory)), default=0))
  if pruned_at is not None:
    info.update(status='pruned', error=None, pruned_at=pruned_at)
  elif proc.returncode == 0 and is_finished(directory, steps):
    info.update(status='done', error=None)
  else:
    with open(log_path) as f:
      tail = [line.rstrip() for line in f.read().replace('\r', '\n').splitlines() if line.strip()]
    info.update(status='failed', error=f'train.py exited with {proc.returncode}: '
                + ' | '.join(tail[-ERROR_TAIL_LINES:])[-2000:])
  write_json(info_path, info)
  return {**info, 'skipped': False}


def _announce(i: int, n: int, trial: Trial, result: dict) -> None:
  if result['skipped']:
    state = 'finished earlier, skipped'
  elif result['status'] == 'done':
    state = f'done in {result["wall_time"]:.0f}s'
  else:
    state = f'FAILED: {result["error"][-300:]}'
  print(f'[{i + 1}/{n}] {trial.name} ({describe(trial.overrides)}): {state}', flush=True)


def run_local(workdir: str, sweep: Sweep, parallel: int = 1) -> list[dict]:
  """Trials one after another, or `parallel` at once; results in trial order."""
  trials = sweep.trials
  jobs = [(trial_dir(workdir, t), t.config.train.steps) for t in trials]
  if parallel <= 1:
    results = []
    for i, (trial, job) in enumerate(zip(trials, jobs)):
      print(f'[{i + 1}/{len(trials)}] {trial.name}: running', flush=True)
      results.append(run_trial(*job))
      _announce(i, len(trials), trial, results[-1])
    return results
  with concurrent.futures.ThreadPoolExecutor(parallel) as pool:
    futures = [pool.submit(run_trial, *job) for job in jobs]
    results = []
    for i, (trial, future) in enumerate(zip(trials, futures)):
      results.append(future.result())
      _announce(i, len(trials), trial, results[-1])
  return results


def _ray_task(directory: str, steps: int) -> dict:
  return run_trial(directory, steps)


def run_ray(workdir: str, sweep: Sweep, address: str | None = None, num_cpus: int | None = None,
            cpus_per_trial: float = 1, gpus_per_trial: float = 0) -> list[dict]:
  """Each trial a Ray task with the given resource requests. `address` joins a running cluster
  (whose nodes must see WORKDIR and this checkout at the same paths); otherwise a local Ray
  instance with `num_cpus` CPUs starts. A trial whose task dies is reported as failed."""
  try:
    import ray  # optional dependency: the `ray` extra
  except ImportError:
    raise spec.SweepError("--backend=ray needs Ray: pip install '.[ray]'.") from None

  started = not ray.is_initialized()
  if started:
    kwargs = dict(address=address) if address else dict(num_cpus=num_cpus)
    ray.init(**kwargs, include_dashboard=False, log_to_driver=False,
             runtime_env={'env_vars': {'PYTHONPATH': ROOT}})
  try:
    task = ray.remote(_ray_task).options(num_cpus=cpus_per_trial, num_gpus=gpus_per_trial,
                                         max_retries=0)
    refs = [task.remote(trial_dir(workdir, t), t.config.train.steps) for t in sweep.trials]
    results = []
    for i, (trial, ref) in enumerate(zip(sweep.trials, refs)):
      try:
        result = ray.get(ref)
      except ray.exceptions.RayError as e:
        directory = trial_dir(workdir, trial)
        result = read_json(os.path.join(directory, 'trial.json'))
        result.update(status='failed', error=f'Ray task failed: {e}'[-2000:], skipped=False)
        write_json(os.path.join(directory, 'trial.json'),
                   {k: v for k, v in result.items() if k != 'skipped'})
      results.append(result)
      _announce(i, len(sweep.trials), trial, result)
  finally:
    if started:
      ray.shutdown()
  return results
