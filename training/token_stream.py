"""Reading the token cache (training/token_cache.py): token streams and documents by index.

Every read maps only the bytes it needs (`np.memmap` at an offset), copies them out and unmaps
them, so the resident memory of a reader does not grow with the corpus or with how much of it
has been read. Readers hold only paths: they pickle into grain worker processes.
"""
from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

from training.token_cache import MANIFEST


def read_tokens(path: str, dtype: str, start: int, count: int, out_dtype=np.int32) -> np.ndarray:
  """Elements [start, start + count) of a raw array file, as `out_dtype`."""
  if count <= 0:
    return np.zeros((0,), out_dtype)
  dtype = np.dtype(dtype)
  mapped = np.memmap(path, dtype, mode='r', offset=start * dtype.itemsize, shape=(count,))
  out = np.array(mapped, out_dtype)
  del mapped
  return out


@dataclasses.dataclass(frozen=True)
class TokenStream:
  """A random-access token sequence stored as consecutive parts of shard files:
  parts = ((path, dtype, first element, length), ...). `stream[a:b]` -> int32 array."""
  parts: tuple

  def __post_init__(self):
    lengths = [p[3] for p in self.parts]
    object.__setattr__(self, '_starts', np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))

  @property
  def size(self) -> int:
    return int(self._starts[-1])

  def __len__(self) -> int:
    return self.size

  def __getitem__(self, key) -> np.ndarray:
    if isinstance(key, (int, np.integer)):
      i = int(key) + (self.size if key < 0 else 0)
      if not 0 <= i < self.size:
        raise IndexError(f'token {key} of a stream of {self.size}')
      return self[i:i + 1][0]
    start, stop, step = key.indices(self.size)
    if step != 1:
      raise ValueError('TokenStream slices take no step.')
    out, pos = [], start
    k = int(np.searchsorted(self._starts, start, side='right')) - 1
    while pos < stop and k < len(self.parts):
      path, dtype, first, length = self.parts[k]
      lo, hi = pos - self._starts[k], min(stop - self._starts[k], length)
      out.append(read_tokens(path, dtype, first + lo, hi - lo))
      pos, k = self._starts[k] + hi, k + 1
    return np.concatenate(out) if out else np.zeros((0,), np.int32)

  def sub(self, start: int, stop: int) -> TokenStream:
    """The stream's tokens [start, stop) as a stream (no data read)."""
    return TokenStream(_slice_runs(self.parts, self._starts, start, stop))

  def __add__(self, other: TokenStream) -> TokenStream:
    return TokenStream(self.parts + other.parts)

  def bincount(self, chunk: int = 1 << 22) -> np.ndarray:
    """Token counts over the whole stream, read in chunks (memory independent of its size)."""
    counts = np.zeros((0,), np.int64)
    for s in range(0, self.size, chunk):
      c = np.bincount(self[s:s + chunk])
      counts = np.pad(counts, (0, max(0, c.size - counts.size)))
      counts[:c.size] += c
    return counts


@dataclasses.dataclass(frozen=True)
class Documents:
  """Random access to one split's documents: docs[i] -> int32 tokens, without the final EOS.
  shards = ((stem, dtype, first document in the shard, count), ...)."""
  shards: tuple
  field: str = 'text'

  def __post_init__(self):
    counts = [s[3] for s in self.shards]
    object.__setattr__(self, '_starts', np.concatenate([[0], np.cumsum(counts)]).astype(np.int64))

  def __len__(self) -> int:
    return int(self._starts[-1])

  def _locate(self, i: int) -> tuple:
    i = int(i)
    if not 0 <= i < len(self):
      raise IndexError(f'document {i} of {len(self)}')
    k = int(np.searchsorted(self._starts, i, side='right')) - 1
    stem, dtype, first, _ = self.shards[k]
    return stem, dtype, first + i - int(self._starts[k])

  def __getitem__(self, i: int) -> np.ndarray:
    stem, dtype, j = self._locate(i)
    lo, hi = read_tokens(f'{stem}.{self.field}.idx', 'int64', j, 2, np.int64)
    return read_tokens(f'{stem}.{self.field}.bin', dtype, int(lo), int(hi - lo - 1))

  def lengths(self) -> np.ndarray:
    """Tokens of every document (without EOS), int64 [len(self)]."""
    out = []
    for stem, _, first, count in self.shards:
      offsets = read_tokens(f'{stem}.{self.field}.idx', 'int64', first, count + 1, np.int64)
      out.append(np.diff(offsets) - 1)
    return np.concatenate(out) if out else np.zeros((0,), np.int64)

  def where(self, i: int) -> tuple[int, int]:
    """(index into the cache's files, line (1-based) or row (0-based)) of document i."""
    stem, _, j = self._locate(i)
    f, r = read_tokens(f'{stem}.where', 'int64', 2 * j, 2, np.int64)
    return int(f), int(r)

  def with_field(self, field: str) -> Documents:
    return Documents(self.shards, field)

  def sub(self, start: int, stop: int) -> Documents:
    """Documents [start, stop) as a Documents (no data read)."""
    return Documents(_slice_runs(self.shards, self._starts, start, stop), self.field)


class Cache:
  """An opened token cache directory (its manifest)."""

  def __init__(self, path: str):
    self.path = path
    with open(os.path.join(path, MANIFEST)) as f:
      self.manifest = json.load(f)
    m = self.manifest
    self.id, self.dtype, self.eos_id = m['id'], m['dtype'], m['eos_id']
    self.fields, self.files = m['fields'], m['files']
    self.totals = m['totals']

  def _stem(self, shard: dict) -> str:
    return os.path.join(self.path, 'shards', f'{shard["unit"]:06d}')

  def stream(self, split: str, field: str | None = None) -> TokenStream:
    """The split's documents, each followed by EOS, as one token stream."""
    field = field or self.fields[0]
    parts = []
    for s in self.manifest['shards']:
      f = s['fields'][field]
      lo, hi = (0, f['train_tokens']) if split == 'train' else (f['train_tokens'], f['tokens'])
      if hi > lo:
        parts.append((f'{self._stem(s)}.{field}.bin', self.dtype, lo, hi - lo))
    return TokenStream(tuple(parts))

  def documents(self, split: str, field: str | None = None) -> Documents:
    shards = []
    for s in self.manifest['shards']:
      lo, hi = (0, s['train_docs']) if split == 'train' else (s['train_docs'], s['docs'])
      if hi > lo:
        shards.append((self._stem(s), self.dtype, lo, hi - lo))
    return Documents(tuple(shards), field or self.fields[0])

  def eval_unigram_counts(self) -> np.ndarray:
    pairs = np.asarray(self.manifest['eval_unigram'], np.int64).reshape(-1, 2)
    counts = np.zeros((int(pairs[:, 0].max()) + 1 if pairs.size else 0,), np.int64)
    counts[pairs[:, 0]] = pairs[:, 1]
    return counts


def _slice_runs(runs: tuple, starts, start: int, stop: int) -> tuple:
  """Items [start, stop) of consecutive runs (where, dtype, first, count) whose global offsets
  are `starts` (one more than runs), as runs of the same form (no data read)."""
  out = []
  for (where, dtype, first, count), s in zip(runs, starts[:-1]):
    lo, hi = max(start - s, 0), min(stop - s, count)
    if hi > lo:
      out.append((where, dtype, int(first + lo), int(hi - lo)))
  return tuple(out)
