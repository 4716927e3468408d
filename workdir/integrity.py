"""Checksum manifests for committed checkpoints, and moving unusable ones aside.

orbax commits a checkpoint atomically but stores no checksums: a truncated, deleted or flipped
file in a committed step restores silently or fails deep inside tensorstore. After a step is
committed, `write_manifest` records every file's size and sha256 in STEP/sha256.json;
`verify` compares them again before a restore. A step that fails anyway (committed but not yet
sealed when the run was killed) is reported in one line by the restore loops, with
`restore_failure` and `silence_abandoned_reads`.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import types

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


def restore_failure(e: BaseException) -> str:
  """One line for a failed restore: the innermost cause (tensorstore's, e.g. "OUT_OF_RANGE:
  Error reading ... in OCDBT database at local file ...") rather than orbax's wrapper, whose
  message carries a multi-line TensorStore spec."""
  while e.__cause__ is not None:
    e = e.__cause__
  lines = str(e).strip().splitlines()
  return f'{type(e).__name__}: {lines[0][:300] if lines else ""}'


_ORBAX = f'{os.sep}orbax{os.sep}'


def _abandoned_read(report) -> bool:
  """Whether an unraisable-exception report echoes a read that a failed orbax restore abandoned:
  its coroutine finalised, or its completion callback finding orbax's event loop closed."""
  if isinstance(report.object, types.CoroutineType):
    return _ORBAX in report.object.cr_code.co_filename
  return isinstance(report.exc_value, RuntimeError) and str(report.exc_value) == \
      'Event loop is closed'


def _keep_log(record: logging.LogRecord) -> bool:
  """False for asyncio's "exception was never retrieved" log of an abandoned orbax read."""
  message = record.getMessage()
  return not (message.startswith(('Task exception was never retrieved',
                                  'Future exception was never retrieved'))
              and (_ORBAX in message or 'OCDBT' in message))


def silence_abandoned_reads() -> None:
  """Drops, for the rest of the process, the reports of reads that a failed orbax restore
  abandoned; the restore loops call it first. When one array of a damaged step fails to read,
  orbax leaves the other reads running, and as they finish or are garbage collected, at any
  later time, each reports its own error (the same bad read, a closed event loop, an exception
  never retrieved): ~1,700 lines of tracebacks around the loop's one-line warning. Only those
  reports are dropped (orbax's coroutines, callbacks finding a closed event loop, asyncio's
  never-retrieved logs of orbax or OCDBT reads); others pass through. Idempotent."""
  if getattr(sys.unraisablehook, 'drops_abandoned_reads', False):
    return
  previous = sys.unraisablehook

  def hook(report):
    if not _abandoned_read(report):
      previous(report)

  hook.drops_abandoned_reads = True
  sys.unraisablehook = hook
  logging.getLogger('asyncio').addFilter(_keep_log)   # once: addFilter skips duplicates
