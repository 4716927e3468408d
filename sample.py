"""Sample from a trained workdir: python sample.py --workdir=DIR --prompt=TEXT [--temperature ...].

Uses the cached sampler (sampling/sampler.py); one sample is printed as it is generated.
"""
from workdir import hostenv

hostenv.ensure_fast_malloc(sampling=True)

import jax
from absl import app, flags, logging

from sampling import encdec
from workdir.load import open_workdir, restore
from sampling.sampler import Sampler, stream_text
from text.chat import prompt_ids
from workdir.files import WorkdirError

_WORKDIR = flags.DEFINE_string('workdir', None, 'A training workdir.', required=True)
_PROMPT = flags.DEFINE_string('prompt', None, 'Text to continue.', required=True)
_CHAT = flags.DEFINE_bool('chat', False, 'Send --prompt as a user turn through the tokenizer\'s '
                          'chat template (tokenizer_config.json `chat_template`).')
_MAX_NEW = flags.DEFINE_integer('max_new_tokens', 200, 'Tokens to generate per sample.')
_TEMPERATURE = flags.DEFINE_float('temperature', 0.8, '0 is greedy.')
_TOP_K = flags.DEFINE_integer('top_k', 0, 'Keep the k most likely tokens (0: all).')
_TOP_P = flags.DEFINE_float('top_p', 1.0, 'Keep the smallest set with this much mass (1: all).')
_SEED = flags.DEFINE_integer('seed', 0, 'Sampling seed.')
_NUM_SAMPLES = flags.DEFINE_integer('num_samples', 1, 'Completions to print.')
_BEAM_SIZE = flags.DEFINE_integer('beam_size', 0, 'Encoder-decoder: beam search with this many '
                                  'beams, printing the --num_samples best (0: sample).')
_LENGTH_PENALTY = flags.DEFINE_float('length_penalty', 0.6, 'Beam search: GNMT length penalty '
                                     'alpha (0: plain log-probability).')


def check_flags() -> None:
  if not _PROMPT.value:
    raise SystemExit('error: --prompt is empty; give some text to continue.')
  if _MAX_NEW.value < 0:
    raise SystemExit(f'error: --max_new_tokens={_MAX_NEW.value} must be >= 0.')
  if _TEMPERATURE.value < 0:
    raise SystemExit(f'error: --temperature={_TEMPERATURE.value} must be >= 0.')
  if not 0 < _TOP_P.value <= 1:
    raise SystemExit(f'error: --top_p={_TOP_P.value} must be in (0, 1].')
  if _NUM_SAMPLES.value < 1:
    raise SystemExit(f'error: --num_samples={_NUM_SAMPLES.value} must be >= 1.')
  if _BEAM_SIZE.value < 0:
    raise SystemExit(f'error: --beam_size={_BEAM_SIZE.value} must be >= 0.')


def sample_encoder_decoder(loaded) -> None:
  """The prompt is the encoder input; prints the targets (samples or the best beams)."""
  try:
    texts = encdec.complete(
        loaded.graphdef, loaded.params, loaded.tokenizer, _PROMPT.value,
        max_len=loaded.config.model.max_len, max_new_tokens=_MAX_NEW.value,
        temperature=_TEMPERATURE.value, top_k=_TOP_K.value, top_p=_TOP_P.value,
        seed=_SEED.value, num_samples=_NUM_SAMPLES.value, beam_size=_BEAM_SIZE.value,
        alpha=_LENGTH_PENALTY.value)
  except ValueError as e:
    raise SystemExit(f'error: --prompt: {e}') from None
  kind = 'beam' if _BEAM_SIZE.value else 'sample'
  for i, text in enumerate(texts):
    print(f'--- {kind} {i} (step {loaded.step}) ---')
    print(text)


def main(argv):
  del argv
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)
  check_flags()
  try:
    opened = open_workdir(_WORKDIR.value)
  except WorkdirError as e:
    raise SystemExit(f'error: {e}') from None
  if opened.config.model.kind == 'encoder_decoder':
    if _CHAT.value:
      raise SystemExit('error: --chat is for decoder-only models; this workdir is an '
                       'encoder-decoder.')
    loaded = restore(opened)
    hostenv.release_free_memory()
    return sample_encoder_decoder(loaded)
  tok = opened.tokenizer
  try:
    text, ids = prompt_ids(tok, _PROMPT.value, chat=_CHAT.value)
  except ValueError as e:
    raise SystemExit(f'error: {e}') from None
  sampler = Sampler(opened.graphdef, opened.abstract, max_len=opened.config.model.max_len,
                    eos_id=tok.eos_id if tok.eos_id >= 0 else None, pad_id=max(tok.pad_id, 0))
  prompts = [ids] * _NUM_SAMPLES.value
  kwargs = dict(max_new_tokens=_MAX_NEW.value, temperature=_TEMPERATURE.value,
                top_k=_TOP_K.value, top_p=_TOP_P.value, seed=_SEED.value)
  try:
    sampler.check(prompts, _MAX_NEW.value, _TEMPERATURE.value, _TOP_K.value, _TOP_P.value)
  except ValueError as e:
    raise SystemExit(f'error: {str(e).replace("prompt 0", "--prompt")}') from None
  # Below f32, the programs are compiled before the parameters are read: compiling's transient
  # (~160 MiB for a 150M Llama) then never adds to them. It keeps ~130 MiB (executables, the
  # compiler's code pages) through the restore, whose own transient grows with the largest
  # parameter: for f32 compiling first raised the peak (1.51x -> 1.61x of the parameters),
  # for bf16 it lowered it (2.38x -> 1.94x; benchmarks/import_memory.py).
  first = all(a.dtype.itemsize < 4 for a in jax.tree.leaves(opened.abstract))
  if first:
    sampler.compile(len(prompts), len(ids), _MAX_NEW.value)
    hostenv.release_free_memory()
  try:
    loaded = restore(opened)
  except WorkdirError as e:
    raise SystemExit(f'error: {e}') from None
  sampler.params = loaded.params
  hostenv.release_free_memory()   # the restore's freed buffers
  if not first:
    sampler.compile(len(prompts), len(ids), _MAX_NEW.value)
    hostenv.release_free_memory()
  if _NUM_SAMPLES.value == 1:
    print(f'--- sample 0 (step {loaded.step}) ---')
    print(text, end='', flush=True)
    for piece in stream_text(tok.decode, sampler.stream(prompts, **kwargs)):
      print(piece, end='', flush=True)
    print()
    return
  for i, new in enumerate(sampler.generate(prompts, **kwargs)):
    print(f'--- sample {i} (step {loaded.step}) ---')
    print(text + tok.decode(new))


if __name__ == '__main__':
  app.run(main)
