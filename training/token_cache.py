"""The token cache: the configured corpus tokenized once into memory-mappable shards.

Layout of CACHE_DIR/<kind>-<id>/ (id: `cache_id`, a hash of everything that decides the content:
the files' paths, sizes and mtimes, the tokenizer's bytes, the text field, the held-out share,
`data.skip_bad_records` and this format's version):
  shards/NNNNNN.<field>.bin   tokens (uint16 when the vocabulary fits, else uint32): the unit's
                              training documents, then its held-out ones, each followed by EOS
  shards/NNNNNN.<field>.idx   int64 [docs + 1] offsets of the documents in the .bin
  shards/NNNNNN.where         int64 [docs, 2] (file index, line or row) of each document
  shards/NNNNNN.json          counts and sha256 of the files above; written last
  manifest.json               the key, dtype, files, per-shard counts and checksums, totals;
                              written when every shard is (its presence: the cache is complete)
  key.json                    the key alone, written first
Fields: ('text',) for language modelling, ('source', 'target') for pairs.

Kill safety: every file is written under a temporary name and renamed when complete, a shard's
.json last and the manifest after all shards. A rerun keeps the shards whose .json exists and
builds the rest; since a shard depends only on its unit of input (documents/plan), the finished
cache is byte-identical to an uninterrupted build, whatever the worker count.
"""
from __future__ import annotations

import collections
import contextlib
import functools
import hashlib
import json
import multiprocessing
import os
import socket
import sys
import types

import numpy as np
import tqdm

from training.documents import (PAIR_FIELDS, BadRecords, DataError, corpus_files, plan, records,
                                unit_bytes_for)
from text.tokenizer import make_tokenizer

FORMAT = 1
MANIFEST = 'manifest.json'
_HOST = socket.gethostname().replace('-', '_')


def is_held_out(key: str | bytes, eval_percent: float) -> bool:
  """Deterministic split: the first 8 hex digits of sha1(key) pick a bucket in [0, 100)."""
  data = key.encode() if isinstance(key, str) else key
  bucket = int(hashlib.sha1(data).hexdigest()[:8], 16) % 10_000 / 100.0
  return bucket < eval_percent


def is_pairs(data_cfg) -> bool:
  return data_cfg.task == 'pairs'


def _files(data_cfg) -> list[tuple[str, str]]:
  if is_pairs(data_cfg):
    return corpus_files(_Files(data_cfg.files))
  return corpus_files(data_cfg)


class _Files:
  corpus = 'files'

  def __init__(self, files):
    self.files = files


def _sha256_file(path: str) -> str:
  with open(path, 'rb') as f:   # a tokenizer file: a few MB at most
    return hashlib.sha256(f.read()).hexdigest()


def cache_key(data_cfg, files=None, tokenizer=None) -> dict:
  """Everything that determines the cache's content (and nothing else: not data.seq_len,
  data.packing or the worker count)."""
  files = _files(data_cfg) if files is None else files
  tok = make_tokenizer(data_cfg.tokenizer) if tokenizer is None else tokenizer
  spec = data_cfg.tokenizer
  try:
    stats = [(os.path.abspath(p), n, os.stat(p).st_size, os.stat(p).st_mtime_ns)
             for p, n in files]
  except OSError as e:
    raise DataError(f'data.files: cannot read {e.filename} ({e.strerror}).') from None
  return {
      'format': FORMAT,
      'fields': list(PAIR_FIELDS if is_pairs(data_cfg) else (data_cfg.text_field,)),
      'files': stats,
      'tokenizer': {'sha256': 'byte' if spec == 'byte' else _sha256_file(spec),
                    'vocab_size': int(tok.vocab_size), 'eos_id': int(tok.eos_id),
                    # what it adds around a document (BOS / EOS, from tokenizer_config.json too)
                    'specials': [int(i) for i in tok.encode('', add_special_tokens=True)]},
      'eval_percent': float(data_cfg.eval_percent),
      'skip_bad_records': bool(data_cfg.skip_bad_records),
  }


def cache_id(data_cfg) -> str:
  """16 hex digits naming the cache of `data_cfg` (the same inputs give the same id)."""
  key = json.dumps(cache_key(data_cfg), sort_keys=True)
  return hashlib.sha256(key.encode()).hexdigest()[:16]


def cache_path(data_cfg, cid: str | None = None) -> str:
  kind = 'pairs' if is_pairs(data_cfg) else data_cfg.corpus
  return os.path.join(os.path.expanduser(data_cfg.cache_dir), f'{kind}-{cid or cache_id(data_cfg)}')


