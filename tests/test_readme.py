"""Every command the README shows, taken from the README text itself, run in README order.

Commands: lines of ```bash blocks that start with `.venv/bin/python` (backslash continuations
joined, `# comments` and `[optional]` arguments dropped), `python ...` lines of plain blocks,
and `$ python ...` lines whose documented output (the lines after them) must appear in what
they print; ```python blocks run as scripts. All of them share one folder (a mirror of the
checkout, so `runs/...` paths land there) and run with LMX_MAX_STEPS=1
(configs.schema.cap_steps: one step, evaluated and checkpointed; the commands' exit codes and
output are what is checked; 3 steps made this file 110 s instead of 97 s on 2 cores with a cold
compilation cache), and LMX_MAX_TRIALS=1
(sweeps.spec.cap_trials), so each sweep runs one trial (three for a scaling fit); the
sweep tests (tests/test_sweeps.py, test_search.py) run whole sweeps of several trials. The Hugging Face commands
read a tiny Llama the test saves at the README's `path/to/Llama-3.2-1B`, and fine-tune on a
`notes/` folder it writes; the "Your data" commands read `corpus/*.jsonl.gz`,
`extra/*.parquet` and a `tokenizer.json` it writes. HOME is the shared folder, so token caches (~/.cache/lmx) stay inside the test.
Commands that name the same `runs/` folder stay in README order on one pytest-xdist worker.
A command that exits non-zero (or lacks its documented output) fails. SKIPS lists, with
reasons, the commands that cannot run here; sweep commands are slow-marked.
"""
import os
import re
import shlex
import subprocess
import sys

import pytest

from tests.conftest import ROOT

MAX_STEPS = '1'
MAX_TRIALS = '1'
# Substring of a command -> why it is not run here.
SKIPS = {
    'make ': 'the make targets: `make test` is this suite, `make demo` trains the full default '
             'model (its train.py and sample.py commands are the ones below)',
    '--coordinator_address': 'needs a second host',
    'configs/gpt2.py': 'GPT-2 124M on 8 devices takes minutes a step on CPU; tests/test_scale.py '
                       'trains its :smoke variant on 8 simulated devices',
    '--backend=ray': 'tests/test_sweeps.py runs a sweep on the Ray backend (a trial whose losses '
                     "match the local backend's, a failing trial reported); here the command "
                     'would only start Ray to skip the trials the command before it finished',
    'sweeps/scaling.py --workdir': "under this test's caps (3 trials, seed 0, one step) it trains "
                                   'the same three widths as the `:quick` command after it, '
                                   'through the same code; tests/test_sweeps.py validates all 10 '
                                   'of its trials',
    '--tasks=hellaswag': "lm-eval's own tasks download their data from the Hugging Face hub "
                         '(no network here); the lmx_python command runs the shipped offline '
                         'tasks through the same code',
}
SLOW = ('sweep.py',)
NOT_MIRRORED = {'.git', '.venv', 'runs', 'exported', 'notes', 'path', 'corpus', 'extra',
                'tokenizer.json', 'tokenizer_config.json'}


def _commands_of_shell_block(text: str) -> list[str]:
  out = []
  for line in text.replace('\\\n', ' ').splitlines():
    words = [w for w in shlex.split(line, comments=True)
             if not (w.startswith('[') and w.endswith(']'))]
    if words:
      out.append(shlex.join(words))
  return out


def readme_commands(path: str = os.path.join(ROOT, 'README.md')) -> list[tuple]:
  """[(kind, text, expected output lines)] in README order; kind 'shell' or 'python'."""
  with open(path) as f:
    readme = f.read()
  out = []
  for lang, body in re.findall(r'^```(\w*)\n(.*?)^```', readme, flags=re.S | re.M):
    if lang == 'bash':
      out += [('shell', c, []) for c in _commands_of_shell_block(body)]
    elif lang == 'python':
      out.append(('python', body, []))
    elif lang == '':
      lines = body.splitlines()
      for i, line in enumerate(lines):
        if line.startswith('$ '):
          expected = []
          for nxt in lines[i + 1:]:
            if not nxt.strip() or nxt.startswith('$ '):
              break
            expected.append(nxt)
          out.append(('shell', line[2:], expected))
        elif line.startswith('python '):
          out.append(('shell', line, []))
  return out


