"""Shared test set-up: the repository root on sys.path, small deterministic configs."""
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)
os.environ.setdefault('LMX_NO_REEXEC', '1')  # subprocess CLIs inherit the test's environment
# Many tests compile the same tiny programs: share compilations across tests and subprocesses.
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR',
                      os.path.join(tempfile.gettempdir(), f'lmx-jax-cache-{os.getuid()}'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.2')
# LLVM code generation at -O0 without its expensive passes (jax's `disable_most_optimizations`;
# XLA's HLO passes, fusion and scheduling are unchanged, and so is what is computed): compiling
# is 2-3x cheaper (tiny model's init 4.0 -> 1.4 CPU-s, train step 4.4 -> 2.0) and the tests'
# programs run few steps. An environment variable, so the CLIs the tests launch inherit it even
# where a test sets its own XLA_FLAGS. JAX_DISABLE_MOST_OPTIMIZATIONS=0 tests optimised code.
# With it, workdir/hostenv.py also picks XLA's cheaper-to-compile emitters (its docstring).
os.environ.setdefault('JAX_DISABLE_MOST_OPTIMIZATIONS', '1')
# The XLA:CPU flags the CLIs set (workdir/hostenv.py), so that in-process runs compile the same
# kernels as the CLI subprocesses they are compared with bitwise (set before JAX initialises).
from workdir import hostenv  # noqa: E402

hostenv.configure_xla_cpu()
# Token caches of the tests' corpora (data.cache_dir's default) in /tmp, not the user's home.
os.environ.setdefault('LMX_CACHE_DIR',
                      os.path.join(tempfile.gettempdir(), f'lmx-token-cache-{os.getuid()}'))

import pytest  # noqa: E402

from configs import default, schema  # noqa: E402


@pytest.fixture
def tiny_config():
  """The tiny decoder config, with overrides: tiny_config({'model.num_kv_heads': 1})."""
  return lambda overrides=None: schema.apply_overrides(default.get_config('tiny'), overrides or {})


def run_cli(*args: str, timeout: float = 300, env: dict | None = None):
  """`python ARGS...` run in the repository root: the CompletedProcess, with text stdout/stderr."""
  return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=timeout)


@pytest.fixture(scope='session')
def trained(tmp_path_factory):
  """A finished tiny run with checkpoints 10, 15, 20 (keep 3), and its config. Read-only: copy
  the workdir before changing it."""
  from training import loop
  cfg = schema.apply_overrides(default.get_config('tiny'), {
      'train.steps': 20, 'train.checkpoint_every': 5, 'train.log_every': 1,
      'train.eval_every': 100})
  workdir = str(tmp_path_factory.mktemp('trained'))
  loop.train(cfg, workdir)
  return cfg, workdir


def _module_fixture_user(item) -> bool:
  info = getattr(item, '_fixtureinfo', None)
  defs = info.name2fixturedefs if info else {}
  return any(d and d[-1].scope == 'module' for d in (defs.get(n) for n in item.fixturenames))


def _tag_group(item, group: str) -> None:
  """The id suffix `@group` by which pytest-xdist's loadgroup scheduler groups tests. xdist 3.8
  writes it to item._nodeid, which pytest 9.2 no longer reads (the id is item._id, a NodeId), so
  its loadgroup silently spreads a group over the workers; written here for either pytest."""
  nodeid = item.nodeid
  if nodeid.endswith(f'@{group}'):
    return
  if hasattr(item, '_id'):
    item._id = type(item._id).parse(f'{nodeid}@{group}')
  else:
    item._nodeid = f'{nodeid}@{group}'
  assert item.nodeid == f'{nodeid}@{group}', item.nodeid


def pytest_collection_modifyitems(config, items):
  """For pytest-xdist (`make test` runs `-n auto --dist loadgroup`): tests sharing a module-scoped
  fixture stay on one worker (one group a file, unless the test names its own `xdist_group`),
  and the units holding slow tests are sent first, then groups, largest first, so that the run
  does not end on one long test alone. Each unit keeps its own order."""
  units = {}
  for i, item in enumerate(items):
    if item.get_closest_marker('xdist_group') is None and _module_fixture_user(item):
      item.add_marker(pytest.mark.xdist_group(os.path.basename(item.path)))
    mark = item.get_closest_marker('xdist_group')
    if mark and getattr(config.option, 'loadgroup', False):   # an xdist worker, --dist loadgroup
      _tag_group(item, mark.args[0])
    units.setdefault(mark.args[0] if mark else f'#{i}', []).append(item)
  order = sorted(units.values(), key=lambda unit: (
      not any(it.get_closest_marker('slow') for it in unit), -len(unit)))
  items[:] = [it for unit in order for it in unit]
