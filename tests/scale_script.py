"""Multi-device checks that need their own process (tests/test_scale.py runs them).

python tests/scale_script.py MODE DEVICES [ARGS] ; prints one JSON line (the last line).
  meshes:  3 train steps of the tiny model on several meshes: losses and parameter shardings.
  reshard WORKDIR: save on fsdp=8, restore on 1 and 2 devices, the next step's loss on each.
  meshes+reshard WORKDIR: both in one process ({'meshes': ..., 'reshard': ...}): one jax start,
           and reshard's fsdp=8 and 1-device steps are meshes' programs (compilation cache hits).
XLA_FLAGS must name the device count before jax is imported, hence a script. It inherits the
tests' JAX_DISABLE_MOST_OPTIMIZATIONS (LLVM at -O0, tests/conftest.py): sharding is settled on HLO
(SPMD partitioning), before LLVM, and every run compared here is compiled the same way.
"""
import json
import os
import sys

MODE, DEVICES = sys.argv[1], int(sys.argv[2])
os.environ['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={DEVICES}'
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from configs import default, schema  # noqa: E402
from training import checkpoint as ckpt_lib  # noqa: E402
from training import loop  # noqa: E402
from training import mesh as mesh_lib  # noqa: E402

MESHES = {  # name -> (devices, mesh overrides)
    '1': (1, dict(data=1, fsdp=1, tensor=1)),
    'data8': (8, dict(data=8, fsdp=1, tensor=1)),
    'fsdp8': (8, dict(data=1, fsdp=8, tensor=1)),
    'd2f2t2': (8, dict(data=2, fsdp=2, tensor=2)),
}


def config(mesh: dict, **overrides):
  over = {'train.batch_size': 8, 'train.steps': 10, 'train.warmup_steps': 2,
          **{f'mesh.{k}': v for k, v in mesh.items()}, **overrides}
  return schema.apply_overrides(default.get_config('tiny'), over)


def batches(cfg, n: int = 3) -> list:
  rng = np.random.default_rng(0)
  out = []
  for _ in range(n):
    tokens = rng.integers(0, 256, (cfg.train.batch_size, cfg.data.seq_len + 1), np.int32)
    out.append({'inputs': tokens[:, :-1], 'targets': tokens[:, 1:],
                'weights': np.ones((cfg.train.batch_size, cfg.data.seq_len), np.float32)})
  return out


def run_steps(s, state, bs) -> tuple:
  losses = []
  for b in bs:
    state, m = s.train_step(state, mesh_lib.put_batch(b, s.mesh))
    losses.append(float(m['loss']))
  return state, losses


def describe(x: jax.Array) -> dict:
  """Where an array lives: its spec, global shape and the first device's shard shape."""
  return {'spec': str(x.sharding.spec), 'shape': list(x.shape),
          'shard': list(x.addressable_shards[0].data.shape), 'devices': len(x.sharding.device_set)}


def meshes() -> dict:
  out = {}
  for scanned in (False, True):
    for name, (n, mesh) in MESHES.items():
      if scanned and name != 'd2f2t2':
        continue
      cfg = config(mesh, **{'model.scan_layers': scanned, 'model.remat': 'full' if scanned
                            else 'none'})
      s = loop.setup(cfg, devices=jax.devices()[:n])
      state, losses = run_steps(s, s.init_state(), batches(cfg))
      p = state.params
      layer = p['layers'] if scanned else p['layers'][0]
      out[name + ('_scan' if scanned else '')] = {
          'losses': losses, 'embedding': describe(p['embed']['embedding'][...]),
          'up': describe(layer['mlp']['up']['kernel'][...]),
          'q': describe(layer['attn']['q']['kernel'][...]),
          'adam_mu_up': describe(_adam_mu_of_up(state))}
  return out


def _adam_mu_of_up(state):
  """Adam's first moment of the first MLP up-projection (optimizer state is sharded too)."""
  for leaf_path, leaf in jax.tree_util.tree_leaves_with_path(state.opt_state):
    path = jax.tree_util.keystr(leaf_path)
    if 'mu' in path and "'up'" in path and "'kernel'" in path:
      return leaf
  raise KeyError('no Adam mu for mlp.up.kernel')


def reshard(workdir: str) -> dict:
  cfg8 = config(MESHES['fsdp8'][1])
  s8 = loop.setup(cfg8)
  state, _ = run_steps(s8, s8.init_state(), batches(cfg8)[:2])
  saver = ckpt_lib.Checkpointer(workdir)
  saver.save(2, state)
  saver.close()
  _, ref = run_steps(s8, state, batches(cfg8)[2:])
  out = {'fsdp8': ref[0]}
  for n, mesh in ((1, MESHES['1'][1]), (2, dict(data=1, fsdp=2, tensor=1))):
    s = loop.setup(config(mesh), devices=jax.devices()[:n])
    restored = ckpt_lib.Checkpointer(workdir, read_only=True).restore(s.abstract_state)
    info = {'step': int(restored.step),
            'up': describe(restored.params['layers'][0]['mlp']['up']['kernel'][...])}
    _, losses = run_steps(s, restored, batches(cfg8)[2:])   # donates `restored`
    out[f'devices{n}'] = {'loss': losses[0], **info}
  return out


if __name__ == '__main__':
  if MODE == 'meshes':
    result = meshes()
  elif MODE == 'reshard':
    result = reshard(sys.argv[3])
  elif MODE == 'meshes+reshard':
    result = {'meshes': meshes(), 'reshard': reshard(sys.argv[3])}
  else:
    raise SystemExit(f'unknown mode {MODE!r}')
  print(json.dumps(result))
