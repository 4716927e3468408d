"""Benchmark evaluation through lm-eval-harness (evals/, evaluate.py).

The reference is lm-eval's own Hugging Face backend (HFLM) on the same tiny random Llama and
tokenizer, imported into a workdir: the shipped tasks (multiple choice, rolling perplexity,
generate-until) give the same log-likelihood per request (<= 1e-4) and the same greedy texts.
The batched scorer is also held to an unbatched forward pass (decoder and encoder-decoder).
"""
import functools
import json
import os

os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('TRANSFORMERS_VERBOSITY', 'error')

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from flax import nnx  # noqa: E402

lm_eval = pytest.importorskip('lm_eval')
from lm_eval.api.instance import Instance  # noqa: E402

from configs import encdec as encdec_configs, schema  # noqa: E402
from evals import harness  # noqa: E402
from evals.lm_eval_adapter import LmxLM  # noqa: E402
from models import build_model  # noqa: E402
from sampling.sampler import Sampler  # noqa: E402
from text.tokenizer import ByteTokenizer  # noqa: E402
from workdir.load import Loaded, load_workdir  # noqa: E402
from tests.conftest import run_cli  # noqa: E402

ATOL = 1e-4
TASKS = ['lmx_python']   # the tag of the three shipped tasks


@pytest.fixture(scope='module')
def llama(tmp_path_factory):
  """(transformers model, its tokenizer, our workdir imported from the saved folder)."""
  hf_models = pytest.importorskip('tests.hf_models')
  pytest.importorskip('accelerate')   # lm-eval's HF backend imports it
  import transformers
  from interop.convert import import_hf
  folder = str(tmp_path_factory.mktemp('hf_llama'))
  model = hf_models.make_hf_model('llama')   # max_position_embeddings 128: rolling windows
  model.save_pretrained(folder)
  hf_models.write_tokenizer(folder, 'post_processor')   # adds BOS, as Llama 3's does
  workdir = str(tmp_path_factory.mktemp('wd_llama') / 'run')
  import_hf(folder, workdir)
  return model, transformers.AutoTokenizer.from_pretrained(folder), workdir


def _evaluate(lm, manager):
  return lm_eval.simple_evaluate(model=lm, tasks=TASKS, task_manager=manager, log_samples=True,
                                 bootstrap_iters=0)


def _responses(results):
  """{(task, doc_id, k): response} of every request, from the logged samples."""
  return {(task, s['doc_id'], k): r[0] for task, samples in results['samples'].items()
          for s in samples for k, r in enumerate(s['resps'])}


def test_matches_lm_eval_hf_backend(llama):
  from lm_eval.models.huggingface import HFLM
  model, tokenizer, workdir = llama
  manager = harness.task_manager(TASKS)
  ours_lm = LmxLM(load_workdir(workdir), batch_size=8)
  ours = _responses(_evaluate(ours_lm, manager))
  ref = _responses(_evaluate(HFLM(pretrained=model, tokenizer=tokenizer, batch_size=4), manager))
  assert ours.keys() == ref.keys()
  kinds = {'lmx_python_choice': 0, 'lmx_python_text': 0, 'lmx_python_complete': 0}
  worst = 0.0
  for key, want in ref.items():
    got = ours[key]
    kinds[key[0]] += 1
    if isinstance(want, str):           # generate_until: the same greedy text
      assert got == want, key
    elif isinstance(want, tuple):       # loglikelihood: (log-probability, is_greedy)
      assert got[1] == want[1], key
      worst = max(worst, abs(got[0] - want[0]))
    else:                               # loglikelihood_rolling: the text's log-probability
      worst = max(worst, abs(got - want))
  assert worst <= ATOL, worst
  assert min(kinds.values()) >= 4, kinds
  # The comparison means something: texts longer than a window, varied non-empty generations.
  texts = [json.loads(line)['text'] for line in open(
      os.path.join(harness.LOCAL_TASKS, 'python_text.jsonl'))]
  assert max(len(ours_lm.tok_encode(t)) for t in texts) > 2 * ours_lm.max_length
  generations = [v for k, v in ours.items() if k[0] == 'lmx_python_complete']
  assert all(generations) and len(set(generations)) > 4
  # Fixed length buckets: a handful of compiled shapes for 60-odd requests and windows.
  assert ours_lm.scorer.shapes <= {(8, 32), (8, 64), (8, 128)}, ours_lm.scorer.shapes


@functools.partial(jax.jit, static_argnames='graphdef')
def _forward(graphdef, params, *tokens):
  """The model's logits for one row (jitted: eager dispatch is slower than compiling)."""
  return nnx.merge(graphdef, params)(*tokens)


def _log_softmax(logits):
  logits = np.asarray(logits, np.float64)
  top = logits.max(-1, keepdims=True)
  return logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))


