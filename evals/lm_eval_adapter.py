"""lm-eval-harness's model interface (`lm_eval.api.model.TemplateLM`) over a loaded workdir.

  lm = LmxLM(load_workdir('runs/tiny'))
  lm_eval.simple_evaluate(model=lm, tasks=['lmx_python'], task_manager=...)

Tokenization follows lm-eval's Hugging Face backend (HFLM) with its default settings, so the
same checkpoint gives the same tokens there and here: texts are encoded with the tokenizer's
special tokens (e.g. BOS; none for the byte tokenizer) unless they already start with the
prefix token's string; a context's trailing spaces move to the continuation; an empty context
is the prefix token. The prefix token is BOS when the tokenizer puts BOS before a text, else
EOS (what separates documents in our training data).

- loglikelihood: (context, continuation) pairs scored in batches (evals/scoring.py).
- loglikelihood_rolling: a text cut into windows of `max_length` tokens as lm-eval's
  `get_rolling_token_windows` does (each token predicted once, with as much context as fits),
  the windows scored in batches, their sums added up.
- generate_until: the cached sampler (sampling/sampler.py), greedy unless the task samples,
  up to `max_gen_toks` tokens or EOS, stopping once every row's text holds a stop string; the
  text is cut at the first one. Contexts are cut from the left to max_length - max_gen_toks.

Encoder-decoder workdirs: loglikelihood only (the context is the encoder input); the other
two request types raise, and `check_output_types` says so before anything compiles.
"""
from __future__ import annotations

import json
import logging
from typing import Iterable

import numpy as np
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import normalize_gen_kwargs, postprocess_generated_text
from tqdm import tqdm

from evals.scoring import Scorer
from sampling.sampler import Sampler

log = logging.getLogger(__name__)

OUTPUT_TYPES = {'decoder': ('loglikelihood', 'multiple_choice', 'loglikelihood_rolling',
                            'generate_until'),
                'encoder_decoder': ('loglikelihood', 'multiple_choice')}
SAMPLING_KEYS = ('do_sample', 'temperature', 'top_k', 'top_p')


