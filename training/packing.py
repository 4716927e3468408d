"""Document packing: token documents, or (source, target) pairs, -> fixed-length rows whose
tokens never see another document.

Language-model rows (T = seq_len), one dict a row:
  inputs, targets [T] int32 · weights [T] float32 · segment_ids [T] int32 (1, 2, ... one per
  piece, 0 on padding) · positions [T] int32 (0, 1, ... restarting at every piece, 0 on padding).
A document d (its tokens, no EOS) is trained on the (input, target) pairs of [EOS] + d + [EOS]:
inputs [EOS] + d, targets d + [EOS], every pair weight 1. So each token of d and the closing EOS
is a target exactly once, as in the unpacked stream (where documents are joined by EOS), but
the first token is predicted from the document start alone, and a document's last token
predicts its own EOS, never the next document's first token. A document with more than T
pairs is cut into pieces of T pairs; each piece is its own segment (positions restart).
Padding has weight 0, segment id 0 and `pad_id` tokens.

Encoder-decoder rows: sources, source_segment_ids, source_positions [S]; inputs (BOS +
target), targets (target + EOS), weights, segment_ids, positions [T]. Pair k of a row has
segment id k on both sides, so the encoder, the decoder and the cross attention mask by it.

Training shuffles pieces, not documents (`PieceSource`), so a long document's pieces spread
over the epoch like the stream's windows. Packing is grain's first-fit
(`grain.experimental.FirstFitPackIterDataset`): pieces fill the
first of `num_bins` open rows with room; when one fits nowhere all rows are emitted. It is
deterministic, and the iterators' `get_state` / `set_state` resume exactly (the state is the
upstream position plus the row index, never buffered data).
"""
from __future__ import annotations

import itertools
from typing import Iterable, Sequence

import grain
import numpy as np

DEFAULT_NUM_BINS = 64   # open rows; more pack tighter (less padding) but buffer more pieces


def read_ahead(ds: grain.MapDataset, elements_per_batch: int = 1) -> grain.IterDataset:
  """`ds` as the IterDataset a training loop reads: 2 background threads keeping ~4 batches
  ready. grain's default (16 threads, 500 elements ahead) read 500 batches in the background of
  a 3-step fine-tune, on threads that took the cores and the GIL from compilation and the train
  step (its first step 6.9 s instead of ~3). Order and checkpointed state are the same."""
  return ds.to_iter_dataset(grain.ReadOptions(num_threads=2,
                                              prefetch_buffer_size=4 * elements_per_batch))


def _as_iter_dataset(items) -> grain.IterDataset:
  """An IterDataset as is; a MapDataset or a sequence (list of arrays) wrapped in order."""
  if isinstance(items, grain.IterDataset):
    return items
  if not isinstance(items, grain.MapDataset):
    items = grain.MapDataset.source(list(items) if not isinstance(items, Sequence) else items)
  return items.to_iter_dataset()


def document_pieces(tokens: np.ndarray, seq_len: int, eos_id: int) -> list[dict]:
  """One document (1-D int tokens, no EOS) -> its pieces {inputs, targets, weights} of at most
  `seq_len` (input, target) pairs of [EOS] + tokens + [EOS]; none for an empty document
  (the unpacked stream skips those too)."""
  tokens = np.asarray(tokens)
  if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
    raise ValueError(f'a document must be a 1-D integer token array; got {tokens.dtype}'
                     f'{list(tokens.shape)}.')
  if not tokens.size:
    return []
  seq = np.concatenate([[eos_id], tokens, [eos_id]]).astype(np.int32)
  return [_piece(seq, i, seq_len) for i in range(0, seq.size - 1, seq_len)]


def _piece(seq: np.ndarray, start: int, seq_len: int) -> dict:
  """The piece of [EOS] + doc + [EOS] (`seq`) whose first pair is pair `start`."""
  stop = min(start + seq_len, seq.size - 1)
  return {'inputs': seq[start:stop], 'targets': seq[start + 1:stop + 1],
          'weights': np.ones((stop - start,), np.float32)}


class _Pieces(grain.experimental.FlatMapTransform):
  """grain flat map: document -> `document_pieces`."""
  max_fan_out = 1 << 30

  def __init__(self, seq_len: int, eos_id: int):
    self.seq_len, self.eos_id = seq_len, eos_id

  def flat_map(self, element):
    return document_pieces(element, self.seq_len, self.eos_id)


def _first_fit(ds: grain.IterDataset, lengths: dict, padding: dict,
               num_bins: int) -> grain.IterDataset:
  if not isinstance(num_bins, (int, np.integer)) or num_bins < 1:
    raise ValueError(f'num_bins={num_bins!r}: must be a positive integer.')
  return grain.experimental.FirstFitPackIterDataset(
      ds, length_struct=lengths, num_packing_bins=int(num_bins), shuffle_bins=False,
      padding_struct=padding)