def _params():
  params = []
  for i, (kind, text, expected) in enumerate(readme_commands()):
    first = text.strip().splitlines()[0][:70]
    marks = []
    skip = None
    if kind == 'shell':
      skip = next((why for key, why in SKIPS.items() if key in text), None)
    if kind == 'python':
      try:
        compile(text, 'README.md', 'exec')
      except SyntaxError:
        skip = 'an illustrative fragment (not a whole program)'
    if skip:
      marks.append(pytest.mark.skip(reason=skip))
    if any(s in text for s in SLOW):
      marks.append(pytest.mark.slow)
    # Commands on one runs/ folder run in README order on one pytest-xdist worker; the others
    # anywhere (each worker builds its own `checkout`).
    workdir = re.search(r'runs/[\w./-]+', text)
    marks.append(pytest.mark.xdist_group(f'readme {workdir.group() if workdir else i}'))
    params.append(pytest.param(kind, text, expected, marks=marks, id=f'{i:02d} {first}'))
  return params


@pytest.fixture(scope='module')
def checkout(tmp_path_factory):
  """A folder mirroring the checkout (symlinks), with the inputs the README's commands name."""
  root = tmp_path_factory.mktemp('readme')
  for name in os.listdir(ROOT):
    if name not in NOT_MIRRORED and not name.startswith('.'):
      os.symlink(os.path.join(ROOT, name), root / name)
  (root / 'notes').mkdir()
  _write_corpus(root)
  try:
    import transformers
    from tests.hf_models import COMMON, FAMILIES, TEXT, write_tokenizer
  except (ImportError, pytest.skip.Exception):
    return root   # no torch/transformers: the HF commands fail and say why
  for i in range(4):
    (root / 'notes' / f'{i}.txt').write_text(TEXT * 20)
  hf = root / 'path' / 'to' / 'Llama-3.2-1B'
  config_cls, model_cls, extra = FAMILIES['llama']   # long enough for sample.py's defaults
  config = getattr(transformers, config_cls)(**{**COMMON, 'max_position_embeddings': 512},
                                             **extra)
  getattr(transformers, model_cls)(config).save_pretrained(str(hf))
  write_tokenizer(str(hf))
  write_tokenizer(str(root))   # the README's tokenizer.json for its own data
  return root


def _write_corpus(root) -> None:
  """'Your data': corpus/*.jsonl.gz and extra/*.parquet documents (different texts, so that
  the held-out split by text hash has some)."""
  import gzip
  import json
  import pyarrow as pa
  import pyarrow.parquet as pq
  words = 'the quick brown fox jumps over the lazy dog near a river that runs to the sea'.split()
  docs = [' '.join(words[(i * 7 + j) % len(words)] for j in range(400)) for i in range(160)]
  (root / 'corpus').mkdir()
  (root / 'extra').mkdir()
  with gzip.open(root / 'corpus' / 'a.jsonl.gz', 'wt') as f:
    f.writelines(json.dumps({'text': f'{i}: {d}'}) + '\n' for i, d in enumerate(docs[:80]))
  pq.write_table(pa.table({'text': [f'{i}: {d}' for i, d in enumerate(docs[80:])]}),
                 root / 'extra' / 'b.parquet')


def _env(home):
  env = dict(os.environ, LMX_MAX_STEPS=MAX_STEPS, LMX_MAX_TRIALS=MAX_TRIALS,
             JAX_PLATFORMS='cpu', HF_HUB_OFFLINE='1',
             LMX_NO_REEXEC='1', HOME=str(home))   # ~/.cache (token caches) inside the test
  env.pop('XLA_FLAGS', None)
  return env


def test_commands_are_found():
  """The parser sees the README's sections (so a reformatted README cannot silently run none)."""
  texts = [t for _, t, _ in readme_commands()]
  for needle in ('train.py --config=configs/default.py:tiny', 'sample.py --workdir=runs/tiny',
                 '-m interop.hf --from_hf=path/to/Llama-3.2-1B', 'configs/encdec.py:reversal',
                 'sweep.py --sweep=configs/sweeps/kv_heads.py', '--dry_run',
                 'from workdir.load import load_workdir', '--config.model.num_kv_head=1',
                 'train.py --config=configs/mixture.py',
                 'evaluate.py --workdir=runs/tiny --tasks=lmx_python'):
    assert any(needle in t for t in texts), needle
  shell = [t for kind, t, _ in readme_commands() if kind == 'shell']
  assert not any(' [' in t for t in shell)   # optional args dropped


@pytest.mark.parametrize('kind, text, expected', _params())
def test_readme_command(checkout, kind, text, expected):
  if kind == 'python':
    args = [sys.executable, '-c', text]
  else:
    words = shlex.split(text)
    assert words[0] in ('.venv/bin/python', 'python'), text
    args = [sys.executable, *words[1:]]
  r = subprocess.run(args, cwd=checkout, env=_env(checkout), capture_output=True, text=True,
                     timeout=600)
  output = r.stdout + r.stderr
  if expected:
    for line in expected:
      assert line in output, f'{text}\n--- printed:\n{output[-3000:]}'
  else:
    assert r.returncode == 0, f'{text}\n--- exit {r.returncode}:\n{output[-3000:]}'
