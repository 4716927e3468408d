"""Corpora, the held-out split, and the grain pipeline that turns a token stream into batches.

The default corpus is this interpreter's standard-library source. Text is tokenized once into
the token cache (training/token_cache.py; `prepare.py` or the first `train.py` builds it) and
read back from its memory-mapped shards. Documents are split into train and held-out by a hash
(of the file name for whole files, of the text for records), so the split never changes with
the file order or the machine.
"""
from __future__ import annotations

import dataclasses

import grain
import numpy as np

from training import packing, token_cache
from training.documents import DataError, corpus_files, stdlib_root  # noqa: F401 (re-exported)
from training.token_cache import is_held_out  # noqa: F401 (re-exported)
from training.token_stream import Cache, TokenStream


@dataclasses.dataclass
class Corpus:
  train: TokenStream         # the training documents, each followed by EOS
  eval: TokenStream          # the held-out documents (or the stream's tail, see load_corpus)
  num_files: dict            # documents a split: {'train': n, 'eval': n}
  baseline: float            # unigram entropy (nats/token) of `eval`
  cache: Cache
  eval_counts: np.ndarray    # token counts of `eval` (the baseline's distribution)


def load_corpus(data_cfg, *, progress: bool = True) -> Corpus:
  """The configured corpus from its token cache (built first when missing). Raises DataError.

  A corpus too small for a by-document split (either side shorter than one window) holds out
  the last data.eval_percent of its token stream instead.
  """
  cache = Cache(token_cache.ensure(data_cfg, progress=progress))
  train, held = cache.stream('train'), cache.stream('eval')
  counts = dict(cache.totals['docs'])
  need = data_cfg.seq_len + 1
  total = train.size + held.size
  if total < 2 * need:
    where = 'data.files' if data_cfg.corpus == 'files' else 'data.corpus'
    raise DataError(f'{where}: the corpus has {total} tokens in {len(cache.files)} file(s); at '
                    f'least {2 * need} are needed for data.seq_len={data_cfg.seq_len} (train + '
                    'held-out).')
  if train.size < need or held.size < need:
    stream = train + held
    cut = min(stream.size - need, int(stream.size * (1 - data_cfg.eval_percent / 100)))
    train, held = stream.sub(0, cut), stream.sub(cut, stream.size)
    eval_counts = held.bincount()
  else:
    eval_counts = cache.eval_unigram_counts()
  return Corpus(train, held, counts, entropy_of_counts(eval_counts), cache, eval_counts)


def split_documents(corpus: Corpus):
  """(training, held-out) Documents; when the hash split leaves either side empty (a corpus of
  few documents) the last document is held out."""
  train, held = corpus.cache.documents('train'), corpus.cache.documents('eval')
  if len(train) and len(held):
    return train, held
  docs = (train if len(train) else held)
  if len(docs) < 2:
    raise DataError(f'data.packing=True needs at least 2 documents (training + held-out); the '
                    f'corpus has {len(docs)}. Use data.packing=False (windows of the token '
                    'stream) or add documents.')
  return docs.sub(0, len(docs) - 1), docs.sub(len(docs) - 1, len(docs))


def lm_data(data_cfg, train_cfg, pad_id: int, *, process_index: int = 0,
            process_count: int = 1) -> tuple:
  """(endless training batches, fixed held-out batches, unigram baseline) of the LM corpus:
  windows of its token stream, or with data.packing whole documents packed into rows with
  segment ids and positions (training/packing.py)."""
  d, t = data_cfg, train_cfg
  corpus = load_corpus(d, progress=process_index == 0)
  if not d.packing:
    train_ds = train_dataset(corpus.train, d.seq_len, t.batch_size, t.seed,
                             process_index=process_index, process_count=process_count,
                             num_workers=d.num_workers)
    return (train_ds, eval_batches(corpus.eval, d.seq_len, t.batch_size, t.eval_batches),
            corpus.baseline)
  train, held = split_documents(corpus)
  ids = {'eos_id': corpus.cache.eos_id, 'pad_id': pad_id}
  train_ds = packing.packed_train_dataset(train, d.seq_len, t.batch_size, t.seed,
                                          process_index=process_index,
                                          process_count=process_count,
                                          num_workers=d.num_workers, **ids)
  evals = packing.packed_eval_batches(held, d.seq_len, t.batch_size, t.eval_batches, **ids)
  return train_ds, evals, corpus.baseline


class _Windows:
  """Random-access source: window i is tokens[i*T : i*T + T + 1] (inputs + shifted targets)."""

  def __init__(self, tokens, seq_len: int):
    self.tokens, self.seq_len = tokens, seq_len

  def __len__(self) -> int:
    return (self.tokens.size - 1) // self.seq_len

  def __getitem__(self, i: int) -> np.ndarray:
    start = int(i) * self.seq_len
    return np.asarray(self.tokens[start:start + self.seq_len + 1], np.int32)


def _to_example(windows: np.ndarray) -> dict:
  return {'inputs': windows[:, :-1], 'targets': windows[:, 1:],
          'weights': np.ones(windows[:, 1:].shape, np.float32)}


def train_dataset(tokens, seq_len: int, batch_size: int, seed: int, *,
                  process_index: int = 0, process_count: int = 1,
                  num_workers: int = 0) -> grain.IterDataset:
  """Shuffled (reshuffled every epoch), endless batches of this process's share of rows.

  tokens: an int array or a TokenStream (read window by window; nothing is loaded whole).
  Each yields {'inputs', 'targets': [b, T] int32, 'weights': [b, T] f32}, b = batch/processes.
  Iterate with `iter(...)`; the iterator's state is checkpointed by training/checkpoint.py.
  """
  return window_batches(shuffled_windows(tokens, seq_len, seed), batch_size,
                        process_index=process_index, process_count=process_count,
                        num_workers=num_workers)


def shuffled_windows(tokens, seq_len: int, seed: int) -> grain.MapDataset:
  """The stream's windows [T + 1], shuffled and reshuffled every epoch, endless."""
  return grain.MapDataset.source(_Windows(tokens, seq_len)).shuffle(seed=seed).repeat(None)


def window_batches(windows: grain.MapDataset, batch_size: int, *, process_index: int = 0,
                   process_count: int = 1, num_workers: int = 0) -> grain.IterDataset:
  """Endless windows -> this process's share in training batches (see train_dataset)."""
  ds = windows[process_index::process_count]
  ds = ds.batch(batch_size // process_count, drop_remainder=True).map(_to_example)
  ids = packing.read_ahead(ds)
  if num_workers > 0:
    ids = ids.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
  return ids


def eval_batches(tokens, seq_len: int, batch_size: int, num_batches: int) -> list:
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


def entropy_of_counts(counts: np.ndarray) -> float:
  """Entropy (nats/token) of the distribution given by token counts."""
  counts = np.asarray(counts, np.float64)
  p = counts[counts > 0] / counts.sum()
  return float(-(p * np.log(p)).sum())


def unigram_entropy(tokens: np.ndarray) -> float:
  """Entropy (nats/token) of the empirical unigram distribution: the no-context baseline."""
  return entropy_of_counts(np.bincount(tokens))
