"""Token cache and data pipeline, measured in one run.

  python benchmarks/data.py [--workdir=/tmp/lmx-data-bench] [--prepare_mb=24] [--rss_steps=12]
                            [--skip=rss,wait]

Prints: (1) prepare rate (input MB/s) of `prepare.py`'s build (training/token_cache.py, all
cores) with the byte tokenizer and with a BPE tokenizer.json (trained here with `tokenizers`),
beside a plain one-process loop over the same jsonl files: json.loads each line, then the
`tokenizers` `encode_batch` of 1,000 texts at a time (its own threads on, as a user would run
it); (2) peak RSS of `train.py` (default model, --rss_steps steps) on a 100 MB and a 1 GB
corpus, above a bare `import jax`, and their ratio; (3) the share of wall time the default
config's training loop spends in `next(data_iterator)`.
Corpora are jsonl of this interpreter's standard-library files, repeated; all in --workdir.
"""
from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from workdir import hostenv  # noqa: E402

hostenv.ensure_fast_malloc()

from absl import app, flags  # noqa: E402

from configs import default, schema  # noqa: E402
from training import token_cache  # noqa: E402
from training.documents import corpus_files  # noqa: E402

_WORKDIR = flags.DEFINE_string('workdir', '/tmp/lmx-data-bench', 'Corpora and caches go here.')
_PREPARE_MB = flags.DEFINE_integer('prepare_mb', 24, 'Size of the prepare-rate corpus (MB).')
_RSS_STEPS = flags.DEFINE_integer('rss_steps', 12, 'Train steps of each peak-RSS run.')
_WAIT_STEPS = flags.DEFINE_integer('wait_steps', 40, 'Steps of the data-wait measurement.')
_SKIP = flags.DEFINE_list('skip', [], 'Parts to skip: prepare, rss, wait.')


def stdlib_texts() -> list[str]:
  out = []
  for p, _ in corpus_files(default.get_config().data):
    with open(p, encoding='utf-8', errors='replace') as f:
      out.append(f.read())
  return out


def write_jsonl(folder: str, megabytes: int, files: int = 4) -> str:
  """`files` jsonl files of ~megabytes MB in all (stdlib files as records, repeated)."""
  if os.path.isdir(folder):
    return os.path.join(folder, '*.jsonl')
  os.makedirs(folder + '.tmp', exist_ok=True)
  texts, target = stdlib_texts(), megabytes * 10**6 // files
  for k in range(files):
    with open(os.path.join(folder + '.tmp', f'{k}.jsonl'), 'w') as f:
      size, i = 0, k
      while size < target:
        line = json.dumps({'text': texts[i % len(texts)]}) + '\n'
        f.write(line)
        size, i = size + len(line), i + 1
  os.replace(folder + '.tmp', folder)
  return os.path.join(folder, '*.jsonl')


def data_config(files: str, cache_dir: str, tokenizer: str = 'byte', **overrides):
  over = {'data.corpus': 'files', 'data.files': files, 'data.cache_dir': cache_dir,
          'data.tokenizer': tokenizer, **overrides}
  return schema.apply_overrides(default.get_config(), over)


def train_bpe(path: str, files: str) -> str:
  import tokenizers  # pylint: disable=import-outside-toplevel
  if not os.path.isfile(path):
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token='<unk>'))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel()
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=8192, special_tokens=['<unk>', '</s>'])
    tok.train(sorted(glob.glob(files))[:1], trainer)
    tok.save(path)
  return path


def input_mb(files: str) -> float:
  return sum(os.path.getsize(p) for p in glob.glob(files)) / 1e6


def prepare_rate(files: str, tokenizer: str, cache_dir: str) -> float:
  shutil.rmtree(cache_dir, ignore_errors=True)
  cfg = data_config(files, cache_dir, tokenizer)
  start = time.perf_counter()
  token_cache.ensure(cfg.data, progress=False, log=lambda _: None)
  return input_mb(files) / (time.perf_counter() - start)


def baseline_rate(files: str, tokenizer: str) -> float:
  """The plain loop: one process, json.loads, encode_batch of 1,000 texts at a time."""
  import tokenizers  # pylint: disable=import-outside-toplevel
  tok = tokenizers.Tokenizer.from_file(tokenizer)
  start, n = time.perf_counter(), 0
  for path in sorted(glob.glob(files)):
    batch = []
    with open(path) as f:
      for line in f:
        batch.append(json.loads(line)['text'])
        if len(batch) == 1000:
          n += sum(len(e.ids) for e in tok.encode_batch(batch, add_special_tokens=False))
          batch = []
    if batch:
      n += sum(len(e.ids) for e in tok.encode_batch(batch, add_special_tokens=False))
  return input_mb(files) / (time.perf_counter() - start)


