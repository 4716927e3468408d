"""Running lm-eval tasks on a workdir: finding the tasks, checking them, writing the results.

Tasks are lm-eval's: its own (which download their data from the Hugging Face hub unless the
`datasets` cache has it) and YAML tasks in local folders, always `evals/tasks/` (the shipped
offline ones, tag `lmx_python`) plus any `include_paths`. Only when a name is not a local task
is lm-eval's full index (~15,000 tasks, several seconds) built.
"""
from __future__ import annotations

import difflib
import json
import os

LOCAL_TASKS = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'tasks')


def task_manager(names: list[str], include_paths: tuple[str, ...] = ()):
  """A TaskManager that knows every one of `names` (tasks, groups or tags); raises
  ValueError naming the unknown ones and how to list what exists. Nothing is loaded yet."""
  from lm_eval.tasks import TaskManager  # pylint: disable=import-outside-toplevel
  for path in include_paths:
    if not os.path.isdir(path):
      raise ValueError(f'--include_path={path}: no such folder (a folder of lm-eval task YAML '
                       'files).')
  paths = [LOCAL_TASKS, *include_paths]
  manager = TaskManager(include_path=paths, include_defaults=False)
  if _unknown(manager, names):
    manager = TaskManager(include_path=paths)
  unknown = _unknown(manager, names)
  if unknown:
    hints = [f"'{n}'" + (f" (did you mean '{close[0]}'?)" if (close := difflib.get_close_matches(
        n, manager.all_tasks, n=1)) else '') for n in unknown]
    raise ValueError(
        f'--tasks: unknown lm-eval task{"s" if len(unknown) > 1 else ""} {", ".join(hints)}. '
        f'List the tasks with `lm-eval ls tasks --include_path {LOCAL_TASKS}` (the lm-eval CLI '
        f'in the virtual environment); local tasks are YAML files in {LOCAL_TASKS}/ or in a '
        'folder given with --include_path.')
  return manager


def _unknown(manager, names: list[str]) -> list[str]:
  known = set(manager.all_tasks)
  return [n for n in names if n not in known]


def output_types(manager, names: list[str]) -> dict[str, str]:
  """{task: output_type} of every task `names` expand to (groups and tags included); this
  builds the tasks (reads their data) but compiles nothing."""
  loaded = manager.load(names)
  return {name: task.OUTPUT_TYPE for name, task in loaded['tasks'].items()}


def write_results(results: dict, path: str) -> None:
  """lm-eval's results (minus per-sample logs unless kept) as JSON, written atomically."""
  from lm_eval.utils import handle_non_serializable  # pylint: disable=import-outside-toplevel
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  tmp = f'{path}.tmp'
  with open(tmp, 'w') as f:
    json.dump(results, f, indent=2, default=handle_non_serializable, ensure_ascii=False)
  os.replace(tmp, path)