def _rename(row: dict, keep: dict) -> dict:
  """grain's `{feature}_segment_ids` / `_positions` -> our names; drops the duplicates."""
  return {new: row[old] for new, old in keep.items()}


_LM_KEYS = {'inputs': 'inputs', 'targets': 'targets', 'weights': 'weights',
            'segment_ids': 'inputs_segment_ids', 'positions': 'inputs_positions'}


def pack_documents(documents, seq_len: int, *, eos_id: int, pad_id: int,
                   num_bins: int = DEFAULT_NUM_BINS) -> grain.IterDataset:
  """Token documents (an IterDataset, MapDataset or sequence of 1-D int arrays, no EOS) ->
  an IterDataset of packed LM rows (see the module docstring); batch it with `.batch(B)`."""
  if not isinstance(seq_len, (int, np.integer)) or seq_len < 1:
    raise ValueError(f'seq_len={seq_len!r}: must be a positive integer.')
  ds = grain.experimental.FlatMapIterDataset(_as_iter_dataset(documents),
                                             _Pieces(int(seq_len), eos_id))
  return _pack_pieces(ds, seq_len, pad_id, num_bins)


def _pack_pieces(pieces: grain.IterDataset, seq_len: int, pad_id: int,
                 num_bins: int) -> grain.IterDataset:
  lengths = dict.fromkeys(('inputs', 'targets', 'weights'), int(seq_len))
  padding = {'inputs': pad_id, 'targets': pad_id, 'weights': 0.0}
  return _first_fit(pieces, lengths, padding, num_bins).map(lambda r: _rename(r, _LM_KEYS))


