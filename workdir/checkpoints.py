"""The checkpoints of a workdir, and restoring or saving only the parameters.

Layout: WORKDIR/checkpoints/<step>/ holds one orbax directory per item, plus sha256.json
(workdir/integrity.py):
  params/  the model's nnx.State of Params: all that sampling, export and fine-tuning read
  train/   {'step', 'opt_state', 'rng'}: what resuming a run needs besides the parameters
  data/    the grain iterator position
  meta/    small JSON facts of the run at that step (training/checkpoint.py)
  lora/    a LoRA run's adapters (models/lora.py): its steps hold lora/ instead of params/, and
           meta/ `lora_base_step` names the step whose params/ they adapt (the frozen base,
           written once, never again; it is kept while steps refer to it)
An imported workdir (interop) has `params` only; training starts its optimizer afresh from it.
Reading the parameters opens `params/` alone, so the optimizer state (two parameter-sized Adam
moments) is never read, verified or allocated for inference.
"""
from __future__ import annotations

import math
import os
import sys

import jax
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils

from models import build_model, lora
from workdir import integrity
from workdir import mesh as mesh_lib
from workdir.files import WorkdirError

PARAMS, TRAIN, DATA, META, LORA = 'params', 'train', 'data', 'meta', 'lora'
BASE_STEP = 'lora_base_step'   # meta/ key of a LoRA step: the step holding its frozen base


def root(workdir: str) -> str:
  return os.path.join(workdir, 'checkpoints')


def step_dir(workdir: str, step: int) -> str:
  return os.path.join(os.path.abspath(root(workdir)), str(step))


def steps(workdir: str) -> list[int]:
  """The committed steps on disk, oldest first (orbax's unfinished saves are not digits)."""
  path = root(workdir)
  return sorted(int(d) for d in os.listdir(path) if d.isdigit()) if os.path.isdir(path) else []


def has_item(workdir: str, step: int, item: str) -> bool:
  return os.path.isdir(os.path.join(step_dir(workdir, step), item))


def read_meta(workdir: str, step: int) -> dict:
  """The step's meta/ item ({} when it has none)."""
  if not has_item(workdir, step, META):
    return {}
  return dict(ocp.JsonCheckpointHandler().restore(epath.Path(step_dir(workdir, step)) / META))


def base_step(workdir: str, step: int) -> int | None:
  """The step whose params/ a LoRA step's adapters apply to; None for a step with params/."""
  if not has_item(workdir, step, LORA):
    return None
  base = read_meta(workdir, step).get(BASE_STEP)
  if base is None or not has_item(workdir, base, PARAMS):
    raise WorkdirError(f'--workdir={workdir}: checkpoint {step} holds LoRA adapters, but their '
                       f'base parameters (step {base}) are missing; they cannot be used.')
  return base


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


def abstract_params(config, devices=None) -> tuple[object, object, jax.sharding.Mesh]:
  """(graphdef, abstract params, mesh) of `config`'s model: the params are an nnx.State of
  jax.ShapeDtypeStruct carrying their shardings on the config's mesh. Nothing is allocated."""
  mesh = mesh_lib.make_mesh(config.mesh, devices)
  model = nnx.eval_shape(lambda: build_model(config, nnx.Rngs(0)))
  abstract = nnx.state(model, nnx.Param)
  shardings = mesh_lib.state_shardings(abstract, mesh, mesh_lib.rules_of(config.mesh))
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract, shardings)
  return nnx.graphdef(model), abstract, mesh


def seal(path: str) -> None:
  """Process 0 writes the checksum manifest of a committed step directory; in multi-process
  runs the others wait for it, so that every process then sees the same sealed steps."""
  if jax.process_index() == 0:
    integrity.write_manifest(path)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f'lmx: manifest of {path}')


def _in_flight_gb(params) -> float:
  """orbax's bound on the bytes it writes or reads at once (by default 96 GB, i.e. the whole
  tree, copied on the host before a write): here the largest parameter (orbax refuses an array
  larger than the bound; 1 MiB spare for rounding), so that saving or restoring needs memory
  for about one parameter beyond the parameters themselves."""
  largest = max(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(params))
  return (largest + (1 << 20)) / 1e9


# Parameters are read in groups of about this many bytes (or one parameter, if larger), each
# its own orbax restore: a 150M bf16 Llama restored in one call peaked 63-110 MiB above its
# parameters from run to run, in ~64 MiB groups a steady 58-67 MiB.
GROUP_BYTES = 64 << 20


def _groups(abstract_params, limit: int) -> list[list[tuple]]:
  """The (path, leaf) pairs of the nnx.State `abstract_params` in consecutive groups of at most
  `limit` bytes (a larger parameter alone)."""
  groups, size = [[]], 0
  for path, leaf in nnx.to_flat_state(abstract_params):
    nbytes = math.prod(leaf.shape) * leaf.dtype.itemsize
    if groups[-1] and size + nbytes > limit:
      groups.append([])
      size = 0
    groups[-1].append((path, leaf))
    size += nbytes
  return groups


