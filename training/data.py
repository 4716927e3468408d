"""Corpora, the held-out split, and the grain pipeline that turns a token stream into batches.

The default corpus is this interpreter's standard-library source. Files are split into train and
held-out by a hash of their path, so the split never changes with the file order or machine.
"""
from __future__ import annotations

import dataclasses
import glob
import hashlib
import os
import sysconfig

import grain
import numpy as np

from training.tokenizer import Tokenizer


class DataError(ValueError):
  """The configured data cannot be used (missing files, empty corpus...)."""


@dataclasses.dataclass
class Corpus:
  train: np.ndarray          # int32 token stream, documents separated by EOS
  eval: np.ndarray
  num_files: dict


def stdlib_root() -> str:
  return sysconfig.get_paths()['stdlib']


def corpus_files(data_cfg) -> list[tuple[str, str]]:
  """[(path on disk, name used for the split hash)], sorted by name."""
  if data_cfg.corpus == 'stdlib':
    root = stdlib_root()
    paths = glob.glob(os.path.join(root, '**', '*.py'), recursive=True)
    named = [(p, os.path.relpath(p, root)) for p in paths]
    named = [(p, n) for p, n in named if not n.startswith('site-packages')]
    if not named:
      raise DataError(f'data.corpus=stdlib: no .py files under {root}.')
    return sorted(named, key=lambda x: x[1])
  named = {}
  for pattern in (s.strip() for s in data_cfg.files.split(',')):
    if not pattern:
      continue
    matches = [p for p in glob.glob(os.path.expanduser(pattern), recursive=True)
               if os.path.isfile(p)]
    if not matches:
      raise DataError(f'data.files: {pattern!r} matches no file.')
    named.update({p: p for p in matches})
  return sorted(named.items(), key=lambda x: x[1])


def is_held_out(name: str, eval_percent: float) -> bool:
  """Deterministic split: the first 8 hex digits of sha1(name) pick a bucket in [0, 100)."""
  bucket = int(hashlib.sha1(name.encode()).hexdigest()[:8], 16) % 10_000 / 100.0
  return bucket < eval_percent


def _read(path: str) -> bytes:
  with open(path, 'rb') as f:
    return f.read()


def load_corpus(data_cfg, tokenizer: Tokenizer) -> Corpus:
  """Reads, tokenizes and splits the configured corpus. Raises DataError on unusable data.

  Cached per process (sweeps and tests train many models on one corpus); the key includes
  every file's size and modification time.
  """
  files = corpus_files(data_cfg)
  stats = tuple((p, n, os.stat(p).st_mtime_ns, os.stat(p).st_size) for p, n in files)
  key = (stats, data_cfg.eval_percent, data_cfg.seq_len, data_cfg.corpus, tokenizer.name)
  if key not in _CACHE:
    _CACHE.clear()  # keep one corpus in memory
    _CACHE[key] = _load(files, data_cfg, tokenizer)
  return _CACHE[key]


_CACHE: dict = {}


def _load(files, data_cfg, tokenizer: Tokenizer) -> Corpus:
  parts = {'train': [], 'eval': []}
  for path, name in files:
    ids = tokenizer.encode(_read(path))
    if ids.size:
      split = 'eval' if is_held_out(name, data_cfg.eval_percent) else 'train'
      parts[split] += [ids, np.asarray([tokenizer.eos_id], np.int32)]
  streams = {k: np.concatenate(v) if v else np.zeros((0,), np.int32) for k, v in parts.items()}
  counts = {k: len(v) // 2 for k, v in parts.items()}
  need = data_cfg.seq_len + 1
  total = streams['train'].size + streams['eval'].size
  if total < 2 * need:
    where = 'data.files' if data_cfg.corpus == 'files' else 'data.corpus'
    raise DataError(f'{where}: the corpus has {total} tokens in {len(files)} file(s); at least '
                    f'{2 * need} are needed for data.seq_len={data_cfg.seq_len} (train + held-out).')
  if streams['train'].size < need or streams['eval'].size < need:
    # Too few files for a by-file split: hold out the tail of the token stream instead.
    stream = np.concatenate([streams['train'], streams['eval']])
    cut = min(stream.size - need, int(stream.size * (1 - data_cfg.eval_percent / 100)))
    streams = {'train': stream[:cut], 'eval': stream[cut:]}
  return Corpus(streams['train'], streams['eval'], counts)


class _Windows:
  """Random-access source: window i is tokens[i*T : i*T + T + 1] (inputs + shifted targets)."""

  def __init__(self, tokens: np.ndarray, seq_len: int):
    self.tokens, self.seq_len = tokens, seq_len

  def __len__(self) -> int:
    return (self.tokens.size - 1) // self.seq_len

  def __getitem__(self, i: int) -> np.ndarray:
    start = int(i) * self.seq_len
    return self.tokens[start:start + self.seq_len + 1]


def _to_example(windows: np.ndarray) -> dict:
  return {'inputs': windows[:, :-1], 'targets': windows[:, 1:],
          'weights': np.ones(windows[:, 1:].shape, np.float32)}


def train_dataset(tokens: np.ndarray, seq_len: int, batch_size: int, seed: int, *,
                  process_index: int = 0, process_count: int = 1,
                  num_workers: int = 0) -> grain.IterDataset:
  """Shuffled (reshuffled every epoch), endless batches of this process's share of rows.

  Each yields {'inputs', 'targets': [b, T] int32, 'weights': [b, T] f32}, b = batch/processes.
  Iterate with `iter(...)`; the iterator's state is checkpointed by training/checkpoint.py.
  """
  ds = grain.MapDataset.source(_Windows(tokens, seq_len)).shuffle(seed=seed).repeat(None)
  ds = ds[process_index::process_count]
  ds = ds.batch(batch_size // process_count, drop_remainder=True).map(_to_example)
  ids = ds.to_iter_dataset()
  if num_workers > 0:
    ids = ids.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
  return ids


def eval_batches(tokens: np.ndarray, seq_len: int, batch_size: int, num_batches: int) -> list:
  """A fixed held-out set: windows spread evenly over the stream; padding rows get weight 0."""
  windows = _Windows(tokens, seq_len)
  n = min(len(windows), num_batches * batch_size)
  idx = np.linspace(0, len(windows) - 1, n).astype(np.int64)
  rows = np.stack([windows[i] for i in idx])
  pad = (-n) % batch_size
  batch = _to_example(np.concatenate([rows, np.zeros((pad, seq_len + 1), rows.dtype)]))
  batch['weights'][n:] = 0.0
  return [{k: v[i:i + batch_size] for k, v in batch.items()}
          for i in range(0, n + pad, batch_size)]


def unigram_entropy(tokens: np.ndarray) -> float:
  """Entropy (nats/token) of the empirical unigram distribution: the no-context baseline."""
  counts = np.bincount(tokens).astype(np.float64)
  p = counts[counts > 0] / counts.sum()
  return float(-(p * np.log(p)).sum())
