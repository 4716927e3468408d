"""T5 span corruption (Raffel et al. 2020, sec. 3.1.4) over a window of tokens.

A window of n tokens gets round(n * noise_density) noise tokens in round(noise / mean_span_length)
spans; span and gap lengths are random compositions, gaps first. Each noise span is replaced in
the input by one sentinel id; the target lists every sentinel followed by the span it stands for:
  tokens  a b c d e f g        inputs  a <s0> d e <s1> g
  noise       ^ ^     ^        targets <s0> b c <s1> f
(training/seq2seq_data.py appends EOS to both). The counts depend on n only, so every window
of one length gives the same input and target lengths (static shapes).
"""
from __future__ import annotations

import numpy as np


def span_counts(n: int, noise_density: float, mean_span_length: float) -> tuple[int, int]:
  """(noise tokens, spans) for a window of n >= 2 tokens; at least one token kept and one noised."""
  num_noise = min(max(int(round(n * noise_density)), 1), n - 1)
  num_spans = max(int(round(num_noise / mean_span_length)), 1)
  return num_noise, min(num_spans, num_noise, n - num_noise)


def corrupted_lengths(n: int, noise_density: float, mean_span_length: float) -> tuple[int, int]:
  """(input length, target length) of a corrupted n-token window, EOS included."""
  noise, spans = span_counts(n, noise_density, mean_span_length)
  return n - noise + spans + 1, noise + spans + 1


def window_length(source_len: int, target_len: int, noise_density: float,
                  mean_span_length: float, max_spans: int) -> int:
  """The longest window whose corrupted input fits source_len and target fits target_len (and
  that needs at most max_spans sentinels); 0 when none does."""
  best = 0
  for n in range(2, source_len + target_len + 1):
    inputs, targets = corrupted_lengths(n, noise_density, mean_span_length)
    if (inputs <= source_len and targets <= target_len
        and span_counts(n, noise_density, mean_span_length)[1] <= max_spans):
      best = n
  return best


def _composition(total: int, parts: int, rng: np.random.Generator) -> np.ndarray:
  """A uniformly random split of `total` into `parts` positive integers."""
  cuts = np.sort(rng.choice(np.arange(1, total), parts - 1, replace=False)) if parts > 1 else []
  return np.diff(np.concatenate([[0], cuts, [total]])).astype(np.int64)


def corrupt(tokens: np.ndarray, rng: np.random.Generator, *, noise_density: float,
            mean_span_length: float, first_sentinel: int) -> tuple[np.ndarray, np.ndarray]:
  """tokens [n] -> (inputs, targets) int32 without EOS; sentinel i is first_sentinel + i."""
  n = tokens.size
  num_noise, num_spans = span_counts(n, noise_density, mean_span_length)
  noise_lengths = _composition(num_noise, num_spans, rng)
  keep_lengths = _composition(n - num_noise, num_spans, rng)
  inputs, targets, pos = [], [], 0
  for i in range(num_spans):
    sentinel = np.int32(first_sentinel + i)
    inputs += [tokens[pos:pos + keep_lengths[i]], [sentinel]]
    pos += keep_lengths[i]
    targets += [[sentinel], tokens[pos:pos + noise_lengths[i]]]
    pos += noise_lengths[i]
  return (np.concatenate(inputs).astype(np.int32), np.concatenate(targets).astype(np.int32))
