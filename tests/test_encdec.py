"""Encoder-decoder against independent references: einsum-softmax cross attention, padding
invariance, span corruption inverted by hand, synthetic answers computed by Python."""
import itertools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import encdec, schema
from models import build_model, layers
from models.config import ModelConfig
from sampling import encdec as encdec_sampling
from training import data as data_lib
from training import loop
from training import seq2seq_data, span_corruption
from training.data import DataError
from text.tokenizer import ByteTokenizer

from tests import conftest

ARCHS = ['modern', 'paper']


def config(variant='addition,tiny', overrides=None):
  return schema.validate(schema.apply_overrides(encdec.get_config(variant), overrides or {}))


def random_tokens(key, shape, vocab=256):
  return jax.random.randint(jax.random.key(key), shape, 0, vocab)


# Whole-model calls compiled as one program: op-by-op (eager) execution compiles every
# primitive at every shape, which cost these tests several times more CPU.
@nnx.jit
def forward(model, sources, targets, rng=None):
  """model(sources [B, S], targets [B, T]) -> logits [B, T, V]."""
  return model(sources, targets, rng=rng)


@nnx.jit
def encode(model, sources):
  return model.encode(sources)


@nnx.jit
def decode_step(decoder, token, position, cache, index, context):
  """One cached decoder step: token [B, 1] -> (logits [B, 1, V], the updated cache)."""
  return decoder(token, position, cache=cache, cache_index=index, context_cache=context)


@pytest.mark.parametrize('num_kv_heads', [1, 2, 4])
def test_cross_attention_equals_einsum_softmax_reference(num_kv_heads):
  cfg = ModelConfig.from_config(config(overrides={'model.num_kv_heads': num_kv_heads}).model)
  attn = layers.Attention(cfg, nnx.Rngs(0), rope=True)   # rope never applies to cross attention
  b, t, s, d = 2, 5, 7, cfg.d_model
  x = np.asarray(jax.random.normal(jax.random.key(1), (b, t, d)))
  ctx = np.asarray(jax.random.normal(jax.random.key(2), (b, s, d)))
  ctx_mask = np.ones((b, s), bool)
  ctx_mask[1, 4:] = False
  got = attn(jnp.asarray(x), jnp.zeros((b, t), jnp.int32), context=jnp.asarray(ctx),
             context_mask=jnp.asarray(ctx_mask))

  w = {n: np.asarray(getattr(attn, n).kernel.value) for n in 'qkvo'}
  group = cfg.num_heads // num_kv_heads
  q = np.einsum('btd,dnh->btnh', x, w['q'])
  k = np.repeat(np.einsum('bsd,dkh->bskh', ctx, w['k']), group, axis=2)
  v = np.repeat(np.einsum('bsd,dkh->bskh', ctx, w['v']), group, axis=2)
  scores = np.einsum('btnh,bsnh->bnts', q, k) / np.sqrt(q.shape[-1])
  scores = np.where(ctx_mask[:, None, None, :], scores, -np.inf)
  probs = np.exp(scores - scores.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  want = np.einsum('btnh,nhD->btD', np.einsum('bnts,bsnh->btnh', probs, v), w['o'])
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)


@pytest.mark.parametrize('arch', ARCHS)
def test_source_padding_changes_nothing(arch):
  """Pad tokens appended to a source change no decoder logit and no encoder output at real
  source positions."""
  cfg = config(f'addition,{arch},tiny')
  model = build_model(cfg, nnx.Rngs(0))
  pad = cfg.model.pad_id
  sources = random_tokens(0, (3, 6))
  sources = sources.at[1, 4:].set(pad)            # rows of different real lengths
  targets = random_tokens(1, (3, 5))
  padded = jnp.concatenate([sources, jnp.full((3, 4), pad, sources.dtype)], axis=1)
  np.testing.assert_allclose(forward(model, padded, targets), forward(model, sources, targets),
                             atol=1e-5)
  enc_a, mask_a = encode(model, sources)
  enc_b, _ = encode(model, padded)
  real = np.asarray(mask_a)
  np.testing.assert_allclose(np.asarray(enc_b[:, :6])[real], np.asarray(enc_a)[real], atol=1e-5)
  # and the pad id really is what is masked: a non-pad token there does change the output
  other = padded.at[:, -1].set((pad + 1) % cfg.model.vocab_size)
  changed = forward(model, other, targets) - forward(model, padded, targets)
  assert float(jnp.max(jnp.abs(changed))) > 1e-5


