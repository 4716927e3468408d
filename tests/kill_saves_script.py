"""kill -9 inside checkpoint saves, at many distinct points (tests/test_kill_saves.py runs it).

python tests/kill_saves_script.py ROOT POINTS SEED [JOBS=2] ; prints one JSON line (the last line).

This process imports everything once and never starts a JAX backend; each kill point is a
forked child that saves a small state and data position at steps 1..STEPS (keep=1, so every
seal prunes) and SIGKILLs itself at the K-th file-system call of one phase of the save path
(os/io/shutil calls made by orbax's writes and commit, grain's iterator state, the sha256
manifest and the pruning), or after a seeded random delay (tensorstore's writes, which are C++). A second child
then reruns: restores the newest usable step, checks it, finishes the saves and checks the end.
"""
import builtins
import collections
import io
import json
import os
import random
import shutil
import signal
import sys
import threading
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import grain  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

from training import checkpoint as ckpt_lib  # noqa: E402
from training.state import TrainState  # noqa: E402

STEPS = 3
HOOKED = [(os, 'rename'), (os, 'replace'), (os, 'fsync'), (os, 'mkdir'), (os, 'makedirs'),
          (os, 'rmdir'), (os, 'remove'), (os, 'unlink'), (shutil, 'rmtree'), (builtins, 'open'),
          (io, 'open')]


def state_of(step: int) -> TrainState:
  """The train state saved at `step` (what an uninterrupted run has there)."""
  base = np.arange(64 * 48, dtype=np.float32).reshape(64, 48)
  # Built in numpy, then put on the device: jnp's eager ops would each compile (in every child,
  # half of a writer's CPU time).
  return jax.device_put(TrainState(
      step=np.int32(step), params={'w': base * np.float32(step), 'b': np.full((48,), -step,
                                                                                np.float32)},
      opt_state={'mu': base * np.float32(0.5 * step)},   # the train item: params its own
      rng=np.asarray([0, step], np.uint32)))


def data_iter():
  return iter(grain.MapDataset.range(1000).to_iter_dataset())


def phase() -> str:
  """Which part of the save path the current (hooked) call comes from."""
  frames = traceback.extract_stack()[:-2]   # without phase() and the hook
  files = ' '.join(f.filename for f in frames)
  names = {f.name for f in frames}
  if 'integrity.py' in files:
    return 'checksums'
  if '_seal' in names and 'delete' in names:
    return 'pruning'
  if 'grain' in files:
    return 'data position'
  return 'orbax write/commit'


def install_kill(kill_at: str | None, log_fd: int) -> list:
  """SIGKILL this process at the hooked call `kill_at` ('PHASE#N': the N-th call of that phase,
  any thread); logs where. Counted within a phase, a point stays in its phase when orbax's threads
  interleave differently from the counting run (a global count drifted out of the few data
  position calls under load). Returns the call counter ([n]). kill_at None: log every call."""
  lock, count, per_phase = threading.Lock(), [0], collections.Counter()

  def wrap(module, name, original):
    def hooked(*args, **kwargs):
      if name == 'open' and not any(c in str(args[1] if len(args) > 1 else kwargs.get('mode', 'r'))
                                    for c in 'wax+'):
        return original(*args, **kwargs)
      with lock:
        count[0] += 1
        where = phase()
        per_phase[where] += 1
        point = f'{where}#{per_phase[where]}'
        if kill_at is None:   # counting run: log each call's point
          os.write(log_fd, json.dumps({'call': point, 'phase': where}).encode() + b'\n')
        elif point == kill_at:
          os.write(log_fd, json.dumps({'killed': f'{module.__name__}.{name}',
                                       'phase': where}).encode() + b'\n')
          os.kill(os.getpid(), signal.SIGKILL)
      return original(*args, **kwargs)
    return hooked

  for module, name in HOOKED:
    setattr(module, name, wrap(module, name, getattr(module, name)))
  return count


def writer(workdir: str, log_fd: int, kill_at: str | None, delay: float | None,
           hooked: bool = True) -> None:
  count = install_kill(kill_at, log_fd) if hooked else [0]
  it = data_iter()
  saver = ckpt_lib.Checkpointer(workdir, keep=1)
  os.write(log_fd, json.dumps({'start': time.time()}).encode() + b'\n')
  if delay is not None:   # from the first save on
    threading.Timer(delay, lambda: (os.write(log_fd, b'{"killed": "timer", "phase": "timed"}\n'),
                                    os.kill(os.getpid(), signal.SIGKILL))).start()
  for step in range(1, STEPS + 1):
    next(it)
    os.write(log_fd, json.dumps({'begin': step}).encode() + b'\n')
    saver.save(step, state_of(step), it)
    if step > 1:
      os.write(log_fd, json.dumps({'sealed': step - 1}).encode() + b'\n')
  saver.close()
  os.write(log_fd, json.dumps({'sealed': STEPS, 'calls': count[0], 'end': time.time()}).encode()
           + b'\n')


def rerun(workdir: str, log_fd: int) -> None:
  """Restore, check, finish the saves, check the end; writes one JSON line (with the traceback
  when it fails, for the test's message)."""
  try:
    out = _rerun(workdir)
  except BaseException:
    os.write(log_fd, json.dumps({'rerun': {'error': traceback.format_exc()[-2000:]}}).encode()
             + b'\n')
    raise
  os.write(log_fd, json.dumps({'rerun': out}).encode() + b'\n')


