"""The configured input files, cut into pieces that one worker reads alone, and their records.

Formats, by file name: `.jsonl` / `.jsonl.gz` (one JSON object a line), `.parquet` (read by row
group with pyarrow), any other file one document (language modelling) or TSV lines
`source<TAB>target` (pairs). A record's text is in `data.text_field` (language modelling) or in
`source` and `target` (pairs). Empty lines are ignored.

A plan is a deterministic list of units (each a list of pieces, about `unit_bytes` of input) that
depends only on the files: the token cache writes one shard per unit, so a shard's content never
depends on the worker count or on where an earlier build was killed.
"""
from __future__ import annotations

import dataclasses
import glob
import gzip
import json
import os
import sysconfig
from typing import Iterator

PAIR_FIELDS = ('source', 'target')


class DataError(ValueError):
  """The configured data cannot be used (missing files, empty corpus, a bad record...)."""


def stdlib_root() -> str:
  return sysconfig.get_paths()['stdlib']


def corpus_files(data_cfg) -> list[tuple[str, str]]:
  """[(path on disk, name used for the split hash)], sorted by name."""
  if data_cfg.corpus == 'stdlib':
    root = stdlib_root()
    named = []
    for folder, dirs, names in os.walk(root):
      if folder == root and 'site-packages' in dirs:
        dirs.remove('site-packages')   # installed packages are not the standard library
      named += [(os.path.join(folder, n), os.path.relpath(os.path.join(folder, n), root))
                for n in names if n.endswith('.py')]
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


def file_format(path: str, pairs: bool = False) -> str:
  """'jsonl' | 'jsonl.gz' | 'parquet' | 'tsv' (pairs) | 'text' (one document)."""
  if path.endswith(('.jsonl', '.json')):
    return 'jsonl'
  if path.endswith(('.jsonl.gz', '.json.gz')):
    return 'jsonl.gz'
  if path.endswith('.parquet'):
    return 'parquet'
  return 'tsv' if pairs else 'text'


@dataclasses.dataclass(frozen=True)
class Piece:
  """Part of one file. kind 'file': the whole file; 'lines': bytes [start, end) of a line file,
  its first line numbered `first` (1-based); 'gz': decompressed lines carried in `data`;
  'parquet': row groups [start, end), the first row numbered `first` (0-based). `size`: the
  input bytes it stands for (uncompressed)."""
  file: int
  kind: str
  size: int
  start: int = 0
  end: int = 0
  first: int = 0
  data: bytes = b''


