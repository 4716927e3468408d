"""The import order of DESIGN.md, checked by walking every module's imports with `ast`.

CLIs -> sweeps, evals -> training, sampling, interop -> workdir -> text, models, configs.base/schema.
A unit may import its own package and units of lower layers only: never a peer (training and
sampling are peers), never upwards, so no two packages can import each other. Experiment files
(configs/*.py besides base/schema, configs/sweeps/) sit on top; tests/ and benchmarks/ are not
library code and are not checked.
"""
from __future__ import annotations

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

LAYERS = (  # bottom first
    ('configs.base/schema', 'models', 'text'),
    ('workdir',),
    ('training', 'sampling', 'interop'),
    ('sweeps', 'evals'),
    ('train', 'sample', 'sweep', 'prepare', 'evaluate'),  # the CLIs
    ('configs',),                             # experiment files
)
RANK = {unit: i for i, layer in enumerate(LAYERS) for unit in layer}
NOT_LIBRARY = ('tests', 'benchmarks', 'docs', 'runs', 'build')


def unit_of(module: str) -> str:
  """'configs.base/schema' (one unit), 'configs' for experiment files, else the top package."""
  parts = module.split('.')
  if parts[0] == 'configs':
    return 'configs.base/schema' if module in ('configs.base', 'configs.schema') else 'configs'
  return parts[0]


def sources(root: str) -> dict[str, str]:
  """{module name: path} of every project .py file outside tests/benchmarks and hidden dirs."""
  out = {}
  for dirpath, dirnames, filenames in os.walk(root):
    rel = os.path.relpath(dirpath, root)
    dirnames[:] = [d for d in dirnames if not d.startswith(('.', '_')) and not d.endswith(
        '.egg-info') and (rel != '.' or d not in NOT_LIBRARY)]
    for name in filenames:
      if name.endswith('.py'):
        parts = [] if rel == '.' else rel.split(os.sep)
        stem = name[:-3]
        module = '.'.join(parts + ([] if stem == '__init__' else [stem]))
        out[module] = os.path.join(dirpath, name)
  return out


def _is_module(root: str, module: str) -> bool:
  path = os.path.join(root, *module.split('.'))
  return os.path.isfile(path + '.py') or os.path.isfile(os.path.join(path, '__init__.py'))


def imports(root: str, module: str, path: str) -> list[tuple[int, str]]:
  """(line, imported project module) of every import in the file, function-local ones too."""
  with open(path) as f:
    tree = ast.parse(f.read(), path)
  package = module if path.endswith('__init__.py') else module.rpartition('.')[0]
  out = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      out += [(node.lineno, a.name) for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ''
      if node.level:
        anchor = package.split('.')[:len(package.split('.')) - node.level + 1]
        base = '.'.join([p for p in anchor if p] + ([base] if base else []))
      for a in node.names:
        sub = f'{base}.{a.name}' if base else a.name
        out.append((node.lineno, sub if _is_module(root, sub) else base))
  return sorted({(line, m) for line, m in out if m and _is_module(root, m.split('.')[0])})


def violations(root: str) -> list[str]:
  """Every import against the order, every unit missing from LAYERS, every package cycle."""
  problems, edges = [], {}
  for module, path in sorted(sources(root).items()):
    if not module:
      continue
    src = unit_of(module)
    if src not in RANK:
      problems.append(f'{path}: {src}/ is in no layer of tests/test_layering.py; add it there.')
      continue
    for line, target in imports(root, module, path):
      dst = unit_of(target)
      if dst == src:
        continue
      edges.setdefault(src, set()).add(dst)
      where = f'{os.path.relpath(path, root)}:{line} imports {target}'
      if dst not in RANK:
        problems.append(f'{where}: {dst} is not library code (or in no layer).')
      elif RANK[dst] >= RANK[src]:
        kind = 'a peer' if RANK[dst] == RANK[src] else 'a higher layer'
        problems.append(f'{where}: {src} may not import {dst} ({kind}).')
  problems += [f'package cycle: {" -> ".join(c)}' for c in cycles(edges)]
  return problems


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
  """One cycle per strongly connected group of units that import each other."""
  found, done = [], set()

  def visit(node, stack):
    if node in stack:
      found.append(stack[stack.index(node):] + [node])
      return
    if node in done:
      return
    for nxt in sorted(edges.get(node, ())):
      visit(nxt, stack + [node])
    done.add(node)

  for node in sorted(edges):
    visit(node, [])
  return found


def test_the_codebase_follows_the_import_order():
  problems = violations(ROOT)
  assert not problems, '\n'.join(problems)


def test_every_library_package_is_walked():
  units = {unit_of(m) for m in sources(ROOT) if m}
  assert {'models', 'text', 'workdir', 'training', 'sampling', 'interop', 'sweeps',
          'configs.base/schema', 'train', 'sample', 'evals', 'evaluate'} <= units


def _write(root, files: dict[str, str]) -> str:
  for rel, text in files.items():
    path = os.path.join(root, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'w') as f:
      f.write(text)
  return str(root)


@pytest.mark.parametrize('files, expected', [
    ({'sampling/load.py': 'from training import loop\n', 'training/loop.py': ''},
     'sampling may not import training (a peer)'),
    ({'models/a.py': 'from configs import default\n', 'configs/default.py': ''},
     'models may not import configs (a higher layer)'),
    ({'models/a.py': 'import workdir.files\n', 'workdir/files.py': ''},
     'models may not import workdir (a higher layer)'),
    ({'text/a.py': 'def f():\n  from . import b\n  from models import x\n', 'text/b.py': '',
      'models/x.py': ''}, 'text may not import models (a peer)'),
    ({'workdir/a.py': 'from text import t\n', 'text/t.py': 'from workdir import a\n'},
     'package cycle: text -> workdir -> text'),
    ({'newpkg/a.py': ''}, 'newpkg/ is in no layer'),
])
def test_violations_are_found(tmp_path, files, expected):
  files = {**files, **{f'{d}/__init__.py': '' for d in {p.split('/')[0] for p in files}}}
  problems = violations(_write(tmp_path, files))
  assert any(expected in p for p in problems), problems


def test_imports_within_a_package_and_downwards_pass(tmp_path):
  files = {'training/loop.py': 'from training import data\nfrom workdir import files\n'
                               'from configs import schema\nimport numpy\n',
           'training/data.py': 'from text.tokenizer import T\n', 'text/tokenizer.py': '',
           'workdir/files.py': 'from configs.schema import X\n', 'configs/schema.py': '',
           'configs/default.py': 'from training import loop\n'}
  files.update({f'{d}/__init__.py': '' for d in ('training', 'text', 'workdir', 'configs')})
  assert violations(_write(tmp_path, files)) == []