def token_dtype(vocab_size: int) -> np.dtype:
  return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


# --- writing ----------------------------------------------------------------------------------

def _write(path: str, data: bytes) -> str:
  """Writes under a temporary name, renames; returns the sha256 of `data`."""
  tmp = f'{path}.tmp-{_HOST}-{_writer(os.getpid())}'   # several hosts may share the directory
  with open(tmp, 'wb') as f:
    f.write(data)
  os.replace(tmp, path)
  return hashlib.sha256(data).hexdigest()


class _Job:
  """What a worker needs for every unit (sent once, to the pool initializer)."""

  def __init__(self, data_cfg, files, fields, shard_dir, dtype, eos_id):
    self.spec, self.files, self.fields = data_cfg.tokenizer, files, tuple(fields)
    self.pairs, self.eval_percent = is_pairs(data_cfg), float(data_cfg.eval_percent)
    self.skip, self.shard_dir, self.dtype, self.eos_id = (bool(data_cfg.skip_bad_records),
                                                          shard_dir, dtype, eos_id)
    self.tokenizer = None


_JOB: _Job | None = None


def _init_worker(job: _Job, threads: bool) -> None:
  global _JOB
  if not threads:  # one process per core already: no tokenizer thread pools on top
    os.environ['TOKENIZERS_PARALLELISM'] = 'false'
  _JOB = job
  _JOB.tokenizer = make_tokenizer(job.spec)


