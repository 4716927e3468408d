"""Encoder-decoder data: (source, target) examples as fixed-length arrays, and their pipelines.

Tasks (`data.task`): 'pairs' (the user's JSONL or TSV files), 'span_corruption' (T5 objective
over the LM corpus), 'addition' and 'reversal' (synthetic, with a held-out set the training
stream never contains). An example is {'sources' [S], 'inputs' [T] (BOS + target),
'targets' [T] (target + EOS), 'weights' [T]}; S = data.source_len, T = data.seq_len. Sources end
with EOS and are padded with the tokenizer's pad id (which the model masks out).
"""
from __future__ import annotations

import dataclasses

import grain
import numpy as np

from training import data as data_lib
from training import packing, span_corruption, token_cache
from training.data import DataError
from training.token_stream import Cache
from text.tokenizer import Tokenizer

ALPHABET = 'abcdefghijklmnopqrstuvwxyz'


@dataclasses.dataclass
class Seq2SeqData:
  train: grain.IterDataset   # endless batches of this process's rows
  eval: list                 # fixed held-out batches (padding rows have weight 0)
  baseline: float            # unigram entropy (nats/token) of the held-out targets


def make_example(source: np.ndarray, target: np.ndarray, source_len: int, target_len: int,
                 tok: Tokenizer) -> dict:
  """Token arrays -> one padded example (source + EOS, BOS + target, target + EOS)."""
  sources = np.full((source_len,), tok.pad_id, np.int32)
  inputs = np.full((target_len,), tok.pad_id, np.int32)
  targets = np.full((target_len,), tok.pad_id, np.int32)
  sources[:source.size + 1] = np.append(source, tok.eos_id)
  inputs[:target.size + 1] = np.append(tok.bos_id, target)
  targets[:target.size + 1] = np.append(target, tok.eos_id)
  weights = (np.arange(target_len) <= target.size).astype(np.float32)
  return {'sources': sources, 'inputs': inputs, 'targets': targets, 'weights': weights}


def stack(examples: list[dict]) -> dict:
  return {k: np.stack([e[k] for e in examples]) for k in examples[0]}


# --- pairs files ----------------------------------------------------------------------------

class _Pairs:
  """Random-access examples of the cached (source, target) documents i in [start, stop)."""

  def __init__(self, docs, data_cfg, tok: Tokenizer, start: int = 0, stop: int | None = None):
    self.src, self.tgt = docs.with_field('source'), docs.with_field('target')
    self.cfg, self.tok = data_cfg, tok
    self.start, self.stop = start, len(docs) if stop is None else stop

  def __len__(self) -> int:
    return self.stop - self.start

  def __getitem__(self, i: int) -> dict:
    i = self.start + int(i)
    return make_example(self.src[i], self.tgt[i], self.cfg.source_len, self.cfg.seq_len, self.tok)


def _check_pair_lengths(docs, files: list, data_cfg) -> None:
  """A DataError naming the file and line of the first pair longer than its side allows."""
  for field, limit, name in (('source', data_cfg.source_len, 'data.source_len'),
                             ('target', data_cfg.seq_len, 'data.seq_len')):
    lengths = docs.with_field(field).lengths()
    too_long = np.flatnonzero(lengths + 1 > limit)
    if too_long.size:
      f, line = docs.where(int(too_long[0]))
      raise DataError(f'data.files: {files[f]}:{line}: the {field} is '
                      f'{lengths[too_long[0]]} tokens + EOS, longer than {name}={limit}; raise '
                      f'{name} (at most model.max_len) or shorten the {field}.')


def pair_examples(data_cfg, tok: Tokenizer) -> tuple[_Pairs, _Pairs]:
  """(train, held-out) random-access examples of the pairs files, read from their token cache
  (JSONL {"source", "target"} lines, parquet columns, or TSV source<TAB>target lines); held out
  by a hash of the source text."""
  cache = Cache(token_cache.ensure(data_cfg))
  train, held = cache.documents('train'), cache.documents('eval')
  for docs in (train, held):
    _check_pair_lengths(docs, cache.files, data_cfg)
  if len(train) + len(held) < 2:
    raise DataError(f'data.files: {len(train) + len(held)} pair(s) in all; at least 2 are '
                    'needed (training + held-out).')
  if not len(held):  # too few pairs for the hash split: hold out the last one
    n = len(train)
    return _Pairs(train, data_cfg, tok, 0, n - 1), _Pairs(train, data_cfg, tok, n - 1, n)
  return _Pairs(train, data_cfg, tok), _Pairs(held, data_cfg, tok)


