"""Orbax checkpoints of the train state and the grain iterator; workdir bookkeeping.

Layout: WORKDIR/config.json (the resolved config), WORKDIR/checkpoints/<step>/{state,data}
and <step>/sha256.json (training/integrity.py). Restoring onto a different mesh works: the
abstract target carries the new shardings. A restore verifies the newest step and falls back to
older ones; old steps are deleted only once a newer one is committed and checksummed.
"""
from __future__ import annotations

import os
import sys

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from configs import schema
from training import integrity


class WorkdirError(ValueError):
  """The workdir cannot be used as asked (different model, nothing to restore...)."""


def config_path(workdir: str) -> str:
  return os.path.join(workdir, 'config.json')


def load_config(workdir: str):
  """The resolved config a workdir was trained with."""
  path = config_path(workdir)
  if not os.path.isfile(path):
    raise WorkdirError(f'--workdir={workdir}: no config.json there (not a training workdir).')
  with open(path) as f:
    return schema.from_json(f.read())


def check_resume(workdir: str, config) -> list[str] | None:
  """None when `workdir` holds no run yet; else the elastic changes ('train.steps: 200 -> 400')
  with which `config` continues the run there. Raises WorkdirError naming every fixed field
  that differs (configs.schema.RESUME_ELASTIC lists what may change). A run whose newest
  checkpoint holds no data position (an imported model's step 0) may change everything but the
  model's parameter shapes: its training starts there."""
  if not os.path.isfile(config_path(workdir)):
    if Checkpointer.exists(workdir):
      raise WorkdirError(f'--workdir={workdir} holds checkpoints but no config.json; refusing to '
                         'resume or overwrite it.')
    return None
  steps = Checkpointer.steps(workdir)
  fresh = not steps or not os.path.isdir(os.path.join(workdir, 'checkpoints', str(steps[-1]),
                                                      'data'))
  fixed, elastic = schema.resume_differences(load_config(workdir), config, fresh_start=fresh)
  if fixed:
    what = 'a different model' if all(f.startswith('model.') for f in fixed) else 'a different run'
    raise WorkdirError(f'--workdir={workdir} holds {what}; refusing to resume it with: '
                       f'{"; ".join(fixed)} (saved -> given). These fields are fixed once a run '
                       'has started: use a new --workdir, or the saved values to resume.')
  return elastic


def write_config(workdir: str, config) -> None:
  os.makedirs(workdir, exist_ok=True)
  tmp = config_path(workdir) + '.tmp'
  with open(tmp, 'w') as f:
    f.write(schema.to_json(config))
  os.replace(tmp, config_path(workdir))


def _param_shapes(tree) -> dict:
  name = lambda path: '.'.join(str(getattr(k, 'key', getattr(k, 'idx', getattr(k, 'name', k))))
                               for k in path)
  return {name(p).removesuffix('.value'): tuple(leaf.shape)
          for p, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def check_param_shapes(abstract_params, saved_params) -> None:
  """Raises WorkdirError naming the first parameter whose checkpointed shape differs from the
  config's (e.g. model.vocab_size changed in config.json), before orbax tries to restore it."""
  want, have = _param_shapes(abstract_params), _param_shapes(saved_params)
  missing = sorted(set(want) - set(have))
  if missing:
    raise WorkdirError(f'the checkpoint has no parameter {missing[0]} that the config\'s model '
                       'needs: the config does not describe the checkpointed model.')
  for key in sorted(want):
    if want[key] != have[key]:
      hint = (f' (model.vocab_size={want[key][0]}, the checkpoint has {have[key][0]})'
              if key.endswith('embed.embedding') and want[key][0] != have[key][0] else '')
      raise WorkdirError(f'checkpoint parameter {key} has shape {have[key]} but the config gives '
                         f'{want[key]}{hint}: the config does not describe the checkpointed '
                         'model.')


def _write_manifest_once(step_dir: str) -> None:
  """Process 0 writes the manifest of the shared step directory; in multi-process runs the
  others wait for it, so that every process then sees the same sealed steps."""
  if jax.process_index() == 0:
    integrity.write_manifest(step_dir)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f'lmx: manifest of {step_dir}')


def _nonfinite_leaf(state) -> str | None:
  """What an unchecksummed step is checked for once restored: every float array finite.
  (Reduced on the devices, so sharded arrays of a multi-process run work too.)"""
  leaves = [(jax.tree_util.keystr(path), leaf)
            for path, leaf in jax.tree_util.tree_leaves_with_path(state)
            if jnp.issubdtype(leaf.dtype, jnp.floating)]
  finite = jax.jit(lambda xs: [jnp.all(jnp.isfinite(x)) for x in xs])([x for _, x in leaves])
  for (name, _), ok in zip(leaves, finite):
    if not bool(np.asarray(ok)):
      return f'it was never checksummed and {name} holds non-finite values'
  return None