def _rerun(workdir: str) -> dict:
  out = {}
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                          state_of(1))
  saver = ckpt_lib.Checkpointer(workdir, keep=1)
  it = data_iter()
  try:
    state = saver.restore(abstract, it)
    out['restored'] = saver.restored_step
    expected = state_of(saver.restored_step)
    out['bitwise'] = all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in
                         zip(jax.tree.leaves(state), jax.tree.leaves(expected), strict=True))
    out['data_ok'] = int(next(it)) == saver.restored_step   # element r: step r+1's batch
    start, taken = saver.restored_step, True
  except ckpt_lib.WorkdirError as e:
    out['restored'], out['error'], start, taken = None, str(e)[:300], 0, False
  for step in range(start + 1, STEPS + 1):
    if not taken:
      next(it)
    taken = False
    saver.save(step, state_of(step), it)
  saver.close()
  root = os.path.join(workdir, 'checkpoints')
  out['left'] = sorted(os.listdir(root))
  out['tmp_files'] = [os.path.join(r, f) for r, ds, fs in os.walk(root) for f in fs + ds
                      if 'tmp' in f]
  final = ckpt_lib.Checkpointer(workdir, read_only=True).restore(abstract)
  out['final_equal'] = all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in
                           zip(jax.tree.leaves(final), jax.tree.leaves(state_of(STEPS)),
                               strict=True))
  return out


def fork(fn, *args) -> int:
  """Runs fn(*args) in a forked child; returns its pid."""
  pid = os.fork()
  if pid == 0:
    code = 0
    try:
      fn(*args)
    except BaseException:  # noqa: BLE001
      traceback.print_exc()
      code = 1
    os._exit(code)
  return pid


def fork_and_wait(fn, *args) -> int:
  return os.waitpid(fork(fn, *args), 0)[1]


def read_log(path: str) -> list[dict]:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def main(root: str, points: int, seed: int, jobs: int = 2) -> None:
  # The hooked calls of an uninterrupted run and their phases, to spread the kill points.
  fd = os.open(os.path.join(root, 'count.log'), os.O_WRONLY | os.O_CREAT)
  assert fork_and_wait(writer, os.path.join(root, 'count'), fd, None, None) == 0
  os.close(fd)
  counted = read_log(os.path.join(root, 'count.log'))
  calls = {x['call']: x['phase'] for x in counted if 'call' in x}
  duration = counted[-1]['end'] - next(x['start'] for x in counted if 'start' in x)
  rng = random.Random(seed)
  timed = max(points // 6, 1)
  # Every call of the checksums and the data position, a quarter of the hooked points in the
  # pruning (rmtree makes one call per file), the rest in orbax's writes and commit.
  by_phase = {}
  for k, p in calls.items():   # in call order
    by_phase.setdefault(p, []).append(k)
  hooks = points - timed
  chosen = set(by_phase.get('checksums', []) + by_phase.get('data position', []))
  pruning = by_phase.get('pruning', [])
  chosen |= set(rng.sample(pruning, min(len(pruning), hooks // 4)))
  rest = by_phase.get('orbax write/commit', [])
  chosen |= set(rng.sample(rest, max(0, min(len(rest), hooks - len(chosen)))))
  plan = [('hook', k) for k in calls if k in chosen]
  plan += [('timer', round(rng.uniform(0.0, duration), 3)) for _ in range(timed)]
  # Each point: its writer child, then its rerun child; `jobs` points at a time (the points
  # are independent folders; the parent stays single-threaded and reaps with os.wait).
  results, running, todo = [None] * len(plan), {}, list(enumerate(plan))

  def start_writer(i, how, where):
    workdir, log = os.path.join(root, f'p{i}'), os.path.join(root, f'p{i}.log')
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    pid = fork(writer, workdir, fd, where if how == 'hook' else None,
               where if how == 'timer' else None, how == 'hook')
    running[pid] = ('writer', i, how, where, fd, None)

  while todo or running:
    while todo and len(running) < jobs:
      i, (how, where) = todo.pop(0)
      start_writer(i, how, where)
    pid, status = os.wait()
    if pid not in running:   # not one of ours
      continue
    stage, i, how, where, fd, writer_status = running.pop(pid)
    workdir, log = os.path.join(root, f'p{i}'), os.path.join(root, f'p{i}.log')
    if stage == 'writer':
      writer_lines = len(read_log(log))
      running[fork(rerun, workdir, fd)] = ('rerun', i, how, where, fd, (status, writer_lines))
      continue
    os.close(fd)
    (status, writer_lines), rerun_status = writer_status, status
    lines = read_log(log)
    written = lines[:writer_lines]
    results[i] = {
        'how': how, 'where': where, 'killed': next((x for x in written if 'killed' in x), None),
        'signaled': os.WIFSIGNALED(status), 'rerun_status': rerun_status,
        'begun': max([x['begin'] for x in written if 'begin' in x], default=0),
        'sealed': max([x['sealed'] for x in written if 'sealed' in x], default=0),
        'rerun': next((x['rerun'] for x in lines if 'rerun' in x), None)}
  print(json.dumps({'calls': calls, 'duration': duration, 'results': results}))


if __name__ == '__main__':
  main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), *map(int, sys.argv[4:5]))
