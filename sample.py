"""Sample from a trained workdir: python sample.py --workdir=DIR --prompt=TEXT [--temperature ...].

Uses the cached sampler (sampling/sampler.py); one sample is printed as it is generated.

A decoder's programs are compiled in a child process (this command again, with
--save_programs) before this process imports JAX; this process then restores the parameters
and loads the programs, tracing and compiling nothing. Compiling a 150M model passes through
~0.3 GB and keeps ~0.14 GB (compiler heap, code pages) in the process that compiles; that way it
never adds to the parameters (benchmarks/import_memory.py: peak RSS of a bf16 workdir 1.88x its
parameter bytes compiling here, 1.40x with the child).
"""
from workdir import hostenv

hostenv.ensure_fast_malloc('sample')

import os
import subprocess
import sys
import tempfile

from absl import app, flags, logging

from workdir.files import WorkdirError, load_config

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
_COMPILE_IN_CHILD = flags.DEFINE_bool('compile_in_child', True, 'Decoders: compile in a child '
                                      'process first (see the module docstring); false: here, '
                                      'after restoring the parameters.')
_SAVE_PROGRAMS = flags.DEFINE_string('save_programs', None, 'Compile the programs this request '
                                     'runs, write them to this file and exit (the child of '
                                     '--compile_in_child).')
BAD_INPUT = 3   # exit code of a --save_programs child that met bad input (reported by the parent)


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
  from sampling import encdec
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


def compile_in_child(folder: str) -> str | None:
  """Runs this command with --save_programs in a child process: the programs' file, or None
  when the child met bad input (this process reports it) or failed (a warning; this process
  then compiles)."""
  path = os.path.join(folder, 'programs.pkl')
  r = subprocess.run([sys.executable, *sys.orig_argv[1:], f'--save_programs={path}',
                      '--nocompile_in_child'], capture_output=True, text=True)
  if r.returncode == 0 and os.path.isfile(path):
    return path
  if r.returncode != BAD_INPUT:
    last = (r.stderr.strip().splitlines() or [f'exit code {r.returncode}'])[-1]
    print(f'warning: compiling in a child process failed ({last}); compiling here instead.',
          file=sys.stderr)
  return None


def is_decoder(workdir: str) -> bool:
  try:
    return load_config(workdir).model.kind != 'encoder_decoder'
  except (WorkdirError, ValueError):   # reported when the workdir is opened
    return False


def main(argv):
  del argv
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)
  check_flags()
  if _SAVE_PROGRAMS.value:
    # Set before JAX is imported: no programs from the persistent cache (Sampler.save_compiled).
    os.environ['JAX_ENABLE_COMPILATION_CACHE'] = 'false'
    try:
      return run(None)
    except SystemExit as e:
      if isinstance(e.code, str):
        print(e.code, file=sys.stderr)
        sys.exit(BAD_INPUT)
      raise
  with tempfile.TemporaryDirectory(prefix='lmx-programs-') as folder:
    child = _COMPILE_IN_CHILD.value and is_decoder(_WORKDIR.value)
    run(compile_in_child(folder) if child else None)


def run(programs: str | None) -> None:
  """Samples as the flags ask; `programs`: the file of a --save_programs child (None: compile
  here). With --save_programs: only compiles and writes them."""
  # JAX is imported only now, after the child compiled (see the module docstring).
  from sampling.sampler import Sampler, stream_text
  from text.chat import prompt_ids
  from workdir.load import open_workdir, restore
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
  if _SAVE_PROGRAMS.value:   # against the abstract parameters: nothing is restored
    sampler.compile(len(prompts), len(ids), _MAX_NEW.value)
    return sampler.save_compiled(_SAVE_PROGRAMS.value)
  try:
    loaded = restore(opened)
  except WorkdirError as e:
    raise SystemExit(f'error: {e}') from None
  sampler.params = loaded.params
  hostenv.release_free_memory()   # the restore's freed buffers
  if programs:   # deserialized as the request reaches each, one at a time
    sampler.load_compiled(programs)
    logging.info('sampling with the programs compiled in a child process')
  else:
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
