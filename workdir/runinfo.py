"""WORKDIR/run.json: what a run is, beside config.json, so the workdir describes itself.

{"config_hash", "tokenizer": {spec, name, vocab_size, sha256}, "mesh": {data, fsdp, tensor},
 "devices": {platform, kind, count, processes}, "code_revision": git commit ('+dirty' when the
 tracked files differ from it) or 'unknown', "versions", "launches": [{time, start_step,
 config_hash, code_revision, mesh, argv}, ...]}: top-level fields describe the latest launch;
 every launch (first run and each resume) is appended.
"""
from __future__ import annotations

import datetime
import hashlib
import importlib.metadata
import json
import os
import subprocess
import sys

import jax

from configs import schema

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_info_path(workdir: str) -> str:
  return os.path.join(workdir, 'run.json')


def code_revision(root: str = ROOT) -> str:
  """The git commit of `root` ('+dirty' if tracked files changed), or 'unknown'."""
  def git(*args):
    return subprocess.run(['git', '-C', root, *args], capture_output=True, text=True,
                          timeout=10, check=True).stdout.strip()
  try:
    commit = git('rev-parse', 'HEAD')
    dirty = git('status', '--porcelain', '--untracked-files=no')
  except (OSError, subprocess.SubprocessError):
    return 'unknown'
  return commit + ('+dirty' if dirty else '')


def _sha256(path: str) -> str | None:
  if not os.path.isfile(path):
    return None
  with open(path, 'rb') as f:
    return hashlib.sha256(f.read()).hexdigest()


def _version(package: str) -> str:
  try:
    return importlib.metadata.version(package)
  except importlib.metadata.PackageNotFoundError:
    return 'unknown'


def describe(config, tokenizer, mesh: jax.sharding.Mesh,
             tokenizer_file: str | None = None) -> dict:
  """The fields of run.json except the launch history. tokenizer_file: where the tokenizer
  file is now, when not yet at `data.tokenizer` (an import writing into a staging folder)."""
  devices = mesh.devices.flatten()
  return {
      'config_hash': schema.config_hash(config),
      'tokenizer': {'spec': config.data.tokenizer, 'name': str(tokenizer.name),
                    'vocab_size': int(tokenizer.vocab_size),
                    'sha256': _sha256(tokenizer_file or config.data.tokenizer)},
      'mesh': {name: int(size) for name, size in zip(mesh.axis_names, mesh.devices.shape)},
      'devices': {'platform': devices[0].platform, 'kind': devices[0].device_kind,
                  'count': int(devices.size), 'processes': jax.process_count()},
      'code_revision': code_revision(),
      'versions': {p: _version(p) for p in ('jax', 'flax', 'optax', 'orbax-checkpoint')},
  }


def read_run_info(workdir: str) -> dict | None:
  path = run_info_path(workdir)
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    return json.load(f)


def record_launch(workdir: str, config, tokenizer, mesh, start_step: int, *,
                  tokenizer_file: str | None = None, **launch_fields) -> dict:
  """Writes run.json for this launch (atomically), keeping earlier launches. Returns it.
  launch_fields: more facts about this launch (e.g. imported_from=HF_DIR)."""
  info = describe(config, tokenizer, mesh, tokenizer_file)
  previous = read_run_info(workdir) or {}
  launch = {'time': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
            'start_step': int(start_step), 'config_hash': info['config_hash'],
            'code_revision': info['code_revision'], 'mesh': info['mesh'], 'argv': sys.argv,
            **launch_fields}
  info['launches'] = [*previous.get('launches', []), launch]
  os.makedirs(workdir, exist_ok=True)
  tmp = run_info_path(workdir) + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(info, f, indent=2)
  os.replace(tmp, run_info_path(workdir))
  return info