@pytest.mark.parametrize('arch', ARCHS)
def test_encoder_is_bidirectional_and_decoder_causal(arch):
  model = build_model(config(f'addition,{arch},tiny'), nnx.Rngs(0))
  sources, targets = random_tokens(0, (2, 6)), random_tokens(1, (2, 5))
  base = forward(model, sources, targets)
  later_source = forward(model, sources.at[:, 5].set((sources[:, 5] + 1) % 256), targets)
  assert float(jnp.max(jnp.abs(later_source[:, 0] - base[:, 0]))) > 1e-5
  later_target = forward(model, sources, targets.at[:, 3].set((targets[:, 3] + 1) % 256))
  np.testing.assert_allclose(later_target[:, :3], base[:, :3], atol=1e-6)


def test_one_shared_embedding_table():
  cfg = config()
  params = nnx.state(build_model(cfg, nnx.Rngs(0)), nnx.Param)
  tables = [p for p in jax.tree.leaves(params) if p.shape == (cfg.model.vocab_size,
                                                              cfg.model.d_model)]
  assert len(tables) == 1


def test_config_errors_name_the_field():
  with pytest.raises(schema.ConfigError, match='data.source_len=600 exceeds model.max_len'):
    config(overrides={'data.source_len': 600, 'model.max_len': 512})
  with pytest.raises(schema.ConfigError, match="data.task='lm' is for model.kind=decoder"):
    config(overrides={'data.task': 'lm'})
  with pytest.raises(schema.ConfigError, match='data.files is empty'):
    config('pairs,tiny')
  with pytest.raises(ValueError, match='TASK'):
    encdec.get_config('adition')


# --- data -----------------------------------------------------------------------------------

def reconstruct(inputs, targets, first_sentinel):
  """Independent inverse of span corruption: each sentinel in the inputs is replaced by the
  tokens that follow the same sentinel in the targets."""
  spans, current = {}, None
  for tok in targets:
    if tok >= first_sentinel:
      current = spans.setdefault(int(tok), [])
    else:
      current.append(int(tok))
  out = []
  for tok in inputs:
    out += spans[int(tok)] if tok >= first_sentinel else [int(tok)]
  return out


@pytest.mark.parametrize('n,density,mean', [(2, 0.15, 3.0), (37, 0.15, 3.0), (200, 0.5, 1.0),
                                            (64, 0.3, 8.0)])
def test_span_corruption_inputs_and_targets_reconstruct_the_text(n, density, mean):
  tok = ByteTokenizer()
  rng = np.random.default_rng(n)
  text = rng.integers(0, 256, n).astype(np.int32)
  for seed in range(5):
    inputs, targets = span_corruption.corrupt(
        text, np.random.default_rng(seed), noise_density=density, mean_span_length=mean,
        first_sentinel=tok.first_sentinel)
    assert reconstruct(inputs, targets, tok.first_sentinel) == text.tolist()
    noise, spans = span_corruption.span_counts(n, density, mean)
    assert np.sum(targets < tok.first_sentinel) == noise
    assert np.sum(inputs >= tok.first_sentinel) == spans
    assert (inputs.size + 1, targets.size + 1) == span_corruption.corrupted_lengths(n, density,
                                                                                    mean)


def test_span_corruption_batches_fit_and_reconstruct():
  cfg = config('span,tiny')
  tok = ByteTokenizer()
  data = seq2seq_data.load(cfg, tok)
  batch = next(iter(data.train))
  assert batch['sources'].shape == (4, cfg.data.source_len)
  for row in range(4):
    src = batch['sources'][row]
    tgt = batch['targets'][row][batch['weights'][row] > 0]
    assert src[src != tok.pad_id][-1] == tok.eos_id and tgt[-1] == tok.eos_id
    text = reconstruct(src[src != tok.pad_id][:-1], tgt[:-1], tok.first_sentinel)
    assert len(text) == span_corruption.window_length(
        cfg.data.source_len - 1, cfg.data.seq_len - 1, cfg.data.noise_density,
        cfg.data.mean_span_length, tok.num_sentinels)
    np.testing.assert_array_equal(batch['inputs'][row][1:len(tgt)], tgt[:-1])   # shifted right


