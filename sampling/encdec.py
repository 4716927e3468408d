"""Encoder-decoder generation: encode the source once, then decode target tokens.

`generate` and `beam_search` run the encoder once, compute every decoder layer's cross-attention
keys and values once (`DecoderLM.context_caches`), and decode one token a step through the
decoder-only model's self-attention KV cache (models/kv_cache.py). `generate_reference` and
`beam_search_reference` recompute the decoder over the whole prefix each step (obviously
correct; the tests hold the cached versions to them). `exact_match` scores greedy outputs.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from models.kv_cache import LayerCache
from sampling import beam
from sampling.rules import sample_tokens


@functools.partial(jax.jit, static_argnames=('graphdef', 'max_new_tokens'))
def generate_reference(graphdef, params, sources: jnp.ndarray, rng: jax.Array, *,
                       max_new_tokens: int, bos_id: int, temperature=0.0, top_k=0,
                       top_p=1.0) -> jnp.ndarray:
  """sources [B, S] -> [B, max_new_tokens] target tokens (greedy when temperature == 0).

  Nothing stops at EOS: callers cut each row at its first EOS.
  """
  model = nnx.merge(graphdef, params)
  encoded, mask = model.encode(sources)
  b = sources.shape[0]
  buf = jnp.full((b, max_new_tokens + 1), bos_id, jnp.int32)

  def body(i, carry):
    buf, rng = carry
    rng, step_rng = jax.random.split(rng)
    logits = model.decode(encoded, mask, buf[:, :-1])
    logits = jax.lax.dynamic_index_in_dim(logits, i, axis=1, keepdims=False)
    token = sample_tokens(step_rng, logits, temperature, top_k, top_p)
    return jax.lax.dynamic_update_index_in_dim(buf, token, i + 1, axis=1), rng

  buf, _ = jax.lax.fori_loop(0, max_new_tokens, body, (buf, rng))
  return buf[:, 1:]


@struct.dataclass
class DecodeState:
  """What `generate`'s decode loop carries (B rows, T = max_new_tokens)."""
  i: jax.Array                   # [] int32, the target position decoded next
  token: jax.Array               # [B] int32, the newest token (BOS before the first step)
  cache: list[LayerCache]        # the decoder's self-attention cache, one per layer
  done: jax.Array                # [B] bool, the row has emitted EOS
  out: jax.Array                 # [B, T] int32, the tokens so far; EOS after each row's end


@functools.partial(jax.jit, static_argnames=('graphdef', 'max_new_tokens'))
def generate(graphdef, params, sources: jnp.ndarray, rng: jax.Array, *, max_new_tokens: int,
             bos_id: int, eos_id: int, temperature=0.0, top_k=0, top_p=1.0) -> jnp.ndarray:
  """Cached decode: sources [B, S] -> [B, max_new_tokens] tokens, EOS after each row's end.

  Stops early once every row has emitted EOS. Step i samples with fold_in(rng, i).
  """
  model = nnx.merge(graphdef, params)
  decoder = model.decoder
  context = decoder.context_caches(*model.encode(sources))
  b = sources.shape[0]

  def cond(s: DecodeState):
    return (s.i < max_new_tokens) & ~jnp.all(s.done)

  def body(s: DecodeState) -> DecodeState:
    logits, cache = decoder(s.token[:, None], jnp.full((b, 1), s.i, jnp.int32), cache=s.cache,
                            cache_index=s.i, context_cache=context)
    token = sample_tokens(jax.random.fold_in(rng, s.i), logits[:, 0], temperature, top_k, top_p)
    token = jnp.where(s.done, eos_id, token)
    out = jax.lax.dynamic_update_index_in_dim(s.out, token, s.i, axis=1)
    return DecodeState(i=s.i + 1, token=token, cache=cache, done=s.done | (token == eos_id),
                       out=out)

  start = DecodeState(i=jnp.int32(0), token=jnp.full((b,), bos_id, jnp.int32),
                      cache=decoder.init_cache(b, max_new_tokens), done=jnp.zeros((b,), bool),
                      out=jnp.full((b, max_new_tokens), eos_id, jnp.int32))
  return jax.lax.while_loop(cond, body, start).out


@functools.partial(jax.jit, static_argnames=('graphdef', 'beam_size', 'max_len', 'bos_id',
                                             'eos_id', 'alpha'))