# --- synthetic tasks ------------------------------------------------------------------------

def synthetic_pair(task: str, rng: np.random.Generator, n: int) -> tuple[str, str]:
  """addition: 'a+b' -> 'a+b' evaluated, each operand of 1..n digits; reversal: a string of
  1..n lowercase letters -> the string reversed."""
  if task == 'addition':
    a, b = (int(rng.integers(10 ** (d - 1) if d > 1 else 0, 10 ** d))
            for d in rng.integers(1, n + 1, size=2))
    return f'{a}+{b}', str(a + b)
  text = ''.join(rng.choice(list(ALPHABET), size=int(rng.integers(1, n + 1))))
  return text, text[::-1]


class _Synthetic:
  """Random-access endless source: example i is drawn from a generator seeded by (seed, i),
  redrawn while its source is held out (`data.is_held_out` of the source text: a fixed
  `data.eval_percent` share of all possible sources, spread evenly over lengths)."""

  def __init__(self, data_cfg, tok: Tokenizer, seed: int):
    self.cfg, self.tok, self.seed = data_cfg, tok, seed

  def __len__(self) -> int:
    return 2 ** 62

  def __getitem__(self, i: int) -> dict:
    rng = np.random.default_rng([self.seed, 1, int(i)])
    while True:
      source, target = synthetic_pair(self.cfg.task, rng, self.cfg.synthetic_length)
      if not data_lib.is_held_out(source, self.cfg.eval_percent):
        break
    return make_example(self.tok.encode(source), self.tok.encode(target), self.cfg.source_len,
                        self.cfg.seq_len, self.tok)


def synthetic_held_out(data_cfg, tok: Tokenizer, count: int, seed: int) -> list[dict]:
  """Up to `count` distinct held-out examples, drawn from the training distribution restricted
  to held-out sources (fewer when the task has fewer held-out sources)."""
  rng = np.random.default_rng([seed, 2])
  seen, examples = set(), []
  for _ in range(int(50 * count * 100 / data_cfg.eval_percent)):
    source, target = synthetic_pair(data_cfg.task, rng, data_cfg.synthetic_length)
    if source not in seen and data_lib.is_held_out(source, data_cfg.eval_percent):
      seen.add(source)
      examples.append((source, target))
    if len(examples) == count:
      break
  return [make_example(tok.encode(s), tok.encode(t), data_cfg.source_len, data_cfg.seq_len, tok)
          for s, t in examples]


# --- span corruption ------------------------------------------------------------------------

def _span_window(data_cfg, tok: Tokenizer) -> int:
  if not hasattr(tok, 'first_sentinel'):
    raise DataError(f"data.task=span_corruption needs sentinel ids; data.tokenizer="
                    f"{data_cfg.tokenizer!r} has none (use data.tokenizer='byte').")
  # make_example appends EOS to both sides.
  n = span_corruption.window_length(data_cfg.source_len - 1, data_cfg.seq_len - 1,
                                    data_cfg.noise_density, data_cfg.mean_span_length,
                                    tok.num_sentinels)
  if n < 2:
    raise DataError(f'data.source_len={data_cfg.source_len} and data.seq_len={data_cfg.seq_len} '
                    'are too short for one span-corrupted window; raise them.')
  return n


class _SpanCorrupt(grain.transforms.RandomMap):
  def __init__(self, data_cfg, tok: Tokenizer):
    self.cfg, self.tok = data_cfg, tok

  def random_map(self, window: np.ndarray, rng: np.random.Generator) -> dict:
    inputs, targets = span_corruption.corrupt(
        window, rng, noise_density=self.cfg.noise_density,
        mean_span_length=self.cfg.mean_span_length, first_sentinel=self.tok.first_sentinel)
    return make_example(inputs, targets, self.cfg.source_len, self.cfg.seq_len, self.tok)