@pytest.mark.parametrize('task', ['addition', 'reversal'])
def test_synthetic_task_is_correct_and_held_out(task):
  cfg = config(f'{task},tiny', {'train.batch_size': 8, 'train.eval_batches': 4})
  tok = ByteTokenizer()
  data = seq2seq_data.load(cfg, tok)
  decode = lambda row: tok.decode(row[row < 256])
  held = {decode(s) for b in data.eval for s in b['sources']}
  assert len(held) == 32 and all(data_lib.is_held_out(s, cfg.data.eval_percent) for s in held)
  it = iter(data.train)
  for _ in range(20):
    batch = next(it)
    for src, tgt in zip(batch['sources'], batch['targets']):
      s, t = decode(src), decode(tgt)
      assert not data_lib.is_held_out(s, cfg.data.eval_percent)
      assert t == (str(eval(s)) if task == 'addition' else s[::-1])   # noqa: S307 (digits only)


def write(path, text):
  path.write_text(text)
  return str(path)


def test_pairs_files_jsonl_and_tsv(tmp_path):
  jsonl = write(tmp_path / 'a.jsonl', '\n'.join(
      json.dumps({'source': f'q{i}', 'target': f'answer {i}'}) for i in range(30)) + '\n')
  tsv = write(tmp_path / 'b.tsv', 'hello\tbonjour\n\ncat\tchat\n')
  cfg = config('pairs,tiny', {'data.files': f'{jsonl},{tsv}'})
  tok = ByteTokenizer()
  train, held = seq2seq_data.pair_examples(cfg.data, tok)
  assert len(train) + len(held) == 32 and len(held)
  got = {(tok.decode(e['sources']), tok.decode(e['targets']))
         for e in [train[i] for i in range(len(train))] + [held[i] for i in range(len(held))]}
  assert ('hello', 'bonjour') in got and ('q7', 'answer 7') in got


@pytest.mark.parametrize('name,text,message', [
    ('empty.jsonl', '\n\n', 'no pairs in 1 file'),
    ('bad.jsonl', '{"source": "a"}\n', r"bad.jsonl:1: no field 'target'"),
    ('bad.tsv', 'a\tb\nno tab here\n', r'bad.tsv:2: expected source<TAB>target'),
    ('long.tsv', 'x' * 60 + '\ty\n', r'long.tsv:1: the source is 60 tokens \+ EOS, longer than '
     r'data.source_len=48'),
])
def test_bad_pairs_files(tmp_path, name, text, message):
  cfg = config('pairs,tiny', {'data.files': write(tmp_path / name, text)})
  with pytest.raises(DataError, match=message):
    seq2seq_data.pair_examples(cfg.data, ByteTokenizer())


# --- beam search ----------------------------------------------------------------------------

def exhaustive(logp_fn, n, vocab, eos, alpha):
  """Every output of at most n tokens (ending at its first EOS, or n tokens without one),
  scored log p / lp(len) from teacher-forced log-probabilities, best first."""
  seqs = np.array(list(itertools.product(range(vocab), repeat=n)), np.int32)
  logp = np.asarray(logp_fn(seqs))                          # [M, n, V]: position i given < i
  token_logp = np.take_along_axis(logp, seqs[..., None], -1)[..., 0]
  out = {}
  for seq, tl in zip(seqs, token_logp):
    eos_at = np.flatnonzero(seq == eos)
    length = int(eos_at[0]) + 1 if eos_at.size else n
    key = tuple(seq[:length])
    if key not in out:
      out[key] = tl[:length].sum() / ((5 + length) / 6) ** alpha
  return sorted(out.items(), key=lambda kv: -kv[1])


@pytest.mark.parametrize('alpha', [0.0, 0.6, 2.0])
def test_beam_search_with_room_for_every_candidate_equals_exhaustive_search(alpha):
  """Tiny vocabulary (6 ids incl. BOS, EOS and pad), 4 steps: 781 candidate outputs."""
  n, vocab, bos, eos, pad = 4, 6, 4, 3, 5
  cfg = config(overrides={'model.vocab_size': vocab, 'model.pad_id': pad})
  model = build_model(cfg, nnx.Rngs(3))
  graphdef, params = nnx.split(model, nnx.Param)
  sources = jnp.asarray([[0, 1, 2, 1, pad], [2, 2, 0, pad, pad]], jnp.int32)
  width = sum((vocab - 1) ** k for k in range(n)) + (vocab - 1) ** n
  seqs, scores, lengths = encdec_sampling.beam_search_reference(
      graphdef, params, sources, beam_size=width, max_len=n, bos_id=bos, eos_id=eos, alpha=alpha)
  for row in range(2):
    def logp_fn(targets, row=row):
      inputs = np.concatenate([np.full((len(targets), 1), bos), targets[:, :-1]], 1)
      src = jnp.repeat(sources[row:row + 1], len(targets), axis=0)
      return jax.nn.log_softmax(forward(model, src, jnp.asarray(inputs)), axis=-1)
    want = exhaustive(logp_fn, n, vocab, eos, alpha)
    assert len(want) == width
    got = [(tuple(np.asarray(s)[:l].tolist()), float(sc))
           for s, sc, l in zip(seqs[row], scores[row], lengths[row])]
    assert [g[0] for g in got[:20]] == [w[0] for w in want[:20]]
    np.testing.assert_allclose([g[1] for g in got], [w[1] for w in want], rtol=1e-4, atol=1e-4)


