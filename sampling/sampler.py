"""The cached sampler: prefill a batch of prompts in one call, then decode in fixed-size chunks.

  sampler = Sampler(graphdef, params, max_len=config.model.max_len, eos_id=tokenizer.eos_id)
  sampler.generate(prompts, max_new_tokens=64, temperature=0.8, top_p=0.9, seed=0)
      -> one 1-D int32 array of new tokens per prompt (the stop token is not included)
  for chunk in sampler.stream(prompts, ...):   # [B, C] int32, -1 where a row made no token
    ...

Prompts of different lengths share a batch: they are left-padded (position -1, never attended
to) to a length bucket, a power of two >= `min_bucket`, so new prompt lengths rarely compile.
`prefill` runs every prompt at once and samples the first token; `decode_program()` is one jit
whose `lax.while_loop` makes up to `chunk` tokens, stopping early once every row has met its stop
token or its max_new_tokens; its state (the cache included) is donated, so the cache is updated
in place. The loop carries one `SamplingState` (its fields list every array with its shape).
Attention reads every slot of the KV cache (models/kv_cache.py), so the cache is kept just long
enough for the next chunk: one of `kv_cache.view_sizes` (multiples of 128 growing by ~1.25x, up
to a power of two >= bucket + max_new_tokens), grown by `grow_cache` between chunks. A decode
step then costs O(filled length); each cache length compiles the decode program once. Sampling
controls are traced: changing them never recompiles. Step i samples with
`fold_in(key(seed), i)`, so results do not depend on the chunk size. `Sampler.compile` builds a
request shape's programs ahead of time, also against abstract parameters (`Sampler.schedule`
lists the cache lengths a request uses); `save_compiled` / `load_compiled` move them between
processes (sample.py compiles in a child process).
"""
from __future__ import annotations

import functools
import pickle
from typing import Callable, Iterable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct
from jax.experimental import serialize_executable

from models import kv_cache
from models.kv_cache import LayerCache
from sampling.rules import sample_tokens
from workdir import hostenv


def bucket(n: int, smallest: int) -> int:
  """The smallest power of two >= max(n, smallest)."""
  return max(smallest, 1 << max(n - 1, 0).bit_length())


@struct.dataclass
class SamplingControls:
  """The sampling rules (sampling/rules.py), traced so that changing them never recompiles."""
  temperature: jax.Array   # [] float32, 0 = greedy
  top_k: jax.Array         # [] int32, 0 = every token
  top_p: jax.Array         # [] float32, 1 = every token


@struct.dataclass
class SamplingState:
  """What the decode loop carries from one token to the next (B rows, S cache slots)."""
  cache: list[LayerCache]    # one per layer: k, v [B, K, S, H], pos [B, S] (models/kv_cache.py)
  index: jax.Array           # [] int32, the cache slot the next token is written to
  position: jax.Array        # [B] int32, the position of the next token of each row
  step: jax.Array            # [] int32, tokens sampled so far (step i samples with fold_in(key, i))
  key: jax.Array             # [] PRNG key of the request's seed
  controls: SamplingControls
  eos: jax.Array             # [B] int32, each row's stop token (-1: none)
  max_new: jax.Array         # [B] int32, each row's token budget
  count: jax.Array           # [B] int32, tokens each row has emitted
  done: jax.Array            # [B] bool, row met its stop token or its budget
  token: jax.Array           # [B] int32, the newest sampled token (the next input)


def _sample(state: SamplingState, logits: jax.Array,
            step: jax.Array) -> tuple[SamplingState, jax.Array]:
  """Samples every row's next token and updates the stop bookkeeping. logits: [B, V].
  Returns (state, emitted [B] int32, -1 where a row made no token)."""
  c = state.controls
  token = sample_tokens(jax.random.fold_in(state.key, step), logits, c.temperature, c.top_k,
                        c.top_p)
  live = ~state.done
  stop = token == state.eos
  emitted = jnp.where(live & ~stop, token, -1)
  count = state.count + (live & ~stop)
  done = state.done | stop | (count >= state.max_new)
  return state.replace(token=token, count=count, done=done), emitted


