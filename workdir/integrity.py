"""Checksum manifests for committed checkpoints, and moving unusable ones aside.

orbax commits a checkpoint atomically but stores no checksums: a truncated, deleted or flipped
file in a committed step restores silently or fails deep inside tensorstore. After a step is
committed, `write_manifest` records every file's size and sha256 in STEP/sha256.json;
`verify` compares them again before a restore.
"""
from __future__ import annotations

import hashlib
import json
import os

MANIFEST = 'sha256.json'


def _files(step_dir: str) -> list[str]:
  out = []
  for root, _, names in os.walk(step_dir):
    out += [os.path.relpath(os.path.join(root, n), step_dir) for n in names]
  return sorted(f for f in out if f != MANIFEST and not f.endswith('.tmp'))


def _sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, 'rb') as f:
    for block in iter(lambda: f.read(1 << 20), b''):
      h.update(block)
  return h.hexdigest()


def write_manifest(step_dir: str) -> None:
  """Records {relative path: [size, sha256]} of the step's files, atomically."""
  entries = {f: [os.path.getsize(os.path.join(step_dir, f)), _sha256(os.path.join(step_dir, f))]
             for f in _files(step_dir)}
  path = os.path.join(step_dir, MANIFEST)
  with open(path + '.tmp', 'w') as f:
    json.dump({'files': entries}, f, indent=0, sort_keys=True)
    f.flush()
    os.fsync(f.fileno())
  os.replace(path + '.tmp', path)


def has_manifest(step_dir: str) -> bool:
  return os.path.isfile(os.path.join(step_dir, MANIFEST))


def verify(step_dir: str, only: str | None = None) -> str | None:
  """None when every file in the manifest is present with its size and sha256, else what is
  wrong. A step without a manifest (killed between commit and manifest) is not checked here.
  only: check just the files under this subfolder (one checkpoint item, e.g. 'params')."""
  if not has_manifest(step_dir):
    return None
  try:
    with open(os.path.join(step_dir, MANIFEST)) as f:
      entries = json.load(f)['files']
  except (OSError, ValueError, KeyError) as e:
    return f'its {MANIFEST} is unreadable ({e})'
  for name, (size, digest) in sorted(entries.items()):
    if only is not None and not name.startswith(only + '/'):
      continue
    path = os.path.join(step_dir, name)
    if not os.path.isfile(path):
      return f'{name} is missing'
    if os.path.getsize(path) != size:
      return f'{name} has {os.path.getsize(path)} bytes, {size} when saved (truncated?)'
    if _sha256(path) != digest:
      return f'{name} differs from its sha256 when saved'
  return None


def quarantine(step_dir: str, workdir: str) -> str:
  """Moves an unusable step out of the checkpoints folder (never deletes it); returns where."""
  root = os.path.join(workdir, 'unusable_checkpoints')
  os.makedirs(root, exist_ok=True)
  base = os.path.join(root, os.path.basename(step_dir))
  target, n = base, 1
  while os.path.exists(target):
    target, n = f'{base}.{n}', n + 1
  os.replace(step_dir, target)
  return target