def test_narrow_beam_stops_early_and_keeps_its_best():
  """A 2-wide beam returns sorted, finite hypotheses that score what the model says."""
  cfg = config()
  model = build_model(cfg, nnx.Rngs(0))
  graphdef, params = nnx.split(model, nnx.Param)
  sources = random_tokens(0, (2, 6))
  seqs, scores, lengths = encdec_sampling.beam_search_reference(
      graphdef, params, sources, beam_size=2, max_len=5, bos_id=257, eos_id=258, alpha=0.6)
  assert np.all(np.isfinite(scores)) and np.all(np.diff(np.asarray(scores), axis=1) <= 0)
  inputs = jnp.concatenate([jnp.full((2, 1), 257), seqs[:, 0, :-1]], 1)
  logp = jax.nn.log_softmax(forward(model, sources, inputs), -1)
  token_logp = jnp.take_along_axis(logp, seqs[:, 0, :, None], -1)[..., 0]
  for row in range(2):
    l = int(lengths[row, 0])
    want = float(jnp.sum(token_logp[row, :l])) / ((5 + l) / 6) ** 0.6
    assert float(scores[row, 0]) == pytest.approx(want, rel=1e-4)


# --- CLIs -----------------------------------------------------------------------------------

def run_cli(*args):
  return conftest.run_cli(*args, timeout=600)


@pytest.mark.slow
def test_train_eval_sample_and_errors_through_the_clis(tmp_path):
  workdir = str(tmp_path / 'run')
  train = run_cli('train.py', '--config=configs/encdec.py:reversal,tiny', f'--workdir={workdir}')
  assert train.returncode == 0, train.stderr
  assert 'Held-out exact match' in train.stdout
  with open(f'{workdir}/metrics.jsonl') as f:
    evals = [m for m in map(json.loads, f) if 'eval_exact_match' in m]
  assert [m['step'] for m in evals] == [3, 6] and 0 <= evals[-1]['eval_exact_match'] <= 1
  greedy = run_cli('sample.py', f'--workdir={workdir}', '--prompt=abc', '--temperature=0',
                   '--max_new_tokens=5')
  assert greedy.returncode == 0, greedy.stderr
  assert greedy.stdout.count('--- sample') == 1
  beams = run_cli('sample.py', f'--workdir={workdir}', '--prompt=abc', '--beam_size=3',
                  '--num_samples=2', '--max_new_tokens=5')
  assert beams.returncode == 0, beams.stderr
  assert beams.stdout.count('--- beam') == 2
  too_long = run_cli('sample.py', f'--workdir={workdir}', '--prompt=' + 'x' * 200)
  assert too_long.returncode != 0
  assert 'the source is 200 tokens + EOS, longer than the model maximum model.max_len=128' in (
      too_long.stderr)
  other_vocab = run_cli('train.py', '--config=configs/encdec.py:reversal,tiny',
                        f'--workdir={workdir}', '--config.model.vocab_size=512')
  assert other_vocab.returncode != 0
  assert 'model.vocab_size: 384 -> 512' in other_vocab.stderr
  with open(f'{workdir}/config.json') as f:
    saved = json.load(f)
  saved['model']['vocab_size'] = 512
  with open(f'{workdir}/config.json', 'w') as f:
    json.dump(saved, f)
  edited = run_cli('sample.py', f'--workdir={workdir}', '--prompt=abc')
  assert edited.returncode != 0
  assert ('checkpoint parameter decoder.embed.embedding has shape (384, 32) but the config gives '
          '(512, 32) (model.vocab_size=512, the checkpoint has 384)') in edited.stderr


# --- cached decoding ------------------------------------------------------------------------