def unit_bytes_for(total_bytes: int) -> int:
  """About 64 units a corpus, each 1-64 MiB: parallel work for small corpora, few shards for
  big ones."""
  return int(min(64 << 20, max(1 << 20, total_bytes // 64)))


def _open_error(path: str, e: Exception) -> DataError:
  return DataError(f'data.files: cannot read {path} ({getattr(e, "strerror", None) or e}).')


def _line_pieces(i: int, path: str, budget: int, compressed: bool) -> Iterator[Piece]:
  """Pieces of about `budget` bytes of a (gzip) line file, cut after a newline."""
  opener = gzip.open if compressed else open
  line, offset = 1, 0
  try:
    with opener(path, 'rb') as f:
      carry = b''
      while True:
        block = f.read(budget)
        chunk = carry + block
        cut = chunk.rfind(b'\n') + 1 if block else len(chunk)
        if block and cut == 0:   # no newline yet: keep reading
          carry = chunk
          continue
        head, carry = chunk[:cut], chunk[cut:]
        if head:
          yield (Piece(i, 'gz', len(head), first=line, data=head) if compressed
                 else Piece(i, 'lines', len(head), offset, offset + len(head), line))
          line, offset = line + head.count(b'\n'), offset + len(head)
        if not block:
          return
  except (OSError, EOFError) as e:
    raise _open_error(path, e) from None


def _parquet_pieces(i: int, path: str, budget: int) -> Iterator[Piece]:
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
  try:
    meta = pq.ParquetFile(path).metadata
  except Exception as e:  # pyarrow raises ArrowInvalid / OSError for non-parquet files
    raise DataError(f'data.files: {path} is not a readable parquet file ({e}).') from None
  start, size, row, first = 0, 0, 0, 0
  for g in range(meta.num_row_groups):
    size += meta.row_group(g).total_byte_size
    row += meta.row_group(g).num_rows
    if size >= budget or g == meta.num_row_groups - 1:
      yield Piece(i, 'parquet', size, start, g + 1, first)
      start, size, first = g + 1, 0, row


def plan(files: list[tuple[str, str]], unit_bytes: int, pairs: bool = False
         ) -> Iterator[list[Piece]]:
  """Units (lists of pieces) in a fixed order; whole files are grouped, big files are cut."""
  unit, size = [], 0
  for i, (path, _) in enumerate(files):
    fmt = file_format(path, pairs)
    if fmt == 'text':
      pieces = [Piece(i, 'file', os.path.getsize(path))]
    elif fmt == 'parquet':
      pieces = _parquet_pieces(i, path, unit_bytes)
    else:
      pieces = _line_pieces(i, path, unit_bytes, compressed=fmt == 'jsonl.gz')
    for piece in pieces:
      unit.append(piece)
      size += piece.size
      if size >= unit_bytes:
        yield unit
        unit, size = [], 0
  if unit:
    yield unit


# --- records -----------------------------------------------------------------------------------

@dataclasses.dataclass
class Record:
  where: int           # line (line files, 1-based), row (parquet, 0-based) or 0 (whole file)
  key: str | bytes     # what the held-out split hashes: the file name, or the (source) text
  texts: tuple         # one text per field


class BadRecords:
  """Counts skipped records (data.skip_bad_records=True) or raises the first as a DataError."""

  def __init__(self, skip: bool):
    self.skip, self.count = skip, 0

  def __call__(self, message: str) -> None:
    if not self.skip:
      raise DataError(f'{message} (set data.skip_bad_records=True to skip and count such '
                      'records).')
    self.count += 1


def _check_fields(row, fields: tuple, where: str, bad: BadRecords) -> tuple | None:
  if not isinstance(row, dict):
    bad(f'{where}: expected a JSON object, found {type(row).__name__}')
    return None
  for f in fields:
    if f not in row:
      bad(f'{where}: no field {f!r}' + (' (data.text_field)' if fields != PAIR_FIELDS else ''))
      return None
    if not isinstance(row[f], str):
      bad(f'{where}: field {f!r} is {type(row[f]).__name__}, not a string')
      return None
  return tuple(row[f] for f in fields)


def _lines(data: bytes, first: int, path: str, fields: tuple, fmt: str, bad: BadRecords
           ) -> Iterator[Record]:
  for n, line in enumerate(data.split(b'\n'), first):
    if not line.strip():
      continue
    where = f'data.files: {path}:{n}'
    if fmt == 'tsv':
      parts = line.rstrip(b'\r').decode('utf-8', errors='replace').split('\t')
      if len(parts) != 2:
        bad(f'{where}: expected source<TAB>target (one tab); found {len(parts) - 1} tabs')
        continue
      texts = tuple(parts)
    else:
      try:
        row = json.loads(line)
      except (json.JSONDecodeError, UnicodeDecodeError) as e:
        bad(f'{where}: not valid JSON ({getattr(e, "msg", e)})')
        continue
      texts = _check_fields(row, fields, where, bad)
      if texts is None:
        continue
    yield Record(n, texts[0], texts)


def _parquet(piece: Piece, path: str, fields: tuple, bad: BadRecords) -> Iterator[Record]:
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
  f = pq.ParquetFile(path)
  names = f.schema_arrow.names
  for name in fields:
    if name not in names:
      raise DataError(f'data.files: {path} has no column {name!r}'
                      + (' (data.text_field)' if fields != PAIR_FIELDS else '')
                      + f'; its columns: {", ".join(names)}.')
  row = piece.first
  for g in range(piece.start, piece.end):
    table = f.read_row_group(g, columns=list(fields))
    columns = [table.column(name).to_pylist() for name in fields]
    for values in zip(*columns):
      for name, v in zip(fields, values):
        if not isinstance(v, str):
          bad(f'data.files: {path}: row {row}: column {name!r} is '
              f'{"null" if v is None else type(v).__name__}, not a string')
          break
      else:
        yield Record(row, values[0], tuple(values))
      row += 1


def records(piece: Piece, path: str, name: str, fields: tuple, bad: BadRecords,
            pairs: bool = False) -> Iterator[Record]:
  """The records of one piece, in file order."""
  fmt = file_format(path, pairs)
  try:
    if piece.kind == 'file':
      with open(path, 'rb') as f:
        yield Record(0, name, (f.read(),))
    elif piece.kind == 'lines':
      with open(path, 'rb') as f:
        f.seek(piece.start)
        data = f.read(piece.end - piece.start)
      yield from _lines(data, piece.first, path, fields, fmt, bad)
    elif piece.kind == 'gz':
      yield from _lines(piece.data, piece.first, path, fields, fmt, bad)
    else:
      yield from _parquet(piece, path, fields, bad)
  except OSError as e:
    raise _open_error(path, e) from None