# XLA:CPU computes a bf16 dot from an f32 copy of its weight; the lm_head's (94 MiB for a 32k
# vocabulary at d_model 768) was sampling's largest temporary. In slices: 1/8 of it.
LOGIT_SLICES = 8


def _merge(graphdef, params):
  """The model, computing a narrower-than-f32 lm_head in `LOGIT_SLICES` vocab slices."""
  model = nnx.merge(graphdef, params)
  head = getattr(model, 'lm_head', None)
  if head is not None and jnp.dtype(head.kernel[...].dtype).itemsize < 4:
    model.logit_slices = LOGIT_SLICES
  return model


@functools.partial(jax.jit, static_argnames=('graphdef', 'cache_len'))
def prefill(graphdef, params, tokens: jax.Array, lengths: jax.Array, max_new: jax.Array,
            eos: jax.Array, controls: SamplingControls, seed: jax.Array, *,
            cache_len: int) -> tuple[SamplingState, jax.Array]:
  """tokens: [B, P] left-padded, lengths [B], max_new [B], eos [B] (-1: none), seed [] int32.

  Returns (state, first tokens [B]); state feeds `decode_program()`.
  """
  model = _merge(graphdef, params)
  b, p = tokens.shape
  positions = jnp.arange(p)[None, :] - (p - lengths)[:, None]
  positions = jnp.where(positions >= 0, positions, -1)
  logits, cache = model(tokens, positions, cache=model.init_cache(b, cache_len))
  state = SamplingState(
      cache=cache, index=jnp.int32(p), position=lengths.astype(jnp.int32), step=jnp.int32(1),
      key=jax.random.key(seed), controls=controls, eos=eos.astype(jnp.int32),
      max_new=max_new.astype(jnp.int32), count=jnp.zeros((b,), jnp.int32), done=max_new <= 0,
      token=jnp.zeros((b,), jnp.int32))
  return _sample(state, logits[:, -1], 0)


def _decode_chunk(graphdef, params, state: SamplingState, *,
                  chunk: int) -> tuple[SamplingState, jax.Array]:
  """Up to `chunk` decode steps: (state, tokens [B, chunk], -1 where nothing was made)."""
  b = state.token.shape[0]

  def cond(carry):
    i, state, _ = carry
    return (i < chunk) & ~jnp.all(state.done)

  def body(carry):
    i, state, out = carry
    # XLA:CPU computes bf16 dots in f32 from an f32 copy of each weight. Tied to the step
    # counter, the parameters are not loop-invariant, so those converts stay in the loop body
    # instead of being hoisted before it: a full f32 copy of a bf16 model held for the call.
    p, i = jax.lax.optimization_barrier((params, i))
    model = _merge(graphdef, p)
    logits, cache = model(state.token[:, None], state.position[:, None], cache=state.cache,
                          cache_index=state.index)
    state = state.replace(cache=cache, index=state.index + 1, position=state.position + 1,
                          step=state.step + 1)
    state, emitted = _sample(state, logits[:, 0], state.step - 1)
    return i + 1, state, jax.lax.dynamic_update_index_in_dim(out, emitted, i, axis=1)

  _, state, out = jax.lax.while_loop(
      cond, body, (jnp.int32(0), state, jnp.full((b, chunk), -1, jnp.int32)))
  return state, out


# Compiler options of the decode loop, by backend. XLA:CPU's own dot emitter packs the whole key
# cache [H, S] again for each decode token's [G, H] x [H, S] scores; with YNNPACK's dots and
# reductions (options of this program only: prefill keeps the XLA:CPU set-up whose memory
# figures workdir/hostenv.py describes) the attention of configs/default.py:small over 1152
# slots ran ~2x faster in isolation, and (with kv_cache's leaner softmax) a decode step at
# context 1024 cost ~0.04-0.09 ms more than at 128 instead of ~0.12 (benchmarks/decode.py,
# 2-core AMD EPYC).
DECODE_COMPILER_OPTIONS = {
    'cpu': {'xla_cpu_experimental_ynn_fusion_type':
            'LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_REDUCE'}}