@pytest.mark.parametrize('arch', ARCHS)
def test_cached_decode_logits_equal_full_forward(arch):
  """Encoder once, cross K/V once, one target token a step through the KV cache == the
  teacher-forced forward pass over the whole target."""
  cfg = config(f'addition,{arch},tiny')
  model = build_model(cfg, nnx.Rngs(0))
  pad = cfg.model.pad_id
  sources = random_tokens(0, (2, 7)).at[1, 5:].set(pad)
  targets = random_tokens(1, (2, 6))
  full = forward(model, sources, targets)
  decoder = model.decoder
  context = decoder.context_caches(*model.encode(sources))
  cache = decoder.init_cache(2, 6)
  for i in range(6):
    logits, cache = decode_step(decoder, targets[:, i:i + 1], jnp.full((2, 1), i), cache,
                                jnp.int32(i), context)
    np.testing.assert_allclose(logits[:, 0], full[:, i], atol=2e-5, err_msg=f'step {i}')


@pytest.mark.parametrize('arch', ARCHS)
def test_cached_greedy_and_beam_equal_the_reference(arch):
  cfg = config(f'addition,{arch},tiny')
  model = build_model(cfg, nnx.Rngs(1))
  graphdef, params = nnx.split(model, nnx.Param)
  sources = random_tokens(2, (3, 7)).at[2, 3:].set(cfg.model.pad_id)
  kw = dict(bos_id=257)
  ref = encdec_sampling.generate_reference(graphdef, params, sources, jax.random.key(0),
                                           max_new_tokens=6, **kw)
  got = encdec_sampling.generate(graphdef, params, sources, jax.random.key(0), max_new_tokens=6,
                                 eos_id=258, **kw)
  for r, g in zip(np.asarray(ref), np.asarray(got)):   # equal up to and including the first EOS
    end = int(np.flatnonzero(r == 258)[0]) + 1 if np.any(r == 258) else r.size
    np.testing.assert_array_equal(g[:end], r[:end])
  kw = dict(beam_size=3, max_len=5, bos_id=257, eos_id=258, alpha=0.6)
  for a, b in zip(encdec_sampling.beam_search_reference(graphdef, params, sources, **kw),
                  encdec_sampling.beam_search(graphdef, params, sources, **kw)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


def test_synthetic_lengths_must_fit():
  with pytest.raises(schema.ConfigError,
                     match='data.synthetic_length=5 needs data.source_len >= 12'):
    config(overrides={'data.synthetic_length': 5})


# --- dropout --------------------------------------------------------------------------------

def test_dropout_formula():
  x = jnp.ones((200_000,))
  y = np.asarray(layers.dropout(x, 0.25, jax.random.key(0)))
  np.testing.assert_allclose(np.unique(y), [0.0, 1 / 0.75], rtol=1e-6)
  assert abs(np.mean(y == 0) - 0.25) < 0.005           # P(drop) = rate
  assert layers.dropout(x, 0.25, None) is x


@pytest.mark.parametrize('arch', ARCHS)
def test_dropout_only_with_a_training_key(arch):
  model = build_model(config(f'addition,{arch},tiny', {'model.dropout': 0.3}), nnx.Rngs(0))
  plain = build_model(config(f'addition,{arch},tiny'), nnx.Rngs(0))
  assert model.uses_rng and not plain.uses_rng
  sources, targets = random_tokens(0, (2, 6)), random_tokens(1, (2, 5))
  np.testing.assert_allclose(forward(model, sources, targets), forward(plain, sources, targets),
                             atol=1e-6)
  a = forward(model, sources, targets, jax.random.key(1))
  np.testing.assert_array_equal(a, forward(model, sources, targets, jax.random.key(1)))
  assert float(jnp.max(jnp.abs(a - forward(plain, sources, targets)))) > 1e-3
  assert float(jnp.max(jnp.abs(a - forward(model, sources, targets, jax.random.key(2))))) > 1e-3


def test_train_step_draws_dropout_from_the_state_rng():
  """The step's loss is the model's loss under key fold_in(state rng, step): recomputed here."""
  cfg = config('reversal,tiny', {'model.dropout': 0.3})
  s = loop.setup(cfg)
  state = s.init_state()
  batch = next(iter(seq2seq_data.load(cfg, ByteTokenizer()).train))
  model = nnx.merge(s.graphdef, state.params)
  key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), 0)
  loss_sum, weight_sum = nnx.jit(loop.model_loss)(model, batch, key)
  no_drop = nnx.jit(loop.model_loss)(model, batch)
  _, metrics = s.train_step(state, batch)
  assert float(metrics['loss']) == pytest.approx(float(loss_sum / weight_sum), rel=1e-5)
  assert abs(float(metrics['loss']) - float(no_drop[0] / no_drop[1])) > 1e-4
