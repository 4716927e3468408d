"""Batched scoring: the log-probability of each row's target tokens, and whether greedy decoding
would have produced them, in one jitted forward pass per batch.

A request is (input tokens, target tokens). Decoder-only: the row is input + target, truncated
from the left to `max_len + 1` tokens; the model reads all but the last and the last
len(target) predictions are scored (what lm-eval's Hugging Face backend does). Encoder-decoder:
the encoder reads input + EOS, the decoder BOS + target[:-1] and predicts target.

Rows are sorted by length, cut into batches of `batch_size` (the last one filled with empty
rows) and right-padded to a length bucket (a power of two >= `smallest_bucket`, at most
`max_len`), so a whole evaluation compiles once per bucket, not once per request.
"""
from __future__ import annotations

import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def _reduce(logits, targets, mask):
  """logits [B, T, V], targets / mask [B, T] -> (target log-probs [B, T], 0 where not scored;
  all scored tokens greedy [B]). The caller sums in float64."""
  logits = logits.astype(jnp.float32)
  logp = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), targets[..., None], -1)[..., 0]
  hit = jnp.argmax(logits, axis=-1) == targets
  return jnp.where(mask, logp, 0.0), jnp.all(hit | ~mask, -1)


@functools.partial(jax.jit, static_argnames=('graphdef',))
def score_decoder(graphdef, params, tokens, targets, mask):
  """tokens [B, T] (right-padded), targets [B, T] (tokens shifted left), mask [B, T] (True at
  scored positions) -> (target log-probs [B, T] fp32, all scored tokens greedy [B] bool)."""
  return _reduce(nnx.merge(graphdef, params)(tokens), targets, mask)


@functools.partial(jax.jit, static_argnames=('graphdef',))
def score_encoder_decoder(graphdef, params, sources, tokens, targets, mask):
  """sources [B, S] (pad-padded encoder input), tokens [B, T] (BOS + targets[:-1]), targets and
  mask [B, T] -> (target log-probs [B, T], greedy [B])."""
  return _reduce(nnx.merge(graphdef, params)(sources, tokens), targets, mask)


def bucket(n: int, smallest: int, largest: int) -> int:
  """The smallest power of two >= max(n, smallest), capped at `largest` (>= n)."""
  return min(max(smallest, 1 << max(n - 1, 0).bit_length()), max(largest, n))


class Scorer:
  """Scores (input, target) token requests of a decoder-only or encoder-decoder model.

  kind: `model.kind`; max_len: the longest row the model reads; pad_id: the padding token (the
  encoder masks it out; decoder rows are right-padded, which causal attention never sees);
  bos_id / eos_id: the encoder-decoder's decoder start and source end tokens.
  """

  def __init__(self, graphdef, params, *, kind: str, max_len: int, pad_id: int,
               bos_id: int = -1, eos_id: int = -1, batch_size: int = 16,
               smallest_bucket: int = 32):
    self.graphdef, self.params, self.kind = graphdef, params, kind
    self.max_len, self.pad_id, self.bos_id, self.eos_id = max_len, pad_id, bos_id, eos_id
    self.batch_size, self.smallest_bucket = batch_size, smallest_bucket
    self.shapes = set()   # (batch, lengths...) compiled so far: the tests count them

  def _rows(self, inputs: Sequence[int], targets: Sequence[int]):
    """One request -> (source or None, model input tokens, shifted targets, scored mask)."""
    if not 0 < len(targets) <= self.max_len:
      raise ValueError(f'a continuation of {len(targets)} tokens: must be 1..{self.max_len} '
                       'tokens (the model maximum length).')
    if self.kind == 'decoder':
      row = (list(inputs) + list(targets))[-(self.max_len + 1):]
      mask = np.zeros(len(row) - 1, bool)
      mask[-len(targets):] = True
      return None, row[:-1], row[1:], mask
    source = (list(inputs) + [self.eos_id])[-self.max_len:]
    return source, [self.bos_id] + list(targets[:-1]), list(targets), np.ones(len(targets), bool)

  def score(self, requests: Sequence[tuple[Sequence[int], Sequence[int]]],
            progress: Callable[[int], object] | None = None) -> list[tuple[float, bool]]:
    """[(input tokens, target tokens)] -> [(sum of target log-probs, targets all greedy)].
    progress(n) is called with the number of requests each batch scored."""
    rows = [self._rows(i, t) for i, t in requests]
    order = sorted(range(len(rows)), key=lambda k: -len(rows[k][1]) - len(rows[k][0] or ()))
    out = [None] * len(rows)
    for start in range(0, len(order), self.batch_size):
      chunk = order[start:start + self.batch_size]
      logp, greedy = self._score_batch([rows[k] for k in chunk])
      for k, lp, g in zip(chunk, logp, greedy):
        out[k] = (float(lp), bool(g))
      if progress:
        progress(len(chunk))
    return out

  def _score_batch(self, rows):
    b, bucket_of = self.batch_size, functools.partial(
        bucket, smallest=self.smallest_bucket, largest=self.max_len)
    t = bucket_of(max(len(r[1]) for r in rows))
    tokens = np.full((b, t), self.pad_id, np.int32)
    targets = np.full((b, t), self.pad_id, np.int32)
    mask = np.zeros((b, t), bool)
    for i, (_, x, y, m) in enumerate(rows):
      tokens[i, :len(x)], targets[i, :len(y)], mask[i, :len(m)] = x, y, m
    if self.kind == 'decoder':
      self.shapes.add((b, t))
      logp, greedy = score_decoder(self.graphdef, self.params, tokens, targets, mask)
    else:
      s = bucket_of(max(len(r[0]) for r in rows))
      sources = np.full((b, s), self.pad_id, np.int32)
      for i, r in enumerate(rows):
        sources[i, :len(r[0])] = r[0]
      self.shapes.add((b, s, t))
      logp, greedy = score_encoder_decoder(self.graphdef, self.params, sources, tokens,
                                           targets, mask)
    logp = np.asarray(logp)[:len(rows)].astype(np.float64).sum(-1)
    return logp, np.asarray(greedy)[:len(rows)]
