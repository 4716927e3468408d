"""Beam search with the GNMT length penalty (Wu et al. 2016), for any step function.

A hypothesis is finished when it emits EOS (its length counts the EOS) or reaches `max_len`
tokens; its score is log p(y) / lp(len), lp(len) = ((5 + len) / 6) ** alpha (alpha = 0: plain
log-probability). Each step extends the `beam_size` alive hypotheses by every token: the EOS
extensions compete with the finished pool, the best `beam_size` others stay alive. With
alpha >= 0 the search stops once no alive hypothesis can still beat the worst finished one.
When `beam_size` is at least the number of candidate outputs, nothing is ever pruned and the
result is the exact ranking of every output (tests/test_encdec.py checks this exhaustively).
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import struct

NEG_INF = -jnp.inf


def length_penalty(length, alpha: float):
  return ((5.0 + jnp.asarray(length, jnp.float32)) / 6.0) ** alpha


def _gather(tree, parents):
  """Rows [B * W, ...] of every leaf reordered to their parent beams: parents [B, W]."""
  b, w = parents.shape
  flat = (parents + w * jnp.arange(b)[:, None]).reshape(-1)
  return jax.tree.map(lambda x: jnp.take(x, flat, axis=0), tree)


def _top(scores, *arrays, k):
  """The k best entries along axis 1 of scores [B, M] and of each array [B, M, ...]."""
  scores, idx = jax.lax.top_k(scores, k)
  return (scores, *(jnp.take_along_axis(a, idx.reshape(idx.shape + (1,) * (a.ndim - 2)), axis=1)
                    for a in arrays))


@struct.dataclass
class BeamState:
  """What the search loop carries (B batch rows, W beams, L = max_len)."""
  i: jax.Array            # [] int32, the position extended next
  alive_seq: jax.Array    # [B, W, L] int32, the alive hypotheses (EOS after position i - 1)
  alive_logp: jax.Array   # [B, W] float32, their log-probabilities (-inf: empty slot)
  fin_seq: jax.Array      # [B, W, L] int32, the finished hypotheses, best first
  fin_score: jax.Array    # [B, W] float32, their length-penalised scores (-inf: empty slot)
  fin_len: jax.Array      # [B, W] int32, their lengths (EOS included)
  step_state: Any         # step_fn's state (e.g. a KV cache), leading dim B * W, beam order


def beam_search(step_fn: Callable, state, *, batch: int, beam_size: int, max_len: int,
                bos_id: int, eos_id: int, alpha: float = 0.6):
  """Returns (sequences [B, W, max_len] int32, scores [B, W], lengths [B, W]), best first.

  step_fn(tokens [B * W, max_len], i, state) -> (logits [B * W, V] for position i, state):
  tokens hold BOS then each hypothesis' tokens so far (position i is the newest input);
  `state` (e.g. a KV cache, leading dim B * W) is reordered to the surviving beams after
  each step. Sequences hold EOS after their end. Scores of -inf mark empty slots (fewer
  candidates than beams).
  """
  b, w = batch, beam_size
  positions = jnp.arange(max_len)

  def cond(s: BeamState):
    lp = jnp.maximum(length_penalty(s.i + 1, alpha), length_penalty(max_len, alpha))
    best_alive = jnp.max(s.alive_logp, axis=1) / lp
    settled = jnp.all((s.fin_score[:, -1] > NEG_INF) & (best_alive < s.fin_score[:, -1]))
    return (s.i < max_len) & ~(settled & (alpha >= 0))

  def body(s: BeamState) -> BeamState:
    i = s.i
    tokens = jnp.concatenate([jnp.full((b, w, 1), bos_id, jnp.int32), s.alive_seq[..., :-1]], -1)
    logits, state = step_fn(tokens.reshape(b * w, max_len), i, s.step_state)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1).reshape(b, w, -1)
    vocab = logp.shape[-1]
    cand = s.alive_logp[..., None] + logp                                # [B, W, V]
    # EOS extensions join the finished pool.
    eos_seq = jnp.where(positions == i, eos_id, s.alive_seq)
    eos_score = cand[..., eos_id] / length_penalty(i + 1, alpha)
    fin_score, fin_seq, fin_len = _top(
        jnp.concatenate([s.fin_score, eos_score], 1), jnp.concatenate([s.fin_seq, eos_seq], 1),
        jnp.concatenate([s.fin_len, jnp.full((b, w), i + 1, jnp.int32)], 1), k=w)
    # The best other extensions stay alive.
    cand = cand.at[..., eos_id].set(NEG_INF).reshape(b, w * vocab)
    alive_logp, flat = jax.lax.top_k(cand, w)
    parents, token = flat // vocab, (flat % vocab).astype(jnp.int32)
    alive_seq = jnp.take_along_axis(s.alive_seq, parents[..., None], axis=1)
    alive_seq = jnp.where(positions == i, token[..., None], alive_seq)
    state = _gather(state, parents)
    # Hypotheses that reach max_len without EOS are finished as they are.
    full_score = jnp.where(i == max_len - 1, alive_logp / length_penalty(max_len, alpha), NEG_INF)
    fin_score, fin_seq, fin_len = _top(
        jnp.concatenate([fin_score, full_score], 1), jnp.concatenate([fin_seq, alive_seq], 1),
        jnp.concatenate([fin_len, jnp.full((b, w), max_len, jnp.int32)], 1), k=w)
    return BeamState(i=i + 1, alive_seq=alive_seq, alive_logp=alive_logp, fin_seq=fin_seq,
                     fin_score=fin_score, fin_len=fin_len, step_state=state)

  start = BeamState(
      i=jnp.int32(0), alive_seq=jnp.full((b, w, max_len), eos_id, jnp.int32),
      alive_logp=jnp.tile(jnp.asarray([0.0] + [NEG_INF] * (w - 1), jnp.float32), (b, 1)),
      fin_seq=jnp.full((b, w, max_len), eos_id, jnp.int32),
      fin_score=jnp.full((b, w), NEG_INF, jnp.float32), fin_len=jnp.zeros((b, w), jnp.int32),
      step_state=state)
  end = jax.lax.while_loop(cond, body, start)
  return end.fin_seq, end.fin_score, end.fin_len