def _reference_logp(graphdef, params, inputs, targets):
  """Unbatched: sum of log p(targets | inputs) in float64, and whether each was the argmax."""
  tokens = jnp.asarray([list(inputs) + list(targets)[:-1]], jnp.int32)
  logp = _log_softmax(_forward(graphdef, params, tokens)[0])[-len(targets):]
  return (float(logp[np.arange(len(targets)), targets].sum()),
          bool(np.all(logp.argmax(-1) == targets)))


def test_scores_and_greedy_flags_match_an_unbatched_forward(llama):
  loaded = load_workdir(llama[2])
  lm = LmxLM(loaded, batch_size=8)   # test_matches_lm_eval_hf_backend's (8, 32) scorer program
  context = [int(t) for t in loaded.tokenizer.encode('the quick brown fox', True)]
  greedy = [int(t) for t in Sampler(loaded.graphdef, loaded.params, max_len=128).generate(
      [context], max_new_tokens=6, temperature=0.0)[0]]
  requests = [(context, greedy), (context, greedy[:-1] + [(greedy[-1] + 1) % 100]),
              (context[:2], greedy[:3]), (context, greedy[:1])]
  got = lm.scorer.score(requests)
  for (inputs, targets), (logp, is_greedy) in zip(requests, got):
    want_logp, want_greedy = _reference_logp(loaded.graphdef, loaded.params, inputs, targets)
    assert abs(logp - want_logp) <= ATOL and is_greedy == want_greedy
  assert [g for _, g in got] == [True, False, False, True]


def test_encoder_decoder_loglikelihood_and_refusals():
  """The context is the encoder input (+ EOS), the continuation the decoder's targets."""
  config = schema.validate(encdec_configs.get_config('reversal,tiny'))
  # rbg keys: the initialisation compiles in half the CPU time of threefry's (any weights do).
  rngs = nnx.Rngs(jax.random.key(0, impl='rbg'))
  graphdef, params = nnx.split(build_model(config, rngs), nnx.Param)
  tok = ByteTokenizer()
  lm = LmxLM(Loaded(config, graphdef, params, tok, 0), batch_size=4)
  pairs = [('abc', 'cba'), ('hello', ' olleh'), ('x', 'x'), ('a b', 'b a')]
  got = lm.loglikelihood([Instance('loglikelihood', {}, pair, k) for k, pair in enumerate(pairs)],
                         disable_tqdm=True)
  for (context, continuation), (logp, _) in zip(pairs, got):
    source = np.append(tok.encode(context), tok.eos_id)[None]
    target = tok.encode(continuation)
    inputs = np.append(tok.bos_id, target[:-1])[None]
    logp_ref = _log_softmax(
        _forward(graphdef, params, jnp.asarray(source), jnp.asarray(inputs))[0])
    assert abs(logp - float(logp_ref[np.arange(len(target)), target].sum())) <= ATOL
  for kind in ('generate_until', 'loglikelihood_rolling'):
    with pytest.raises(ValueError, match=f"model.kind='encoder_decoder'.*not {kind}"):
      lm.check_output_types(['loglikelihood', kind])


def test_unknown_task_is_one_error_before_the_workdir_is_read():
  import evaluate
  from absl import flags
  argv = ['evaluate.py', '--workdir=/nonexistent/run', '--tasks=lmx_python_choice,lmx_pyton']
  flags.FLAGS(argv)
  try:
    with pytest.raises(SystemExit) as e:
      evaluate.main(argv)
  finally:
    flags.FLAGS.unparse_flags()
  message = str(e.value)
  assert message.startswith("error: --tasks: unknown lm-eval task 'lmx_pyton' (did you mean "
                            "'lmx_python'?)"), message
  assert 'lm-eval ls tasks' in message and harness.LOCAL_TASKS in message
  assert '\n' not in message


def test_cli_evaluates_a_trained_workdir(trained, tmp_path):
  _, workdir = trained
  out = tmp_path / 'results.json'
  r = run_cli('evaluate.py', f'--workdir={workdir}', '--tasks=lmx_python_choice,lmx_python_text',
              '--limit=3', '--batch_size=4', f'--output={out}')
  assert r.returncode == 0, r.stderr[-3000:]
  assert 'lmx_python_choice' in r.stdout and 'bits_per_byte' in r.stdout
  results = json.loads(out.read_text())
  assert set(results['results']) == {'lmx_python_choice', 'lmx_python_text'}
  assert 0 <= results['results']['lmx_python_choice']['acc,none'] <= 1
  assert results['results']['lmx_python_text']['bits_per_byte,none'] > 0
  assert results['config']['model_kind'] == 'decoder' and results['config']['step'] == 20
