"""Benchmarks through lm-eval-harness: python evaluate.py --workdir=DIR --tasks=lmx_python[,...].

Runs lm-eval tasks (its own, and YAML tasks in evals/tasks/ or --include_path folders) on the
workdir's latest checkpoint through evals/lm_eval_adapter.py, prints lm-eval's results table and
writes the results to DIR/eval_results.json (or --output). Task names, flags, the workdir and
what the model kind can answer are checked before anything compiles.
"""
from workdir import hostenv

hostenv.ensure_fast_malloc()

import logging as std_logging
import os

from absl import app, flags, logging

from evals import harness
from workdir.files import WorkdirError
from workdir.load import load_workdir

_WORKDIR = flags.DEFINE_string('workdir', None, 'A training (or imported) workdir.',
                               required=True)
_TASKS = flags.DEFINE_list('tasks', None, 'lm-eval task, group or tag names (comma-separated); '
                           'lmx_python: the shipped offline tasks (evals/tasks/).', required=True)
_INCLUDE = flags.DEFINE_list('include_path', [], 'More folders of lm-eval task YAML files.')
_NUM_FEWSHOT = flags.DEFINE_integer('num_fewshot', None, 'Few-shot examples (default: each '
                                    "task's own, else 0).")
_LIMIT = flags.DEFINE_float('limit', None, 'Documents per task: a count (>= 1) or a fraction '
                            '(< 1).')
_BATCH = flags.DEFINE_integer('batch_size', 16, 'Rows per jitted forward / decode batch.')
_MAX_LENGTH = flags.DEFINE_integer('max_length', 0, 'Longest row the model reads (0: '
                                   'model.max_len); rolling windows have this many tokens.')
_MAX_GEN = flags.DEFINE_integer('max_gen_toks', 256, 'generate_until tokens when a task sets '
                                'none.')
_SEED = flags.DEFINE_integer('seed', 0, 'Seed of few-shot selection and of sampling tasks.')
_OUTPUT = flags.DEFINE_string('output', None, 'Results JSON (default: WORKDIR/eval_results.json).')
_LOG_SAMPLES = flags.DEFINE_bool('log_samples', False, 'Keep every request and response in the '
                                 'results JSON.')


def check_flags() -> None:
  if _BATCH.value < 1:
    raise SystemExit(f'error: --batch_size={_BATCH.value} must be >= 1.')
  if _MAX_LENGTH.value < 0:
    raise SystemExit(f'error: --max_length={_MAX_LENGTH.value} must be >= 0 (0: model.max_len).')
  if _MAX_GEN.value < 1:
    raise SystemExit(f'error: --max_gen_toks={_MAX_GEN.value} must be >= 1.')
  if _LIMIT.value is not None and not (_LIMIT.value >= 1 and _LIMIT.value.is_integer()
                                       or 0 < _LIMIT.value < 1):
    raise SystemExit(f'error: --limit={_LIMIT.value:g} must be a whole count >= 1 or a '
                     'fraction in (0, 1).')
  if _NUM_FEWSHOT.value is not None and _NUM_FEWSHOT.value < 0:
    raise SystemExit(f'error: --num_fewshot={_NUM_FEWSHOT.value} must be >= 0.')
  if not _TASKS.value:
    raise SystemExit('error: --tasks is empty; name at least one lm-eval task.')


def main(argv):
  del argv
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)
    std_logging.getLogger('lm_eval').setLevel(std_logging.ERROR)
  check_flags()
  try:
    manager = harness.task_manager(_TASKS.value, tuple(_INCLUDE.value))
    loaded = load_workdir(_WORKDIR.value)
  except (ValueError, WorkdirError) as e:
    raise SystemExit(f'error: {e}') from None
  from evals.lm_eval_adapter import LmxLM  # pylint: disable=import-outside-toplevel
  try:
    lm = LmxLM(loaded, batch_size=_BATCH.value, max_length=_MAX_LENGTH.value or None,
               max_gen_toks=_MAX_GEN.value, seed=_SEED.value)
    types = harness.output_types(manager, _TASKS.value)
    try:
      lm.check_output_types(types.values())
    except ValueError as e:
      raise ValueError(f'--workdir={_WORKDIR.value}: {e} (--tasks: '
                       f'{", ".join(f"{t} is {k}" for t, k in sorted(types.items()))}).') from None
  except ValueError as e:
    raise SystemExit(f'error: {e}') from None

  import lm_eval  # pylint: disable=import-outside-toplevel
  from lm_eval.utils import make_table  # pylint: disable=import-outside-toplevel
  limit = None if _LIMIT.value is None else (int(_LIMIT.value) if _LIMIT.value >= 1
                                             else _LIMIT.value)
  results = lm_eval.simple_evaluate(
      model=lm, tasks=_TASKS.value, task_manager=manager, num_fewshot=_NUM_FEWSHOT.value,
      limit=limit, log_samples=_LOG_SAMPLES.value, random_seed=_SEED.value,
      numpy_random_seed=_SEED.value, fewshot_random_seed=_SEED.value)
  results['config']['workdir'] = os.path.abspath(_WORKDIR.value)
  print(f'{_WORKDIR.value} (step {loaded.step}):')
  print(make_table(results))
  if results.get('groups'):
    print(make_table(results, 'groups'))
  output = _OUTPUT.value or os.path.join(_WORKDIR.value, 'eval_results.json')
  harness.write_results(results, output)
  print(f'Results: {output}')


if __name__ == '__main__':
  app.run(main)