def build_unit(unit_id: int, pieces: list) -> dict:
  """Tokenizes one unit and writes its shard; returns the shard's metadata (its .json)."""
  job = _JOB
  bad = BadRecords(job.skip)
  docs = {False: [], True: []}   # held out -> [(file, where, texts)]
  for piece in pieces:
    path, name = job.files[piece.file]
    for r in records(piece, path, name, job.fields, bad, job.pairs):
      docs[is_held_out(r.key, job.eval_percent)].append((piece.file, r.where, r.texts))
  order = docs[False] + docs[True]
  # LM documents get the tokenizer's special tokens (e.g. BOS), as transformers encodes them.
  specials = not job.pairs
  tokens = [job.tokenizer.encode_batch([d[2][k] for d in order], add_special_tokens=specials)
            for k in range(len(job.fields))]
  keep = list(range(len(order)))
  bare = job.tokenizer.encode('', add_special_tokens=specials)
  # One EOS ends each document, unless the tokenizer adds it itself (add_eos_token).
  sep = 0 if specials and bare.size and bare[-1] == job.eos_id else 1
  if not job.pairs:   # an empty document adds nothing but an EOS
    keep = [i for i in keep if tokens[0][i].size > bare.size]
  train_docs = sum(1 for i in keep if i < len(docs[False]))
  stem = os.path.join(job.shard_dir, f'{unit_id:06d}')
  meta = {'unit': unit_id, 'docs': len(keep), 'train_docs': train_docs,
          'input_bytes': sum(p.size for p in pieces), 'bad_records': bad.count, 'fields': {}}
  for field, toks in zip(job.fields, tokens):
    lengths = np.array([toks[i].size + sep for i in keep], np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    flat = np.full((int(offsets[-1]),), job.eos_id, job.dtype)   # EOS after each document
    for i, start in zip(keep, offsets[:-1]):
      flat[start:start + toks[i].size] = toks[i]
    meta['fields'][field] = {
        'tokens': int(offsets[-1]), 'train_tokens': int(offsets[train_docs]),
        'bin_sha256': _write(f'{stem}.{field}.bin', flat.tobytes()),
        'idx_sha256': _write(f'{stem}.{field}.idx', offsets.tobytes())}
  where = np.array([order[i][:2] for i in keep], np.int64).reshape(-1, 2)
  meta['where_sha256'] = _write(f'{stem}.where', where.tobytes())
  if not job.pairs:   # the held-out unigram counts: the no-context baseline, without a pass
    counts = np.bincount(flat[meta['fields'][job.fields[0]]['train_tokens']:])
    meta['eval_unigram'] = [[int(i), int(counts[i])] for i in np.flatnonzero(counts)]
  _write(f'{stem}.json', json.dumps(meta, sort_keys=True).encode())
  return meta


def _build_unit_job(args) -> dict:
  return build_unit(*args)


@contextlib.contextmanager
def _bare_main():
  """Spawned workers re-run the parent's __main__ script first (train.py would import JAX in
  every worker); they need only this module, so the pool starts under a bare __main__."""
  main = sys.modules['__main__']
  sys.modules['__main__'] = types.ModuleType('__main__')
  try:
    yield
  finally:
    sys.modules['__main__'] = main


def _complete_shards(shard_dir: str, fields, itemsize: int) -> dict[int, dict]:
  """unit id -> metadata of the shards whose files are all in place."""
  done = {}
  for name in os.listdir(shard_dir):
    if not name.endswith('.json'):
      continue
    stem = os.path.join(shard_dir, name[:-5])
    with open(stem + '.json') as f:
      meta = json.load(f)
    sizes = {f'{stem}.where': 16 * meta['docs']}
    for k in fields:
      sizes[f'{stem}.{k}.idx'] = 8 * (meta['docs'] + 1)
      sizes[f'{stem}.{k}.bin'] = itemsize * meta['fields'][k]['tokens']
    if all(os.path.isfile(p) and os.path.getsize(p) == n for p, n in sizes.items()):
      done[meta['unit']] = meta
  return done


def _remove_stale_temporaries(*folders: str) -> None:
  """Deletes this host's `*.tmp-HOST-PID-START` files whose writer is gone (a killed build)."""
  for folder in folders:
    for name in os.listdir(folder):
      host, _, writer = name.rpartition('.tmp-')[2].partition('-')
      if '.tmp-' in name and host == _HOST and not _alive(writer):
        os.remove(os.path.join(folder, name))


def _process_start(pid: int) -> str | None:
  """The start time of process `pid` in clock ticks since boot (Linux), '' where /proc does not
  tell, None when the process is gone or a zombie (killed, not yet reaped: it writes no more)."""
  if not os.path.isdir('/proc/self'):
    return ''
  try:
    with open(f'/proc/{pid}/stat') as f:
      fields = f.read().rpartition(')')[2].split()   # after the command name, which may hold ' '
  except FileNotFoundError:
    return None
  except OSError:
    return ''
  return None if fields[0] in ('Z', 'X') else fields[19]


@functools.cache
def _writer(pid: int) -> str:
  """The `PID-START` suffix of this process's temporaries (see `_alive`); keyed by PID, so a
  forked child gets its own, and /proc is read once per process, not once per write."""
  return f'{pid}-{_process_start(pid) or ""}'


def _alive(writer: str) -> bool:
  """Whether the process named by a temporary's `PID-START` suffix still runs. The start time
  tells a killed writer from a later process that was given its PID (PIDs are reused: a
  32768-PID machine cycles through them within a test run)."""
  pid, _, start = writer.partition('-')
  if not pid.isdigit():
    return True   # not a name `_write` makes: leave it alone
  now = _process_start(int(pid))
  if now is None:
    return False
  if now and start:
    return now == start
  try:
    os.kill(int(pid), 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def num_workers(requested: int | None) -> int:
  if requested:
    return int(requested)
  return len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()


def ensure(data_cfg, *, progress: bool = True, log=None) -> str:
  """The cache directory of `data_cfg`, built first if it has no manifest. Raises DataError."""
  log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
  files = _files(data_cfg)
  tok = make_tokenizer(data_cfg.tokenizer)
  key = cache_key(data_cfg, files, tok)
  cid = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
  path = cache_path(data_cfg, cid)
  if os.path.isfile(os.path.join(path, MANIFEST)):
    return path
  shard_dir = os.path.join(path, 'shards')
  try:
    os.makedirs(shard_dir, exist_ok=True)
    _write(os.path.join(path, 'key.json'), json.dumps(key, sort_keys=True, indent=1).encode())
  except OSError as e:
    raise DataError(f'data.cache_dir={data_cfg.cache_dir!r}: cannot write the token cache at '
                    f'{path} ({e.strerror or e}); set data.cache_dir to a writable '
                    'directory.') from None
  _remove_stale_temporaries(path, shard_dir)
  fields = key['fields']
  dtype = token_dtype(tok.vocab_size)
  job = _Job(data_cfg, files, fields, shard_dir, dtype, tok.eos_id)
  done = _complete_shards(shard_dir, fields, dtype.itemsize)
  total = sum(s for *_, s, _ in key['files'])
  unit_bytes = unit_bytes_for(total)
  units = ((i, u) for i, u in enumerate(plan(files, unit_bytes, is_pairs(data_cfg)))
           if i not in done)
  # A corpus of one or two units is built in this process: starting workers would cost more.
  workers = 1 if total < 2 * unit_bytes else num_workers(data_cfg.prepare_workers)
  log(f'Building the token cache {path} ({len(files)} files, {total / 1e6:.1f} MB, '
      f'{workers} worker{"s" * (workers > 1)}{f", {len(done)} shards already done" * bool(done)}).')
  metas = dict(done)
  gz = any(p.endswith('.gz') for p, _ in files)   # sizes of their text are not known up front
  bar = tqdm.tqdm(total=None if gz else total, unit='B', unit_scale=True, desc='tokenizing', disable=not progress,
                  file=sys.stderr, mininterval=1.0)
  counts = {'docs': sum(m['docs'] for m in done.values()),
            'tokens': sum(m['fields'][fields[0]]['tokens'] for m in done.values())}

  def finish(meta):
    metas[meta['unit']] = meta
    counts['docs'] += meta['docs']
    counts['tokens'] += meta['fields'][fields[0]]['tokens']
    bar.update(meta['input_bytes'])
    bar.set_postfix_str(f'{counts["docs"]:,} docs, {counts["tokens"]:,} tokens', refresh=False)

  bar.update(sum(m['input_bytes'] for m in done.values()))
  with bar:
    if workers == 1:
      _init_worker(job, threads=True)
      for unit in units:
        finish(build_unit(*unit))
    else:
      with _bare_main():
        pool = multiprocessing.get_context('spawn').Pool(workers, _init_worker, (job, False))
      with pool:
        pending = collections.deque()
        for unit in units:   # at most 2 units a worker in flight: bounded memory
          pending.append(pool.apply_async(_build_unit_job, (unit,)))
          while len(pending) >= 2 * workers:
            finish(pending.popleft().get())
        while pending:
          finish(pending.popleft().get())
  manifest = _manifest(key, cid, metas, files, tok, dtype)
  totals = manifest['totals']
  if is_pairs(data_cfg) and not sum(totals['docs'].values()):
    raise DataError(f'data.files: no pairs in {len(files)} file(s) (expected JSONL lines '
                    '{"source": ..., "target": ...}, parquet columns source and target, or TSV '
                    'lines source<TAB>target).')
  if not totals['tokens']:
    where = 'data.files' if data_cfg.corpus == 'files' else 'data.corpus'
    raise DataError(f'{where}: the corpus has 0 tokens in {len(files)} file(s).')
  _write(os.path.join(path, MANIFEST), json.dumps(manifest, sort_keys=True, indent=1).encode())
  skipped = totals['bad_records']
  log(f'Token cache: {totals["docs"]["train"]} training and {totals["docs"]["eval"]} held-out '
      f'documents, {totals["tokens"]} tokens' + (f'; skipped {skipped} bad record(s) '
                                                  '(data.skip_bad_records=True)' if skipped else '')
      + '.')
  return path


def _manifest(key, cid, metas: dict, files, tok, dtype) -> dict:
  ids = sorted(metas)
  if ids != list(range(len(ids))):
    raise RuntimeError(f'token cache: shards {sorted(set(range(max(ids) + 1)) - set(ids))} are '
                       'missing after the build.')
  field = key['fields'][0]
  eval_counts = collections.Counter()
  for m in metas.values():
    eval_counts.update({i: c for i, c in m.get('eval_unigram', [])})
  shards = [{k: v for k, v in metas[i].items() if k != 'eval_unigram'} for i in ids]
  train_docs = sum(s['train_docs'] for s in shards)
  docs = sum(s['docs'] for s in shards)
  train_tokens = sum(s['fields'][field]['train_tokens'] for s in shards)
  tokens = sum(s['fields'][field]['tokens'] for s in shards)
  return {
      'format': FORMAT, 'id': cid, 'key': key, 'dtype': dtype.name, 'eos_id': int(tok.eos_id),
      'vocab_size': int(tok.vocab_size), 'fields': key['fields'],
      'files': [n for _, n in files], 'shards': shards,
      'eval_unigram': sorted([int(i), int(c)] for i, c in eval_counts.items()),
      'totals': {'docs': {'train': train_docs, 'eval': docs - train_docs},
                 'tokens': tokens, 'train_tokens': train_tokens,
                 'bad_records': sum(s['bad_records'] for s in shards),
                 'input_bytes': sum(s['input_bytes'] for s in shards)},
  }