class _Chunks:
  """Random-access non-overlapping windows tokens[i*n : (i+1)*n]."""

  def __init__(self, tokens: np.ndarray, n: int):
    self.tokens, self.n = tokens, n

  def __len__(self) -> int:
    return self.tokens.size // self.n

  def __getitem__(self, i: int) -> np.ndarray:
    return self.tokens[int(i) * self.n:(int(i) + 1) * self.n]


# --- assembly -------------------------------------------------------------------------------

def eval_batches(examples: list[dict], batch_size: int, num_batches: int) -> list[dict]:
  """Up to num_batches * batch_size held-out examples in fixed batches; pad rows weigh 0."""
  examples = examples[:num_batches * batch_size]
  rows = stack(examples)
  pad = (-len(examples)) % batch_size
  padding = {k: np.repeat(v[:1], pad, axis=0) for k, v in rows.items()}
  padding['weights'] = np.zeros_like(padding['weights'])
  rows = {k: np.concatenate([v, padding[k]]) for k, v in rows.items()}
  return [{k: v[i:i + batch_size] for k, v in rows.items()}
          for i in range(0, len(examples) + pad, batch_size)]


def target_entropy(batches: list[dict]) -> float:
  """Unigram entropy (nats/token) of the weighted target tokens: the no-context baseline."""
  tokens = np.concatenate([b['targets'][b['weights'] > 0] for b in batches])
  return data_lib.unigram_entropy(tokens)


def load(config, tok: Tokenizer, *, process_index: int = 0, process_count: int = 1
         ) -> Seq2SeqData:
  """The training stream and held-out batches of `config.data.task`. Raises DataError."""
  d, t = config.data, config.train
  num_eval = t.eval_batches * t.batch_size
  if d.task in ('addition', 'reversal'):
    held_out = synthetic_held_out(d, tok, num_eval, t.seed)
    if not held_out:
      raise DataError(f'data.task={d.task}: no held-out example found; raise '
                      f'data.synthetic_length or data.eval_percent.')
    ds = grain.MapDataset.source(_Synthetic(d, tok, t.seed))
  elif d.task == 'pairs':
    train, held = pair_examples(d, tok)
    held_out = [held[i] for i in range(min(len(held), num_eval))]
    ds = grain.MapDataset.source(train).shuffle(seed=t.seed).repeat(None)
  elif d.task == 'span_corruption':
    corpus = data_lib.load_corpus(d)
    n = _span_window(d, tok)
    chunks = _Chunks(corpus.eval, n)
    if not len(chunks):
      raise DataError(f'data.corpus: the held-out split has {corpus.eval.size} tokens, fewer '
                      f'than one {n}-token span-corruption window.')
    corrupt = _SpanCorrupt(d, tok)
    idx = np.linspace(0, len(chunks) - 1, min(len(chunks), num_eval)).astype(np.int64)
    held_out = [corrupt.random_map(chunks[i], np.random.default_rng([t.seed, 3, int(i)]))
                for i in idx]
    ds = (grain.MapDataset.source(_Chunks(corpus.train, n)).shuffle(seed=t.seed).repeat(None)
          .random_map(corrupt, seed=t.seed))
  else:
    raise DataError(f'data.task={d.task!r} is not an encoder-decoder task.')
  ds, rows = ds[process_index::process_count], t.batch_size // process_count
  if d.packing:   # pairs share rows; held-out examples stay one a row (exact match decodes them)
    train_ds = packing.pack_examples(packing.read_ahead(ds, rows), d.source_len, d.seq_len,
                                     pad_id=tok.pad_id).batch(rows, drop_remainder=True)
  else:
    train_ds = packing.read_ahead(ds.batch(rows, drop_remainder=True))
  if d.num_workers > 0:
    train_ds = train_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=d.num_workers))
  evals = eval_batches(held_out, t.batch_size, t.eval_batches)
  return Seq2SeqData(train_ds, evals, target_entropy(evals))