@functools.cache
def _decode_jit(backend: str):
  return jax.jit(_decode_chunk, static_argnames=('graphdef', 'chunk'), donate_argnames=('state',),
                 compiler_options=DECODE_COMPILER_OPTIONS.get(backend))


def decode_program():
  """`_decode_chunk` jitted (state donated) with the default backend's
  `DECODE_COMPILER_OPTIONS`: call it as decode_program()(graphdef, params, state, chunk=C)."""
  return _decode_jit(jax.default_backend())


@functools.partial(jax.jit, static_argnames=('graphdef', 'cache_len'))
def grow_cache(graphdef, params, cache: list, *, cache_len: int) -> list:
  """The KV cache moved into a longer one of `cache_len` slots (windowed layers: up to their
  window); the filled slots keep their places (`kv_cache.grow`)."""
  model = nnx.merge(graphdef, params)
  empty = model.init_cache(cache[0].pos.shape[0], cache_len, cache[0].k.dtype)
  return [kv_cache.grow(c, e) for c, e in zip(cache, empty)]


class Sampler:
  """Generates from a decoder LM's (graphdef, params) with a KV cache. See the module docstring.

  max_len: the model's longest position (prompt + new tokens must fit). eos_id: default stop
  token (None: none). chunk: decode steps per jitted call (the streaming granularity).

  `compile` builds a request shape's programs ahead of time; `params` may then still be
  abstract (jax.ShapeDtypeStruct leaves, e.g. checkpoints.abstract_params) and be set to the
  real ones afterwards, so that compiling never overlaps holding the parameters; sample.py
  compiles in a child process and loads the programs (`save_compiled`, `load_compiled`).
  Requests of another shape fall back to the jitted functions.
  """

  def __init__(self, graphdef, params, *, max_len: int, eos_id: int | None = None,
               pad_id: int = 0, chunk: int = 32, min_bucket: int = 16):
    self.graphdef, self.params = graphdef, params
    self.max_len, self.eos_id, self.pad_id = max_len, eos_id, pad_id
    self.chunk, self.min_bucket = chunk, min_bucket
    self.compiled: dict[tuple, jax.stages.Compiled] = {}
    self._serialized: dict[tuple, tuple] = {}   # load_compiled's programs, by compiled's keys

  def layout(self, prompt_len: int, max_new_tokens: int) -> tuple[int, list[int]]:
    """(prompt bucket P, the cache lengths a request may use: `kv_cache.view_sizes`) for its
    longest prompt and largest max_new_tokens."""
    p = bucket(prompt_len, self.min_bucket)
    return p, kv_cache.view_sizes(bucket(p + max_new_tokens, self.min_bucket))

  def cache_len(self, sizes: list[int], index: int) -> int:
    """The cache length a chunk starting at slot `index` needs (it writes index .. index +
    chunk - 1)."""
    return next(s for s in sizes if s >= min(index + self.chunk, sizes[-1]))

  def schedule(self, prompt_len: int, max_new_tokens: int) -> tuple[int, list[int]]:
    """(prompt bucket P, the cache lengths a request uses in order: prefill's, then each one
    `grow_cache` moves to). A row's first token comes from prefill, so at most
    ceil((max_new_tokens - 1) / chunk) chunks run, chunk k from slot P + k * chunk."""
    p, sizes = self.layout(prompt_len, max_new_tokens)
    chunks = max(-(-(max_new_tokens - 1) // self.chunk), 1)
    return p, sorted({self.cache_len(sizes, p + k * self.chunk) for k in range(chunks)})

  def compile(self, batch: int, prompt_len: int, max_new_tokens: int) -> None:
    """Compiles every program a request of `batch` prompts (the longest `prompt_len` tokens,
    max_new_tokens at most `max_new_tokens`) runs; `stream` then uses them. `self.params` may be
    abstract."""
    p, lengths = self.schedule(prompt_len, max_new_tokens)
    i32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)
    f32 = jax.ShapeDtypeStruct((), jnp.float32)
    controls = SamplingControls(temperature=f32, top_k=i32(), top_p=f32)
    g = self.graphdef
    lowered = prefill.lower(g, self.params, i32(batch, p), i32(batch), i32(batch), i32(batch),
                            controls, i32(), cache_len=lengths[0])
    self.compiled[('prefill', batch, p, lengths[0])] = lowered.compile()
    del lowered   # its HLO, before the next compile
    if max_new_tokens <= 1:
      return
    state = jax.eval_shape(functools.partial(prefill, g, cache_len=lengths[0]), self.params,
                           i32(batch, p), i32(batch), i32(batch), i32(batch), controls, i32())[0]
    for before, length in zip([None, *lengths], lengths):
      if before is not None:
        cache = state.cache
        self.compiled[('grow', batch, before, length)] = grow_cache.lower(
            g, self.params, cache, cache_len=length).compile()
        state = state.replace(cache=jax.eval_shape(
            functools.partial(grow_cache, g, cache_len=length), self.params, cache))
      self.compiled[('decode', batch, length, self.chunk)] = decode_program().lower(
          g, self.params, state, chunk=self.chunk).compile()

  def save_compiled(self, path: str) -> None:
    """Writes the programs `compile` built to `path` (serialized executables), for
    `load_compiled` in a process with the same devices, jax version and XLA flags. XLA:CPU
    serializes completely only in a process that has not loaded programs from jax's persistent
    compilation cache (kernels they share are missing), and only programs not run yet."""
    with open(path, 'wb') as f:
      pickle.dump({key: serialize_executable.serialize(exe)
                   for key, exe in self.compiled.items()}, f)

  def load_compiled(self, path: str) -> None:
    """Adds the programs `save_compiled` wrote to `path` (a file this program wrote itself: it
    is unpickled). Nothing is traced or compiled. Each is deserialized when a request first runs
    it and released once the request has moved past it (prefill after prefill, a decode
    program when the cache grows): one in memory at a time, ~35 MiB each for a 150M model."""
    with open(path, 'rb') as f:
      self._serialized.update(pickle.load(f))

  def _run(self, key: tuple, fn, *args, **static):
    """fn(graphdef, params, *args, **static), by the program `compile` made (or
    `load_compiled` added) for `key` if any."""
    exe = self.compiled.get(key)
    if exe is None and key in self._serialized:
      exe = self.compiled[key] = serialize_executable.deserialize_and_load(*self._serialized[key])
      hostenv.release_free_memory()   # deserializing's scratch
    if exe is not None:
      return exe(self.params, *args)
    return fn(self.graphdef, self.params, *args, **static)

  def _done_with(self, key: tuple) -> None:
    """Releases a deserialized program (`load_compiled`) the request no longer needs."""
    if key in self._serialized and self.compiled.pop(key, None) is not None:
      hostenv.release_free_memory()

  def check(self, prompts: Sequence[Sequence[int]], max_new_tokens, temperature: float,
            top_k: int, top_p: float) -> tuple[list[np.ndarray], np.ndarray]:
    """Validates a request before anything compiles: (prompts, max_new_tokens per row)."""
    if not 0 <= temperature < float('inf'):
      raise ValueError(f'temperature={temperature!r}: must be >= 0 (0 is greedy).')
    if not 0 <= top_k:
      raise ValueError(f'top_k={top_k!r}: must be >= 0 (0 keeps every token).')
    if not 0 < top_p <= 1:
      raise ValueError(f'top_p={top_p!r}: must be in (0, 1] (1 keeps every token).')
    if len(prompts) == 0:
      raise ValueError('prompts is empty: give at least one prompt.')
    arrays = [np.asarray(p, np.int32).reshape(-1) for p in prompts]
    max_new = np.broadcast_to(np.asarray(max_new_tokens), (len(arrays),))
    if max_new.dtype.kind not in 'iu' or np.any(max_new < 0):
      raise ValueError(f'max_new_tokens={max_new_tokens!r}: must be an integer >= 0 (or one '
                       'per prompt).')
    for i, (a, n) in enumerate(zip(arrays, max_new)):
      if a.size == 0:
        raise ValueError(f'prompt {i} is empty: give at least one token to continue.')
      if a.size + n > self.max_len:
        raise ValueError(f'prompt {i} ({a.size} tokens) + max_new_tokens={n} exceeds the model '
                         f'maximum length model.max_len={self.max_len}.')
    return arrays, max_new.astype(np.int32)

  def stream(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int | Sequence[int],
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
             eos_id: int | None = None) -> Iterator[np.ndarray]:
    """Yields [B, n] int32 chunks of new tokens as they are made; -1 where a row made none.

    max_new_tokens: one for all rows or one per row. A row stops after its max_new_tokens or
    at the stop token `eos_id` (default: the sampler's), which is not emitted.
    """
    arrays, max_new = self.check(prompts, max_new_tokens, temperature, top_k, top_p)
    eos = self.eos_id if eos_id is None else eos_id
    b = len(arrays)
    p, sizes = self.layout(max(a.size for a in arrays), int(max_new.max()))
    index, allocated = p, self.cache_len(sizes, p)
    tokens = np.full((b, p), self.pad_id, np.int32)
    for row, a in zip(tokens, arrays):
      row[p - a.size:] = a
    # device_put of numpy arrays: nothing here compiles beside the sampler's programs
    put = lambda x, dtype: jax.device_put(np.asarray(x, dtype))
    controls = SamplingControls(temperature=put(temperature, np.float32),
                                top_k=put(top_k, np.int32), top_p=put(top_p, np.float32))
    pre = ('prefill', b, p, allocated)
    state, first = self._run(
        pre, prefill, put(tokens, np.int32), put([a.size for a in arrays], np.int32),
        put(max_new, np.int32), put(np.full((b,), -1 if eos is None else eos), np.int32),
        controls, put(seed, np.int32), cache_len=allocated)
    self._done_with(pre)
    if max_new.max() == 0:
      return
    yield np.asarray(first)[:, None]
    while not bool(np.all(np.asarray(state.done))):   # a chunk ends early only when all are
      if self.cache_len(sizes, index) > allocated:
        before, allocated = allocated, self.cache_len(sizes, index)
        self._done_with(('decode', b, before, self.chunk))
        grow = ('grow', b, before, allocated)
        state = state.replace(cache=self._run(grow, grow_cache, state.cache,
                                              cache_len=allocated))
        self._done_with(grow)
      state, out = self._run(('decode', b, allocated, self.chunk), decode_program(), state,
                             chunk=self.chunk)
      index += self.chunk
      yield np.asarray(out)
    self._done_with(('decode', b, allocated, self.chunk))

  def generate(self, prompts: Sequence[Sequence[int]], **kwargs) -> list[np.ndarray]:
    """One 1-D int32 array of new tokens per prompt, without the stop token. Args: `stream`."""
    chunks = list(self.stream(prompts, **kwargs))
    if not chunks:
      return [np.zeros((0,), np.int32) for _ in prompts]
    out = np.concatenate(chunks, axis=1)
    return [row[row >= 0] for row in out]


def stream_text(decode: Callable[[np.ndarray], str],
                chunks: Iterable[np.ndarray]) -> Iterator[str]:
  """Text pieces of row 0 as token chunks [B, n] arrive (-1: no token). An incomplete
  multi-byte character (decoded as U+FFFD) is held back until the rest of it arrives."""
  tokens, shown = [], ''
  for chunk in chunks:
    tokens.extend(int(t) for t in chunk[0] if t >= 0)
    text = decode(np.asarray(tokens, np.int32)).rstrip('\ufffd')
    if text.startswith(shown) and len(text) > len(shown):
      yield text[len(shown):]
      shown = text
  text = decode(np.asarray(tokens, np.int32))
  if text.startswith(shown):
    yield text[len(shown):]