class PieceSource:
  """Random access to every piece of every document: piece k -> `document_pieces` entry, found
  through a table of pieces per document (8 bytes a document). Shuffling pieces, not
  documents, spreads a long document's pieces over the epoch as the stream's windows are;
  packing shuffled documents instead put a 20 KB file's 80 rows into 5 consecutive batches
  and trained measurably worse (benchmarks/packing.py)."""

  def __init__(self, documents, seq_len: int, eos_id: int):
    self.documents, self.seq_len, self.eos_id = documents, int(seq_len), eos_id
    lengths = (np.asarray(documents.lengths()) if hasattr(documents, 'lengths')
               else np.asarray([len(d) for d in documents]))
    pieces = np.where(lengths > 0, -(-(lengths + 1) // self.seq_len), 0)
    self.first = np.concatenate([[0], np.cumsum(pieces)]).astype(np.int64)

  def __len__(self) -> int:
    return int(self.first[-1])

  def __getitem__(self, k: int) -> dict:
    k = int(k)
    doc = int(np.searchsorted(self.first, k, side='right')) - 1
    tokens = np.asarray(self.documents[doc])
    seq = np.concatenate([[self.eos_id], tokens, [self.eos_id]]).astype(np.int32)
    return _piece(seq, int(k - self.first[doc]) * self.seq_len, self.seq_len)


def shuffled_pieces(documents, seq_len: int, seed: int, *, eos_id: int) -> grain.MapDataset:
  """Every piece of the documents (see PieceSource), shuffled and reshuffled every epoch, endless."""
  source = PieceSource(documents, seq_len, eos_id)
  if not len(source):
    raise ValueError('packed_train_dataset: the documents are all empty.')
  return grain.MapDataset.source(source).shuffle(seed=seed).repeat(None)


def packed_batches(pieces: grain.MapDataset, seq_len: int, batch_size: int, *, pad_id: int,
                   process_index: int = 0, process_count: int = 1, num_workers: int = 0,
                   num_bins: int = DEFAULT_NUM_BINS) -> grain.IterDataset:
  """Endless pieces -> this process's share packed into rows, [b, T] arrays with
  b = batch_size / process_count."""
  rows_here = batch_size // process_count
  ds = read_ahead(pieces[process_index::process_count], rows_here)
  rows = _pack_pieces(ds, seq_len, pad_id, num_bins).batch(rows_here, drop_remainder=True)
  if num_workers > 0:
    rows = rows.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
  return rows


def packed_train_dataset(documents, seq_len: int, batch_size: int, seed: int, *, eos_id: int,
                         pad_id: int, process_index: int = 0, process_count: int = 1,
                         num_workers: int = 0,
                         num_bins: int = DEFAULT_NUM_BINS) -> grain.IterDataset:
  """Endless batches of packed rows from a random-access sequence of documents (1-D int
  arrays, no EOS; e.g. the token cache's documents, whose `lengths()` is used when present):
  pieces shuffled (reshuffled every epoch) and packed, this process's share, [b, T] arrays
  with b = batch_size / process_count."""
  return packed_batches(shuffled_pieces(documents, seq_len, seed, eos_id=eos_id), seq_len,
                        batch_size, pad_id=pad_id, process_index=process_index,
                        process_count=process_count, num_workers=num_workers, num_bins=num_bins)


def packed_eval_batches(documents, seq_len: int, batch_size: int, num_batches: int, *,
                        eos_id: int, pad_id: int, num_bins: int = DEFAULT_NUM_BINS) -> list[dict]:
  """A fixed held-out set of up to num_batches * batch_size packed rows, spread evenly over the
  documents (a random-access sequence): documents at a stride are packed until 8x the rows
  needed exist, then rows are taken evenly from those. Padding rows weigh 0."""
  want = num_batches * batch_size
  stride = max(1, len(documents) // max(want, 1))
  source = grain.MapDataset.source(documents)
  rows = []
  for ds in ([source[::stride], source] if stride > 1 else [source]):
    rows = list(itertools.islice(iter(pack_documents(ds, seq_len, eos_id=eos_id, pad_id=pad_id,
                                                     num_bins=num_bins)), 8 * want))
    if len(rows) >= want:
      break
  take = np.linspace(0, len(rows) - 1, min(want, len(rows))).astype(np.int64)
  return fixed_batches([rows[i] for i in take], batch_size)


def pair_piece(source: np.ndarray, target: np.ndarray, source_len: int, seq_len: int, *,
               bos_id: int, eos_id: int) -> dict:
  """One (source, target) token pair (no EOS/BOS) -> {sources: source + EOS, inputs: BOS +
  target, targets: target + EOS, weights}; ValueError when a side does not fit."""
  source, target = np.asarray(source, np.int32), np.asarray(target, np.int32)
  if source.size + 1 > source_len or target.size + 1 > seq_len:
    raise ValueError(f'a pair of {source.size} source and {target.size} target tokens (+ EOS) '
                     f'does not fit source_len={source_len}, seq_len={seq_len}.')
  return {'sources': np.append(source, eos_id).astype(np.int32),
          'inputs': np.append(bos_id, target).astype(np.int32),
          'targets': np.append(target, eos_id).astype(np.int32),
          'weights': np.ones((target.size + 1,), np.float32)}


_PAIR_KEYS = {'sources': 'sources', 'source_segment_ids': 'sources_segment_ids',
              'source_positions': 'sources_positions', **_LM_KEYS}


def pack_pairs(pairs, source_len: int, seq_len: int, *, bos_id: int, eos_id: int, pad_id: int,
               num_bins: int = DEFAULT_NUM_BINS) -> grain.IterDataset:
  """(source, target) token pairs (IterDataset, MapDataset or sequence of 2-tuples of 1-D int
  arrays) -> an IterDataset of packed encoder-decoder rows (see the module docstring)."""
  ds = _as_iter_dataset(pairs).map(lambda p: pair_piece(
      p[0], p[1], source_len, seq_len, bos_id=bos_id, eos_id=eos_id))
  return pack_examples(ds, source_len, seq_len, pad_id=pad_id, num_bins=num_bins)


def _unpad(example: dict, pad_id: int) -> dict:
  """A padded encoder-decoder example (training/seq2seq_data.py `make_example`) -> its piece."""
  n = int((example['weights'] > 0).sum())
  s = int((example['sources'] != pad_id).sum())
  return {'sources': example['sources'][:s], 'inputs': example['inputs'][:n],
          'targets': example['targets'][:n], 'weights': example['weights'][:n]}


def pack_examples(examples, source_len: int, seq_len: int, *, pad_id: int,
                  num_bins: int = DEFAULT_NUM_BINS) -> grain.IterDataset:
  """Padded encoder-decoder examples {sources [S], inputs, targets, weights [T]} (real tokens
  first, then `pad_id` / weight 0) -> an IterDataset of packed encoder-decoder rows."""
  ds = _as_iter_dataset(examples).map(lambda e: _unpad(e, pad_id))
  lengths = {'sources': int(source_len), **dict.fromkeys(('inputs', 'targets', 'weights'),
                                                         int(seq_len))}
  padding = {'sources': pad_id, 'inputs': pad_id, 'targets': pad_id, 'weights': 0.0}
  return _first_fit(ds, lengths, padding, num_bins).map(lambda r: _rename(r, _PAIR_KEYS))


def fixed_batches(rows: Iterable[dict], batch_size: int) -> list[dict]:
  """Every row of a finite packed dataset in batches of `batch_size` [B, ...]; the last batch
  is completed with all-padding rows (weight 0), as held-out sets need."""
  rows = list(rows)
  if not rows:
    return []
  pad = (-len(rows)) % batch_size
  blank = {k: np.zeros_like(v) for k, v in rows[0].items()}
  stacked = {k: np.stack([r[k] for r in rows] + [blank[k]] * pad) for k in rows[0]}
  return [{k: v[i:i + batch_size] for k, v in stacked.items()}
          for i in range(0, len(rows) + pad, batch_size)]


def padding_fraction(rows: Iterable[dict]) -> float:
  """Share of target slots that are padding (weight 0) in packed rows."""
  total = filled = 0
  for r in rows:
    total, filled = total + r['weights'].size, filled + int((r['weights'] > 0).sum())
  return 1.0 - filled / max(total, 1)