class Checkpointer:
  """Keeps the last `keep` checksummed checkpoints of {state, data iterator} under
  WORKDIR/checkpoints (pruning is done here, not by orbax, so that the last good step is never
  deleted while a newer one is unverified)."""

  def __init__(self, workdir: str, keep: int = 3, read_only: bool = False):
    options = ocp.CheckpointManagerOptions(
        max_to_keep=None, save_interval_steps=0 if read_only else 1,
        create=not read_only, read_only=read_only, cleanup_tmp_directories=not read_only)
    self.workdir, self.keep, self.read_only = workdir, keep, read_only
    self.manager = ocp.CheckpointManager(
        os.path.abspath(os.path.join(workdir, 'checkpoints')), options=options,
        item_handlers={'state': ocp.StandardCheckpointHandler(),
                       'data': grain.checkpoint.CheckpointHandler(),
                       'meta': ocp.JsonCheckpointHandler()})
    self._unsealed: int | None = None   # saved, but its manifest is not written yet
    self.restored_step: int | None = None
    self.restored_meta: dict = {}   # the restored step's `meta` ({} for older checkpoints)

  @staticmethod
  def steps(workdir: str) -> list[int]:
    """The committed steps on disk, oldest first (no orbax manager needed)."""
    root = os.path.join(workdir, 'checkpoints')
    return sorted(int(d) for d in os.listdir(root) if d.isdigit()) if os.path.isdir(root) else []

  @staticmethod
  def exists(workdir: str) -> bool:
    return bool(Checkpointer.steps(workdir))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def step_dir(self, step: int) -> str:
    return os.path.join(self.manager.directory, str(step))

  def save(self, step: int, state, data_iter=None, meta: dict | None = None) -> None:
    """Starts an asynchronous save; the previous one is sealed (checksummed) first.
    meta: small JSON-able facts about the run at this step (restored as `restored_meta`)."""
    self._seal()
    items = {'state': ocp.args.StandardSave(state)}
    if data_iter is not None:
      items['data'] = grain.checkpoint.CheckpointSave(data_iter)
    if meta is not None:
      items['meta'] = ocp.args.JsonSave(meta)
    try:
      self.manager.save(step, args=ocp.args.Composite(**items), force=True)
    except OSError as e:
      raise self._save_failed(step, e) from e
    self._unsealed = step

  def _save_failed(self, step: int, error: BaseException) -> 'WorkdirError':
    """The error a failed (background) save ends the run with: the workdir, the step, the cause,
    and what is still there to resume from."""
    sealed = [s for s in self.steps(self.workdir)
              if s != step and integrity.has_manifest(self.step_dir(s))]
    left = (f'checkpoint {sealed[-1]} and older are intact; fix the cause and rerun the same '
            f'command to resume from step {sealed[-1]}' if sealed else 'no earlier checkpoint')
    return WorkdirError(f'--workdir={self.workdir}: saving checkpoint {step} failed '
                        f'({type(error).__name__}: {error}); {left}.')

  def _seal(self) -> None:
    """Waits for the pending save, writes its manifest, then prunes old steps. An error of the
    background save (a full disk, an I/O error) is raised here as a WorkdirError."""
    if self._unsealed is None:
      return
    step, self._unsealed = self._unsealed, None
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # noqa: BLE001  (whatever the writer raised in the background)
      raise self._save_failed(step, e) from e
    _write_manifest_once(self.step_dir(step))
    sealed = [s for s in self.manager.all_steps() if integrity.has_manifest(self.step_dir(s))]
    if len(sealed) > self.keep:
      for s in self.manager.all_steps():
        if s < sorted(sealed)[-self.keep]:
          self.manager.delete(s)

  def restore(self, abstract_state, data_iter=None, step: int | None = None):
    """Restores into the shapes/shardings of `abstract_state`; `data_iter` is updated in place
    when the checkpoint holds its position (an imported model's step-0 checkpoint does not:
    the data then starts from the beginning).

    step=None: the newest usable step. A step that fails its checksums or its restore is
    reported on stderr and the previous one is tried; once one restores, the unusable newer
    ones are moved to WORKDIR/unusable_checkpoints (unless read-only). `restored_step` tells
    which step was used. Raises WorkdirError when no step restores.
    """
    steps = [step] if step is not None else sorted(self.manager.all_steps(), reverse=True)
    problems = []
    for s in steps:
      problem = integrity.verify(self.step_dir(s))
      if problem is None:
        try:
          state, meta = self._restore(s, abstract_state, data_iter)
        except WorkdirError:  # the config does not describe this model: not damage
          raise
        except Exception as e:  # noqa: BLE001  (whatever a damaged checkpoint raises)
          problem = f'restoring it failed: {type(e).__name__}: {str(e)[:300]}'
        else:
          if not integrity.has_manifest(self.step_dir(s)):  # committed, never checksummed
            problem = _nonfinite_leaf(state)
      if problem is not None:
        problems.append((s, problem))
        continue
      self.restored_step, self.restored_meta = s, meta
      if not self.read_only and not integrity.has_manifest(self.step_dir(s)):
        _write_manifest_once(self.step_dir(s))  # committed before a kill: seal it now
      for bad, why in problems:
        note = f'checkpoint {bad} is unusable ({why})'
        if not self.read_only:
          note += f'; moved to {integrity.quarantine(self.step_dir(bad), self.workdir)}'
        print(f'warning: {note}; restored the previous good checkpoint, step {s}.',
              file=sys.stderr)
      if problems and not self.read_only:
        self.manager.reload()
      return state
    detail = '; '.join(f'step {s}: {why}' for s, why in problems) or 'there is none'
    raise WorkdirError(f'--workdir={self.workdir}: no checkpoint could be restored ({detail}). '
                       'Nothing was changed.')

  def _restore(self, step: int, abstract_state, data_iter) -> tuple[object, dict]:
    """(state, meta) of `step`; meta is {} when the checkpoint has none."""
    saved = self.manager.item_metadata(step)
    check_param_shapes(abstract_state['params'], saved['state']['params'])
    items = {'state': ocp.args.StandardRestore(abstract_state)}
    if data_iter is not None and 'data' in saved:
      items['data'] = grain.checkpoint.CheckpointRestore(data_iter)
    if os.path.isdir(os.path.join(self.step_dir(step), 'meta')):
      items['meta'] = ocp.args.JsonRestore()
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    return restored['state'], dict(restored['meta']) if 'meta' in items else {}

  def close(self) -> None:
    self._seal()
    self.manager.wait_until_finished()
    self.manager.close()
