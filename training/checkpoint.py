"""Writing and resuming orbax checkpoints of the train state and the grain iterator.

Layout (workdir/checkpoints.py): WORKDIR/checkpoints/<step>/{params,train,data} and
<step>/sha256.json (workdir/integrity.py). Restoring onto a different mesh works: the abstract
target carries the new shardings. A restore verifies the newest step and falls back to older
ones; old steps are deleted only once a newer one is committed and checksummed. A step with
parameters only (an import) restores as a TrainState whose `is_params_only`: the caller starts a
fresh optimizer state. The state is typed in memory (training/state.py) and two dict items on
disk, the layout older versions wrote.
LoRA (the state's `frozen` holds the base): a step saves the adapters as its `lora` item and
names its base step in `meta`; that base step is never pruned while it is referenced. Restoring
a step with `params` (LoRA starting there) is params-only too: they become the frozen base.
"""
from __future__ import annotations

import os
import sys

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from training.state import TrainState
from workdir import checkpoints as ckpts
from workdir import integrity, resume
from workdir.files import WorkdirError, config_path, load_config

def check_resume(workdir: str, config) -> list[str] | None:
  """None when `workdir` holds no run yet; else the elastic changes ('train.steps: 200 -> 400')
  with which `config` continues the run there. Raises WorkdirError naming every fixed field
  that differs (workdir.resume.RESUME_ELASTIC lists what may change). A run whose newest
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
  fixed, elastic = resume.resume_differences(load_config(workdir), config, fresh_start=fresh)
  if fixed:
    what = 'a different model' if all(f.startswith('model.') for f in fixed) else 'a different run'
    raise WorkdirError(f'--workdir={workdir} holds {what}; refusing to resume it with: '
                       f'{"; ".join(fixed)} (saved -> given). These fields are fixed once a run '
                       'has started: use a new --workdir, or the saved values to resume.')
  return elastic


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
        item_handlers={ckpts.PARAMS: ocp.StandardCheckpointHandler(),
                       ckpts.TRAIN: ocp.StandardCheckpointHandler(),
                       ckpts.LORA: ocp.StandardCheckpointHandler(),
                       ckpts.DATA: grain.checkpoint.CheckpointHandler(),
                       ckpts.META: ocp.JsonCheckpointHandler()})
    self._unsealed: int | None = None   # saved, but its manifest is not written yet
    self.restored_step: int | None = None
    self.restored_meta: dict = {}   # the restored step's `meta` ({} for older checkpoints)
    self.lora_base: int | None = None   # LoRA: the step holding the frozen base (set by restore)

  @staticmethod
  def steps(workdir: str) -> list[int]:
    """The committed steps on disk, oldest first (no orbax manager needed)."""
    return ckpts.steps(workdir)

  @staticmethod
  def exists(workdir: str) -> bool:
    return bool(Checkpointer.steps(workdir))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def step_dir(self, step: int) -> str:
    return os.path.join(self.manager.directory, str(step))

  def save(self, step: int, state: TrainState, data_iter=None, meta: dict | None = None) -> None:
    """Starts an asynchronous save; the previous one is sealed (checksummed) first.
    meta: small JSON-able facts about the run at this step (restored as `restored_meta`)."""
    self._seal()
    lora = state.has_frozen   # LoRA: the adapters; the base is in its own step already
    if lora and self.lora_base is None:
      raise ValueError('a LoRA state is saved only after restoring its base (lora_base).')
    items = {ckpts.LORA if lora else ckpts.PARAMS: ocp.args.StandardSave(state.params),
             ckpts.TRAIN: ocp.args.StandardSave(state.train_item())}
    if data_iter is not None:
      items[ckpts.DATA] = grain.checkpoint.CheckpointSave(data_iter)
    if lora:
      meta = {**(meta or {}), ckpts.BASE_STEP: self.lora_base}
    if meta is not None:
      items[ckpts.META] = ocp.args.JsonSave(meta)
    try:
      self.manager.save(step, args=ocp.args.Composite(**items), force=True)
    except OSError as e:
      raise self._save_failed(step, e) from e
    self._unsealed = step

  def save_base(self, step: int, params) -> None:
    """Writes the frozen base of a LoRA run that starts from scratch as a params-only step (as
    an import does), sealed before training starts; later steps name it as their base."""
    self._seal()
    self.manager.save(step, args=ocp.args.Composite(
        **{ckpts.PARAMS: ocp.args.StandardSave(params)}), force=True)
    self._unsealed = step
    self._seal()
    self.lora_base = step

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
    ckpts.seal(self.step_dir(step))
    sealed = [s for s in self.manager.all_steps() if integrity.has_manifest(self.step_dir(s))]
    sealed = [s for s in sealed if s != self.lora_base]   # the LoRA base stays
    if len(sealed) > self.keep:
      for s in self.manager.all_steps():
        if s < sorted(sealed)[-self.keep] and s != self.lora_base:
          self.manager.delete(s)

  def restore(self, abstract_state: TrainState, data_iter=None,
              step: int | None = None) -> TrainState:
    """Restores into the shapes/shardings of `abstract_state`; `data_iter` is updated in place
    when the checkpoint holds its position. A params-only step (an imported model's step 0)
    returns a state with params alone (`is_params_only`): the caller starts the optimizer afresh,
    the data from the start.

    step=None: the newest usable step. A step that fails its checksums or its restore is
    reported on stderr and the previous one is tried; once one restores, the unusable newer
    ones are moved to WORKDIR/unusable_checkpoints (unless read-only). `restored_step` tells
    which step was used. Raises WorkdirError when no step restores.
    """
    steps = [step] if step is not None else sorted(self.manager.all_steps(), reverse=True)
    integrity.silence_abandoned_reads()
    problems = []
    for s in steps:
      problem = integrity.verify(self.step_dir(s))
      if problem is None:
        try:
          state, meta = self._restore(s, abstract_state, data_iter)
        except WorkdirError:  # the config does not describe this model: not damage
          raise
        except Exception as e:  # noqa: BLE001  (whatever a damaged checkpoint raises)
          problem = f'restoring it failed: {integrity.restore_failure(e)}'
        else:
          if not integrity.has_manifest(self.step_dir(s)):  # committed, never checksummed
            problem = _nonfinite_leaf(state)
      if problem is not None:
        problems.append((s, problem))
        continue
      self.restored_step, self.restored_meta = s, meta
      if not self.read_only and not integrity.has_manifest(self.step_dir(s)):
        ckpts.seal(self.step_dir(s))  # committed before a kill: seal it now
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

  def _restore(self, step: int, abstract_state: TrainState,
               data_iter) -> tuple[TrainState, dict]:
    """(state, meta) of `step`; meta is {} when the checkpoint has none, the state is params
    only when the step has no `train` item (an import) or LoRA starts on its `params`."""
    frozen = abstract_state.frozen
    with_lora = abstract_state.has_frozen
    if with_lora and ckpts.has_item(self.workdir, step, ckpts.LORA):
      return self._restore_lora(step, abstract_state, data_iter)
    if not ckpts.has_item(self.workdir, step, ckpts.PARAMS):
      raise ValueError(f'it has no {ckpts.PARAMS}/ item (a checkpoint of an older version of '
                       'this code?)')
    target = frozen if with_lora else abstract_state.params
    ckpts.check_param_shapes(target, self.manager.item_metadata(step)[ckpts.PARAMS].tree)
    items = {ckpts.PARAMS: ocp.args.StandardRestore(target)}
    # LoRA starting on a trained step: its optimizer state is for all parameters, not read.
    has_train = ckpts.has_item(self.workdir, step, ckpts.TRAIN) and not with_lora
    if has_train:
      items[ckpts.TRAIN] = ocp.args.StandardRestore(abstract_state.train_item())
    if data_iter is not None and ckpts.has_item(self.workdir, step, ckpts.DATA):
      items[ckpts.DATA] = grain.checkpoint.CheckpointRestore(data_iter)
    if ckpts.has_item(self.workdir, step, ckpts.META):
      items[ckpts.META] = ocp.args.JsonRestore()
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    state = TrainState.from_items(restored[ckpts.PARAMS],
                                  dict(restored[ckpts.TRAIN]) if has_train else None)
    self.lora_base = step if with_lora else None
    return state, dict(restored[ckpts.META]) if ckpts.META in items else {}

  def _restore_lora(self, step: int, abstract_state: TrainState,
                    data_iter) -> tuple[TrainState, dict]:
    """A LoRA step: its adapters, optimizer state and data position, and the frozen base from
    the step its meta names (verified against that step's checksums)."""
    base = ckpts.base_step(self.workdir, step)
    problem = integrity.verify(self.step_dir(base), only=ckpts.PARAMS)
    if problem is not None:
      raise ValueError(f'its LoRA base, step {base}, is unusable ({problem})')
    ckpts.check_param_shapes(abstract_state.params,
                             self.manager.item_metadata(step)[ckpts.LORA].tree)
    items = {ckpts.LORA: ocp.args.StandardRestore(abstract_state.params),
             ckpts.TRAIN: ocp.args.StandardRestore(abstract_state.train_item()),
             ckpts.META: ocp.args.JsonRestore()}
    if data_iter is not None and ckpts.has_item(self.workdir, step, ckpts.DATA):
      items[ckpts.DATA] = grain.checkpoint.CheckpointRestore(data_iter)
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    frozen = ckpts.restore_item(self.step_dir(base), abstract_state.frozen)
    self.lora_base = base
    state = TrainState.from_items(restored[ckpts.LORA], dict(restored[ckpts.TRAIN]))
    return state.replace(frozen=frozen), dict(restored[ckpts.META])

  def close(self) -> None:
    self._seal()
    self.manager.wait_until_finished()
    self.manager.close()