def peak_rss_mb(argv: list[str]) -> float:
  """Peak RSS (MB) of a child process running `python argv...`."""
  env = dict(os.environ, LMX_NO_REEXEC='1', GLIBC_TUNABLES='glibc.malloc.hugetlb=1')
  proc = subprocess.Popen([sys.executable, *argv], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE)
  _, status, usage = os.wait4(proc.pid, 0)
  if os.waitstatus_to_exitcode(status) != 0:
    raise SystemExit(f'{argv} failed: {proc.stderr.read().decode()[-2000:]}')
  return usage.ru_maxrss / 1024


def train_rss(files: str, cache_dir: str, workdir: str) -> float:
  shutil.rmtree(workdir, ignore_errors=True)
  steps = _RSS_STEPS.value
  return peak_rss_mb(['train.py', '--config=configs/default.py', f'--workdir={workdir}',
                      '--config.data.corpus=files', f'--config.data.files={files}',
                      f'--config.data.cache_dir={cache_dir}', f'--config.train.steps={steps}',
                      '--config.train.warmup_steps=1', f'--config.train.eval_every={steps}',
                      f'--config.train.checkpoint_every={steps}'])


def data_wait_share() -> tuple[float, float, float]:
  """(share of wall time in next(data_iterator), seconds a step, seconds a batch of the
  pipeline alone) over the default config's loop: the same calls as training/loop.py's,
  without checkpoints and evaluation."""
  import jax  # pylint: disable=import-outside-toplevel
  from training import loop, mesh as mesh_lib  # pylint: disable=import-outside-toplevel
  from text.tokenizer import make_tokenizer  # pylint: disable=import-outside-toplevel
  config = default.get_config()
  train_ds, _, _ = loop.load_data(config, make_tokenizer(config.data.tokenizer))
  s = loop.setup(config)
  it, state = iter(train_ds), s.init_state()
  state, metrics = s.train_step(state, mesh_lib.put_batch(next(it), s.mesh))   # compile
  jax.block_until_ready(metrics)
  waited, start = 0.0, time.perf_counter()
  for _ in range(_WAIT_STEPS.value):
    t = time.perf_counter()
    batch = next(it)
    waited += time.perf_counter() - t
    state, metrics = s.train_step(state, mesh_lib.put_batch(batch, s.mesh))
  jax.block_until_ready(metrics)
  total = time.perf_counter() - start
  start = time.perf_counter()
  for _ in range(_WAIT_STEPS.value):   # the pipeline alone, for its cost a batch
    next(it)
  alone = (time.perf_counter() - start) / _WAIT_STEPS.value
  return waited / total, total / _WAIT_STEPS.value, alone


def main(argv):
  del argv
  work = _WORKDIR.value
  os.makedirs(work, exist_ok=True)
  load = os.getloadavg()[0]
  print(f'{os.cpu_count()} cores; load average {load:.1f} at the start (the machine is shared '
        'with other jobs: rates are lower bounds).')
  if 'prepare' not in _SKIP.value:
    files = write_jsonl(os.path.join(work, f'prep{_PREPARE_MB.value}'), _PREPARE_MB.value)
    bpe = train_bpe(os.path.join(work, 'bpe8k.json'), files)
    workers = token_cache.num_workers(None)
    byte = prepare_rate(files, 'byte', os.path.join(work, 'cache-byte'))
    ours = prepare_rate(files, bpe, os.path.join(work, 'cache-bpe'))
    base = baseline_rate(files, bpe)
    print(f'prepare ({input_mb(files):.0f} MB of jsonl, {workers} workers): byte tokenizer '
          f'{byte:.1f} MB/s; BPE (8k vocab) {ours:.2f} MB/s vs one-process tokenizers '
          f'encode_batch loop {base:.2f} MB/s: {ours / base:.2f}x (target >= 1.5x)')
  if 'rss' not in _SKIP.value:
    bare = peak_rss_mb(['-c', 'import jax; jax.numpy.zeros(1).block_until_ready()'])
    rss = {}
    for mb in (100, 1000):
      files = write_jsonl(os.path.join(work, f'rss{mb}'), mb)
      cache = os.path.join(work, 'cache-rss')
      subprocess.run([sys.executable, 'prepare.py', '--config=configs/default.py',
                      '--config.data.corpus=files', f'--config.data.files={files}',
                      f'--config.data.cache_dir={cache}'], cwd=ROOT, check=True,
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
      rss[mb] = train_rss(files, cache, os.path.join(work, f'run{mb}')) - bare
      print(f'train.py peak RSS above import jax ({bare:.0f} MB), {mb} MB corpus: '
            f'{rss[mb]:.0f} MB')
    print(f'peak RSS ratio 1 GB / 100 MB corpus: {rss[1000] / rss[100]:.3f} (target <= 1.1)')
  if 'wait' not in _SKIP.value:
    share, step, alone = data_wait_share()
    print(f'default config: {100 * share:.2f}% of wall time waiting for data '
          f'({step * 1e3:.0f} ms a step; target <= 2%); the pipeline alone takes '
          f'{alone * 1e3:.1f} ms a batch')
  print(f'load average at the end {os.getloadavg()[0]:.1f}')


if __name__ == '__main__':
  app.run(main)