class LmxLM(TemplateLM):
  """An lm-eval LM over `workdir.load.Loaded` (config, graphdef, params, tokenizer, step).

  max_length: the longest row the model reads (default `model.max_len`); batch_size: rows per
  jitted forward; max_gen_toks: generate_until's default when a task sets none; seed: sampling
  seed for tasks that sample.
  """

  def __init__(self, loaded, *, batch_size: int = 16, max_length: int | None = None,
               max_gen_toks: int = 256, seed: int = 0):
    super().__init__()
    self.loaded, self.tok = loaded, loaded.tokenizer
    model = loaded.config.model
    self.kind = model.kind
    self.backend = 'causal' if self.kind == 'decoder' else 'seq2seq'
    self._max_length = max_length or model.max_len
    if not 0 < self._max_length <= model.max_len:
      raise ValueError(f'max_length={self._max_length}: must be in 1..model.max_len='
                       f'{model.max_len}.')
    self._max_gen_toks, self.seed = max_gen_toks, seed
    self.batch_size = batch_size
    pad = max(self.tok.pad_id, 0)
    self.scorer = Scorer(loaded.graphdef, loaded.params, kind=self.kind,
                         max_len=self._max_length, pad_id=pad, bos_id=self.tok.bos_id,
                         eos_id=self.tok.eos_id, batch_size=batch_size)
    self.sampler = Sampler(loaded.graphdef, loaded.params, max_len=self._max_length,
                           eos_id=self.tok.eos_id if self.tok.eos_id >= 0 else None,
                           pad_id=pad) if self.kind == 'decoder' else None
    probe = self.tok.encode('a', add_special_tokens=True)
    self._adds_bos = self.tok.bos_id >= 0 and len(probe) > 0 and int(probe[0]) == self.tok.bos_id
    strings = self.tok.special_token_strings
    self._prefix_string = strings.get('bos_token' if self._adds_bos else 'eos_token')

  # ------------------------------------------------------------------ what lm-eval asks for
  @property
  def eot_token_id(self) -> int:
    return self.tok.eos_id

  @property
  def prefix_token_id(self) -> int:
    return self.tok.bos_id if self._adds_bos or self.tok.eos_id < 0 else self.tok.eos_id

  @property
  def max_length(self) -> int:
    return self._max_length

  @property
  def max_gen_toks(self) -> int:
    return self._max_gen_toks

  @property
  def tokenizer_name(self) -> str:
    return self.tok.name

  def get_model_info(self) -> dict:
    """What lm-eval records about the model in its results."""
    return {'model_kind': self.kind, 'tokenizer': self.tok.name, 'step': self.loaded.step,
            'max_length': self._max_length}

  def check_output_types(self, output_types: Iterable[str]) -> None:
    """Raises ValueError naming what this model kind cannot answer (before any compile)."""
    bad = sorted(set(output_types) - set(OUTPUT_TYPES[self.kind]))
    if bad:
      raise ValueError(f'model.kind={self.kind!r} answers {", ".join(OUTPUT_TYPES[self.kind])} '
                       f'requests, not {", ".join(bad)}.')

  def tok_encode(self, string: str, add_special_tokens: bool | None = None,
                 left_truncate_len: int | None = None, **kwargs) -> list[int]:
    """HFLM's rule: special tokens unless asked otherwise or the text starts with the prefix
    token's string."""
    del kwargs
    if add_special_tokens is None:
      add_special_tokens = not (self._prefix_string and string.startswith(self._prefix_string))
    ids = [int(i) for i in self.tok.encode(string, add_special_tokens=add_special_tokens)]
    return ids[-left_truncate_len:] if left_truncate_len else ids

  def tok_decode(self, tokens) -> str:
    return self.tok.decode(np.asarray(tokens, np.int32))

  # ------------------------------------------------------------------ the three request types
  def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
    """[((context, continuation) or None, context ids, continuation ids)] -> [(logp, greedy)]."""
    del kwargs
    with tqdm(total=len(requests), disable=disable_tqdm, desc='Scoring') as bar:
      results = self.scorer.score([(ctx, cont) for _, ctx, cont in requests], bar.update)
    for (key, _, _), answer in zip(requests, results):
      if key is not None:
        self.cache_hook.add_partial('loglikelihood', key, answer)
    return results

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
    self._require('loglikelihood_rolling')
    windows, owner = [], []
    for k, (text,) in enumerate(req.args for req in requests):
      for ctx, cont in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
          token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
          max_seq_len=self._max_length, context_len=1)):
        windows.append((None, ctx, cont))
        owner.append(k)
    totals = [0.0] * len(requests)
    for k, (logp, _) in zip(owner, self._loglikelihood_tokens(windows, disable_tqdm)):
      totals[k] += logp
    for req, total in zip(requests, totals):
      self.cache_hook.add_partial('loglikelihood_rolling', req.args, total)
    return totals

  def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
    self._require('generate_until')
    out = [None] * len(requests)
    groups = {}
    for k, req in enumerate(requests):   # one group per distinct generation settings
      groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(k)
    bar = tqdm(total=len(requests), disable=disable_tqdm, desc='Generating')
    for members in groups.values():
      settings = self._settings(requests[members[0]].args[1])
      contexts = {k: self._context(requests[k].args[0], settings['max_new_tokens'])
                  for k in members}
      members = sorted(members, key=lambda k: -len(contexts[k]))
      for start in range(0, len(members), self.batch_size):
        chunk = members[start:start + self.batch_size]
        texts = self._generate([contexts[k] for k in chunk], settings)
        for k, text in zip(chunk, texts):
          out[k] = text
          self.cache_hook.add_partial('generate_until', requests[k].args, text)
        bar.update(len(chunk))
    bar.close()
    return out

  # ------------------------------------------------------------------ helpers
  def _require(self, output_type: str) -> None:
    if output_type not in OUTPUT_TYPES[self.kind]:
      self.check_output_types([output_type])

  def _settings(self, gen_kwargs: dict) -> dict:
    kwargs = normalize_gen_kwargs(gen_kwargs, self._max_gen_toks)
    until = kwargs.pop('until') or []
    max_new = int(kwargs.pop('max_gen_toks'))
    if not 0 < max_new < self._max_length:
      raise ValueError(f'max_gen_toks={max_new}: must be in 1..{self._max_length - 1} (the '
                       f'model maximum length {self._max_length} minus at least one context '
                       'token).')
    ignored = sorted(set(kwargs) - set(SAMPLING_KEYS))
    if ignored:
      log.warning('generate_until ignores generation settings %s.', ignored)
    sample = bool(kwargs.get('do_sample'))
    return dict(until=[u for u in until if u], max_new_tokens=max_new,
                temperature=float(kwargs.get('temperature', 0.0)) if sample else 0.0,
                top_k=int(kwargs.get('top_k') or 0), top_p=float(kwargs.get('top_p') or 1.0))

  def _context(self, text: str, max_new: int) -> list[int]:
    ids = self.tok_encode(text, left_truncate_len=self._max_length - max_new)
    return ids or [self.prefix_token_id]

  def _generate(self, prompts: list[list[int]], settings: dict) -> list[str]:
    """Greedy or sampled continuations of `prompts`, cut at the first stop string. The batch is
    filled to `batch_size` with rows that make no tokens, so its shape stays the same."""
    n, until = len(prompts), settings['until']
    padded = prompts + [prompts[0]] * (self.batch_size - n)
    max_new = np.asarray([settings['max_new_tokens']] * n + [0] * (self.batch_size - n))
    tokens = [[] for _ in range(n)]
    for chunk in self.sampler.stream(
        padded, max_new_tokens=max_new, temperature=settings['temperature'],
        top_k=settings['top_k'], top_p=settings['top_p'], seed=self.seed):
      for row, new in zip(tokens, chunk[:n]):
        row.extend(int(t) for t in new if t >= 0)
      if until and all(any(u in self.tok_decode(row) for u in until) for row in tokens):
        break
    return [postprocess_generated_text(self.tok_decode(row), until, None) for row in tokens]
