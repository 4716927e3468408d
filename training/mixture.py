"""Weighted data mixtures: the training rows of several corpora (training/sources.py) mixed in
proportion to their weights, and a held-out loss per source.

Training: each source's rows (windows of its token stream, or with `data.packing` the pieces of
its documents) are shuffled with a seed derived from `train.seed` and the source's name, and
repeated; grain's `MapDataset.mix` interleaves the sources so that of the first k rows source
i supplies k * w_i / sum(w) up to a row or two (grain scales the weights to integers, the
smallest to 100). Which source row k comes from depends on the weights alone, which of its
rows on the seed. The mixed rows are then split over processes, batched (or packed) exactly as
a single corpus's, and the iterator's state (an index) is checkpointed, so a resume continues
the same sequence of sources and rows.

Held-out: each source keeps its own split. `MixtureEval.metrics` gives `eval_loss/NAME` per
source and `eval_loss`, their mean weighted by the shares w_i / sum(w) (the loss on the
training mixture). The unigram baseline is the entropy of the shares-weighted mixture of the
sources' held-out unigram distributions: the best no-context loss on that same mixture.
"""
from __future__ import annotations

import dataclasses
import hashlib
from typing import Callable

import grain
import numpy as np

from training import data as data_lib
from training import packing, sources
from training.documents import DataError


@dataclasses.dataclass
class MixtureEval:
  """Fixed held-out batches per source, and the sources' shares of the mixture."""
  sets: dict[str, list]       # name -> held-out batches (as data.eval_batches returns)
  shares: dict[str, float]    # name -> w / sum(w)

  def metrics(self, loss_of: Callable[[list], float]) -> dict[str, float]:
    """{'eval_loss/NAME': loss_of(NAME's batches) for every source, 'eval_loss': their
    shares-weighted mean}."""
    line = {f'eval_loss/{name}': loss_of(batches) for name, batches in self.sets.items()}
    line['eval_loss'] = sum(self.shares[name] * line[f'eval_loss/{name}'] for name in self.sets)
    return line

  @property
  def batches(self) -> list:
    """Every source's batches, one list."""
    return [b for batches in self.sets.values() for b in batches]


def source_seed(seed: int, name: str) -> int:
  """The shuffle seed of source `name`: its row order depends on the seed and its name only."""
  return int.from_bytes(hashlib.sha256(f'{seed}:{name}'.encode()).digest()[:4], 'little') >> 1


def shares(weights: dict[str, float]) -> dict[str, float]:
  total = sum(weights.values())
  return {name: w / total for name, w in weights.items()}


def mixture_entropy(counts: dict[str, np.ndarray], shares_: dict[str, float]) -> float:
  """Entropy (nats/token) of sum_i shares_i * (counts_i / sum counts_i)."""
  size = max(c.size for c in counts.values())
  p = sum(shares_[n] * np.pad(c, (0, size - c.size)) / c.sum() for n, c in counts.items())
  return data_lib.entropy_of_counts(p)


def load(data_cfg, *, progress: bool = True) -> dict[str, data_lib.Corpus]:
  """name -> Corpus of every source with weight > 0 (token caches built first when missing).
  Every source's files are checked before any is tokenized. Raises DataError."""
  sources.check_files(data_cfg)
  corpora = {}
  for name, cfg in sources.source_configs(data_cfg).items():
    try:
      corpora[name] = data_lib.load_corpus(cfg, progress=progress)
    except DataError as e:
      raise sources.renamed(e, data_cfg, name) from None
  return corpora


def mix(rows: dict[str, grain.MapDataset], weights: dict[str, float]) -> grain.MapDataset:
  """Endless per-source rows -> endless mixed rows, source i at w_i / sum(w) of them."""
  names = list(weights)
  return grain.MapDataset.mix([rows[n] for n in names], [weights[n] for n in names])


def lm_data(data_cfg, train_cfg, pad_id: int, *, process_index: int = 0,
            process_count: int = 1) -> tuple:
  """(endless training batches, MixtureEval, unigram baseline) of `data.mixture`: windows of
  the sources' token streams, or with data.packing their documents packed into rows."""
  d, t = data_cfg, train_cfg
  corpora = load(d, progress=process_index == 0)
  weights = sources.weights(d)
  seeds = {name: source_seed(t.seed, name) for name in corpora}
  where = dict(process_index=process_index, process_count=process_count,
               num_workers=d.num_workers)
  evals = {}
  if not d.packing:
    rows = {n: data_lib.shuffled_windows(c.train, d.seq_len, seeds[n]) for n, c in corpora.items()}
    train = data_lib.window_batches(mix(rows, weights), t.batch_size, **where)
    for name, c in corpora.items():
      evals[name] = data_lib.eval_batches(c.eval, d.seq_len, t.batch_size, t.eval_batches)
  else:
    rows = {}
    for name, c in corpora.items():
      try:
        docs, held = data_lib.split_documents(c)
      except DataError as e:
        raise sources.renamed(e, d, name) from None
      ids = {'eos_id': c.cache.eos_id}
      rows[name] = packing.shuffled_pieces(docs, d.seq_len, seeds[name], **ids)
      evals[name] = packing.packed_eval_batches(held, d.seq_len, t.batch_size, t.eval_batches,
                                                pad_id=pad_id, **ids)
    train = packing.packed_batches(mix(rows, weights), d.seq_len, t.batch_size, pad_id=pad_id,
                                   **where)
  s = shares(weights)
  baseline = mixture_entropy({n: c.eval_counts for n, c in corpora.items()}, s)
  return train, MixtureEval(evals, s), baseline