def restore_item(path: str, abstract_params, name: str = PARAMS, group_bytes: int = GROUP_BYTES):
  """The `name` item of step directory `path`, into the shapes/shardings of the abstract
  nnx.State `abstract_params`; read in groups of about `group_bytes` (see GROUP_BYTES)."""
  item = epath.Path(os.path.join(path, name))
  check_param_shapes(abstract_params, ocp.StandardCheckpointHandler().metadata(item).tree)
  handler = ocp.PyTreeCheckpointHandler(restore_concurrent_gb=_in_flight_gb(abstract_params))
  restored = []
  with ocp.Checkpointer(handler) as checkpointer:
    for group in _groups(abstract_params, group_bytes):
      part = nnx.from_flat_state(group)
      restored += nnx.to_flat_state(checkpointer.restore(item, args=ocp.args.PyTreeRestore(
          item=part, restore_args=ocp.checkpoint_utils.construct_restore_args(part),
          partial_restore=True)))
  return nnx.from_flat_state(restored)


def _zeros(abstract):
  return jax.tree.map(lambda a: jax.numpy.zeros(a.shape, a.dtype, device=a.sharding), abstract)


def _check_step(workdir: str, s: int, with_lora: bool) -> tuple[int | None, str | None]:
  """(base step, problem) of step `s`: a LoRA step (`with_lora` and a lora/ item) checks its
  adapters and its base step's params/ and returns that base step; any other step its params/."""
  path = step_dir(workdir, s)
  if with_lora and has_item(workdir, s, LORA):
    b = base_step(workdir, s)
    return b, (integrity.verify(path, only=LORA)
               or integrity.verify(step_dir(workdir, b), only=PARAMS))
  if not has_item(workdir, s, PARAMS):
    return None, f'it has no {PARAMS}/ item'
  return None, integrity.verify(path, only=PARAMS)


def restore_params(workdir: str, abstract_params, step: int | None = None) -> tuple[object, int]:
  """(parameters, step) of the newest usable checkpoint (or of `step`): only the `params` item
  (a LoRA step: its `lora` item and its base step's `params`) is verified against its checksums
  and read. A damaged newer step is reported on stderr and the previous one used; nothing is
  moved or written (training does that). Raises WorkdirError when no step restores."""
  candidates = [step] if step is not None else steps(workdir)[::-1]
  if not candidates:
    raise WorkdirError(f'--workdir={workdir}: no checkpoint there yet.')
  integrity.silence_abandoned_reads()
  problems = []
  for s in candidates:
    path = step_dir(workdir, s)
    adapters, base = lora.split(abstract_params)
    base_of, problem = _check_step(workdir, s, bool(jax.tree.leaves(adapters)))
    if problem is None:
      try:
        if base_of is not None:   # adapters over their base step's parameters
          params = nnx.merge_state(restore_item(step_dir(workdir, base_of), base),
                                   restore_item(path, adapters, LORA))
        elif jax.tree.leaves(adapters):   # LoRA on, none trained yet: zero adapters = the base
          params = nnx.merge_state(restore_item(path, base), _zeros(adapters))
        else:
          params = restore_item(path, abstract_params)
      except WorkdirError:  # the config does not describe this model: not damage
        raise
      except Exception as e:  # noqa: BLE001  (whatever a damaged checkpoint raises)
        problem = f'restoring it failed: {integrity.restore_failure(e)}'
    if problem is not None:
      problems.append((s, problem))
      continue
    for bad, why in problems:
      print(f'warning: checkpoint {bad} is unusable ({why}); using the previous good '
            f'checkpoint, step {s}.', file=sys.stderr)
    return params, s
  detail = '; '.join(f'step {s}: {why}' for s, why in problems)
  raise WorkdirError(f'--workdir={workdir}: no checkpoint could be restored ({detail}).')


def save_params(workdir: str, step: int, params) -> None:
  """Writes a params-only checkpoint at `step` (an import: no optimizer or data state) and
  seals it with its checksums."""
  options = ocp.CheckpointManagerOptions(max_to_keep=None, create=True)
  manager = ocp.CheckpointManager(os.path.abspath(root(workdir)), options=options,
                                  item_handlers={PARAMS: ocp.StandardCheckpointHandler(
                                      save_concurrent_gb=_in_flight_gb(params))})
  manager.save(step, args=ocp.args.Composite(**{PARAMS: ocp.args.StandardSave(params)}),
               force=True)
  manager.wait_until_finished()
  manager.close()
  seal(step_dir(workdir, step))