def beam_search(graphdef, params, sources: jnp.ndarray, *, beam_size: int, max_len: int,
                bos_id: int, eos_id: int, alpha: float = 0.6):
  """Cached beam search (sampling/beam.py): the self-attention cache follows the beams.

  sources [B, S] -> (sequences [B, W, max_len], scores [B, W], lengths [B, W]), best first.
  """
  model = nnx.merge(graphdef, params)
  decoder = model.decoder
  encoded, mask = model.encode(sources)
  b, w = sources.shape[0], beam_size
  context = decoder.context_caches(jnp.repeat(encoded, w, axis=0), jnp.repeat(mask, w, axis=0))

  def step(tokens, i, cache):
    token = jax.lax.dynamic_slice_in_dim(tokens, i, 1, axis=1)
    logits, cache = decoder(token, jnp.full((b * w, 1), i, jnp.int32), cache=cache,
                            cache_index=i, context_cache=context)
    return logits[:, 0], cache

  return beam.beam_search(step, decoder.init_cache(b * w, max_len), batch=b, beam_size=w,
                          max_len=max_len, bos_id=bos_id, eos_id=eos_id, alpha=alpha)


def exact_match_counts(predicted: jnp.ndarray, targets: jnp.ndarray,
                       weights: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
  """(rows predicted exactly, rows) of a batch; a row is exact when every weighted target
  token (the EOS included) is predicted. Rows with no weight (padding) are not counted."""
  real = jnp.any(weights > 0, axis=-1)
  exact = jnp.all((predicted == targets) | (weights == 0), axis=-1) & real
  return jnp.sum(exact), jnp.sum(real)


def exact_match(graphdef, params, batches, *, bos_id: int, eos_id: int,
                put=lambda b: b) -> float:
  """Share of the rows of `batches` whose greedy output equals the target exactly."""
  correct, total = 0, 0
  for batch in batches:
    batch = put(batch)
    out = generate(graphdef, params, batch['sources'], jax.random.key(0),
                   max_new_tokens=batch['targets'].shape[1], bos_id=bos_id, eos_id=eos_id)
    c, n = exact_match_counts(out, batch['targets'], batch['weights'])
    correct, total = correct + int(c), total + int(n)
  return correct / max(total, 1)


def eval_exact_match(graphdef, params, batches, tokenizer, put) -> dict:
  """{'eval_exact_match'}: the held-out metric train.py adds for encoder-decoder tasks
  (a training.loop.EvalFn)."""
  return {'eval_exact_match': exact_match(graphdef, params, batches, bos_id=tokenizer.bos_id,
                                          eos_id=tokenizer.eos_id, put=put)}


@functools.partial(jax.jit, static_argnames=('graphdef', 'beam_size', 'max_len', 'bos_id',
                                             'eos_id', 'alpha'))
def beam_search_reference(graphdef, params, sources: jnp.ndarray, *, beam_size: int,
                          max_len: int, bos_id: int, eos_id: int, alpha: float = 0.6):
  """Beam search (sampling/beam.py) over a full decoder recompute per step.

  sources [B, S] -> (sequences [B, W, max_len], scores [B, W], lengths [B, W]), best first.
  """
  model = nnx.merge(graphdef, params)
  encoded, mask = model.encode(sources)
  b = sources.shape[0]
  context = (jnp.repeat(encoded, beam_size, axis=0), jnp.repeat(mask, beam_size, axis=0))

  def step(tokens, i, context):
    logits = model.decode(*context, tokens)
    return jax.lax.dynamic_index_in_dim(logits, i, axis=1, keepdims=False), context

  return beam.beam_search(step, context, batch=b, beam_size=beam_size, max_len=max_len,
                          bos_id=bos_id, eos_id=eos_id, alpha=alpha)


def complete(graphdef, params, tok, source_text: str, *, max_len: int, max_new_tokens: int,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
             num_samples: int = 1, beam_size: int = 0, alpha: float = 0.6) -> list[str]:
  """Target texts for one source text: `num_samples` samples, or with beam_size > 0 the
  `num_samples` best beams. Raises ValueError when the source (+ EOS) exceeds `max_len`."""
  source = np.append(tok.encode(source_text), tok.eos_id).astype(np.int32)
  if source.size > max_len:
    raise ValueError(f'the source is {source.size - 1} tokens + EOS, longer than the model '
                     f'maximum model.max_len={max_len}.')
  if max_new_tokens > max_len:
    raise ValueError(f'max_new_tokens={max_new_tokens} exceeds model.max_len={max_len}.')
  if beam_size > 0:
    seqs, _, lengths = beam_search(
        graphdef, params, jnp.asarray(source[None]), beam_size=max(beam_size, num_samples),
        max_len=max_new_tokens, bos_id=tok.bos_id, eos_id=tok.eos_id, alpha=alpha)
    rows = [np.asarray(s)[:l] for s, l in zip(seqs[0], lengths[0])][:num_samples]
  else:
    rows = np.asarray(generate(
        graphdef, params, jnp.asarray(np.tile(source, (num_samples, 1))), jax.random.key(seed),
        max_new_tokens=max_new_tokens, bos_id=tok.bos_id, eos_id=tok.eos_id,
        temperature=temperature, top_k=top_k, top_p=top_p))
  out = []
  for row in rows:
    stop = np.flatnonzero(row == tok.eos_id)
    out.append(tok.decode(row[:stop[0]] if stop.size else row))
  return out
