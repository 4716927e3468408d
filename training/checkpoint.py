"""Orbax checkpoints of the train state and the grain iterator; workdir bookkeeping.

Layout: WORKDIR/config.json (the resolved config), WORKDIR/checkpoints/<step>/{state,data}.
Restoring onto a different mesh works: the abstract target carries the new shardings.
"""
from __future__ import annotations

import os

import grain
import jax
import orbax.checkpoint as ocp

from configs import schema


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


def check_resume(workdir: str, config) -> bool:
  """True when `workdir` already holds a run of the same model; raises if the model differs."""
  if not os.path.isfile(config_path(workdir)):
    if Checkpointer.exists(workdir):
      raise WorkdirError(f'--workdir={workdir} holds checkpoints but no config.json; refusing to '
                         'resume or overwrite it.')
    return False
  differences = schema.shape_differences(load_config(workdir), config)
  if differences:
    raise WorkdirError(f'--workdir={workdir} holds a run of a different model; refusing to '
                       f'overwrite it. Differing fields: {"; ".join(differences)}. Use a new '
                       '--workdir, or the saved values to resume.')
  return True


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


class Checkpointer:
  """Keeps the last `keep` checkpoints of {state, data iterator} under WORKDIR/checkpoints."""

  def __init__(self, workdir: str, keep: int = 3, read_only: bool = False):
    options = ocp.CheckpointManagerOptions(
        max_to_keep=None if read_only else keep, save_interval_steps=0 if read_only else 1,
        create=not read_only, read_only=read_only, cleanup_tmp_directories=not read_only)
    self.manager = ocp.CheckpointManager(
        os.path.abspath(os.path.join(workdir, 'checkpoints')), options=options,
        item_handlers={'state': ocp.StandardCheckpointHandler(),
                       'data': grain.checkpoint.CheckpointHandler()})

  @staticmethod
  def exists(workdir: str) -> bool:
    root = os.path.join(workdir, 'checkpoints')
    return os.path.isdir(root) and any(d.isdigit() for d in os.listdir(root))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, data_iter=None) -> None:
    items = {'state': ocp.args.StandardSave(state)}
    if data_iter is not None:
      items['data'] = grain.checkpoint.CheckpointSave(data_iter)
    self.manager.save(step, args=ocp.args.Composite(**items), force=True)

  def restore(self, abstract_state, data_iter=None, step: int | None = None):
    """Restores into the shapes/shardings of `abstract_state`; `data_iter` is updated in place
    when the checkpoint holds its position (an imported model's step-0 checkpoint does not:
    the data then starts from the beginning)."""
    step = self.latest_step() if step is None else step
    check_param_shapes(abstract_state['params'], self.manager.item_metadata(step)['state']['params'])
    items = {'state': ocp.args.StandardRestore(abstract_state)}
    if data_iter is not None and 'data' in self.manager.item_metadata(step):
      items['data'] = grain.checkpoint.CheckpointRestore(data_iter)
    return self.manager.restore(step, args=ocp.args.Composite(**items))['state']

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
