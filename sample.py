"""Sample from a trained workdir: python sample.py --workdir=DIR --prompt=TEXT [--temperature ...]."""
from training import hostenv

hostenv.ensure_fast_malloc()

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

from sampling.load import load_workdir
from sampling.reference import generate_reference
from training.checkpoint import WorkdirError

_WORKDIR = flags.DEFINE_string('workdir', None, 'A training workdir.', required=True)
_PROMPT = flags.DEFINE_string('prompt', None, 'Text to continue.', required=True)
_MAX_NEW = flags.DEFINE_integer('max_new_tokens', 200, 'Tokens to generate per sample.')
_TEMPERATURE = flags.DEFINE_float('temperature', 0.8, '0 is greedy.')
_TOP_K = flags.DEFINE_integer('top_k', 0, 'Keep the k most likely tokens (0: all).')
_TOP_P = flags.DEFINE_float('top_p', 1.0, 'Keep the smallest set with this much mass (1: all).')
_SEED = flags.DEFINE_integer('seed', 0, 'Sampling seed.')
_NUM_SAMPLES = flags.DEFINE_integer('num_samples', 1, 'Completions to print.')


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


def main(argv):
  del argv
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)
  check_flags()
  try:
    loaded = load_workdir(_WORKDIR.value)
  except WorkdirError as e:
    raise SystemExit(f'error: {e}') from None
  tok = loaded.tokenizer
  prompt = tok.encode(_PROMPT.value)
  max_len = loaded.config.model.max_len
  if prompt.size + _MAX_NEW.value > max_len:
    raise SystemExit(f'error: prompt ({prompt.size} tokens) + --max_new_tokens={_MAX_NEW.value} '
                     f'exceeds the model maximum length model.max_len={max_len}.')
  prompts = jnp.asarray(np.tile(prompt[None], (_NUM_SAMPLES.value, 1)), jnp.int32)
  out = generate_reference(loaded.graphdef, loaded.params, prompts, jax.random.key(_SEED.value),
                           max_new_tokens=_MAX_NEW.value, temperature=_TEMPERATURE.value,
                           top_k=_TOP_K.value, top_p=_TOP_P.value)
  for i, row in enumerate(np.asarray(out)):
    new = row[prompt.size:]
    stop = np.flatnonzero(new == tok.eos_id)
    new = new[:stop[0]] if stop.size else new
    print(f'--- sample {i} (step {loaded.step}) ---')
    print(_PROMPT.value + tok.decode(new))


if __name__ == '__main__':
  app.run(main)
